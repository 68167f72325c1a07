"""Console logging: readable, quiet by default, and free of patient data (we log counts and codes, not URIs).

On a terminal, rich's handler; anywhere else (a pod, a pipe, CI) one plain line per record, never wrapped,
so log collectors see whole messages.
"""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler

_NOISY = ("kafka", "py4j", "tensorflow", "absl", "urllib3")


def configure(level: str = "INFO") -> None:
    # Logs go to stderr: stdout is for data (`cxr broker` prints its address there).
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(console=Console(stderr=True), rich_tracebacks=False, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
