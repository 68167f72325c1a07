"""Each check of k8s_checks, given a deliberately broken manifest, expression, key or Dockerfile: it must say
so. Without these, a check that silently finds nothing would look exactly like a deployment without defects."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import k8s_checks as checks
import pytest

# Schemas --------------------------------------------------------------------------------------------------

DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "cxr-worklist", "namespace": "cxr", "labels": {"app": "cxr-worklist"}},
    "spec": {
        "replicas": 1,
        "selector": {"matchLabels": {"app": "cxr-worklist"}},
        "template": {
            "metadata": {"labels": {"app": "cxr-worklist"}},
            "spec": {
                "containers": [
                    {
                        "name": "worklist",
                        "image": "ghcr.io/example/cxr-stream:0.1.0",
                        "args": ["cxr", "worklist"],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "env": [{"name": "CXR_WORKLIST_PORT", "value": "8080"}],
                        "envFrom": [{"configMapRef": {"name": "cxr-stream"}}],
                    }
                ]
            },
        },
    },
}

SPARK_APP: dict[str, Any] = {
    "apiVersion": "sparkoperator.k8s.io/v1beta2",
    "kind": "SparkApplication",
    "metadata": {"name": "cxr-stream", "namespace": "cxr"},
    "spec": {
        "type": "Python",
        "mode": "cluster",
        "image": "ghcr.io/example/cxr-stream:0.1.0",
        "mainApplicationFile": "local:///usr/local/lib/python3.11/site-packages/streaming/cli.py",
        "sparkVersion": "4.2.0",
        "driver": {"cores": 1, "memory": "2g", "labels": {"app.kubernetes.io/component": "driver"}},
        "executor": {"instances": 2, "cores": 4, "memory": "6g"},
    },
}

TOPIC: dict[str, Any] = {
    "apiVersion": "kafka.strimzi.io/v1beta2",
    "kind": "KafkaTopic",
    "metadata": {"name": "cxr-references", "namespace": "kafka", "labels": {"strimzi.io/cluster": "cxr-kafka"}},
    "spec": {"topicName": "cxr.references", "partitions": 12, "replicas": 3, "config": {"min.insync.replicas": "2"}},
}


def broken(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `obj` with the dotted `path` set to `value` (numbers index lists)."""
    out = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node: Any = out
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[int(last) if last.isdigit() else last] = value
    return out


def test_valid_objects_pass() -> None:
    for obj in (DEPLOYMENT, SPARK_APP, TOPIC):
        assert checks.schema_errors(obj) == [], checks.name_of(obj)


@pytest.mark.parametrize(
    ("obj", "path", "value", "expected"),
    [
        (DEPLOYMENT, "spec.replica", 2, "replica"),  # misspelled field: strict schema
        (DEPLOYMENT, "spec.template.spec.containers.0.resources", {"limit": {"cpu": "1"}}, "limit"),
        (DEPLOYMENT, "spec.template.spec.containers.0.ports.0.containerPort", "http", "http"),
        (SPARK_APP, "spec.driver.coresLimit", "2", "coresLimit"),  # the CRD says coreLimit
        (SPARK_APP, "spec.mode", "client-ish", "client-ish"),
        (SPARK_APP, "metadata.lables", {"a": "b"}, "lables"),  # ObjectMeta is strict for custom resources too
        (TOPIC, "spec.partitions", "twelve", "twelve"),
        (TOPIC, "spec.topicname", "x", "topicname"),
    ],
)
def test_schema_errors_are_found(obj: dict[str, Any], path: str, value: Any, expected: str) -> None:
    problems = checks.schema_errors(broken(obj, path, value))
    assert problems and expected in "\n".join(problems)


def test_unknown_kinds_fail() -> None:
    unknown = {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g"}, "spec": {}}
    assert "unknown kind" in " ".join(checks.schema_errors(unknown))
    old_api = broken(DEPLOYMENT, "apiVersion", "extensions/v1beta1")  # gone since Kubernetes 1.16
    assert "unknown kind" in " ".join(checks.schema_errors(old_api))
    assert checks.schema_errors({"kind": "ConfigMap"}) != []


def _refresh() -> ModuleType:
    spec = importlib.util.spec_from_file_location("k8s_schemas_refresh", checks.SCHEMAS / "refresh.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_crd_conversion_is_strict_where_the_crd_is_closed() -> None:
    refresh = _refresh()
    schema = refresh.strict_schema(
        {
            "type": "object",
            "description": "dropped",
            "properties": {
                "spec": {"type": "object", "properties": {"properties": {"type": "string"}}},
                "config": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "port": {"x-kubernetes-int-or-string": True},
                "note": {"type": "string", "nullable": True},
                "policy": {"type": "string", "pattern": "^(?i)(abort|warn)?$"},
            },
        }
    )
    assert "description" not in schema and schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["spec"]["additionalProperties"] is False
    assert props["spec"]["properties"]["properties"] == {"type": "string"}  # a field named `properties`
    assert "additionalProperties" not in props["config"]
    assert props["labels"]["additionalProperties"] == {"type": "string"}
    assert props["port"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert props["note"]["type"] == ["string", "null"]
    assert props["policy"]["pattern"] == "(?i)^(abort|warn)?$"


# PromQL and metrics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        "sum(rate(cxr_references_total[5m])) by (outcome)",
        "histogram_quantile(0.95, sum by (le) (rate(cxr_end_to_end_latency_seconds_bucket[10m])))",
        'max_over_time(cxr_model_info{job="j"}[6h] offset 10m)',
        "up == 0",
        "metrics_cxr_stream_driver_jvm_heap_used_Value > 0",
        'absent({__name__="cxr_query_up"})',
    ],
)
def test_good_queries_pass(expr: str) -> None:
    assert checks.promql_problems("rule", expr) == []


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("sum(rate(cxr_references_total[5m])", "does not parse"),
        ("rate(cxr_references_total[5m]) > > 1", "does not parse"),
        ("rate(cxr_refrences_total[5m])", "cxr_refrences_total is not exported"),
        ("rate(cxr_references[5m])", "cxr_references is not exported"),  # a counter is exported as _total
        ("cxr_end_to_end_latency_seconds", "is not exported"),  # a histogram has only _bucket/_sum/_count
        ('absent({__name__="cxr_query_upp"})', "cxr_query_upp is not exported"),
        ("kube_pod_info", "kube_pod_info is not exported"),  # not in the allow-list
        ("metrics_other_app_driver_jvm_heap_used_Value", "is not exported"),  # another spark.metrics.namespace
    ],
)
def test_bad_queries_fail(expr: str, expected: str) -> None:
    assert expected in " ".join(checks.promql_problems("rule", expr))


def test_recording_rules_and_jobs() -> None:
    assert checks.promql_problems("r", "cxr:scored:rate5m > 0", recorded=["cxr:scored:rate5m"]) == []
    assert checks.promql_problems("r", "cxr:scored:rate5m > 0") != []
    jobs = ["cxr-stream-driver-metrics"]
    assert checks.promql_problems("r", 'cxr_query_up{job="cxr-stream-driver-metrics"}', jobs=jobs) == []
    problems = checks.promql_problems("r", 'cxr_query_up{job="cxr-stream-driver-metric"}', jobs=jobs)
    assert "matches no scrape job" in " ".join(problems)


def test_exported_metrics_come_from_the_code() -> None:
    exported = checks.exported_metrics()
    assert {"cxr_references_total", "cxr_dead_letters_total", "cxr_end_to_end_latency_seconds_bucket"} <= exported
    assert {"cxr_model_info", "cxr_query_up", "cxr_worklist_scoring_stalled"} <= exported
    assert "cxr_references" not in exported


def test_metric_families_are_found_only_where_prometheus_client_builds_them(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from collections import Counter\n"
        "from prometheus_client.core import GaugeMetricFamily\n"
        'GaugeMetricFamily("cxr_a", "doc")\n'
        'Counter("not a metric")\n'
    )
    assert checks.metric_families_in_source(module) == {"cxr_a": "gauge"}


DASHBOARD: dict[str, Any] = {
    "panels": [
        {"title": "ok", "targets": [{"refId": "A", "expr": "sum(rate(cxr_references_total[$__rate_interval]))"}]},
        {
            "type": "row",
            "title": "row",
            "panels": [{"title": "nested", "targets": [{"refId": "B", "expr": 'cxr_typo{namespace="$namespace"}'}]}],
        },
        {"title": "logs", "datasource": {"type": "loki"}, "targets": [{"expr": '{app="x"} |= "error"'}]},
    ],
    "annotations": {"list": [{"name": "a", "expr": "changes(cxr_model_info[$__interval]) > 0"}]},
    "templating": {
        "list": [
            {"name": "namespace", "type": "query", "query": {"query": "label_values(cxr_query_upp, namespace)"}},
            {"name": "ds", "type": "datasource", "query": "prometheus"},
        ]
    },
}


def test_dashboard_queries_are_found_substituted_and_checked() -> None:
    queries = dict(checks.dashboard_queries(DASHBOARD))
    assert queries["panel 'ok' A"] == "sum(rate(cxr_references_total[5m]))"
    assert queries["annotation 'a'"] == "changes(cxr_model_info[5m]) > 0"
    assert queries["variable $namespace"] == "cxr_query_upp"
    assert not any("loki" in where or "|=" in q for where, q in queries.items())  # not Prometheus: not checked
    problems = [p for where, q in queries.items() for p in checks.promql_problems(where, q)]
    assert len(problems) == 2 and "cxr_typo" in problems[0] and "cxr_query_upp" in problems[1]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("rate(x[$__rate_interval])", "rate(x[5m])"),
        ("increase(x[${__range}])", "increase(x[5m])"),
        ("x / $__range_s", "x / 300"),
        ('x{namespace=~"${namespace:regex}", pod="[[pod]]"}', 'x{namespace=~"x", pod="x"}'),
    ],
)
def test_grafana_variables(query: str, expected: str) -> None:
    assert checks.substitute_grafana_variables(query) == expected


# Settings -------------------------------------------------------------------------------------------------


def test_settings_names() -> None:
    known = checks.known_settings()
    for name in ("CXR_MODEL_BUNDLE", "CXR_KAFKA__SASL_JAAS_CONFIG", "CXR_CONFIG_FILE", "cxr_metrics_port"):
        assert known.knows(name), name
    for name in ("CXR_MODEL_BUNDEL", "CXR_KAFKA__", "CXR_METRICS", "CXR_SPARK_CONF_X"):
        assert not known.knows(name), name
    assert checks.env_name_problems("cm", ["CXR_MODEL_BUNDEL"], settings_source=False) != []
    assert checks.env_name_problems("cm", ["CRX_MODEL_BUNDLE"], settings_source=False) != []
    assert checks.env_name_problems("pod", ["SPARK_LOCAL_DIRS"], settings_source=False) == []
    assert checks.env_name_problems("cm", ["SPARK_LOCAL_DIRS"], settings_source=True) != []
    assert checks.env_name_problems("cm", ["PYTHONUNBUFFERED"], settings_source=True) == []


@pytest.mark.parametrize(
    ("env", "bad"),
    [
        ({"CXR_METRICS_PORT": "nine-one-oh-eight"}, True),
        ({"CXR_WORKLIST_START": "earlist"}, True),
        ({"CXR_MAX_OFFSETS_PER_TRIGGER": "0"}, True),
        ({"CXR_FAIL_ON_DATA_LOSS": "maybe"}, True),
        ({"CXR_METRICS_PORT": "9108", "CXR_WORKLIST_START": "latest", "CXR_ALLOWED_ROOTS": "/a,/b"}, False),
    ],
)
def test_settings_values(env: dict[str, str], bad: bool) -> None:
    assert bool(checks.settings_value_problems("cm", env)) == bad


def _configmap(data: dict[str, str], name: str = "cxr-stream") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "cxr"}, "data": data}


def test_settings_problems_in_configmaps_and_pods() -> None:
    good = _configmap({"CXR_MODEL_BUNDLE": "/m", "CXR_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"})
    assert checks.settings_problems([good, DEPLOYMENT]) == []
    typo = _configmap({"CXR_MODEL_BUNDEL": "/m", "LOG_LEVEL": "x"})
    assert len(checks.settings_problems([typo])) == 2
    bad_value = _configmap({"CXR_METRICS_PORT": "x"})
    assert "rejects" in " ".join(checks.settings_problems([bad_value]))
    env_typo = broken(DEPLOYMENT, "spec.template.spec.containers.0.env.0.name", "CXR_WORKLIST_PROT")
    assert "CXR_WORKLIST_PROT" in " ".join(checks.settings_problems([good, env_typo]))
    env_value = broken(DEPLOYMENT, "spec.template.spec.containers.0.env.0.value", "http")
    assert "rejects" in " ".join(checks.settings_problems([good, env_value]))
    spark_env = broken(SPARK_APP, "spec.driver.env", [{"name": "CXR_CHECKPOINT_DIRECTORY", "value": "/c"}])
    assert "CXR_CHECKPOINT_DIRECTORY" in " ".join(checks.settings_problems([spark_env]))


DEFAULT_TOPICS = ("cxr.references", "cxr.results", "cxr.dead-letter", "cxr.fhir", "cxr.export-dead-letter")


def test_topics_must_exist_and_survive_a_broker() -> None:
    assert checks.topic_problems([_configmap({"CXR_RESULTS_TOPIC": "cxr.references"})], [TOPIC]) != []  # defaults
    topics = [broken(TOPIC, "spec.topicName", n) for n in DEFAULT_TOPICS]
    assert checks.topic_problems([_configmap({"CXR_MODEL_BUNDLE": "/m"})], topics) == []
    renamed = _configmap({"CXR_INPUT_TOPIC": "cxr.refs"})
    assert "cxr.refs" in " ".join(checks.topic_problems([renamed], topics))
    # The exporters' topics, by default and renamed, in a ConfigMap or in a pod's own environment.
    without_fhir = [t for t in topics if t["spec"]["topicName"] != "cxr.fhir"]
    assert "CXR_FHIR_TOPIC=cxr.fhir" in " ".join(checks.topic_problems([_configmap({"CXR_X": "1"})], without_fhir))
    moved = _configmap({"CXR_EXPORT_DEAD_LETTER_TOPIC": "cxr.export-dlq"})
    assert "cxr.export-dlq" in " ".join(checks.topic_problems([moved], topics))
    pod_env = broken(DEPLOYMENT, "spec.template.spec.containers.0.env", [{"name": "CXR_FHIR_TOPIC", "value": "fhir"}])
    assert "CXR_FHIR_TOPIC=fhir" in " ".join(checks.topic_problems([pod_env], topics))
    fragile = broken(TOPIC, "spec.config", {"min.insync.replicas": "3"})
    assert "min.insync.replicas" in " ".join(checks.topic_problems([], [fragile]))


# Selectors and references ---------------------------------------------------------------------------------


def _service(selector: dict[str, str], port: str = "http", target: Any = "http") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "cxr-worklist", "namespace": "cxr", "labels": {"app": "cxr-worklist"}},
        "spec": {"selector": selector, "ports": [{"name": port, "port": 80, "targetPort": target}]},
    }


def _monitor(port: str, selector: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "m", "namespace": "cxr"},
        "spec": {"selector": {"matchLabels": selector}, "endpoints": [{"port": port}]},
    }


def _policy(selector: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "cxr"},
        "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress"]},
    }


def test_references_that_resolve_pass() -> None:
    objects = [
        _configmap({"CXR_MODEL_BUNDLE": "/m"}),
        DEPLOYMENT,
        SPARK_APP,
        _service({"app": "cxr-worklist"}),
        _monitor("http", {"app": "cxr-worklist"}),
        _policy({"app": "cxr-worklist"}),
        _policy({"spark-role": "driver", "sparkoperator.k8s.io/app-name": "cxr-stream"}),
    ]
    assert checks.reference_problems(objects) == []


@pytest.mark.parametrize(
    ("objects", "expected"),
    [
        ([DEPLOYMENT, _service({"app": "cxr-worklists"})], "matches no pod"),
        ([DEPLOYMENT, _service({"app": "cxr-worklist"}, target="metrics")], "targetPort 'metrics'"),
        ([DEPLOYMENT, _service({"app": "cxr-worklist"}), _monitor("http", {"app": "x"})], "matches no Service"),
        ([DEPLOYMENT, _service({"app": "cxr-worklist"}), _monitor("web", {"app": "cxr-worklist"})], "port 'web'"),
        ([DEPLOYMENT, SPARK_APP, _policy({"spark-role": "drivers"})], "protects nothing"),
        ([DEPLOYMENT], "envFrom ConfigMap 'cxr-stream'"),
        ([broken(SPARK_APP, "spec.driver.serviceAccount", "cxr-sparkk")], "service account 'cxr-sparkk'"),
        (
            [broken(SPARK_APP, "spec.driver.volumeMounts", [{"name": "checkpoint", "mountPath": "/c"}])],
            "volumeMount 'checkpoint' names no volume",
        ),
        (
            [broken(DEPLOYMENT, "spec.template.spec.containers.0.readinessProbe", {"httpGet": {"port": "htp"}})],
            "readinessProbe port 'htp'",
        ),
        (
            [broken(DEPLOYMENT, "spec.template.spec.volumes", [{"name": "c", "configMap": {"name": "nope"}}])],
            "ConfigMap 'nope'",
        ),
    ],
)
def test_references_that_point_nowhere_fail(objects: list[dict[str, Any]], expected: str) -> None:
    assert expected in " ".join(checks.reference_problems(objects))


def test_scrape_jobs_are_the_monitored_services() -> None:
    objects = [DEPLOYMENT, _service({"app": "cxr-worklist"}), _monitor("http", {"app": "cxr-worklist"})]
    assert checks.scrape_jobs(objects) == {"cxr-worklist"}


# Long-running workloads -----------------------------------------------------------------------------------

_PROBES = {"httpGet": {"path": "/healthz", "port": "http"}}
#: The worklist as it should be: probes, one replica and Recreate for its ReadWriteOnce database, and a policy
#: that admits its port.
WORKLOAD: dict[str, Any] = broken(
    broken(
        broken(DEPLOYMENT, "spec.template.spec.containers.0.livenessProbe", _PROBES),
        "spec.template.spec.containers.0.readinessProbe",
        _PROBES,
    ),
    "spec.strategy",
    {"type": "Recreate"},
)
WORKLOAD["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [{"name": "db", "mountPath": "/data"}]
WORKLOAD["spec"]["template"]["spec"]["volumes"] = [{"name": "db", "persistentVolumeClaim": {"claimName": "db"}}]
CLAIM: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "PersistentVolumeClaim",
    "metadata": {"name": "db", "namespace": "cxr"},
    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
}
DENY: dict[str, Any] = broken(_policy({}), "spec.podSelector", {})
ADMIT: dict[str, Any] = broken(_policy({"app": "cxr-worklist"}), "spec.ingress", [{"ports": [{"port": 8080}]}])


def test_long_running_workloads_that_are_right_pass() -> None:
    assert checks.workload_problems([WORKLOAD, CLAIM, DENY, ADMIT]) == []
    # No policy restricting ingress: nothing to admit. A port admitted by name, or by a rule without ports.
    assert checks.workload_problems([WORKLOAD, CLAIM]) == []
    by_name = broken(ADMIT, "spec.ingress", [{"ports": [{"port": "http", "protocol": "TCP"}]}])
    assert checks.workload_problems([WORKLOAD, CLAIM, DENY, by_name]) == []
    assert checks.workload_problems([WORKLOAD, CLAIM, DENY, broken(ADMIT, "spec.ingress", [{}])]) == []
    ranged = broken(ADMIT, "spec.ingress", [{"ports": [{"port": 8000, "endPort": 8100}]}])
    assert checks.workload_problems([WORKLOAD, CLAIM, DENY, ranged]) == []
    # A shared (ReadWriteMany) claim, or one mounted read-only, may roll with replicas.
    rolling = broken(broken(WORKLOAD, "spec.strategy", {"type": "RollingUpdate"}), "spec.replicas", 2)
    assert checks.workload_problems([rolling, broken(CLAIM, "spec.accessModes", ["ReadWriteMany"])]) == []
    read_only = broken(rolling, "spec.template.spec.containers.0.volumeMounts.0.readOnly", True)
    assert checks.workload_problems([read_only, CLAIM]) == []
    # Another image's containers are not ours to judge; Jobs run to completion without probes.
    other = broken(DEPLOYMENT, "spec.template.spec.containers.0.image", "nginx:1.27")
    assert checks.workload_problems([other, DENY]) == []
    job = {**broken(DEPLOYMENT, "spec.strategy", None), "kind": "Job", "apiVersion": "batch/v1"}
    assert checks.workload_problems([job]) == []


@pytest.mark.parametrize(
    ("objects", "expected"),
    [
        ([broken(WORKLOAD, "spec.template.spec.containers.0.livenessProbe", None), CLAIM], "no livenessProbe"),
        ([broken(WORKLOAD, "spec.template.spec.containers.0.readinessProbe", None), CLAIM], "no readinessProbe"),
        ([broken(WORKLOAD, "spec.strategy", {"type": "RollingUpdate"}), CLAIM], "strategy RollingUpdate"),
        ([broken(WORKLOAD, "spec.strategy", None), CLAIM], "strategy RollingUpdate"),  # the default
        ([broken(WORKLOAD, "spec.replicas", 2), CLAIM], "2 replica(s)"),
        ([broken(WORKLOAD, "spec.replicas", 2), broken(CLAIM, "spec.accessModes", ["ReadWriteOncePod"])], "claim 'db'"),
        ([WORKLOAD, CLAIM, DENY], "port http 8080/TCP is admitted by no NetworkPolicy"),
        ([WORKLOAD, CLAIM, DENY, broken(ADMIT, "spec.ingress.0.ports.0.port", 9109)], "port http 8080/TCP"),
        ([WORKLOAD, CLAIM, DENY, broken(ADMIT, "spec.ingress.0.ports.0.protocol", "UDP")], "port http 8080/TCP"),
        ([WORKLOAD, CLAIM, DENY, broken(ADMIT, "metadata.namespace", "other")], "port http 8080/TCP"),
    ],
)
def test_long_running_workloads_that_are_wrong_fail(objects: list[dict[str, Any]], expected: str) -> None:
    assert expected in " ".join(checks.workload_problems(objects))


# Files and kustomizations ---------------------------------------------------------------------------------


def test_orphan_manifests_are_found(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: [a.yaml, part]\n")
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "kustomization.yaml").write_text("resources: [b.yaml]\n")
    (tmp_path / "part" / "b.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n")
    (tmp_path / "topics.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: t}\n")
    (tmp_path / "forgotten.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: f}\n")
    (tmp_path / "lost").mkdir()
    (tmp_path / "lost" / "kustomization.yaml").write_text("resources: [c.yaml]\n")
    (tmp_path / "lost" / "c.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
    problems = checks.orphan_manifests(tmp_path, {"topics.yaml": "applied on its own"})
    assert len(problems) == 2, problems
    assert "k8s/lost/: a kustomization" in problems[0] and "forgotten.yaml" in problems[1]
    assert checks.orphan_manifests(tmp_path, {"topics.yaml": "", "lost": "", "forgotten.yaml": ""}) == []
    assert checks.nested_kustomizations(tmp_path) == [tmp_path / "lost", tmp_path / "part"]


def test_a_broken_kustomization_fails_to_render(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(RuntimeError, match="kustomize build"):
        checks.render(tmp_path)


def test_paths_into_the_image() -> None:
    dockerfile = checks.DOCKERFILE.read_text()
    assert checks.image_path_problems(dockerfile, [SPARK_APP]) == []
    for path, value, expected in [
        ("spec.mainApplicationFile", "local:///usr/local/lib/python3.12/site-packages/streaming/cli.py", "3.12"),
        ("spec.mainApplicationFile", "local:///usr/local/lib/python3.11/site-packages/streaming/kli.py", "kli.py"),
        ("spec.sparkConf", {"spark.jars": "local:///opt/cxr/jvm/lib/spark/kafka-clients-0.0.1.jar"}, "0.0.1"),
    ]:
        problems = checks.image_path_problems(dockerfile, [broken(SPARK_APP, path, value)])
        assert expected in " ".join(problems), path


# Dockerfile -----------------------------------------------------------------------------------------------

GOOD_DOCKERFILE = """\
ARG BASE=python:3.11-slim
FROM debian:bookworm-slim AS build
COPY src/ src/
FROM ${BASE}
ARG UID=185
# a comment
RUN echo a \\
 && echo b
COPY --from=build /src /app
COPY run.sh /run.sh
ENV PYTHONUNBUFFERED=1 HOME=/app
USER ${UID}
"""


def _context(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / ".dockerignore").write_text("tests\n**/*.pyc\n")
    return tmp_path


def test_a_good_dockerfile_passes(tmp_path: Path) -> None:
    assert checks.dockerfile_problems(GOOD_DOCKERFILE, _context(tmp_path)) == []
    assert checks.final_user(GOOD_DOCKERFILE) == "185"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("FROM debian:bookworm-slim AS build", "FROM debian AS build", "not pinned"),
        ("ARG BASE=python:3.11-slim", "ARG BASE=python:latest", "not pinned"),
        ("COPY run.sh /run.sh", "COPY runn.sh /run.sh", "does not exist"),
        ("COPY run.sh /run.sh", "COPY tests/ /tests/", "excluded by .dockerignore"),
        ("USER ${UID}", "USER root", "not a numeric non-zero UID"),
        ("USER ${UID}", "USER 0", "not a numeric non-zero UID"),
        ("USER ${UID}\n", "", "runs as root"),
        ("ENV PYTHONUNBUFFERED=1", "ENV KAFKA_PASSWORD=hunter2", "KAFKA_PASSWORD looks like a secret"),
        ("ARG UID=185", "ARG UID=185\nARG DICOMWEB_TOKEN", "DICOMWEB_TOKEN looks like a secret"),
    ],
)
def test_a_broken_dockerfile_fails(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in GOOD_DOCKERFILE
    problems = checks.dockerfile_problems(GOOD_DOCKERFILE.replace(old, new), _context(tmp_path))
    assert expected in " ".join(problems)


def test_pods_must_run_as_the_image_uid() -> None:
    app = broken(SPARK_APP, "spec.executor.podSecurityContext", {"runAsUser": 1000})
    assert "runAsUser 1000" in " ".join(checks.run_as_user_problems(GOOD_DOCKERFILE, [app]))
    pod = broken(DEPLOYMENT, "spec.template.spec.securityContext", {"runAsUser": 185})
    assert checks.run_as_user_problems(GOOD_DOCKERFILE, [pod]) == []
