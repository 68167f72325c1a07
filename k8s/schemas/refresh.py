"""Regenerate the JSON schemas of the custom resources under k8s/ from the CRDs their operators release.

The offline validation of k8s/ (tests/k8s, `make validate-k8s`) checks every SparkApplication, KafkaTopic,
KafkaUser, ServiceMonitor, PodMonitor and PrometheusRule against these files, so that a typo in a custom
resource fails CI instead of being silently dropped by the API server (or rejected only at `kubectl apply`).
They are kept in the repository, for the operator versions named in SOURCES and in README.md beside this file,
so that the tests need no network.

Each file is the `openAPIV3Schema` of one served CRD version, made strict the way kubeconform's
`openapi2jsonschema.py --strict` does it (`additionalProperties: false` on every object that declares
`properties` and neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields`), with OpenAPI's
`nullable` and int-or-string spelled in JSON Schema, `apiVersion` and `kind` pinned to the CRD's, and the
descriptions left out (they are most of the bytes and no check reads them). Draft 7: every keyword a
structural schema uses means the same there, and validators check its meta-schema ten times faster than
2020-12's. Files are laid out like
kubeconform's CRD catalogue, `{group}/{kind}_{version}.json`, so kubeconform can use them too:
`-schema-location 'k8s/schemas/{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json'`.

Where the CRDs come from (reachable without GitHub): the Go module proxy (`go mod download`, checked against
the Go checksum database) for the Spark Operator and the Prometheus Operator, Maven Central (checked against
its SHA-1) for Strimzi, whose `io.strimzi:api` test jar carries the CRDs its build generates.

Usage, from the repository root (needs `go` on PATH and network to the Go module proxy and Maven Central):

    .venv/bin/python k8s/schemas/refresh.py          # rewrite k8s/schemas/*/*.json
    .venv/bin/python k8s/schemas/refresh.py --check  # exit 1 if the files differ from what the sources give

To move to another operator release, change its version in SOURCES, run this, update README.md here and run
`make validate-k8s`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
#: Downloads stay inside the project (git-ignored), next to the kustomize that `make install` builds.
CACHE = ROOT / ".tools"
MAVEN_CENTRAL = "https://repo1.maven.org/maven2"


@dataclass(frozen=True)
class GoModule:
    """CRD files inside a Go module, as the Go module proxy serves it."""

    module: str
    version: str
    files: tuple[str, ...]
    versions: tuple[str, ...] = ()  # CRD versions to keep; empty: every served one

    @property
    def label(self) -> str:
        return f"{self.module}@{self.version} (Go module proxy)"

    def read(self) -> Iterator[tuple[str, bytes]]:
        env = dict(os.environ, GOPATH=str(CACHE / "go"), GOFLAGS="-modcacherw", GO111MODULE="on")
        done = subprocess.run(
            ["go", "mod", "download", "-json", f"{self.module}@{self.version}"],
            env=env,
            cwd=CACHE,
            check=False,
            capture_output=True,
            text=True,
        )
        info = json.loads(done.stdout or "{}")
        if done.returncode or "Dir" not in info:
            raise SystemExit(f"go mod download {self.module}@{self.version} failed: {info.get('Error') or done.stderr}")
        for name in self.files:
            yield name, (Path(info["Dir"]) / name).read_bytes()


@dataclass(frozen=True)
class MavenJar:
    """CRD files inside a jar on Maven Central."""

    group: str
    artifact: str
    version: str
    classifier: str
    files: tuple[str, ...]
    versions: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.group}:{self.artifact}:{self.version}:{self.classifier} (Maven Central)"

    def read(self) -> Iterator[tuple[str, bytes]]:
        name = f"{self.artifact}-{self.version}-{self.classifier}.jar"
        url = f"{MAVEN_CENTRAL}/{self.group.replace('.', '/')}/{self.artifact}/{self.version}/{name}"
        with urllib.request.urlopen(url, timeout=120) as response:
            jar = response.read()
        with urllib.request.urlopen(url + ".sha1", timeout=60) as response:
            expected = response.read().decode().split()[0]
        if hashlib.sha1(jar).hexdigest() != expected:
            raise SystemExit(f"{url}: SHA-1 mismatch")
        with zipfile.ZipFile(io.BytesIO(jar)) as archive:
            for member in self.files:
                yield member, archive.read(member)


Source = GoModule | MavenJar

#: The operator releases the manifests are written for. README.md (here and k8s/README.md) names the same.
SOURCES: tuple[Source, ...] = (
    GoModule(
        "github.com/kubeflow/spark-operator/v2",
        "v2.5.1",
        ("config/crd/bases/sparkoperator.k8s.io_sparkapplications.yaml",),
    ),
    GoModule(
        "github.com/prometheus-operator/prometheus-operator",
        "v0.94.0",
        (
            "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
            "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml",
            "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml",
        ),
    ),
    # Strimzi 0.51 serves kafka.strimzi.io v1 (the only version of Strimzi 1.x) and, deprecated, v1beta2
    # (what it stores). The older v1beta1/v1alpha1 are left out on purpose.
    MavenJar(
        "io.strimzi",
        "api",
        "0.51.0",
        "tests",
        ("crds/v1beta2/043-Crd-kafkatopic.yaml", "crds/v1beta2/044-Crd-kafkauser.yaml"),
        versions=("v1", "v1beta2"),
    ),
)


# The conversion ------------------------------------------------------------------------------------------

_SUBSCHEMA_KEYS = ("items", "additionalProperties", "not")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf")


def strict_schema(schema: Any) -> Any:
    """An OpenAPI v3 structural schema (a CRD's) as a strict JSON Schema (draft 7), recursively.

    Walks schema keywords only (a field that happens to be called `properties` stays a field), so the result
    is exactly kubeconform's --strict behaviour without its quirks.
    """
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if k != "description"}
    if "properties" in out:
        out["properties"] = {name: strict_schema(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in _SUBSCHEMA_KEYS:
        if isinstance(out.get(key), dict):
            out[key] = strict_schema(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(sub) for sub in out[key]]
    if isinstance(out.get("pattern"), str):
        out["pattern"] = python_regex(out["pattern"])
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    return out


def python_regex(pattern: str) -> str:
    """A Go (RE2) pattern as one Python's `re` (what jsonschema uses) accepts with the same meaning.

    RE2 takes inline flags anywhere (`^(?i)(abort|warn)?$`, in PrometheusRule); Python only at the start,
    where i, m and s mean the same when they lead the pattern as when they follow its `^`.
    """
    match = re.match(r"^(\^?)\(\?([ims]+)\)(.*)$", pattern, re.DOTALL)
    if match and match.group(1):
        pattern = f"(?{match.group(2)}){match.group(1)}{match.group(3)}"
    re.compile(pattern)  # a pattern Python cannot read would fail every validation: fail here instead
    return pattern


def crd_schemas(crd: dict[str, Any], versions: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """`{relative file name: JSON schema}` for the served versions of one CustomResourceDefinition."""
    if crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"not a CustomResourceDefinition: {crd.get('kind')}")
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    out: dict[str, dict[str, Any]] = {}
    for version in crd["spec"]["versions"]:
        name = version["name"]
        if not version.get("served", True) or (versions and name not in versions):
            continue
        schema = strict_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
        props = schema.setdefault("properties", {})
        props["apiVersion"] = {"type": "string", "enum": [f"{group}/{name}"]}
        props["kind"] = {"type": "string", "enum": [kind]}
        schema.setdefault("additionalProperties", False)
        required = schema.setdefault("required", [])
        required[:0] = [k for k in ("apiVersion", "kind") if k not in required]
        out[f"{group}/{kind.lower()}_{name}.json"] = {
            "$schema": "http://json-schema.org/draft-07/schema#",
            **schema,
        }
    if not out:
        raise ValueError(f"{group}/{kind}: none of the versions {versions} is served")
    return out


def generate() -> dict[str, str]:
    """Every schema file's text, keyed by its path relative to this folder."""
    files: dict[str, str] = {}
    for source in SOURCES:
        for member, raw in source.read():
            for rel, schema in crd_schemas(yaml.safe_load(raw), source.versions).items():
                schema = {"$comment": f"Generated by k8s/schemas/refresh.py from {source.label}: {member}", **schema}
                files[rel] = json.dumps(schema, indent=1, sort_keys=False) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)
    CACHE.mkdir(exist_ok=True)
    files = generate()
    existing = {str(p.relative_to(HERE)): p for p in HERE.glob("*/*.json")}
    if args.check:
        stale = sorted(
            rel
            for rel in set(files) | set(existing)
            if rel not in existing or rel not in files or existing[rel].read_text() != files[rel]
        )
        for rel in stale:
            print(f"differs: k8s/schemas/{rel}", file=sys.stderr)
        return 1 if stale else 0
    for rel, path in existing.items():
        if rel not in files:
            path.unlink()
    for rel, text in files.items():
        target = HERE / rel
        target.parent.mkdir(exist_ok=True)
        target.write_text(text)
        print(f"wrote k8s/schemas/{rel} ({len(text) // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
