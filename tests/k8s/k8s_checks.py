"""Offline checks of the deployment under k8s/ (and of the Dockerfile that builds its image).

Nothing under k8s/ runs in the other tests, and the API server, the operators and Prometheus only see it when
a platform team applies it: a typo in a field name is dropped silently by the API server's defaulting (or
rejected at apply time), a misspelled setting is ignored by pydantic (`extra="ignore"`), a metric name that the
job does not export makes an alert that can never fire. These functions find such mistakes from the files
alone, fast, with the real kustomize and the real schemas, so that the tests in this folder can run them on
whatever k8s/ contains (the base and every overlay) and prove on broken input that each of them can fail.

Every check returns a list of human-readable problems (empty: fine) rather than asserting, so one test run
reports every problem at once and the unit tests can look at what was found.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import json
import os
import re
import shlex
import subprocess
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import promql_parser
import referencing
import yaml
from kubernetes_validate.utils import schema_contents  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SCHEMAS = K8S / "schemas"
OVERLAYS = K8S / "overlays"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_SCRIPTS = K8S / "image"
#: The code whose settings and metrics the manifests must agree with.
PACKAGES = ("streaming", "producers", "worklist", "training", "exporters")

#: The Kubernetes release every built-in object must be valid for (kubernetes-validate's bundled OpenAPI
#: schemas, strict: unknown fields are errors). The oldest minor still supported upstream when this was
#: written; raise it when the platform's oldest cluster moves on.
KUBERNETES_VERSION = "1.33"

#: Manifests under k8s/ that are applied on their own, not through a kustomization (path relative to k8s/:
#: why). Every other manifest must be a resource of some kustomization, or it would never be deployed.
SEPARATELY_APPLIED = {
    "kafka-topics.yaml": "Strimzi topics live in the Kafka cluster's namespace (kubectl apply -n kafka -f ...)",
}

#: Metric names the alert rules and the dashboard may use although cxr-stream's code does not export them.
#: Exact names; each says where the series comes from.
EXTERNAL_METRICS = {
    # Prometheus itself, per scrape target.
    "up": "Prometheus: 1 when the target's last scrape succeeded",
    "scrape_duration_seconds": "Prometheus: how long the target's last scrape took",
    "scrape_samples_scraped": "Prometheus: samples in the target's last scrape",
    # kube-state-metrics (kube-prometheus-stack), for pods and Deployments the job's metrics cannot see.
    "kube_pod_container_status_restarts_total": "kube-state-metrics: container restarts",
    "kube_pod_container_status_waiting_reason": "kube-state-metrics: why a container waits (CrashLoopBackOff...)",
    "kube_pod_status_ready": "kube-state-metrics: pod readiness",
    "kube_pod_status_phase": "kube-state-metrics: pod phase",
    "kube_deployment_status_replicas_available": "kube-state-metrics: available replicas of a Deployment",
    "kube_deployment_spec_replicas": "kube-state-metrics: desired replicas of a Deployment",
    "kube_persistentvolumeclaim_status_phase": "kube-state-metrics: PVC bound or not",
    "kubelet_volume_stats_available_bytes": "kubelet: free bytes on a mounted PVC (checkpoint volume)",
    "kubelet_volume_stats_capacity_bytes": "kubelet: size of a mounted PVC",
}
#: Prefixes of metric families named at run time by Spark's PrometheusServlet, which the ServiceMonitor
#: scrapes from the driver's UI port (spark-application.yaml sets spark.metrics.namespace to
#: SPARK_METRICS_NAMESPACE; a test checks that it still does).
SPARK_METRICS_NAMESPACE = "cxr_stream"
EXTERNAL_METRIC_PREFIXES = {
    f"metrics_{SPARK_METRICS_NAMESPACE}_driver_": "Spark driver metrics (JVM, block manager, streaming query)",
    "metrics_executor_": "Spark per-executor metrics (/metrics/executors/prometheus)",
}

#: Environment variables a ConfigMap of CXR_ settings may also carry (name: why). Anything else in such a
#: ConfigMap is a misspelled setting until it is listed here.
FOREIGN_ENV = {
    "PYTHONUNBUFFERED": "Python: unbuffered log output",
    "TF_CPP_MIN_LOG_LEVEL": "TensorFlow: C++ log verbosity",
    "JAVA_TOOL_OPTIONS": "the JVM of the Spark driver (e.g. heap dumps)",
}

_WORKLOAD_TEMPLATES = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
_KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


# Rendering ------------------------------------------------------------------------------------------------


class ToolMissing(RuntimeError):
    """A tool the checks need is not installed: a failure, never a reason to skip (see `make install`)."""


def kustomize_version() -> str:
    """The pinned kustomize version: the Makefile's, so that the two cannot disagree."""
    match = re.search(r"^KUSTOMIZE_VERSION\s*:?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    if match is None:
        raise ToolMissing("the Makefile does not pin KUSTOMIZE_VERSION")
    return match.group(1)


@functools.cache
def kustomize() -> str:
    """The kustomize binary that `make install` built (or $KUSTOMIZE), at the pinned version."""
    binary = os.environ.get("KUSTOMIZE") or str(ROOT / ".tools" / "bin" / "kustomize")
    try:
        done = subprocess.run([binary, "version"], capture_output=True, text=True, check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as e:
        raise ToolMissing(f"kustomize not usable at {binary} ({e}): run `make install` (needs Go)") from e
    if done.stdout.strip() != kustomize_version():
        raise ToolMissing(f"{binary} is kustomize {done.stdout.strip()}, not {kustomize_version()}: `make install`")
    return binary


def kustomizations(k8s: Path = K8S) -> list[Path]:
    """The base k8s/ and every overlay under k8s/overlays/, whatever the other helpers add."""
    overlays = k8s / "overlays"
    return [k8s, *sorted(p for p in overlays.glob("*") if p.is_dir())]


def nested_kustomizations(k8s: Path = K8S) -> list[Path]:
    """Other folders under k8s/ with a kustomization of kind Kustomization (e.g. k8s/worklist): the base or an
    overlay includes them, and each must also build on its own into valid objects."""
    roots = set(kustomizations(k8s))
    out = []
    for file in sorted(k8s.rglob("kustomization.y*ml")) + sorted(k8s.rglob("Kustomization")):
        directory = file.parent
        if directory in roots or "schemas" in directory.relative_to(k8s).parts:
            continue
        if (yaml.safe_load(file.read_text()) or {}).get("kind", "Kustomization") == "Kustomization":
            out.append(directory)
    return out


def kustomization_file(directory: Path) -> Path | None:
    return next((directory / n for n in _KUSTOMIZATION_FILES if (directory / n).is_file()), None)


@functools.cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    """`kustomize build DIR`, as objects (cached: several tests look at the same render)."""
    done = subprocess.run(
        [kustomize(), "build", str(directory)], capture_output=True, text=True, check=False, timeout=120
    )
    if done.returncode:
        raise RuntimeError(f"kustomize build {os.path.relpath(directory, ROOT)} failed:\n{done.stderr}")
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def referenced_files(directory: Path, seen: set[Path] | None = None) -> set[Path]:
    """Files a kustomization reads (resources, patches, generators, components, configurations), recursively."""
    seen = set() if seen is None else seen
    file = kustomization_file(directory)
    if file is None or directory in seen:
        return set()
    seen.add(directory)
    spec = yaml.safe_load(file.read_text()) or {}
    out = {file.resolve()}
    entries: list[str] = [*spec.get("resources", []), *spec.get("components", []), *spec.get("bases", [])]
    entries += spec.get("configurations", []) + spec.get("crds", [])
    for patch in [*spec.get("patches", []), *spec.get("patchesStrategicMerge", [])]:
        entries += [patch] if isinstance(patch, str) else [patch["path"]] if "path" in patch else []
    for gen in [*spec.get("configMapGenerator", []), *spec.get("secretGenerator", [])]:
        entries += [f.split("=", 1)[-1] for f in gen.get("files", [])] + gen.get("envs", [])
    for entry in entries:
        if "://" in entry or entry.startswith(("github.com/", "git@")) or "\n" in entry:
            continue
        path = (directory / entry).resolve()
        if path.is_dir():
            out |= referenced_files(path, seen)
        else:
            out.add(path)
    return out


def orphan_manifests(k8s: Path = K8S, separately_applied: Mapping[str, str] = SEPARATELY_APPLIED) -> list[str]:
    """Manifests under k8s/ that neither the base nor an overlay deploys and that are not known to be applied
    on their own (a file or folder in `separately_applied`): written, reviewed, and never deployed."""
    used: set[Path] = set()
    for directory in kustomizations(k8s):
        used |= referenced_files(directory)
    problems = []
    for directory in nested_kustomizations(k8s):
        file = kustomization_file(directory)
        rel = directory.relative_to(k8s)
        if file is not None and file.resolve() not in used and not _listed(rel, separately_applied):
            problems.append(f"k8s/{rel}/: a kustomization that neither the base nor an overlay includes")
            used |= referenced_files(directory)
    for path in sorted(k8s.rglob("*.y*ml")):
        rel = path.relative_to(k8s)
        if rel.parts[0] in ("overlays", "schemas") or path.resolve() in used or _listed(rel, separately_applied):
            continue
        kinds = {d.get("kind") for d in load_documents(path) if isinstance(d, dict) and "apiVersion" in d}
        if kinds - {None, "Kustomization", "Component"}:
            problems.append(f"k8s/{rel}: in no kustomization (add it to resources, or to SEPARATELY_APPLIED)")
    return problems


def _listed(rel: Path, separately_applied: Mapping[str, str]) -> bool:
    return any(rel == Path(entry) or Path(entry) in rel.parents for entry in separately_applied)


def name_of(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {ns}{meta.get('name')}"


# Schemas --------------------------------------------------------------------------------------------------


def crd_schema_path(obj: Mapping[str, Any]) -> Path | None:
    """The CRD schema kept for this object's apiVersion and kind (k8s/schemas/{group}/{kind}_{version}.json)."""
    api_version = str(obj.get("apiVersion", ""))
    if "/" not in api_version:
        return None
    group, version = api_version.split("/", 1)
    path = SCHEMAS / group / f"{str(obj.get('kind', '')).lower()}_{version}.json"
    return path if path.is_file() else None


@functools.cache
def _crd_validator(path: Path) -> jsonschema.protocols.Validator:
    schema = json.loads(path.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


_STRICT_DIR = f"kubernetes-json-schema/v{KUBERNETES_VERSION}.0-local-strict"


@functools.cache
def _kubernetes_definitions() -> tuple[str, referencing.Registry[Any]]:
    """kubernetes-validate's shared definitions for KUBERNETES_VERSION, loaded once (1.4 MB of JSON that its
    own `validate()` would parse again for every object)."""
    definitions = schema_contents(f"{_STRICT_DIR}/_definitions.json", KUBERNETES_VERSION)
    registry: referencing.Registry[Any] = referencing.Resource.from_contents(definitions) @ referencing.Registry()
    return str(definitions["$id"]), registry


@functools.cache
def _builtin_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
    """The strict schema of a built-in kind, named the way kubernetes-validate names its files
    (`rbac.authorization.k8s.io/v1` Role: role-rbac-v1.json); None if Kubernetes has no such kind."""
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = schema_contents(f"{_STRICT_DIR}/{kind.lower()}-{group_version}.json", KUBERNETES_VERSION)
    except FileNotFoundError:
        return None
    return jsonschema.Draft202012Validator(schema, registry=_kubernetes_definitions()[1])


@functools.cache
def _object_meta_validator() -> jsonschema.protocols.Validator:
    """Kubernetes' strict ObjectMeta schema: CRDs leave `metadata` open, the API server does not."""
    base, registry = _kubernetes_definitions()
    ref = f"{base}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    return jsonschema.Draft202012Validator({"$ref": ref}, registry=registry)


def _errors(validator: jsonschema.protocols.Validator, instance: Any, prefix: str) -> list[str]:
    found = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{prefix}{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in found]


def schema_errors(obj: Mapping[str, Any]) -> list[str]:
    """Problems of one object: built-ins against Kubernetes' strict OpenAPI schemas, custom resources against
    the CRD schemas in k8s/schemas (metadata against ObjectMeta). A kind known to neither is a problem too."""
    where = f"{name_of(obj)}: "
    if not obj.get("apiVersion") or not obj.get("kind"):
        return [f"{where}no apiVersion or kind"]
    path = crd_schema_path(obj)
    if path is not None:
        return _errors(_crd_validator(path), obj, where) + _errors(
            _object_meta_validator(), obj.get("metadata"), f"{where}metadata."
        )
    validator = _builtin_validator(str(obj["apiVersion"]), str(obj["kind"]))
    if validator is None:
        return [
            f"{where}unknown kind {obj['apiVersion']} {obj['kind']}: not in Kubernetes {KUBERNETES_VERSION} and"
            " no CRD schema in k8s/schemas (add its operator to k8s/schemas/refresh.py)"
        ]
    return _errors(validator, obj, where)


# Metrics and PromQL ---------------------------------------------------------------------------------------

#: Sample names each kind of metric family exposes (prometheus_client's exposition).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "untyped": ("",),
    "unknown": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
}
_CONSTRUCTORS = {
    "Counter": "counter",
    "Gauge": "gauge",
    "Histogram": "histogram",
    "Summary": "summary",
    "Info": "info",
    "Enum": "enum",
    "CounterMetricFamily": "counter",
    "GaugeMetricFamily": "gauge",
    "HistogramMetricFamily": "histogram",
    "GaugeHistogramMetricFamily": "gaugehistogram",
    "SummaryMetricFamily": "summary",
    "InfoMetricFamily": "info",
    "StateSetMetricFamily": "stateset",
    "UnknownMetricFamily": "unknown",
}


def sample_names(family: str, kind: str) -> set[str]:
    """The series names a family exports (a counter `x` is `x_total` and `x_created`, a histogram `x_bucket`...)."""
    base = family.removesuffix({"counter": "_total", "info": "_info"}.get(kind, "\0"))
    return {base + suffix for suffix in _SUFFIXES.get(kind, ("",))}


def _package_files() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


@functools.cache
def _module_tree(path: Path) -> ast.Module:
    """A package module's syntax tree (parsed once: the metric and settings scans both walk them)."""
    return ast.parse(path.read_text(), filename=str(path))


def metric_families_in_source(path: Path) -> dict[str, str]:
    """`{family: kind}` constructed with a literal name anywhere in a module that uses prometheus_client."""
    tree = _module_tree(path)
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prometheus_client")
        for alias in node.names
    }
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        first = node.args[0]
        if (
            func in _CONSTRUCTORS
            and func in imported
            and isinstance(first, ast.Constant)
            and isinstance(first.value, str)
        ):
            found[first.value] = _CONSTRUCTORS[func]
    return found


@functools.cache
def exported_metrics() -> frozenset[str]:
    """Every series name cxr-stream's processes can export: `cxr run`'s registry as the job builds it (its
    custom histogram collectors included), plus every family the packages construct by name (the worklist's
    collector, anything a feed adds)."""
    from streaming.metrics import JobMetrics

    names: set[str] = set()
    for family in JobMetrics().registry.collect():
        names |= sample_names(family.name, family.type)
    for path in _package_files():
        for family_name, kind in metric_families_in_source(path).items():
            names |= sample_names(family_name, kind)
    return frozenset(names)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (by name or by `__name__="..."`); ValueError if it does not parse."""
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__" and matcher.op == promql_parser.MatchOp.Equal:
                    names.add(matcher.value)
        return None

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return names


def promql_job_values(expr: str) -> set[str]:
    """Values the expression's selectors require of the `job` label (exact matches only)."""
    jobs: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            jobs.update(
                m.value for m in node.matchers.matchers if m.name == "job" and m.op == promql_parser.MatchOp.Equal
            )
        return None

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return jobs


def unknown_metric(name: str, extra: Iterable[str] = ()) -> bool:
    """True if nothing exports `name`: not the code, not the allow-lists, not a recording rule (`extra`)."""
    return not (
        name in exported_metrics()
        or name in EXTERNAL_METRICS
        or name in set(extra)
        or any(name.startswith(prefix) for prefix in EXTERNAL_METRIC_PREFIXES)
    )


def promql_problems(
    where: str, expr: str, recorded: Iterable[str] = (), jobs: Iterable[str] | None = None
) -> list[str]:
    """A query that does not parse, names a metric nothing exports, or requires a `job` no scrape produces."""
    try:
        names = promql_metric_names(expr)
        required_jobs = promql_job_values(expr)
    except ValueError as e:
        return [f"{where}: does not parse: {e}"]
    problems = [f"{where}: metric {n} is not exported" for n in sorted(names) if unknown_metric(n, recorded)]
    if jobs is not None:
        known = set(jobs)
        problems += [f"{where}: job={j!r} matches no scrape job {sorted(known)}" for j in sorted(required_jobs - known)]
    return problems


def rule_expressions(rule_object: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`(where, expr)` of every rule of a PrometheusRule."""
    out = []
    for group in (rule_object.get("spec") or {}).get("groups") or []:
        for rule in group.get("rules") or []:
            label = rule.get("alert") or rule.get("record") or "?"
            out.append((f"{name_of(rule_object)} {group.get('name')}/{label}", str(rule.get("expr", ""))))
    return out


def recorded_names(objects: Iterable[Mapping[str, Any]]) -> set[str]:
    return {
        rule["record"]
        for obj in objects
        if obj.get("kind") == "PrometheusRule"
        for group in (obj.get("spec") or {}).get("groups") or []
        for rule in group.get("rules") or []
        if rule.get("record")
    }


# Grafana's own variables: ranges and intervals become a duration, their _s/_ms forms a number.
_GRAFANA_TIME = re.compile(r"\$\{?__(?:rate_interval|interval|range|auto|auto_interval_\w+)(_ms|_s)?\}?")
_GRAFANA_VAR = re.compile(r"\$\{[^}]+\}|\[\[[^\]]+\]\]|\$\w+")


def substitute_grafana_variables(query: str) -> str:
    """A dashboard query as Prometheus would receive it, with every variable replaced by a plausible value."""
    query = _GRAFANA_TIME.sub(lambda m: {"_s": "300", "_ms": "300000"}.get(m.group(1) or "", "5m"), query)
    return _GRAFANA_VAR.sub("x", query)


_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<expr>.*),)?\s*(?P<label>[\w.]+)\s*\)\s*$", re.DOTALL)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.*)\)\s*$", re.DOTALL)


def _is_prometheus(datasource: Any) -> bool:
    """Unless a panel says otherwise, queries go to the dashboard's Prometheus data source."""
    kind = datasource.get("type") if isinstance(datasource, dict) else None
    return kind in (None, "prometheus") or (isinstance(kind, str) and kind.startswith("$"))


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`(where, PromQL)` for every Prometheus query of a Grafana dashboard: panel targets (rows included),
    annotations, and query variables (`label_values(expr, label)` and `query_result(expr)` give their PromQL)."""
    out: list[tuple[str, str]] = []

    def panels(items: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels") or [])

    for panel in panels(dashboard.get("panels") or []):
        for target in panel.get("targets") or []:
            source = target.get("datasource") or panel.get("datasource")
            if target.get("expr") and _is_prometheus(source):
                out.append((f"panel {panel.get('title')!r} {target.get('refId', '')}", target["expr"]))
    for annotation in (dashboard.get("annotations") or {}).get("list") or []:
        if annotation.get("expr") and _is_prometheus(annotation.get("datasource")):
            out.append((f"annotation {annotation.get('name')!r}", annotation["expr"]))
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        if variable.get("type") != "query" or not _is_prometheus(variable.get("datasource")):
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        match = _LABEL_VALUES.match(text) or _QUERY_RESULT.match(text)
        if match is not None:
            if match.group("expr"):
                out.append((f"variable ${variable.get('name')}", match.group("expr")))
        elif text.strip() and not text.strip().startswith(("label_names(", "metrics(")):
            out.append((f"variable ${variable.get('name')}", text))
    return [(where, substitute_grafana_variables(q)) for where, q in out]


def dashboards(objects: Iterable[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Grafana dashboards shipped as ConfigMaps (the sidecar's label `grafana_dashboard`), parsed."""
    out = []
    for obj in objects:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if obj.get("kind") == "ConfigMap" and "grafana_dashboard" in labels:
            for key, text in (obj.get("data") or {}).items():
                out.append((f"{name_of(obj)} {key}", json.loads(text)))
    return out


def scrape_jobs(objects: Sequence[Mapping[str, Any]]) -> set[str] | None:
    """The `job` label values the Prometheus Operator gives what these monitors scrape (a ServiceMonitor: the
    Service's name; a PodMonitor: namespace/name), or None where a `jobLabel` makes them unknowable."""
    jobs: set[str] = set()
    services = [o for o in objects if o.get("kind") == "Service"]
    for monitor in objects:
        spec = monitor.get("spec") or {}
        if monitor.get("kind") == "ServiceMonitor":
            if spec.get("jobLabel"):
                return None
            jobs |= {(s["metadata"]["name"]) for s in _monitored(monitor, services, _service_labels)}
        elif monitor.get("kind") == "PodMonitor":
            if spec.get("jobLabel"):
                return None
            jobs.add(f"{monitor['metadata'].get('namespace', '')}/{monitor['metadata']['name']}")
    return jobs


# Selectors and references --------------------------------------------------------------------------------


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions), or a plain map as Services use, against labels."""
    if not selector:
        return True
    plain = {k: v for k, v in selector.items() if k not in ("matchLabels", "matchExpressions")}
    wanted = {**plain, **(selector.get("matchLabels") or {})}
    if any(labels.get(k) != str(v) for k, v in wanted.items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, op, values = expression["key"], expression["operator"], expression.get("values") or []
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and labels.get(key) in values)
            or (op == "Exists" and key not in labels)
            or (op == "DoesNotExist" and key in labels)
        ):
            return False
    return True


@dataclass
class PodTemplate:
    """The pods an object makes: where, their labels, named ports, containers (env, mounts, probes), volumes
    and service account."""

    where: str
    namespace: str | None
    labels: dict[str, str]
    ports: set[str] = field(default_factory=set)
    containers: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    service_account: str | None = None


def pod_templates(objects: Iterable[Mapping[str, Any]]) -> list[PodTemplate]:
    """Pods of workloads, and the driver and executor pods the Spark Operator creates for a SparkApplication
    (its labels: the application's and the role's own, plus those the operator and Spark add)."""
    out = []
    for obj in objects:
        kind, meta, spec = obj.get("kind"), obj.get("metadata") or {}, obj.get("spec") or {}
        namespace = meta.get("namespace")
        if kind in _WORKLOAD_TEMPLATES or kind == "Pod":
            template: Any = obj
            for key in _WORKLOAD_TEMPLATES.get(str(kind), ()):
                template = (template or {}).get(key)
            template = template or {}
            pod = template.get("spec") or {}
            containers = [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]
            ports = {p["name"] for c in containers for p in c.get("ports") or [] if p.get("name")}
            labels = (template.get("metadata") or {}).get("labels") or {}
            account = pod.get("serviceAccountName") or pod.get("serviceAccount")
            volumes = list(pod.get("volumes") or [])
            out.append(PodTemplate(name_of(obj), namespace, dict(labels), ports, containers, volumes, account))
        elif kind == "SparkApplication":
            for role in ("driver", "executor"):
                part = spec.get(role) or {}
                labels = {
                    **(meta.get("labels") or {}),
                    **(part.get("labels") or {}),
                    "spark-role": role,
                    "sparkoperator.k8s.io/app-name": meta.get("name", ""),
                    "sparkoperator.k8s.io/launched-by-spark-operator": "true",
                }
                ports = {p["name"] for p in part.get("ports") or [] if p.get("name")}
                env = list(part.get("env") or []) + [
                    {"name": k, "value": v} for k, v in (part.get("envVars") or {}).items()
                ]
                env += [{"name": k, "valueFrom": v} for k, v in (part.get("envSecretKeyRefs") or {}).items()]
                container = {
                    "name": role,
                    "env": env,
                    "envFrom": part.get("envFrom") or [],
                    "ports": part.get("ports") or [],
                    "volumeMounts": part.get("volumeMounts") or [],
                }
                volumes = list(spec.get("volumes") or [])
                where = f"{name_of(obj)} {role}"
                out.append(
                    PodTemplate(where, namespace, labels, ports, [container], volumes, part.get("serviceAccount"))
                )
    return out


def _service_labels(service: Mapping[str, Any]) -> Mapping[str, str]:
    return (service.get("metadata") or {}).get("labels") or {}


def _monitored(monitor: Mapping[str, Any], candidates: Iterable[Any], labels_of: Any) -> list[Any]:
    """The Services (or pod templates) a ServiceMonitor (or PodMonitor) selects, namespaces included."""
    spec = monitor.get("spec") or {}
    own = (monitor.get("metadata") or {}).get("namespace")
    namespaces = spec.get("namespaceSelector") or {}
    out = []
    for candidate in candidates:
        ns = candidate.namespace if isinstance(candidate, PodTemplate) else candidate["metadata"].get("namespace")
        if not namespaces.get("any") and ns not in (namespaces.get("matchNames") or [own]):
            continue
        if selector_matches(spec.get("selector") or {}, labels_of(candidate)):
            out.append(candidate)
    return out


def reference_problems(objects: Sequence[Mapping[str, Any]]) -> list[str]:
    """Selectors that select nothing and names that point nowhere, which the API server accepts silently: a
    Service without endpoints, a ServiceMonitor or PodMonitor that scrapes nothing (or a port its targets do
    not have), a NetworkPolicy that protects no pod, envFrom naming a ConfigMap that is not deployed."""
    problems: list[str] = []
    pods = pod_templates(objects)
    services = [o for o in objects if o.get("kind") == "Service"]
    configmaps = {
        (o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects if o.get("kind") == "ConfigMap"
    }
    for service in services:
        selector = (service.get("spec") or {}).get("selector")
        ns = service["metadata"].get("namespace")
        matched = [p for p in pods if p.namespace == ns and selector_matches(selector, p.labels)] if selector else []
        if selector and not matched:
            problems.append(f"{name_of(service)}: selector {selector} matches no pod")
        for port in (service.get("spec") or {}).get("ports") or []:
            target = port.get("targetPort")
            if isinstance(target, str) and matched and not any(target in p.ports for p in matched):
                problems.append(f"{name_of(service)}: targetPort {target!r} is a named port of no selected pod")
    for monitor in objects:
        spec = monitor.get("spec") or {}
        if monitor.get("kind") == "ServiceMonitor":
            targets = _monitored(monitor, services, _service_labels)
            if not targets:
                problems.append(f"{name_of(monitor)}: selector matches no Service")
            names = {p.get("name") for s in targets for p in (s.get("spec") or {}).get("ports") or []}
            for endpoint in spec.get("endpoints") or []:
                if targets and endpoint.get("port") and endpoint["port"] not in names:
                    problems.append(f"{name_of(monitor)}: endpoint port {endpoint['port']!r} is on no selected Service")
        elif monitor.get("kind") == "PodMonitor":
            matched_pods = _monitored(monitor, pods, lambda p: p.labels)
            if not matched_pods:
                problems.append(f"{name_of(monitor)}: selector matches no pod")
            for endpoint in spec.get("podMetricsEndpoints") or []:
                port = endpoint.get("port")
                if matched_pods and port and not any(port in p.ports for p in matched_pods):
                    problems.append(f"{name_of(monitor)}: port {port!r} is a named port of no selected pod")
        elif monitor.get("kind") == "NetworkPolicy":
            selector = spec.get("podSelector") or {}
            ns = monitor["metadata"].get("namespace")
            if selector and not any(p.namespace == ns and selector_matches(selector, p.labels) for p in pods):
                problems.append(f"{name_of(monitor)}: podSelector {selector} matches no pod: it protects nothing")
    accounts = {
        (o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects if o.get("kind") == "ServiceAccount"
    }
    for pod in pods:
        problems += _pod_problems(pod, configmaps, accounts)
    return problems


def _pod_problems(pod: PodTemplate, configmaps: set[tuple[Any, Any]], accounts: set[tuple[Any, Any]]) -> list[str]:
    """What the API server accepts but the pod then fails on: a ConfigMap or service account that is not
    deployed, a mount of no volume (the Spark Operator's webhook drops it), a probe on a port it does not name."""
    problems = []
    if pod.service_account not in (None, "default") and (pod.namespace, pod.service_account) not in accounts:
        problems.append(f"{pod.where}: service account {pod.service_account!r} is not in the manifests")
    for volume in pod.volumes:
        ref = volume.get("configMap")
        if ref and not ref.get("optional") and (pod.namespace, ref.get("name")) not in configmaps:
            problems.append(
                f"{pod.where}: volume {volume.get('name')!r} names ConfigMap {ref.get('name')!r}, not in the manifests"
            )
    volume_names = {v.get("name") for v in pod.volumes}
    for container in pod.containers:
        where = f"{pod.where} container {container.get('name')}"
        for source in container.get("envFrom") or []:
            ref = source.get("configMapRef")
            if ref and not ref.get("optional") and (pod.namespace, ref.get("name")) not in configmaps:
                problems.append(f"{where}: envFrom ConfigMap {ref.get('name')!r} is not in the manifests")
        for mount in container.get("volumeMounts") or []:
            if mount.get("name") not in volume_names:
                problems.append(f"{where}: volumeMount {mount.get('name')!r} names no volume of the pod")
        port_names = {p.get("name") for p in container.get("ports") or [] if p.get("name")}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            for handler in ("httpGet", "tcpSocket", "grpc"):
                port = ((container.get(probe) or {}).get(handler) or {}).get("port")
                if isinstance(port, str) and port not in port_names:
                    problems.append(f"{where}: {probe} port {port!r} is not a named port of the container")
    return problems


# Long-running workloads -----------------------------------------------------------------------------------

#: Kinds whose pods run until stopped (Jobs and CronJobs run to completion: no probes expected).
_LONG_RUNNING = ("Deployment", "StatefulSet", "DaemonSet")
_SINGLE_WRITER_MODES = {"ReadWriteOnce", "ReadWriteOncePod"}


def workload_problems(objects: Sequence[Mapping[str, Any]], image: str = "cxr-stream") -> list[str]:
    """What the API server accepts but what breaks a long-running pod of our image (the worklist, the feeds,
    the exporters), each one a mistake a new Deployment copied from another is likely to make:

    - a container without a liveness or a readiness probe: a hung process is never restarted, a rollout does
      not wait for the new pod;
    - a Deployment that mounts a ReadWriteOnce claim writable (a cursor, a database) with more than one
      replica or without `strategy: Recreate`: two pods would share one state file, or the new pod waits for a
      volume the old one still holds;
    - a container port that no NetworkPolicy selecting the pod admits (where policies restrict its ingress):
      Prometheus, probes' peers and clients are cut off by the namespace's default deny."""
    problems: list[str] = []
    claims = {
        (o["metadata"].get("namespace"), o["metadata"]["name"]): set((o.get("spec") or {}).get("accessModes") or [])
        for o in objects
        if o.get("kind") == "PersistentVolumeClaim"
    }
    policies = [o for o in objects if o.get("kind") == "NetworkPolicy"]
    for obj in objects:
        kind = obj.get("kind")
        if kind not in _LONG_RUNNING:
            continue
        template: Any = obj
        for key in _WORKLOAD_TEMPLATES[str(kind)]:
            template = (template or {}).get(key)
        pod = (template or {}).get("spec") or {}
        ours = [c for c in pod.get("containers") or [] if image in str(c.get("image", ""))]
        if not ours:
            continue
        where = name_of(obj)
        for container in ours:
            missing = [p for p in ("livenessProbe", "readinessProbe") if not container.get(p)]
            problems += [f"{where} container {container.get('name')}: no {p}" for p in missing]
        if kind == "Deployment":
            problems += _single_writer_problems(obj, pod, claims)
        labels = ((template or {}).get("metadata") or {}).get("labels") or {}
        namespace = (obj.get("metadata") or {}).get("namespace")
        problems += _ingress_problems(where, namespace, labels, ours, policies)
    return problems


def _single_writer_problems(
    deployment: Mapping[str, Any], pod: Mapping[str, Any], claims: Mapping[tuple[Any, Any], set[str]]
) -> list[str]:
    namespace = (deployment.get("metadata") or {}).get("namespace")
    writable = {
        m.get("name") for c in pod.get("containers") or [] for m in c.get("volumeMounts") or [] if not m.get("readOnly")
    }
    spec = deployment.get("spec") or {}
    replicas = spec.get("replicas", 1)
    strategy = (spec.get("strategy") or {}).get("type", "RollingUpdate")
    problems = []
    for volume in pod.get("volumes") or []:
        claim = volume.get("persistentVolumeClaim")
        if not claim or claim.get("readOnly") or volume.get("name") not in writable:
            continue
        modes = claims.get((namespace, claim.get("claimName")))
        if modes and modes <= _SINGLE_WRITER_MODES and (replicas > 1 or strategy != "Recreate"):
            problems.append(
                f"{name_of(deployment)}: mounts ReadWriteOnce claim {claim.get('claimName')!r} writable with"
                f" {replicas} replica(s) and strategy {strategy}: one replica and `Recreate` (one writer, and the"
                " old pod lets go of the volume before the new one mounts it)"
            )
    return problems


def _ingress_problems(
    where: str,
    namespace: Any,
    labels: Mapping[str, str],
    containers: Sequence[Mapping[str, Any]],
    policies: Sequence[Mapping[str, Any]],
) -> list[str]:
    selecting = [
        p
        for p in policies
        if (p.get("metadata") or {}).get("namespace") == namespace
        and "Ingress" in ((p.get("spec") or {}).get("policyTypes") or ["Ingress"])
        and selector_matches((p.get("spec") or {}).get("podSelector") or {}, labels)
    ]
    if not selecting:
        return []  # nothing restricts its ingress
    rules = [r for p in selecting for r in (p.get("spec") or {}).get("ingress") or []]
    problems = []
    for container in containers:
        for port in container.get("ports") or []:
            if not any(_rule_admits(rule, port) for rule in rules):
                problems.append(
                    f"{where} container {container.get('name')}: port {port.get('name') or ''}"
                    f" {port.get('containerPort')}/{port.get('protocol', 'TCP')} is admitted by no NetworkPolicy"
                    " ingress rule"
                )
    return problems


def _rule_admits(rule: Mapping[str, Any], port: Mapping[str, Any]) -> bool:
    """Whether an ingress rule's `ports` admit a container port (no `ports`: every port)."""
    entries = rule.get("ports") or []
    if not entries:
        return True
    number, name, protocol = port.get("containerPort"), port.get("name"), port.get("protocol", "TCP")
    for entry in entries:
        if entry.get("protocol", "TCP") != protocol:
            continue
        wanted = entry.get("port")
        if wanted is None or wanted == name:
            return True
        if isinstance(wanted, int) and isinstance(number, int) and wanted <= number <= entry.get("endPort", wanted):
            return True
    return False


# Settings -------------------------------------------------------------------------------------------------


@functools.cache
def _settings_classes() -> tuple[type[Any], ...]:
    """Every pydantic-settings class in the packages, found in the source and imported (today: Settings)."""
    found = []
    for path in _package_files():
        for node in ast.walk(_module_tree(path)):
            if isinstance(node, ast.ClassDef) and any(
                (getattr(b, "id", None) or getattr(b, "attr", None)) == "BaseSettings" for b in node.bases
            ):
                module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                found.append(getattr(importlib.import_module(module), node.name))
    return tuple(found)


@dataclass(frozen=True)
class KnownSettings:
    """The environment variables the code reads: exact names, and prefixes of nested (mapping) settings."""

    names: frozenset[str]
    prefixes: frozenset[str]

    def knows(self, name: str) -> bool:
        upper = name.upper()
        return upper in self.names or any(upper.startswith(p) and len(upper) > len(p) for p in self.prefixes)


def _is_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation) or annotation
    if origin in (typing.Union, types.UnionType):  # `dict[str, str] | None` is a mapping setting too
        return any(_is_mapping(a) for a in typing.get_args(annotation))
    return isinstance(origin, type) and issubclass(origin, Mapping | dict)


@functools.cache
def known_settings() -> KnownSettings:
    """Derived from the code: each settings class's fields under its env_prefix (mapping fields take nested
    `PREFIX_FIELD__KEY` variables, e.g. CXR_KAFKA__SECURITY_PROTOCOL), plus CXR_ variables the packages read
    straight from the environment (e.g. CXR_CONFIG_FILE) or that the image's scripts read (k8s/image/*.sh)."""
    names: set[str] = set()
    prefixes: set[str] = set()
    for cls in _settings_classes():
        config = cls.model_config
        prefix = str(config.get("env_prefix", "")).upper()
        delimiter = config.get("env_nested_delimiter")
        for field_name, info in cls.model_fields.items():
            alias = info.validation_alias if isinstance(info.validation_alias, str) else info.alias
            env = (alias or prefix + field_name).upper()
            names.add(env)
            if delimiter and _is_mapping(info.annotation):
                prefixes.add(env + str(delimiter).upper())
    for path in _package_files():
        names |= {n for n in _environment_reads(path) if re.fullmatch(r"CXR_[A-Z0-9_]+", n)}
    for script in sorted(IMAGE_SCRIPTS.glob("*.sh")):
        names |= set(re.findall(r"\$\{?(CXR_[A-Z0-9_]+)", script.read_text()))
    return KnownSettings(frozenset(names), frozenset(prefixes))


@functools.cache
def _environment_reads(path: Path) -> frozenset[str]:
    """String constants a module hands to os.environ.get / os.getenv / os.environ[...]."""
    out: set[str] = set()
    for node in ast.walk(_module_tree(path)):
        args: list[ast.expr] = []
        if isinstance(node, ast.Call):
            text = ast.unparse(node.func)
            if text.endswith(("environ.get", "getenv", "environ.setdefault", "environ.pop")):
                args = node.args[:1]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("environ"):
            args = [node.slice]
        out |= {a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return frozenset(out)


def env_name_problems(where: str, names: Iterable[str], *, settings_source: bool) -> list[str]:
    """Variables named like a cxr-stream setting that the code does not know (a typo is silently ignored by
    pydantic). In a source of settings (a ConfigMap of CXR_ keys) every other name must be in FOREIGN_ENV."""
    known = known_settings()
    problems = []
    for name in names:
        looks_like_ours = name.upper().startswith(("CXR", "CRX"))
        if looks_like_ours and not known.knows(name):
            problems.append(f"{where}: {name} is not a setting cxr-stream knows")
        elif not looks_like_ours and settings_source and name not in FOREIGN_ENV:
            problems.append(f"{where}: {name} is not a CXR_ setting (or list it in FOREIGN_ENV)")
    return problems


def settings_value_problems(where: str, env: Mapping[str, str]) -> list[str]:
    """Values the settings classes reject (a number that is not one, `CXR_WORKLIST_START: earlist`), read the
    way the job reads them: from the environment, with nothing else of ours in it."""
    problems = []
    with _cxr_environment(env):
        for cls in _settings_classes():
            try:
                cls()
            except Exception as e:  # pydantic's ValidationError, and whatever a validator raises
                lines = [line for line in str(e).splitlines() if line.strip()]
                problems.append(f"{where}: {cls.__name__} rejects these values: {' / '.join(lines[:6])}")
    return problems


@contextlib.contextmanager
def _cxr_environment(env: Mapping[str, str]) -> Iterator[None]:
    """The process environment with exactly `env` as its CXR_ variables, for a moment; only those keys are
    touched (clearing the whole environment would briefly hide everything else from other threads)."""
    saved = {k: v for k, v in os.environ.items() if k.upper().startswith("CXR_")}
    try:
        for key in saved:
            del os.environ[key]
        os.environ.update(env)
        yield
    finally:
        for key in [k for k in os.environ if k.upper().startswith("CXR_")]:
            del os.environ[key]
        os.environ.update(saved)


def _string_data(obj: Mapping[str, Any]) -> dict[str, str]:
    return {**(obj.get("data") or {}), **(obj.get("stringData") or {})}


def settings_problems(objects: Sequence[Mapping[str, Any]]) -> list[str]:
    """ConfigMaps and Secrets of CXR_ settings, and the environment of every pod: names the code knows, values
    its settings accept."""
    problems: list[str] = []
    by_name = {(o.get("kind"), o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objects}
    for obj in objects:
        if obj.get("kind") in ("ConfigMap", "Secret"):
            keys = [*_string_data(obj), *(obj.get("binaryData") or {})]
            if any(k.upper().startswith("CXR_") for k in keys):
                problems += env_name_problems(name_of(obj), keys, settings_source=True)
                if obj.get("kind") == "ConfigMap":
                    values = {k: v for k, v in _string_data(obj).items() if k.upper().startswith("CXR_")}
                    problems += settings_value_problems(name_of(obj), values)
    for pod in pod_templates(objects):
        for container in pod.containers:
            where = f"{pod.where} container {container.get('name')}"
            env: dict[str, str] = {}
            for source in container.get("envFrom") or []:
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    ref = source.get(key)
                    found = by_name.get((kind, pod.namespace, (ref or {}).get("name")))
                    if ref and found:
                        prefix = source.get("prefix", "")
                        data = _string_data(found) if kind == "ConfigMap" else dict.fromkeys(_string_data(found), "")
                        env.update({prefix + k: v for k, v in data.items()})
                        if prefix:
                            problems += env_name_problems(where, [prefix + k for k in data], settings_source=False)
            literal = {e["name"]: str(e["value"]) for e in container.get("env") or [] if "value" in e}
            problems += env_name_problems(where, [e["name"] for e in container.get("env") or []], settings_source=False)
            merged = {k: v for k, v in {**env, **literal}.items() if k.upper().startswith("CXR_") and v != ""}
            if merged:
                problems += settings_value_problems(where, merged)
    return problems


#: The topic settings (environment variable: Settings field) whose topics must exist: the job's three and the
#: exporters' (`cxr export fhir` publishes to the FHIR topic; both exporters dead-letter to their own topic).
TOPIC_SETTINGS = {
    "CXR_INPUT_TOPIC": "input_topic",
    "CXR_RESULTS_TOPIC": "results_topic",
    "CXR_DEAD_LETTER_TOPIC": "dead_letter_topic",
    "CXR_FHIR_TOPIC": "fhir_topic",
    "CXR_EXPORT_DEAD_LETTER_TOPIC": "export_dead_letter_topic",
}


def topic_problems(objects: Sequence[Mapping[str, Any]], topics: Sequence[Mapping[str, Any]]) -> list[str]:
    """The topics cxr-stream is configured with (TOPIC_SETTINGS: the ConfigMap's value, else the code's
    default) exist as KafkaTopics, and each KafkaTopic can take acks=all writes with one broker down
    (min.insync.replicas < replicas)."""
    problems = []
    names = {str((t.get("spec") or {}).get("topicName") or t["metadata"]["name"]) for t in topics}
    from streaming.settings import Settings

    for obj in objects:
        if obj.get("kind") != "ConfigMap" or not any(k.startswith("CXR_") for k in obj.get("data") or {}):
            continue
        for env, attr in TOPIC_SETTINGS.items():
            topic = (obj.get("data") or {}).get(env) or str(Settings.model_fields[attr].default)
            if topic not in names:
                problems.append(f"{name_of(obj)}: {env}={topic} is not a KafkaTopic in k8s/ ({sorted(names)})")
    for pod in pod_templates(objects):
        for container in pod.containers:
            for var in container.get("env") or []:
                if var.get("name") in TOPIC_SETTINGS and "value" in var and str(var["value"]) not in names:
                    problems.append(
                        f"{pod.where} container {container.get('name')}: {var['name']}={var['value']} is not a"
                        f" KafkaTopic in k8s/ ({sorted(names)})"
                    )
    for topic in topics:
        spec = topic.get("spec") or {}
        isr = (spec.get("config") or {}).get("min.insync.replicas")
        if isr is not None and spec.get("replicas") is not None and int(isr) >= int(spec["replicas"]):
            problems.append(f"{name_of(topic)}: min.insync.replicas {isr} >= replicas {spec['replicas']}")
    return problems


# Dockerfile -----------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    """One Dockerfile instruction, continuation lines joined, comments dropped."""

    line: int
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile (continuations joined; comment lines, even inside them, dropped)."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        joined = " ".join(p.strip() for p in pending).strip()
        pending = []
        if joined:
            keyword, _, args = joined.partition(" ")
            out.append(Instruction(start, keyword.upper(), args.strip()))
    return out


_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")


def _expand(text: str, variables: Mapping[str, str]) -> str:
    return _VAR.sub(lambda m: variables.get(m.group(1) or m.group(3), m.group(2) or ""), text)


def _key_values(args: str) -> dict[str, str]:
    """`ENV`/`ARG`/`LABEL` arguments: `K=V K2="V 2"`, or the legacy `K V`."""
    parts = shlex.split(args, posix=True)
    if parts and "=" not in parts[0]:
        return {parts[0]: " ".join(parts[1:])}
    out: dict[str, str] = {}
    for part in parts:
        key, _, value = part.partition("=")
        out[key] = value
    return out


def _flags_and_operands(args: str) -> tuple[dict[str, str], list[str]]:
    if args.startswith("["):
        return {}, list(json.loads(args))
    flags: dict[str, str] = {}
    operands: list[str] = []
    for part in shlex.split(args):
        if part.startswith("--") and not operands:
            key, _, value = part[2:].partition("=")
            flags[key] = value
        else:
            operands.append(part)
    return flags, operands


def _dockerignore(root: Path) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    path = root / ".dockerignore"
    for line in path.read_text().splitlines() if path.is_file() else []:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().lstrip("/").removeprefix("./").rstrip("/")
        regex = "".join(
            ".*" if tok == "**" else "[^/]*" if tok == "*" else "[^/]" if tok == "?" else re.escape(tok)
            for tok in re.split(r"(\*\*|\*|\?)", pattern)
        )
        rules.append((negate, re.compile(regex.replace(".*/", "(.*/)?") + "(/.*)?")))
    return rules


def _ignored(rel: str, rules: Sequence[tuple[bool, re.Pattern[str]]]) -> bool:
    ignored = False
    for negate, pattern in rules:
        if pattern.fullmatch(rel):
            ignored = not negate
    return ignored


def final_user(text: str) -> str | None:
    """The USER the image's last stage runs as, its ARGs expanded (None: root by default)."""
    global_args: dict[str, str] = {}
    stage_args: dict[str, str] = {}
    user, in_stage = None, False
    for ins in parse_dockerfile(text):
        if ins.keyword == "ARG":
            values = _key_values(ins.args)
            (stage_args if in_stage else global_args).update(
                {k: v or global_args.get(k, "") for k, v in values.items()}
            )
        elif ins.keyword == "FROM":
            in_stage, stage_args, user = True, {}, None
        elif ins.keyword == "USER":
            user = _expand(ins.args.split()[0], {**global_args, **stage_args})
    return user


def run_as_user_problems(dockerfile: str, objects: Iterable[Mapping[str, Any]], image: str = "cxr-stream") -> list[str]:
    """Pods of our image that set runAsUser must use the image's UID: files the image gives that UID (its
    working directory, where Spark fetches the job's jars) are not writable by another one."""
    user = final_user(dockerfile) or "0"
    uid = int(user.split(":")[0]) if re.fullmatch(r"\d+(:\d+)?", user) else None
    problems = []
    for obj in objects:
        spec = obj.get("spec") or {}
        contexts: list[tuple[str, Any]] = []
        if obj.get("kind") == "SparkApplication" and image in str(spec.get("image", "")):
            for role in ("driver", "executor"):
                part = spec.get(role) or {}
                contexts += [(role, part.get("podSecurityContext")), (role, part.get("securityContext"))]
        elif obj.get("kind") in _WORKLOAD_TEMPLATES or obj.get("kind") == "Pod":
            template: Any = obj
            for key in _WORKLOAD_TEMPLATES.get(str(obj.get("kind")), ()):
                template = (template or {}).get(key)
            pod = (template or {}).get("spec") or {}
            ours = [c for c in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]
                    if image in str(c.get("image", ""))]  # fmt: skip
            if ours:
                contexts.append(("pod", pod.get("securityContext")))
                contexts += [(f"container {c.get('name')}", c.get("securityContext")) for c in ours]
        for where, context in contexts:
            run_as = (context or {}).get("runAsUser")
            if run_as is not None and run_as != uid:
                problems.append(f"{name_of(obj)} {where}: runAsUser {run_as}, but the image's USER is {user}")
    return problems


def dockerfile_problems(text: str, root: Path = ROOT) -> list[str]:
    """Checks hadolint would make, and some it cannot: every COPY/ADD source exists in the build context and
    is not excluded by .dockerignore; base images are pinned (a tag or digest, never `latest`); the final stage
    runs as a numeric non-zero UID (so that Kubernetes' runAsNonRoot can verify it); no ENV or ARG carries a
    secret (both end up in the image's history)."""
    problems: list[str] = []
    instructions = parse_dockerfile(text)
    rules = _dockerignore(root)
    global_args: dict[str, str] = {}
    stage_args: dict[str, str] = {}
    stages: set[str] = set()
    user: str | None = None
    in_stage = False
    secret = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|CREDENTIAL|ACCESS_?KEY", re.IGNORECASE)
    for ins in instructions:
        where = f"Dockerfile:{ins.line} {ins.keyword}"
        variables = {**global_args, **stage_args}
        if ins.keyword == "ARG":
            values = _key_values(ins.args)
            (stage_args if in_stage else global_args).update(
                {k: v or global_args.get(k, "") for k, v in values.items()}
            )
            problems += [f"{where}: build argument {k} looks like a secret" for k in values if secret.search(k)]
        elif ins.keyword == "FROM":
            in_stage, stage_args, user = True, {}, None
            parts = [p for p in ins.args.split() if not p.startswith("--")]
            image = _expand(parts[0], global_args)
            if len(parts) >= 3 and parts[1].upper() == "AS":
                stages.add(parts[2].lower())
            if image.lower() in stages or image == "scratch":
                continue
            last = image.rsplit("/", 1)[-1]
            if "@" not in image and (":" not in last or last.endswith(":latest")):
                problems.append(f"{where}: base image {image!r} is not pinned to a tag (or digest) other than latest")
        elif ins.keyword == "USER":
            user = _expand(ins.args.split()[0], variables)
        elif ins.keyword == "ENV":
            problems += [f"{where}: {k} looks like a secret" for k in _key_values(ins.args) if secret.search(k)]
        elif ins.keyword in ("COPY", "ADD"):
            flags, operands = _flags_and_operands(ins.args)
            if "from" in flags or len(operands) < 2:
                continue
            for source in operands[:-1]:
                source = _expand(source, variables)
                if ins.keyword == "ADD" and re.match(r"^(https?|git)://|^git@", source):
                    continue
                problems += _copy_source_problems(where, source, root, rules)
    if user is None:
        problems.append("Dockerfile: the final stage has no USER: the image runs as root")
    elif not re.fullmatch(r"\d+(:\d+)?", user) or int(user.split(":")[0]) == 0:
        problems.append(
            f"Dockerfile: final USER {user!r} is not a numeric non-zero UID (runAsNonRoot cannot check a name)"
        )
    return problems


def _copy_source_problems(
    where: str, source: str, root: Path, rules: Sequence[tuple[bool, re.Pattern[str]]]
) -> list[str]:
    rel = source.lstrip("/").removeprefix("./").rstrip("/") or "."
    if rel == ".":
        return []
    matches = [p for p in root.glob(rel)] if any(c in rel for c in "*?[") else [root / rel]
    present = [p for p in matches if p.exists() and not _ignored(str(p.relative_to(root)), rules)]
    if not present:
        excluded = any(p.exists() for p in matches)
        why = "is excluded by .dockerignore" if excluded else "does not exist in the build context"
        return [f"{where}: source {source!r} {why}"]
    return []


#: Where the image puts what the repository builds (Dockerfile: `COPY --from=jvm /build/jvm/lib/ ...`).
IMAGE_JVM_LIB = "/opt/cxr/jvm/lib/"
_SITE_PACKAGES = re.compile(r"/usr/local/lib/(python\d+\.\d+)/site-packages/([\w./-]+)")
_IMAGE_JARS = re.compile(re.escape(IMAGE_JVM_LIB) + r"([\w./-]+\.jar)")


def image_path_problems(dockerfile: str, objects: Iterable[Mapping[str, Any]], root: Path = ROOT) -> list[str]:
    """Paths into the image that the manifests name (mainApplicationFile, CXR_MODEL_BUNDLE, the log4j2 file,
    spark.jars) exist in what the image is built from: the Python of its base image, the packages' files, the
    jars Maven resolves (jvm/lib, built by `make install`). A renamed module or a connector bump that misses
    the manifests fails here, not in the first pod."""
    problems: set[str] = set()
    text = json.dumps(list(objects))
    match = re.search(r"python:(\d+\.\d+)", dockerfile)
    for version, rest in _SITE_PACKAGES.findall(text):
        if match is not None and version != f"python{match.group(1)}":
            problems.add(f"manifests name /usr/local/lib/{version}/ but the image has python{match.group(1)}")
        top = rest.split("/", 1)[0]
        if top in PACKAGES and not (root / rest.rstrip("/.")).exists():
            problems.add(f"manifests name {rest} in the image's site-packages: no such file in the repository")
    jars = _IMAGE_JARS.findall(text)
    if jars and IMAGE_JVM_LIB not in dockerfile:
        problems.add(f"manifests name jars under {IMAGE_JVM_LIB} but the Dockerfile puts none there")
    if jars and not (root / "jvm" / "lib").is_dir():
        problems.add("jvm/lib is missing: run `make install` (Maven resolves the jars the manifests name)")
    else:
        problems |= {f"{IMAGE_JVM_LIB}{jar}: Maven resolves no such jar (jvm/lib)" for jar in jars
                     if not (root / "jvm" / "lib" / jar).is_file()}  # fmt: skip
    return sorted(problems)
