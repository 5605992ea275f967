"""Entry points' logging set-up, in a process of its own (it changes the whole process's logging)."""

from __future__ import annotations

import subprocess
import sys

REPLACED_STDERR = """
import io, logging, sys
sys.stderr = io.StringIO()  # as a program or notebook may have it: no file descriptor behind it
from swarm.logs import setup_logging
setup_logging("INFO")
logging.getLogger("blockswarm-test").info("logged")
sys.__stdout__.write(sys.stderr.getvalue())
"""


def test_setup_logging_works_with_a_stderr_that_has_no_file_descriptor() -> None:
    """The logs still go to the replaced stderr; only the stack dump on SIGUSR1, which needs a file descriptor, is
    left out."""
    done = subprocess.run([sys.executable, "-c", REPLACED_STDERR], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "INFO blockswarm-test: logged" in done.stdout
