"""Signed server records in a real swarm: a peer that breaks the rules can neither write records for another peer
nor publish malformed ones; the bootstrap node and the peers refuse them, and readers drop what slips through."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hivemind
import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time

from swarm.client._sync import run_sync
from swarm.dht import start_dht
from swarm.directory import read_swarm_view
from swarm.protocol import ServerInfo, block_key, model_prefix_for
from swarm.signed_records import ServerRecordValidator, _server_record_peer_id, peer_identity
from swarm.testing import LOOPBACK, LocalSwarm

pytestmark = pytest.mark.slow

NUM_BLOCKS = 2


class _Forger(ServerRecordValidator):
    """A rule breaker: signs every server record it writes with its own key, whoever the record names, and
    accepts anything into its own storage."""

    def validate(self, record: DHTRecord) -> bool:
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        self._peer_id = _named_peer(record)  # claim to be whoever the subkey names
        return super().sign_value(record)


class _RawReader(ServerRecordValidator):
    """Shows what the storage nodes hold: strips signatures, drops nothing."""

    def validate(self, record: DHTRecord) -> bool:
        return True


def _named_peer(record: DHTRecord) -> str | None:
    return _server_record_peer_id(record.subkey)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:  # type: ignore[no-untyped-def]
    return tiny_model_dir("llama", NUM_BLOCKS)


@pytest.fixture(scope="module")
def local_swarm(model_dir, make_swarm) -> LocalSwarm:  # type: ignore[no-untyped-def]
    return make_swarm(model_dir, [(0, NUM_BLOCKS)])


@pytest.fixture
def dhts() -> Iterator[list[hivemind.DHT]]:
    started: list[hivemind.DHT] = []
    try:
        yield started
    finally:
        for dht in started:
            dht.shutdown()


def test_forged_and_malformed_records_are_refused_and_never_reach_routing(local_swarm, model_dir, dhts) -> None:  # type: ignore[no-untyped-def]
    prefix = model_prefix_for(str(model_dir))
    honest = start_dht(local_swarm.initial_peers, client_mode=True)
    dhts.append(honest)
    (victim,) = run_sync(read_swarm_view(honest, prefix, NUM_BLOCKS)).spans
    identity = peer_identity(None)
    try:
        forger = hivemind.DHT(
            initial_peers=local_swarm.initial_peers, host_maddrs=[LOOPBACK], identity_path=str(identity.path),
            check_if_identity_free=False, record_validators=[_Forger(identity.private_key_der)], start=True,
        )  # fmt: skip
    finally:
        identity.discard()
    dhts.append(forger)
    expiration = get_dht_time() + 120  # later than the genuine record's: it would win if it were stored
    inflated = ServerInfo.from_wire({**victim.info.to_wire(), "throughput": 1e9})
    malformed = {**victim.info.to_wire(), "start": 1, "end": 0}
    own = ServerInfo.from_wire({**victim.info.to_wire(), "start": 0, "end": 1})

    forger.store(block_key(prefix, 0), inflated.to_wire(), expiration, subkey=victim.peer_id)
    forger.store(block_key(prefix, 1), malformed, expiration, subkey=identity.peer_id)
    assert forger.store(block_key(prefix, 0), own.to_wire(), expiration, subkey=identity.peer_id)
    forger.shutdown()  # from here on only the honest nodes' storage answers
    dhts.remove(forger)

    reader = hivemind.DHT(
        initial_peers=local_swarm.initial_peers, host_maddrs=[LOOPBACK], client_mode=True,
        record_validators=[_RawReader()], start=True,
    )  # fmt: skip
    dhts.append(reader)
    stored = {key: reader.get(block_key(prefix, key), latest=True) for key in range(NUM_BLOCKS)}
    assert identity.peer_id in stored[0].value, "the forger's own, well-formed record is stored: the path works"
    assert stored[0].value[victim.peer_id].value["throughput"] == victim.info.throughput
    assert identity.peer_id not in stored[1].value, "the malformed record was refused"
    view = run_sync(read_swarm_view(honest, prefix, NUM_BLOCKS))
    assert {span.peer_id: span.info for span in view.spans}[victim.peer_id] == victim.info
