"""One fake `producers.publish.Publisher` for the feeds' unit tests: it records sends and fails on request.

Shared by the folder, Orthanc, DICOMweb and C-STORE feeds' tests (``pythonpath = ["tests"]``), so each tests
the one rule they share, "the cursor moves (or success is answered) only after Kafka acknowledged", against the
same notion of acknowledging.
"""

from __future__ import annotations

from producers.publish import PublishError
from streaming.contracts import Reference


class Ack:
    """A send's future: `succeeded()` once Kafka acknowledged it."""

    def __init__(self, ok: bool) -> None:
        self.ok = ok

    def succeeded(self) -> bool:
        return self.ok


class FakePublisher:
    """Records what was sent.

    `ack_only`: only the first N sends are acknowledged (a flush after an unacknowledged one raises, and so
    does `send_and_wait` for an unacknowledged one); `fail_flush`: that flush (1-based) and every later one
    raises; `flush_error` / `send_error`: what `flush` / `send` (and `send_and_wait`) raise instead;
    `wait_error`: what `send_and_wait` raises after recording the send (Kafka did not answer in time)."""

    def __init__(
        self,
        *,
        ack_only: int | None = None,
        fail_flush: int | None = None,
        flush_error: Exception | None = None,
        send_error: Exception | None = None,
        wait_error: Exception | None = None,
    ) -> None:
        self.ack_only, self.fail_flush = ack_only, fail_flush
        self.flush_error, self.send_error, self.wait_error = flush_error, send_error, wait_error
        self.sent: list[Reference] = []
        self.flushes = 0
        self.flush_timeouts: list[float | None] = []
        #: `timeout_s` of each `send_and_wait`
        self.wait_timeouts: list[float] = []
        self._batch: list[Ack] = []

    def send(self, ref: Reference) -> Ack:
        if self.send_error is not None:
            raise self.send_error
        self.sent.append(ref)
        ack = Ack(self.ack_only is None or len(self.sent) <= self.ack_only)
        self._batch.append(ack)
        return ack

    def flush(self, timeout_s: float | None = None) -> None:
        self.flushes += 1
        self.flush_timeouts.append(timeout_s)
        batch, self._batch = self._batch, []
        if self.flush_error is not None:
            raise self.flush_error
        if self.fail_flush is not None and self.flushes >= self.fail_flush:
            raise PublishError("Kafka did not acknowledge: not acknowledged")
        if not all(ack.ok for ack in batch):
            raise PublishError("Kafka did not acknowledge every reference: not acknowledged")

    def send_and_wait(self, ref: Reference, timeout_s: float) -> None:
        """Waits for this send's own acknowledgement only: neither flushes nor reports earlier sends."""
        self.wait_timeouts.append(timeout_s)
        if self.send_error is not None:
            raise self.send_error
        self.sent.append(ref)
        if self.wait_error is not None:
            raise self.wait_error
        if self.ack_only is not None and len(self.sent) > self.ack_only:
            raise PublishError(f"Kafka did not acknowledge the reference (event {ref.event_id}): not acknowledged")
