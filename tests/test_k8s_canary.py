"""The canary overlay (Argo Rollouts): a Rollout runs the Deployment's pod template, the autoscaler sizes
the Rollout, a background AnalysisTemplate measures the canary's own pods with the alerts' queries, and a
blocking analysis step checks that the canary served enough requests before it takes every pod.

Schema validation of every rendered object is in test_k8s_manifests.py, the queries on a live Prometheus in
test_canary_analysis.py.
"""

import os
import re
from typing import Any

import pytest
import yaml
from test_k8s_manifests import (
    K8S,
    KUBERNETES_VERSIONS,
    REPO_ROOT,
    by_kind,
    kustomize,
    needs_kubectl,
    schema_errors,
)

from devtools.k8s_queries import load_prometheus_rule, metric_names

pytestmark = needs_kubectl
# The label Argo Rollouts puts on the canary's pods, and the label name the operator gives it in Prometheus.
POD_TEMPLATE_HASH = "rollouts-pod-template-hash"
POD_TEMPLATE_HASH_SERIES_LABEL = "rollouts_pod_template_hash"
BACKGROUND_TEMPLATE = "healnet-canary"
TRAFFIC_TEMPLATE = "healnet-canary-traffic"
DEPLOY_DOC = REPO_ROOT / "docs" / "deploy.md"
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


def analysis_template(name: str, objects: list[dict[str, Any]]) -> dict[str, Any]:
    (template,) = [obj for obj in by_kind(objects, "AnalysisTemplate") if obj["metadata"]["name"] == name]
    return template


def rollout_analyses(rollout: dict[str, Any]) -> list[dict[str, Any]]:
    """The background analysis and every analysis step of the Rollout."""
    strategy = rollout["spec"]["strategy"]["canary"]
    return [strategy["analysis"], *(step["analysis"] for step in strategy["steps"] if "analysis" in step)]


def test_the_rollout_and_its_analysis_validate_against_the_argo_rollouts_schemas(canary) -> None:
    objects = [the("Rollout", canary), *by_kind(canary, "AnalysisTemplate")]
    assert len(objects) == 3
    for obj in objects:
        for version in KUBERNETES_VERSIONS:
            assert schema_errors(obj, version) == [], obj["metadata"]["name"]


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
    steps = strategy["steps"][:4]
    assert [step.get("setWeight") for step in steps[::2]] == [10, 50]
    assert all("pause" in step for step in steps[1::2])
    analysis = strategy["analysis"]
    assert [t["templateName"] for t in analysis["templates"]] == [BACKGROUND_TEMPLATE]
    analysis_template(BACKGROUND_TEMPLATE, canary)
    assert steps[analysis["startingStep"] - 1] == {"setWeight": 10}, "analysis starts once 10 % runs"


def test_the_traffic_check_blocks_the_last_step_before_the_canary_takes_every_pod(canary) -> None:
    """After the last step the canary becomes stable on every pod: the check is that last step, after the
    last pause, so that it counts the requests of both pauses."""
    steps = the("Rollout", canary)["spec"]["strategy"]["canary"]["steps"]
    last_pause = max(index for index, step in enumerate(steps) if "pause" in step)
    assert last_pause == len(steps) - 2
    assert set(steps[-1]) == {"analysis"}, "a blocking analysis step, not a background one"
    check = steps[-1]["analysis"]
    assert [t["templateName"] for t in check["templates"]] == [TRAFFIC_TEMPLATE]
    analysis_template(TRAFFIC_TEMPLATE, canary)
    given = {arg["name"]: arg.get("valueFrom") for arg in check["args"]}
    assert given == {
        "canary-hash": {"podTemplateHashValue": "Latest"},
        "namespace": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    }


def test_the_rollout_gives_every_argument_the_analysis_needs(canary) -> None:
    analyses = rollout_analyses(the("Rollout", canary))
    assert len(analyses) == 2
    for analysis in analyses:
        (reference,) = analysis["templates"]
        template = analysis_template(reference["templateName"], canary)["spec"]
        given = {arg["name"]: arg for arg in analysis["args"]}
        declared = {arg["name"] for arg in template["args"]}
        required = {arg["name"] for arg in template["args"] if "value" not in arg}
        assert required <= set(given) <= declared
        assert given["canary-hash"]["valueFrom"] == {"podTemplateHashValue": "Latest"}
        for metric in template["metrics"]:
            used = set(re.findall(r"\{\{args\.([\w-]+)\}\}", str(metric)))
            assert used <= declared, metric["name"]


def test_the_documented_patches_change_the_arguments_they_are_meant_for(canary, tmp_path) -> None:
    """docs/deploy.md patches AnalysisTemplate arguments by position: applied to the overlay, the
    Prometheus address moves in both templates and the minimum request count in the traffic check."""
    blocks = re.findall(r"```yaml\n(.*?)```", DEPLOY_DOC.read_text(), flags=re.DOTALL)
    patches = [
        patch
        for block in blocks
        if "kind: AnalysisTemplate" in block
        for patch in yaml.safe_load(block)["patches"]
    ]
    kustomization = {
        "resources": [os.path.relpath(K8S / "overlays" / "canary", tmp_path)],
        "patches": patches,
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    patched = kustomize(tmp_path)

    def changed(name: str) -> set[str]:
        before, after = (analysis_template(name, objects)["spec"]["args"] for objects in (canary, patched))
        return {old["name"] for old, new in zip(before, after, strict=True) if old != new}

    assert changed(BACKGROUND_TEMPLATE) == {"prometheus-address"}
    assert changed(TRAFFIC_TEMPLATE) == {"prometheus-address", "min-requests"}


def test_the_analysis_measures_the_canary_pods_only(canary) -> None:
    monitor = the("ServiceMonitor", canary)["spec"]
    assert POD_TEMPLATE_HASH in monitor["podTargetLabels"]
    assert POD_TEMPLATE_HASH.replace("-", "_") == POD_TEMPLATE_HASH_SERIES_LABEL
    metrics = [
        metric for template in by_kind(canary, "AnalysisTemplate") for metric in template["spec"]["metrics"]
    ]
    assert len(metrics) == 5
    for metric in metrics:
        query = metric["provider"]["prometheus"]["query"]
        selectors = re.findall(r"\{[^{}]*\}", re.sub(r"\{\{[^}]*\}\}", "ARG", query))
        assert selectors, metric["name"]
        for selector in selectors:
            assert f'{POD_TEMPLATE_HASH_SERIES_LABEL}="ARG"' in selector, (metric["name"], selector)


@pytest.mark.parametrize("metric_name", sorted(ALERT_OF_METRIC))
def test_each_analysis_metric_reuses_its_alerts_metrics_and_threshold(canary, metric_name: str) -> None:
    alert_name, threshold, threshold_in_alert = ALERT_OF_METRIC[metric_name]
    metrics = analysis_template(BACKGROUND_TEMPLATE, canary)["spec"]["metrics"]
    (metric,) = [m for m in metrics if m["name"] == metric_name]
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
