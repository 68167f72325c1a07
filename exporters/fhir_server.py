"""FHIR transaction Bundles to a FHIR server: `FhirServerSink`, one bounded HTTP attempt (`exporters.http`) per
bundle, and what the server's answer means (`fhir_outcome`).

The HTTP rules of `exporters.http` decide; the reason adds the severity and code of each OperationOutcome issue
the answer names, only words of FHIR's value sets: never the diagnostics or details, which may echo patient data.
"""

from __future__ import annotations

from exporters import http
from exporters.errors import ExportError
from exporters.sinks import check_timeout

_FHIR_CREDENTIALS = "CXR_FHIR_TOKEN, or CXR_FHIR_USERNAME and CXR_FHIR_PASSWORD"
#: OperationOutcome.issue.severity and .code (FHIR R4 value sets): only these words ever reach a reason.
_ISSUE_SEVERITIES = frozenset({"fatal", "error", "warning", "information"})
_ISSUE_CODES = frozenset(
    {
        "invalid", "structure", "required", "value", "invariant", "security", "login", "unknown", "expired",
        "forbidden", "suppressed", "processing", "not-supported", "duplicate", "multiple-matches", "not-found",
        "deleted", "too-long", "code-invalid", "extension", "too-costly", "business-rule", "conflict",
        "transient", "lock-error", "no-store", "exception", "timeout", "incomplete", "throttled", "informational",
    }
)  # fmt: skip
_MAX_ISSUES = 5


def operation_outcome_issues(body: bytes | None) -> list[str]:
    """`severity/code` of each issue of an OperationOutcome answer (at most `_MAX_ISSUES`, each once), only
    words of FHIR's value sets: never the diagnostics or details, which may echo patient data."""
    outcome = http.decoded_json(body)
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return []
    issues = outcome.get("issue")
    found: list[str] = []
    for issue in issues if isinstance(issues, list) else []:
        if not isinstance(issue, dict):
            continue
        severity, code = issue.get("severity"), issue.get("code")
        if severity in _ISSUE_SEVERITIES and code in _ISSUE_CODES and f"{severity}/{code}" not in found:
            found.append(f"{severity}/{code}")
        if len(found) == _MAX_ISSUES:
            break
    return found


def fhir_outcome(status: int, body: bytes | None) -> ExportError | None:
    """None when a FHIR server took the transaction (2xx); otherwise the error, with the issues it named."""
    issues = operation_outcome_issues(body) if not 300 <= status < 400 else []
    return http.status_error(status, f" (OperationOutcome: {', '.join(issues)})" if issues else "")


class FhirServerSink:
    """POSTs FHIR transaction Bundles to a FHIR server's base URL, one bounded attempt per call."""

    def __init__(self, url: str, *, authorization: str | None, timeout_s: float) -> None:
        self.url = http.checked_url(url, "FHIR server", _FHIR_CREDENTIALS)
        http.check_authorization(authorization)
        check_timeout(timeout_s)
        self.destination = f"fhir:{http.redact_url(self.url)}"
        self.timeout_s = float(timeout_s)
        self._session = http.bounded_session(authorization)

    def post(self, bundle: bytes) -> None:
        """POST one transaction Bundle (`application/fhir+json`); returns when the server took all of it."""
        with http.bounded_attempt(self.timeout_s) as attempt:
            try:
                response = self._session.post(
                    self.url,
                    data=bundle,
                    headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
                    timeout=self.timeout_s,
                    allow_redirects=False,
                    stream=True,
                )
                with response:
                    body = http.read_answer(response) if not response.is_redirect else None
                error = fhir_outcome(response.status_code, body)
            except http.TRANSPORT_ERRORS as exc:
                error = http.transport_error(exc, attempt)
        if attempt.fired:
            raise http.timed_out(attempt)
        if error is not None:
            raise error

    def close(self) -> None:
        self._session.close()

    def __repr__(self) -> str:
        return f"FhirServerSink({self.destination!r})"
