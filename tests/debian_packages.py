"""Debian packages some tests need (Prometheus, Chromium), installed on first use where the tests run as root.

Elsewhere, or when apt-get fails, the calling test is skipped with a message naming the package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

import pytest


def require_debian_package(package: str, find: Callable[[], str | None], timeout: float = 600.0) -> str:
    """What `find()` returns (a binary's path), after installing `package` with apt-get if it returns None."""
    if (found := find()) is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{package} is missing; install Debian's `{package}` package (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "--no-install-recommends", package]
    try:
        if subprocess.run(command, env=env, capture_output=True, timeout=timeout).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=timeout)
            subprocess.run(command, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    if (found := find()) is None:
        pytest.skip(f"could not install Debian's `{package}` package (apt-get failed)")
    return found
