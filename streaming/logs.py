"""Console logging: readable, quiet by default, and free of patient data (we log counts and codes, not URIs)."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

_NOISY = ("kafka", "py4j", "tensorflow", "absl", "urllib3")


def configure(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(message)s",
        datefmt="[%X]",
        # Logs on stderr: stdout is for data (`cxr broker` prints its address there).
        handlers=[RichHandler(console=Console(stderr=True), rich_tracebacks=False, show_path=False)],
        force=True,
    )
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
