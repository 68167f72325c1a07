"""Typed failures that become dead letters.

Every way a reference can fail is a `CxrError` carrying the pipeline stage and a stable, machine-readable
code. The codes are part of the dead-letter contract (dashboards and alerts key on them), so they live in one
enum and are never invented ad hoc at a raise site. Reasons are one human sentence and must never contain
patient data: say what was wrong, not what the file or header contained.
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    PARSE = "parse"
    FETCH = "fetch"
    DECODE = "decode"
    SCORE = "score"


class ErrorCode(StrEnum):
    # parse
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    UNSUPPORTED_SCHEMA = "unsupported_schema"
    # fetch
    FORBIDDEN_URI = "forbidden_uri"
    UNSUPPORTED_URI = "unsupported_uri"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    FETCH_FAILED = "fetch_failed"
    #: a server that is down or overloaded, or a worker whose reads are stuck: try again later
    UNAVAILABLE = "unavailable"
    #: fetch or decode ran past the per-reference deadline (stage says which was running)
    TIMEOUT = "timeout"
    # decode
    UNSUPPORTED_FORMAT = "unsupported_format"
    CORRUPT_IMAGE = "corrupt_image"
    # score
    MODEL_ERROR = "model_error"
    #: the Python worker died while this reference was in its batch, again when it was retried alone
    WORKER_CRASHED = "worker_crashed"


class CxrError(Exception):
    """A reference that cannot be scored, and why; becomes one dead letter."""

    stage: Stage = Stage.SCORE

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value!r}, {self.reason!r})"


class ParseError(CxrError):
    stage = Stage.PARSE


class FetchError(CxrError):
    stage = Stage.FETCH


class DecodeError(CxrError):
    stage = Stage.DECODE


class ScoreError(CxrError):
    stage = Stage.SCORE


#: Every (stage, code) pair that can occur; metrics pre-register these so dashboards show zeros, not gaps.
KNOWN_FAILURES: tuple[tuple[Stage, ErrorCode], ...] = (
    *(
        (Stage.PARSE, c)
        for c in (
            ErrorCode.INVALID_JSON,
            ErrorCode.NOT_AN_OBJECT,
            ErrorCode.MISSING_FIELD,
            ErrorCode.INVALID_FIELD,
            ErrorCode.UNSUPPORTED_SCHEMA,
        )
    ),
    *(
        (Stage.FETCH, c)
        for c in (
            ErrorCode.FORBIDDEN_URI,
            ErrorCode.UNSUPPORTED_URI,
            ErrorCode.NOT_FOUND,
            ErrorCode.TOO_LARGE,
            ErrorCode.FETCH_FAILED,
            ErrorCode.UNAVAILABLE,
            ErrorCode.TIMEOUT,
        )
    ),
    *(
        (Stage.DECODE, c)
        for c in (ErrorCode.UNSUPPORTED_FORMAT, ErrorCode.CORRUPT_IMAGE, ErrorCode.TOO_LARGE, ErrorCode.TIMEOUT)
    ),
    (Stage.SCORE, ErrorCode.MODEL_ERROR),
    (Stage.SCORE, ErrorCode.WORKER_CRASHED),
)
