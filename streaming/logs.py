"""Console logging: readable, quiet by default, and free of patient data (we log counts and codes, not URIs).

On a terminal, rich's handler; anywhere else (a pod, a pipe, CI) one plain line per record, never wrapped,
so log collectors see whole messages.
"""

from __future__ import annotations

import logging
import sys
import warnings

from rich.console import Console
from rich.logging import RichHandler

_NOISY = ("kafka", "py4j", "tensorflow", "absl", "urllib3")
#: Libraries whose warnings quote what they read: DICOM header values, which may be UIDs, names, accessions
#: (highdicom copies the patient module into each SR; dicomweb-client logs the URLs it requests).
_QUOTE_HEADERS = ("pydicom", "highdicom", "dicomweb_client")


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
    silence_header_quoters()


def silence_header_quoters() -> None:
    """Keep libraries that quote DICOM header values out of every log; call it in each process that decodes.

    pydicom sends each warning both through `warnings` and through its logger, and many quote the value they
    dislike ("Invalid value for VR UI: '1.2.…'"): with a hostile or sloppy header that is patient data. In a
    Spark Python worker, a warning goes to stderr, which Spark copies into the driver's log; a log record
    would go there too as soon as anything gives the worker's root logger a handler. So both ways are closed
    (idempotent: the filter replaces its own copy). Nothing is lost: the decoder turns what pydicom cannot
    read into a dead letter whose reason names the problem without the value.
    """
    for name in _QUOTE_HEADERS:
        warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")
        logging.getLogger(name).propagate = False
