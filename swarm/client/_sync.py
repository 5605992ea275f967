"""One event-loop thread per process for synchronous callers (`generate`, `model(...)`, the CLI).

hivemind's P2P objects belong to the loop that created them, so every coroutine of the client runs here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")
_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def client_loop() -> asyncio.AbstractEventLoop:
    """The process's client loop, started on first use in a daemon thread."""
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="blockswarm-client-loop", daemon=True).start()
        return _loop


def run_sync(coroutine: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
    """Run `coroutine` on the client loop and wait for its result from a synchronous caller."""
    loop = client_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        raise RuntimeError("run_sync was called from the client loop itself; await the coroutine instead")
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)
