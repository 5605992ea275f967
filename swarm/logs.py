"""Logging set-up for entry points only; library modules just call `logging.getLogger(__name__)`."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys

FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | int | None = None) -> None:
    """Log to stderr at `level` (default: $BLOCKSWARM_LOG_LEVEL or INFO) and quiet chatty dependencies. SIGUSR1
    prints every thread's stack to stderr (`kill -USR1 PID`: where a stuck process is), and the process goes on."""
    level = level or os.environ.get("BLOCKSWARM_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level, format=FORMAT, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    with contextlib.suppress(AttributeError, OSError, RuntimeError, ValueError):  # a stderr without a file descriptor
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    for noisy in ("hivemind", "transformers", "urllib3", "filelock", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def short_id(peer_id: object) -> str:
    """The last 6 characters of a peer id, as in route logs."""
    return "…" + str(peer_id)[-6:]
