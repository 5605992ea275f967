"""`asyncio_timeout`: `asyncio.timeout` on Python >= 3.11, an equivalent on 3.10."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

if sys.version_info >= (3, 11):
    asyncio_timeout = asyncio.timeout
else:

    @contextlib.asynccontextmanager
    async def asyncio_timeout(delay: float | None) -> AsyncIterator[None]:
        """Cancel the enclosed block after `delay` seconds and raise TimeoutError, like asyncio.timeout."""
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        timed_out = False

        def cancel() -> None:
            nonlocal timed_out
            timed_out = True
            task.cancel()

        handle = loop.call_later(delay, cancel) if delay is not None else None
        try:
            yield
        except asyncio.CancelledError:
            if timed_out:
                raise TimeoutError from None
            raise
        finally:
            if handle is not None:
                handle.cancel()
