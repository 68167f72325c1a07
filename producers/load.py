"""The load generator: references to a set of images at a steady pace, for benchmarks and capacity tests.

Each reference gets a fresh event id and is stamped with `sent_at` as it is handed to Kafka, so every result
carries its own end-to-end latency. The pace is kept against a fixed schedule (reference i is due at
start + i / rate), not by sleeping a fixed gap after each send: a slow send does not lower the rate, it is made
up by the next ones, which is what "N references per second" means to someone sizing a system.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from producers.folder import image_kind, references, scan
from streaming.contracts import Reference, now_utc, rfc3339

log = logging.getLogger(__name__)


class Sender(Protocol):
    def send(self, ref: Reference) -> object: ...

    def flush(self, timeout_s: float | None = None) -> None: ...


def image_templates(folder: Path) -> list[Reference]:
    """One reference per image in the folder (PNG, JPEG, DICOM, with their DICOM identifiers), to be cycled."""
    found = list(references(p for p in scan(folder) if image_kind(p) is not None))
    if not found:
        raise FileNotFoundError(f"no PNG, JPEG or DICOM image in {folder}")
    return found


def cycle(templates: Sequence[Reference], count: int | None = None) -> Iterator[Reference]:
    """The templates over and over (`count` in all, or without end), each with a new event id."""
    stream: Iterable[Reference] = itertools.cycle(templates)
    if count is not None:
        stream = itertools.islice(stream, count)
    for template in stream:
        yield replace(template, event_id=str(uuid.uuid4()), sent_at=None)


def due_at(index: int, rate_per_s: float, start: float) -> float:
    """When reference `index` (0-based) is due on a steady schedule."""
    return start + index / rate_per_s


@dataclass
class LoadGenerator:
    """Sends references at `rate_per_s` until `duration_s` is over, the references run out, or `stop()`."""

    sender: Sender
    rate_per_s: float
    duration_s: float | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    on_sent: Callable[[Reference], None] = lambda ref: None
    sent: int = 0

    def run(self, refs: Iterable[Reference], stop: Callable[[], bool] = lambda: False) -> int:
        if self.rate_per_s <= 0:
            raise ValueError("the rate must be positive")
        start = self.clock()
        end = start + self.duration_s if self.duration_s is not None else None
        for index, ref in enumerate(refs):
            due = due_at(index, self.rate_per_s, start)
            if end is not None and due >= end:
                break
            wait = due - self.clock()
            if wait > 0:
                self.sleep(wait)
            if stop():
                break
            stamped = replace(ref, sent_at=rfc3339(now_utc()))
            self.sender.send(stamped)
            self.on_sent(stamped)
            self.sent += 1
        self.sender.flush()
        return self.sent
