"""Fixtures shared by every test module."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import hypothesis  # noqa: F401  # see below
import pytest

from swarm.demo_model import ensure_demo_model

# hypothesis is imported here, while only the main thread runs. Its pytest plugin would otherwise import it at the
# end of a run that used none of it, and pytest parses the modules it rewrites with `ast.parse`. In CPython 3.11,
# the AST converter's depth counter is shared by all threads (python/cpython#106905), and another thread that
# parses at that moment (formatting a traceback does) made such a run crash in its summary with "AST constructor
# recursion depth mismatch".


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device", default="cpu", help="where tests/swarm/test_device_swarm.py runs everything: cpu (default), cuda"
    )
    parser.addoption("--dtype", default="auto", help="its dtype: auto (bfloat16 on cuda, float32 on cpu), float16, ...")


@pytest.fixture(scope="session", autouse=True)
def _main_thread_event_loop() -> Iterator[None]:
    """hivemind's MPFuture calls `asyncio.get_event_loop()`, which on the main thread creates a loop when a DHT is
    started from synchronous code (as a client is). Own that loop for the whole session and close it at the end,
    so it is neither dropped half-way nor reported as leaked. Tests run coroutines on loops of their own."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    asyncio.set_event_loop(None)
    loop.close()


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shipped demo model, read by the tests that need a trained model with a tokenizer."""
    return ensure_demo_model(tmp_path_factory.mktemp("demo") / "demo-model")
