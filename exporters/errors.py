"""Why a result could not be exported, as data: retried while the cause may pass, dead-lettered when it cannot.

A destination that is down (connection refused, a timeout, HTTP 429/5xx, a Kafka broker away) is the normal bad
day: the exporter waits and tries the same result again, for as long as it takes, and never skips ahead. A
result that no retry can help (unreadable, refused by the destination as invalid, its image gone) becomes one
export dead letter with its reason, and the exporter moves on. Reasons name what was wrong, never what a
message or a DICOM header contained.
"""

from __future__ import annotations

from enum import StrEnum


class ExportCode(StrEnum):
    #: the message on the results topic is not a readable `cxr.result/v1`
    UNREADABLE_RESULT = "unreadable_result"
    #: the scored image cannot be read back for the SR (gone, outside the allowed roots, not DICOM)
    SOURCE_UNREADABLE = "source_unreadable"
    #: the library refused to build the export from this result (it would not validate)
    INVALID_EXPORT = "invalid_export"
    #: the destination answered and refused this export (HTTP 4xx, a DICOM failure status)
    REJECTED = "rejected"
    #: the destination (or the image's server) is away, slow or overloaded: retried
    UNAVAILABLE = "unavailable"


#: Codes that are retried rather than dead-lettered.
TRANSIENT = frozenset({ExportCode.UNAVAILABLE})


class ExportError(Exception):
    """One result that could not be exported now (`transient`) or ever."""

    def __init__(self, code: ExportCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT

    def __repr__(self) -> str:
        return f"ExportError({self.code.value!r}, {self.reason!r})"
