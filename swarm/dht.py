"""`start_dht`: a hivemind DHT that checks server records' signatures and whose forked process leaves Ctrl-C to
its owner.

Ctrl-C in a terminal sends SIGINT to the whole process group. If the DHT process died with its owner, the owner
could no longer announce itself offline on the way out; so the DHT process ignores SIGINT (hivemind's choice; we
hold SIGINT back while it forks, until it has) and the owner shuts it down with `dht.shutdown()`, which also stops
its `p2pd`.
SIGTERM stays deliverable: hivemind's own hard shutdown of a stuck DHT process relies on it.

p2pd binds with SO_REUSEPORT, so two processes on one fixed port would both start and silently split incoming
connections; `LIBP2P_TCP_REUSEPORT=false` (unless set otherwise) makes the second one fail to start instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import hivemind
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

from swarm.errors import ConfigError
from swarm.signed_records import ServerRecordValidator
from swarm.swarm_key import SwarmKey, SwarmKeyAuthorizer

_OWNER_SIGNALS = (signal.SIGINT,)


def start_dht(
    initial_peers: Sequence[str],
    *,
    signing_key: bytes | None = None,
    swarm_key: SwarmKey | None = None,
    **kwargs: Any,
) -> hivemind.DHT:
    """A started DHT node that validates server records (swarm/signed_records.py); with `signing_key` (a peer's
    RSA identity key, DER) it signs its own. With `swarm_key` it talks only to members of that private swarm
    (swarm/swarm_key.py)."""
    os.environ.setdefault("LIBP2P_TCP_REUSEPORT", "false")  # read by the p2pd the DHT starts
    validators = [ServerRecordValidator(signing_key)]
    authorizer = None if swarm_key is None else SwarmKeyAuthorizer(swarm_key)
    with _ctrl_c_held() as held:
        try:
            dht = hivemind.DHT(
                initial_peers=list(initial_peers),
                start=True,
                record_validators=validators,
                authorizer=authorizer,
                **kwargs,
            )
        except P2PDaemonError as e:
            raise ConfigError(f"could not join the swarm through --initial-peers {' '.join(initial_peers)}: {e}") from e
        except RuntimeError as e:
            if "bootstrap failed" not in str(e):
                raise
            hint = (
                " (is --swarm-key this swarm's key?)"
                if swarm_key is not None
                else (" (are they running? a private swarm answers only members: pass its --swarm-key)")
            )
            raise ConfigError(
                f"could not join the swarm: none of --initial-peers {' '.join(initial_peers)} answered{hint}"
            ) from e
    if held:  # Ctrl-C came while the DHT started: stop it cleanly, then take the Ctrl-C as it came
        dht.shutdown()
        signal.raise_signal(held[0])
    return dht


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[list[int]]:
    """Hold Ctrl-C back while hivemind forks and starts the DHT's process, and list what came.

    The forked process inherits our handlers until hivemind ignores Ctrl-C there (its owner stops it), and a Ctrl-C
    that reached it first would kill it with a traceback. Merely ignoring Ctrl-C meanwhile would lose one meant for
    us: a demo stopped while its client joins the swarm would go on to the end."""
    held: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in _OWNER_SIGNALS}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:  # an ignored Ctrl-C (a background job) stays ignored, and is not held
            signal.signal(signum, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
