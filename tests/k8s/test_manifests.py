"""The deployment under k8s/, checked offline: whatever the base and each overlay render to must be what the
API server, the operators, Prometheus and the job itself accept. See k8s_checks for what each check catches;
test_k8s_checks_fail.py proves on broken input that each of them can fail."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import k8s_checks as checks
import pytest

#: What gets deployed: the base and each overlay. Every check runs on each of them.
KUSTOMIZATIONS = checks.kustomizations()
IDS = [str(p.relative_to(checks.ROOT)) for p in KUSTOMIZATIONS]
#: Parts the base or an overlay includes (k8s/worklist...): they must build on their own into valid objects.
NESTED = checks.nested_kustomizations()


def _report(problems: list[str]) -> str:
    return "\n".join(["", *problems])


def _render(directory: Path) -> tuple[dict[str, Any], ...]:
    try:
        return checks.render(directory)
    except checks.ToolMissing as e:
        pytest.fail(str(e))  # CI: a missing tool is a failure, never a skip


def _refresh_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("k8s_schemas_refresh", checks.SCHEMAS / "refresh.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_kustomize_is_installed_at_the_pinned_version() -> None:
    try:
        checks.kustomize()
    except checks.ToolMissing as e:
        pytest.fail(str(e))


def test_every_overlay_is_a_kustomization() -> None:
    """A folder under k8s/overlays without a kustomization would be skipped by every check below."""
    assert [p for p in KUSTOMIZATIONS if checks.kustomization_file(p) is None] == []


def test_every_manifest_is_deployed_or_known_to_be_applied_on_its_own() -> None:
    assert checks.orphan_manifests() == []


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=IDS)
def test_rendered_objects_match_kubernetes_and_crd_schemas(directory: Path) -> None:
    objects = _render(directory)
    assert objects, f"{directory} renders nothing"
    problems = [p for obj in objects for p in checks.schema_errors(obj)]
    assert problems == [], _report(problems)


@pytest.mark.parametrize("directory", NESTED, ids=[str(p.relative_to(checks.ROOT)) for p in NESTED])
def test_included_kustomizations_build_on_their_own(directory: Path) -> None:
    problems = [p for obj in _render(directory) for p in checks.schema_errors(obj)]
    assert problems == [], _report(problems)


@pytest.mark.parametrize("path", sorted(checks.SEPARATELY_APPLIED), ids=str)
def test_separately_applied_manifests_match_their_schemas(path: str) -> None:
    objects = checks.load_documents(checks.K8S / path)
    assert objects
    problems = [p for obj in objects for p in checks.schema_errors(obj)]
    assert problems == [], _report(problems)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=IDS)
def test_selectors_and_references_resolve(directory: Path) -> None:
    problems = checks.reference_problems(_render(directory))
    assert problems == [], _report(problems)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=IDS)
def test_long_running_workloads_have_probes_one_writer_and_open_ports(directory: Path) -> None:
    """Every Deployment of the image (worklist, feeds, exporters): probes, one writer per ReadWriteOnce claim
    (one replica, Recreate), and a NetworkPolicy ingress rule for each of its ports."""
    objects = _render(directory)
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    assert {"worklist", "exporter"} <= {
        d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") for d in deployments
    }
    problems = checks.workload_problems(objects)
    assert problems == [], _report(problems)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=IDS)
def test_settings_and_environment_are_known_to_the_code(directory: Path) -> None:
    objects = _render(directory)
    assert any(o["kind"] == "ConfigMap" and "CXR_MODEL_BUNDLE" in (o.get("data") or {}) for o in objects)
    problems = checks.settings_problems(objects)
    assert problems == [], _report(problems)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=IDS)
def test_alert_rules_parse_and_use_exported_metrics(directory: Path) -> None:
    objects = _render(directory)
    rules = [r for o in objects if o["kind"] == "PrometheusRule" for r in checks.rule_expressions(o)]
    assert rules, "no PrometheusRule rendered"
    recorded, jobs = checks.recorded_names(objects), checks.scrape_jobs(objects)
    problems = [p for where, expr in rules for p in checks.promql_problems(where, expr, recorded, jobs)]
    assert problems == [], _report(problems)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=IDS)
def test_dashboard_queries_parse_and_use_exported_metrics(directory: Path) -> None:
    objects = _render(directory)
    found = checks.dashboards(objects)
    assert found, "no Grafana dashboard ConfigMap rendered"
    recorded = checks.recorded_names(objects)
    problems = []
    for name, dashboard in found:
        queries = checks.dashboard_queries(dashboard)
        assert queries, f"{name}: no Prometheus queries found"
        problems += [p for where, q in queries for p in checks.promql_problems(f"{name} {where}", q, recorded)]
    assert problems == [], _report(problems)


def test_json_files_parse_and_dashboards_have_a_uid() -> None:
    """The dashboard files themselves, as Grafana's import (not only the sidecar) reads them."""
    files = [p for p in sorted(checks.K8S.rglob("*.json")) if checks.SCHEMAS not in p.parents]
    assert files
    for path in files:
        document = json.loads(path.read_text())
        if isinstance(document, dict) and "panels" in document:
            assert document.get("uid") and document.get("title"), path


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=IDS)
def test_paths_into_the_image_exist(directory: Path) -> None:
    problems = checks.image_path_problems(checks.DOCKERFILE.read_text(), _render(directory))
    assert problems == [], _report(problems)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=IDS)
def test_kafka_topics_cover_the_configured_topics(directory: Path) -> None:
    topics = [o for p in checks.SEPARATELY_APPLIED for o in checks.load_documents(checks.K8S / p)]
    topics = [t for t in topics if t.get("kind") == "KafkaTopic"]
    assert len(topics) >= len(checks.TOPIC_SETTINGS)
    problems = checks.topic_problems(_render(directory), topics)
    assert problems == [], _report(problems)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=IDS)
def test_spark_metric_names_match_the_allow_list(directory: Path) -> None:
    """EXTERNAL_METRIC_PREFIXES allows Spark's servlet names for one spark.metrics.namespace: this one."""
    apps = [o for o in _render(directory) if o["kind"] == "SparkApplication"]
    assert apps
    for app in apps:
        namespace = (app["spec"].get("sparkConf") or {}).get("spark.metrics.namespace")
        assert namespace == checks.SPARK_METRICS_NAMESPACE, checks.name_of(app)


def test_crd_schemas_are_valid_strict_and_documented() -> None:
    """The files in k8s/schemas are JSON Schemas, generated by refresh.py from the versions README.md names."""
    refresh = _refresh_module()
    readme = (checks.SCHEMAS / "README.md").read_text()
    files = sorted(checks.SCHEMAS.glob("*/*.json"))
    assert len(files) >= 6
    for path in files:
        schema = json.loads(path.read_text())
        jsonschema.validators.validator_for(schema).check_schema(schema)
        assert schema["$comment"].startswith("Generated by k8s/schemas/refresh.py"), path
        assert schema["additionalProperties"] is False, path
    for source in refresh.SOURCES:
        assert source.version in readme, f"k8s/schemas/README.md does not name {source.label}"
