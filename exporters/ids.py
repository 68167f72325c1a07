"""Deterministic identifiers for everything an export creates.

At-least-once delivery means a result may be exported twice (a restart before the cursor was saved, a replay).
Every id is a name-based UUID (RFC 4122 version 5) of the event id and the model's name and version, so the
second export of a result names the same FHIR resources and the same SR instance, and the receiver overwrites
instead of adding a copy. A new model version is a new opinion on the same image, and gets new ids.
"""

from __future__ import annotations

import json
import uuid

#: The namespace of every cxr-stream export id (fixed forever: changing it would duplicate every past export).
NAMESPACE = uuid.UUID("6f1d3c52-8a4e-5b7f-9c2d-0e1f2a3b4c5d")


def export_uuid(kind: str, *parts: str) -> uuid.UUID:
    """The UUID of one exported thing: `kind` (a resource type, "sr-instance", ...) and what identifies it."""
    # A JSON array (ASCII, every character escaped as needed) names the parts unambiguously whatever they
    # contain: no separator an event id could forge, and text with lone surrogates still has a name.
    return uuid.uuid5(NAMESPACE, json.dumps([kind, *parts]))


def resource_id(kind: str, event_id: str, model_name: str, model_version: str) -> str:
    """A FHIR resource id (at most 64 characters of [A-Za-z0-9-.]: a UUID's 36 fit)."""
    return str(export_uuid(kind, event_id, model_name, model_version))


def device_id(model_name: str, model_version: str) -> str:
    """One FHIR Device per model version, shared by all its results."""
    return str(export_uuid("Device", model_name, model_version))


def uid(kind: str, *parts: str) -> str:
    """A DICOM UID under the UUID root `2.25` (PS3.5 B.2): at most 2 + 1 + 39 digits, well inside 64."""
    return f"2.25.{export_uuid(kind, *parts).int}"


def sr_instance_uid(event_id: str, model_name: str, model_version: str) -> str:
    """The SR's SOP Instance UID: a replay stores the same instance again, which a PACS keeps once."""
    return uid("sr-instance", event_id, model_name, model_version)


def sr_series_uid(study_key: str, model_name: str, model_version: str) -> str:
    """One SR series per study and model version, so a viewer shows the model's reports together."""
    return uid("sr-series", study_key, model_name, model_version)


def device_uid(model_name: str, model_version: str) -> str:
    """The model as a DICOM device observer (Device Observer UID)."""
    return uid("device", model_name, model_version)


def tracking_uid(event_id: str, model_name: str, model_version: str, label: str) -> str:
    """The tracking UID of one finding's measurement group in an SR."""
    return uid("tracking", event_id, model_name, model_version, label)
