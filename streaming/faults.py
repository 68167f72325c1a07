"""Test-only fault injection: a decoder that crashes its process, or one that never returns.

The fault tests need what a crafted file does to a native decoder (SIGSEGV) or what the kernel does to a worker
that ate too much memory (SIGKILL), and a decode that hangs. They get it from a file *name*, only where the
`fault_injection` setting (CXR_FAULT_INJECTION) is on; it is off by default and nothing else reads it.
"""

from __future__ import annotations

import os
import signal
import time

CRASH = "cxr-fault-crash"
HANG = "cxr-fault-hang"
HANG_S = 3600.0


def inject(uri: str) -> None:
    """Crash the process, or hang for an hour, when the URI's last segment names a fault."""
    name = uri.rsplit("/", 1)[-1]
    if CRASH in name:
        os.kill(os.getpid(), signal.SIGKILL)  # as abrupt as a segfault: no handler, no cleanup
    if HANG in name:
        time.sleep(HANG_S)
