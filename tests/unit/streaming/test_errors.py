"""The failure taxonomy: stable codes (the dead-letter contract) and the stage each error class reports."""

from __future__ import annotations

import pytest

from streaming.errors import (
    KNOWN_FAILURES,
    CxrError,
    DecodeError,
    ErrorCode,
    FetchError,
    ParseError,
    ScoreError,
    Stage,
)


def test_codes_and_stages_are_the_contract_values() -> None:
    assert {s.value for s in Stage} == {"parse", "fetch", "decode", "score"}
    assert {
        "invalid_json",
        "missing_field",
        "not_found",
        "forbidden_uri",
        "unsupported_format",
        "corrupt_image",
        "too_large",
    } <= {c.value for c in ErrorCode}


@pytest.mark.parametrize(
    ("cls", "stage"),
    [(ParseError, Stage.PARSE), (FetchError, Stage.FETCH), (DecodeError, Stage.DECODE), (ScoreError, Stage.SCORE)],
)
def test_each_error_class_reports_its_stage(cls: type[CxrError], stage: Stage) -> None:
    error = cls(ErrorCode.TOO_LARGE, "the image is too large")
    assert error.stage is stage
    assert (error.code, error.reason, str(error)) == (ErrorCode.TOO_LARGE, "the image is too large", error.reason)
    assert repr(error) == f"{cls.__name__}('too_large', 'the image is too large')"
    assert isinstance(error, CxrError)


def test_known_failures_cover_every_code_once_per_stage() -> None:
    assert len(set(KNOWN_FAILURES)) == len(KNOWN_FAILURES)
    assert {code for _, code in KNOWN_FAILURES} == set(ErrorCode)
    by_stage = {stage: {code for s, code in KNOWN_FAILURES if s is stage} for stage in Stage}
    assert ErrorCode.INVALID_JSON in by_stage[Stage.PARSE]
    assert ErrorCode.TOO_LARGE in by_stage[Stage.FETCH] and ErrorCode.TOO_LARGE in by_stage[Stage.DECODE]
    assert by_stage[Stage.SCORE] == {ErrorCode.MODEL_ERROR, ErrorCode.WORKER_CRASHED}
    assert ErrorCode.TIMEOUT in by_stage[Stage.FETCH] and ErrorCode.TIMEOUT in by_stage[Stage.DECODE]
    assert ErrorCode.UNAVAILABLE in by_stage[Stage.FETCH]
