"""`first_part` before and after: the email-parser split of a WADO-RS multipart/related answer against the
byte-level splitter, in ms per MB, on answers of 0.25, 1.3, 8 and 20 MB, in one run.

Each answer is one part framed as Orthanc frames it (Content-Type, Content-Length, MIME-Version) around a
random-byte instance behind a DICOM preamble (random bytes: about one CR or LF in every 128, as compressed
pixel data has). Both splitters must give the same bytes. Each figure is the median of `--repeats` runs (the
best is printed too); `copy` is what one copy of the instance costs, the floor for anything that returns it
as `bytes`. A last line times the splitter on a hostile answer made of boundary look-alikes. Usage:

    .venv/bin/python -m bench.multipart [--sizes 0.25,1.3,8,20] [--repeats 7]
"""

from __future__ import annotations

import argparse
import functools
import platform
import random
import statistics
import time
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP

from streaming.errors import ErrorCode, FetchError
from streaming.fetch import first_part

BOUNDARY = "4f2a9c0d-6e1b-4c8e-9a57-3d0b1e2f7a64"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
MB = 1_000_000


def email_parser_first_part(body: bytes, content_type: str) -> bytes:
    """`streaming.fetch.first_part` as it was before the byte-level splitter, word for word (email parser,
    `get_payload(decode=True)`): measured against here, and the oracle of tests/unit/streaming/test_multipart.py."""
    if not content_type.lower().startswith("multipart/"):
        return body
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes) and payload:
            return payload
    raise FetchError(ErrorCode.FETCH_FAILED, "the DICOMweb answer carried no instance")


def answer(size: int, rng: random.Random) -> tuple[bytes, bytes]:
    """A one-part answer of about `size` bytes, and the instance it carries."""
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\nContent-Length: {{}}\r\nMIME-Version: 1.0\r\n\r\n"
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    instance_size = size - len(head) - len(tail) - 8
    instance = b"\x00" * 128 + b"DICM" + rng.randbytes(instance_size - 132)
    return head.format(instance_size).encode() + instance + tail, instance


def timed(split: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, best) seconds of `repeats` calls."""
    runs = []
    for _ in range(repeats):
        began = time.perf_counter()
        split()
        runs.append(time.perf_counter() - began)
    return statistics.median(runs), min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.25,1.3,8,20", help="answer sizes in MB (10^6 bytes), comma-separated")
    parser.add_argument("--repeats", type=int, default=7, help="runs of each splitter on each answer")
    args = parser.parse_args()
    sizes = [float(size) for size in args.sizes.split(",")]
    rng = random.Random(20240611)

    print(f"Python {platform.python_version()} on {platform.machine()}; median (best) of {args.repeats} runs")
    print(
        f"{'answer':>7} | {'email parser':^27} | {'byte-level':^27} | {'copy':>6} | {'ratio':>7}\n"
        f"{'MB':>7} | {'ms':>9} {'ms/MB (best)':>17} | {'ms':>9} {'ms/MB (best)':>17} | {'ms':>6} | {'old/new':>7}"
    )
    for size in sizes:
        body, instance = answer(int(size * MB), rng)
        old_got, new_got = email_parser_first_part(body, CONTENT_TYPE), first_part(body, CONTENT_TYPE)
        if old_got != instance or new_got != instance:
            raise SystemExit(f"the splitters disagree on the {size} MB answer")
        megabytes = len(body) / MB
        old, old_best = timed(functools.partial(email_parser_first_part, body, CONTENT_TYPE), args.repeats)
        new, new_best = timed(functools.partial(first_part, body, CONTENT_TYPE), args.repeats * 5)
        copy, _ = timed(functools.partial(bytes.__getitem__, body, slice(1, -1)), args.repeats * 5)
        print(
            f"{megabytes:7.2f} | {old * 1e3:9.2f} {old / megabytes * 1e3:8.2f} ({old_best / megabytes * 1e3:6.2f})"
            f" | {new * 1e3:9.3f} {new / megabytes * 1e3:8.3f} ({new_best / megabytes * 1e3:6.3f})"
            f" | {copy * 1e3:6.3f} | {old / new:6.0f}x"
        )

    look_alikes = b"\r\n--" + BOUNDARY.encode() + b"X"
    payload = look_alikes * (20 * MB // len(look_alikes))
    hostile = f"--{BOUNDARY}\r\n\r\n".encode() + payload + f"\r\n--{BOUNDARY}--".encode()
    assert first_part(hostile, CONTENT_TYPE) == payload
    median, _ = timed(lambda: first_part(hostile, CONTENT_TYPE), args.repeats)
    print(
        f"hostile: {len(hostile) / MB:.1f} MB of {len(payload) // len(look_alikes)} boundary look-alikes, "
        f"byte-level: {median * 1e3:.1f} ms ({median / (len(hostile) / MB) * 1e3:.2f} ms/MB)"
    )


if __name__ == "__main__":
    main()
