"""The canary overlay (Argo Rollouts): a Rollout runs the Deployment's pod template, the autoscaler sizes
the Rollout, and the AnalysisTemplate measures the canary's own pods with the alerts' queries.

Schema validation of every rendered object is in test_k8s_manifests.py, the queries on a live Prometheus in
test_canary_analysis.py.
"""

import re
from typing import Any

import pytest
from test_k8s_manifests import K8S, KUBERNETES_VERSIONS, by_kind, kustomize, needs_kubectl, schema_errors

from devtools.k8s_queries import load_prometheus_rule, metric_names

pytestmark = needs_kubectl
# The label Argo Rollouts puts on the canary's pods, and the label name the operator gives it in Prometheus.
POD_TEMPLATE_HASH = "rollouts-pod-template-hash"
POD_TEMPLATE_HASH_SERIES_LABEL = "rollouts_pod_template_hash"
# each analysis metric, the alert whose query and threshold it reuses, and how the threshold reads there
ALERT_OF_METRIC = {
    "server-error-ratio": ("HealnetServerErrorRateHigh", "0.05", r"\) > {}$"),
    "validation-error-ratio": ("HealnetValidationErrorRateHigh", "0.1", r"\) > {}$"),
    "request-latency-p95": ("HealnetRequestLatencyP95High", "2", r"\) > {}$"),
    "risk-median-shift": ("HealnetRiskScoreDrift", "0.5", r"^{} \* \($"),
}


@pytest.fixture(scope="module")
def canary() -> list[dict[str, Any]]:
    return kustomize(K8S / "overlays" / "canary")


def the(kind: str, objects: list[dict[str, Any]]) -> dict[str, Any]:
    (obj,) = by_kind(objects, kind)
    return obj


def test_the_rollout_and_its_analysis_validate_against_the_argo_rollouts_schemas(canary) -> None:
    for kind in ("Rollout", "AnalysisTemplate"):
        for version in KUBERNETES_VERSIONS:
            assert schema_errors(the(kind, canary), version) == [], kind


def test_the_rollout_runs_the_deployments_pods_and_the_autoscaler_sizes_it(canary) -> None:
    rollout, deployment = the("Rollout", canary), the("Deployment", canary)
    reference = rollout["spec"]["workloadRef"]
    assert (reference["apiVersion"], reference["kind"]) == (deployment["apiVersion"], deployment["kind"])
    assert reference["name"] == deployment["metadata"]["name"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert rollout["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "template" not in rollout["spec"], "the pod spec is defined once, in the Deployment"
    assert "replicas" not in rollout["spec"], "the autoscaler owns the replica count"
    target = the("HorizontalPodAutoscaler", canary)["spec"]["scaleTargetRef"]
    assert target == {
        "apiVersion": rollout["apiVersion"],
        "kind": "Rollout",
        "name": rollout["metadata"]["name"],
    }
    selectors = {
        "Service": the("Service", canary)["spec"]["selector"],
        "PodDisruptionBudget": the("PodDisruptionBudget", canary)["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": the("NetworkPolicy", canary)["spec"]["podSelector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector and selector.items() <= pod_labels.items(), f"{kind} misses the Rollout's pods"


def test_the_canary_does_not_follow_the_champion_on_a_shared_store(canary) -> None:
    """A hot swap in every pod at once would bypass the canary (docs/deploy.md)."""
    (container,) = the("Deployment", canary)["spec"]["template"]["spec"]["containers"]
    assert not {"HEALNET_FOLLOW_CHAMPION_S", "HEALNET_REGISTRY_DIR"} & {
        env["name"] for env in container["env"]
    }
    assert by_kind(canary, "PersistentVolumeClaim") == []


def test_the_canary_steps_through_10_and_50_percent_with_pauses_under_analysis(canary) -> None:
    strategy = the("Rollout", canary)["spec"]["strategy"]["canary"]
    steps = strategy["steps"]
    assert [step.get("setWeight") for step in steps[::2]] == [10, 50]
    assert all("pause" in step for step in steps[1::2]) and len(steps) == 4
    analysis = strategy["analysis"]
    assert [t["templateName"] for t in analysis["templates"]] == [
        the("AnalysisTemplate", canary)["metadata"]["name"]
    ]
    assert steps[analysis["startingStep"] - 1] == {"setWeight": 10}, "analysis starts once 10 % runs"


def test_the_rollout_gives_every_argument_the_analysis_needs(canary) -> None:
    template = the("AnalysisTemplate", canary)["spec"]
    given = {
        arg["name"]: arg for arg in the("Rollout", canary)["spec"]["strategy"]["canary"]["analysis"]["args"]
    }
    declared = {arg["name"] for arg in template["args"]}
    required = {arg["name"] for arg in template["args"] if "value" not in arg}
    assert required <= set(given) <= declared
    assert given["canary-hash"]["valueFrom"] == {"podTemplateHashValue": "Latest"}
    for metric in template["metrics"]:
        used = set(re.findall(r"\{\{args\.([\w-]+)\}\}", str(metric)))
        assert used <= declared, metric["name"]


def test_the_analysis_measures_the_canary_pods_only(canary) -> None:
    monitor = the("ServiceMonitor", canary)["spec"]
    assert POD_TEMPLATE_HASH in monitor["podTargetLabels"]
    assert POD_TEMPLATE_HASH.replace("-", "_") == POD_TEMPLATE_HASH_SERIES_LABEL
    for metric in the("AnalysisTemplate", canary)["spec"]["metrics"]:
        query = metric["provider"]["prometheus"]["query"]
        selectors = re.findall(r"\{[^{}]*\}", re.sub(r"\{\{[^}]*\}\}", "ARG", query))
        assert selectors, metric["name"]
        for selector in selectors:
            assert f'{POD_TEMPLATE_HASH_SERIES_LABEL}="ARG"' in selector, (metric["name"], selector)


@pytest.mark.parametrize("metric_name", sorted(ALERT_OF_METRIC))
def test_each_analysis_metric_reuses_its_alerts_metrics_and_threshold(canary, metric_name: str) -> None:
    alert_name, threshold, threshold_in_alert = ALERT_OF_METRIC[metric_name]
    (metric,) = [m for m in the("AnalysisTemplate", canary)["spec"]["metrics"] if m["name"] == metric_name]
    (alert,) = [
        rule
        for group in load_prometheus_rule()["spec"]["groups"]
        for rule in group["rules"]
        if rule.get("alert") == alert_name
    ]
    assert metric_names(metric["provider"]["prometheus"]["query"]) == metric_names(alert["expr"])
    assert metric["successCondition"] == f"result[0] <= {threshold}"
    pattern = re.compile(threshold_in_alert.format(re.escape(threshold)))
    assert any(pattern.search(line.strip()) for line in alert["expr"].splitlines()), alert["expr"]
