"""The load generator without Kafka: a steady schedule that catches up, fresh event ids, stamped sends."""

from __future__ import annotations

from pathlib import Path

import pytest

from producers.load import LoadGenerator, cycle, due_at, image_templates
from streaming.contracts import Reference, parse_timestamp


class Recorder:
    def __init__(self) -> None:
        self.sent: list[Reference] = []
        self.flushed = 0

    def send(self, ref: Reference) -> None:
        self.sent.append(ref)

    def flush(self, timeout_s: float | None = None) -> None:
        self.flushed += 1


class FakeTime:
    """A clock that only moves when the generator sleeps, or when a send is slow."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def templates(n: int = 3) -> list[Reference]:
    return [Reference(event_id=f"t{i}", uri=f"file:///images/{i}.png") for i in range(n)]


def test_reference_i_is_due_i_over_rate_after_the_start() -> None:
    assert [due_at(i, 4.0, 10.0) for i in range(3)] == [10.0, 10.25, 10.5]


def test_cycle_repeats_the_templates_with_fresh_event_ids() -> None:
    refs = list(cycle(templates(2), 5))
    assert [r.uri for r in refs] == ["file:///images/0.png", "file:///images/1.png"] * 2 + ["file:///images/0.png"]
    assert len({r.event_id for r in refs}) == 5 and not {"t0", "t1"} & {r.event_id for r in refs}


def test_a_timed_run_sends_rate_times_duration_on_schedule_and_stamps_each() -> None:
    sender, time_ = Recorder(), FakeTime()
    generator = LoadGenerator(sender, rate_per_s=10.0, duration_s=2.0, clock=time_.clock, sleep=time_.sleep)
    assert generator.run(cycle(templates())) == 20
    assert len(sender.sent) == 20 and sender.flushed == 1
    assert time_.now == pytest.approx(101.9)  # the last one is due at 1.9 s
    assert all(r.sent_at and parse_timestamp(r.sent_at) for r in sender.sent)


def test_a_slow_send_is_made_up_by_the_next_ones_not_by_a_lower_rate() -> None:
    time_ = FakeTime()

    class SlowOnce(Recorder):
        def send(self, ref: Reference) -> None:
            super().send(ref)
            if len(self.sent) == 1:
                time_.now += 0.35  # the first send took three intervals and a half

    sender = SlowOnce()
    generator = LoadGenerator(sender, rate_per_s=10.0, duration_s=1.0, clock=time_.clock, sleep=time_.sleep)
    generator.run(cycle(templates()))
    assert len(sender.sent) == 10
    assert len(time_.sleeps) == 10 - 4  # references 1, 2 and 3 were already due: sent at once


def test_a_count_and_a_stop_both_end_the_run() -> None:
    sender, time_ = Recorder(), FakeTime()
    generator = LoadGenerator(sender, rate_per_s=100.0, clock=time_.clock, sleep=time_.sleep)
    assert generator.run(cycle(templates(), 7)) == 7
    again = LoadGenerator(Recorder(), rate_per_s=100.0, clock=time_.clock, sleep=time_.sleep)
    assert again.run(cycle(templates()), stop=lambda: again.sent >= 3) == 3


def test_the_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        LoadGenerator(Recorder(), rate_per_s=0).run(cycle(templates(), 1))


def test_image_templates_take_images_by_content_and_refuse_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (tmp_path / "notes.txt").write_text("not an image")
    assert [Path(r.uri).name for r in image_templates(tmp_path)] == ["a.png"]
    (tmp_path / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match="no PNG, JPEG or DICOM"):
        image_templates(tmp_path)
