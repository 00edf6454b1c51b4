"""Kustomize overlays render, and every object validates offline against its schema.

Built-in kinds: `kubernetes-validate --strict` for Kubernetes 1.29 and 1.33. prometheus-operator
kinds: the JSON schemas extracted from its CRDs (k8s/schemas/). Without kubectl (some CI images),
the resource files of base/, components/ and training/ are validated directly instead of the
rendered overlays; the test ids and a warning say which path was taken.
"""

import json
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S = REPO_ROOT / "k8s"
SCHEMAS = K8S / "schemas"
DASHBOARD = K8S / "components" / "monitoring" / "dashboards" / "healnet.json"
KUBERNETES_VERSIONS = ("1.29", "1.33")
TARGETS = (
    "overlays/dev",
    "overlays/prod",
    "overlays/shared-store",
    "overlays/drift",
    "overlays/canary",
    "training",
)
CUSTOM_RESOURCE_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMAS / "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): SCHEMAS / "prometheusrule-monitoring-v1.json",
    ("argoproj.io/v1alpha1", "Rollout"): SCHEMAS / "rollout-argoproj-v1alpha1.json",
    ("argoproj.io/v1alpha1", "AnalysisTemplate"): SCHEMAS / "analysistemplate-argoproj-v1alpha1.json",
}
DEPRECATED_KUSTOMIZE_FIELDS = {
    "commonLabels",
    "patchesStrategicMerge",
    "patchesJson6902",
    "vars",
    "bases",
    "imageTags",  # `images` replaced it
}

KUBECTL = shutil.which("kubectl")
RENDER_PATH = "kubectl-kustomize" if KUBECTL else "files-directly"
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not found: overlays cannot be rendered")


class RenderFallbackWarning(UserWarning):
    """kubectl is absent: the resource files were validated without rendering the overlays."""


@cache
def _kustomize_output(directory: Path) -> str:
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return result.stdout


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """Objects rendered by `kubectl kustomize` (a fresh copy on every call)."""
    return [doc for doc in yaml.safe_load_all(_kustomize_output(directory)) if doc]


def resource_files(directory: Path) -> list[Path]:
    """The YAML resource files a kustomization lists, following directory references."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    files = []
    for entry in kustomization.get("resources", []) + kustomization.get("components", []):
        path = (directory / entry).resolve()
        files += resource_files(path) if path.is_dir() else [path]
    return files


def objects_from_files(directory: Path) -> list[dict[str, Any]]:
    """Fallback without kubectl: the listed resource files as written (no patches, no generators)."""
    return [doc for path in resource_files(directory) for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests(target: str) -> list[dict[str, Any]]:
    directory = K8S / target
    if KUBECTL:
        return kustomize(directory)
    warnings.warn(
        RenderFallbackWarning(f"kubectl not found: validating the resource files of {target} directly"),
        stacklevel=2,
    )
    return objects_from_files(directory)


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def schema_errors(obj: dict[str, Any], kubernetes_version: str) -> list[str]:
    """Validation errors of one object (empty when valid), named by kind/name and field path."""
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    custom_schema = CUSTOM_RESOURCE_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if custom_schema is not None:
        validator = jsonschema.Draft202012Validator(json.loads(custom_schema.read_text()))
        return [f"{name} .{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
    try:
        used = kubernetes_validate.validate(obj, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{name} .{'.'.join(map(str, error.path))}: {error.message} (Kubernetes {error.version})"]
    if used != kubernetes_version:
        return [f"{name}: validated with the Kubernetes {used} schema instead of {kubernetes_version}"]
    return []


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("target", TARGETS, ids=[f"{t}-{RENDER_PATH}" for t in TARGETS])
def test_every_object_validates_strictly(target: str, kubernetes_version: str) -> None:
    objects = manifests(target)
    assert objects, f"{target} produced no objects"
    errors = [error for obj in objects for error in schema_errors(obj, kubernetes_version)]
    assert errors == [], "\n".join(errors)


def test_installed_kubernetes_validate_ships_both_schema_versions() -> None:
    shipped = set(kubernetes_validate.utils.all_versions())
    for version in KUBERNETES_VERSIONS:
        assert f"{version}.0" in shipped, (
            f"kubernetes-validate {kubernetes_validate.__version__} lacks {version}"
        )


def _misspell_replicas(deployment: dict[str, Any]) -> None:
    deployment["spec"]["replica"] = 2


def _misspell_port(service_monitor: dict[str, Any]) -> None:
    service_monitor["spec"]["endpoints"][0]["prot"] = service_monitor["spec"]["endpoints"][0].pop("port")


def _prose_duration(prometheus_rule: dict[str, Any]) -> None:
    prometheus_rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"


def _weight_as_percent(rollout: dict[str, Any]) -> None:
    rollout["spec"]["strategy"]["canary"]["steps"][0]["setWeight"] = "10%"


def _misspell_success_condition(analysis_template: dict[str, Any]) -> None:
    metric = analysis_template["spec"]["metrics"][0]
    metric["sucessCondition"] = metric.pop("successCondition")


@pytest.mark.parametrize(
    ("file", "break_it", "expected"),
    [
        ("base/deployment.yaml", _misspell_replicas, "'replica' was unexpected"),
        ("components/monitoring/servicemonitor.yaml", _misspell_port, "'prot' was unexpected"),
        ("components/monitoring/prometheusrule.yaml", _prose_duration, "'5 minutes' does not match"),
        ("overlays/canary/rollout.yaml", _weight_as_percent, "'10%' is not of type 'integer'"),
        (
            "overlays/canary/analysistemplate.yaml",
            _misspell_success_condition,
            "'sucessCondition' was unexpected",
        ),
    ],
    ids=[
        "deployment-typo",
        "servicemonitor-typo",
        "prometheusrule-bad-duration",
        "rollout-weight-as-percent",
        "analysistemplate-typo",
    ],
)
def test_validation_rejects_a_broken_copy(
    file: str, break_it: Callable[[dict[str, Any]], None], expected: str
) -> None:
    obj = yaml.safe_load((K8S / file).read_text())
    assert schema_errors(obj, "1.33") == [], "the unbroken object must be valid"
    break_it(obj)
    errors = schema_errors(obj, "1.33")
    assert any(expected in error for error in errors), errors


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod"])
def test_overlay_contains_the_monitoring_resources(overlay: str) -> None:
    kinds = {obj["kind"] for obj in manifests(overlay)}
    expected = {"Namespace", "Deployment", "Service", "ServiceAccount", "HorizontalPodAutoscaler"}
    expected |= {"PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule"}
    assert expected <= kinds, f"missing: {expected - kinds}"


@needs_kubectl
@pytest.mark.parametrize(
    ("overlay", "namespace", "image", "min_replicas"),
    [
        ("dev", "healnet-dev", "registry.example.com/healnet/healnet-service:0.3.0-dev", 1),
        ("prod", "healnet", "registry.example.com/healnet/healnet-service:0.3.0@sha256:" + "0" * 64, 3),
    ],
)
def test_overlay_sets_namespace_image_replicas_and_release(
    overlay: str, namespace: str, image: str, min_replicas: int
) -> None:
    objects = kustomize(K8S / "overlays" / overlay)
    assert [obj["metadata"]["name"] for obj in by_kind(objects, "Namespace")] == [namespace]
    assert {obj["metadata"].get("namespace") for obj in objects if obj["kind"] != "Namespace"} == {namespace}
    (deployment,) = by_kind(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == image
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == min_replicas
    for obj in by_kind(objects, "ServiceMonitor") + by_kind(objects, "PrometheusRule"):
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack", obj["kind"]


def served_model_tag(objects: list[dict[str, Any]]) -> tuple[str, str]:
    """The generated ConfigMap the container takes HEALNET_MODEL_TAG from, and the value it gets."""
    (deployment,) = by_kind(objects, "Deployment")
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    reference = env["HEALNET_MODEL_TAG"]["valueFrom"]["configMapKeyRef"]
    configmaps = {cm["metadata"]["name"]: cm for cm in by_kind(objects, "ConfigMap")}
    assert reference["name"] in configmaps, f"{reference['name']} is not rendered (hash suffix out of sync?)"
    return reference["name"], configmaps[reference["name"]]["data"][reference["key"]]


@needs_kubectl
@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlays_serve_the_model_packed_into_the_image(overlay: str) -> None:
    """Registry versions are BentoML-generated: an empty tag lets the service load the packed model."""
    _, tag = served_model_tag(kustomize(K8S / "overlays" / overlay))
    assert tag == ""


@needs_kubectl
def test_the_shared_store_overlay_follows_the_champion_on_a_read_only_volume() -> None:
    objects = kustomize(K8S / "overlays" / "shared-store")
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BENTOML_HOME"] == env["HEALNET_REGISTRY_DIR"] == "/registry"
    assert float(env["HEALNET_FOLLOW_CHAMPION_S"]) > 0
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["registry"] == {"name": "registry", "mountPath": "/registry", "readOnly": True}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["registry"]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    (pvc,) = by_kind(objects, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == claim["claimName"] and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


@needs_kubectl
def test_an_overlay_can_pin_the_model_tag(tmp_path: Path) -> None:
    relative_prod = Path(os.path.relpath(K8S / "overlays" / "prod", tmp_path))
    pinned = "healnet:tezypsxkxsgpoax4"
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(relative_prod)],
                "configMapGenerator": [
                    {
                        "name": "healnet-service-config",
                        "behavior": "merge",
                        "literals": [f"HEALNET_MODEL_TAG={pinned}"],
                    }
                ],
            }
        )
    )
    unpinned_name, _ = served_model_tag(kustomize(K8S / "overlays" / "prod"))
    pinned_name, tag = served_model_tag(kustomize(tmp_path))
    assert tag == pinned
    assert pinned_name != unpinned_name, "a new tag must change the ConfigMap name and roll the pods"


@needs_kubectl
@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_dashboard_configmap_is_generated_from_the_json_file(overlay: str) -> None:
    objects = kustomize(K8S / "overlays" / overlay)
    dashboards = [
        cm for cm in by_kind(objects, "ConfigMap") if cm["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    assert [cm["metadata"]["name"] for cm in dashboards] == ["healnet-grafana-dashboard"]
    assert json.loads(dashboards[0]["data"]["healnet.json"]) == json.loads(DASHBOARD.read_text())


@needs_kubectl
def test_gpu_component_requests_a_gpu_on_gpu_nodes(tmp_path: Path) -> None:
    relative_k8s = Path(os.path.relpath(K8S, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(relative_k8s / "overlays" / "prod")],
                "components": [str(relative_k8s / "components" / "gpu")],
            }
        )
    )
    objects = kustomize(tmp_path)
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["containers"][0]["resources"]["limits"]["memory"] == "4Gi", "the prod memory limit was lost"
    assert "ephemeral-storage" in pod["containers"][0]["resources"]["limits"]
    assert {"name": "BENTOML_DO_NOT_TRACK", "value": "True"} in pod["containers"][0]["env"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    for version in KUBERNETES_VERSIONS:
        assert schema_errors(deployment, version) == []


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_file_fallback_covers_every_rendered_kind(target: str) -> None:
    rendered = [obj["kind"] for obj in kustomize(K8S / target) if obj["kind"] != "ConfigMap"]
    direct = [obj["kind"] for obj in objects_from_files(K8S / target)]
    assert sorted(direct) == sorted(rendered), (
        "generated ConfigMaps aside, both paths must see the same objects"
    )


def test_kustomizations_use_current_fields_only() -> None:
    kustomizations = sorted(K8S.rglob("kustomization.yaml"))
    assert len(kustomizations) >= 6
    for path in kustomizations:
        content = yaml.safe_load(path.read_text())
        deprecated = DEPRECATED_KUSTOMIZE_FIELDS & set(content)
        assert not deprecated, f"{path.relative_to(REPO_ROOT)} uses deprecated {sorted(deprecated)}"
        expected_kind = "Component" if "components" in path.parts else "Kustomization"
        assert content["kind"] == expected_kind, path


def dashboard_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for panel in panels for p in [panel, *dashboard_panels(panel.get("panels", []))]]


def test_dashboard_is_importable_without_placeholders() -> None:
    text = DASHBOARD.read_text()
    dashboard = json.loads(text)
    assert dashboard["schemaVersion"] >= 39
    assert "__inputs" not in dashboard and "${DS_" not in text
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard_panels(dashboard["panels"]) if p["type"] != "row"]
    ids = [p["id"] for p in dashboard_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", f"{panel['title']} {target['refId']}"


@pytest.mark.parametrize(
    ("panel_type", "metric"),
    [
        ("timeseries", "healnet_requests_total"),
        ("timeseries", "healnet_missing_modality_total"),
        ("timeseries", "healnet_inference_duration_seconds_bucket"),
        ("timeseries", "bentoml_service_request_duration_seconds_bucket"),
        ("timeseries", "bentoml_service_request_total"),
        ("timeseries", "healnet_validation_errors_total"),
        ("heatmap", "healnet_risk_score_bucket"),
        ("timeseries", "healnet_reference_risk_score"),
        ("timeseries", "healnet_imputed_feature_fraction_bucket"),
        ("table", "healnet_model_info"),
    ],
)
def test_dashboard_has_a_panel_for(panel_type: str, metric: str) -> None:
    panels = dashboard_panels(json.loads(DASHBOARD.read_text())["panels"])
    assert any(
        panel["type"] == panel_type and any(metric in target["expr"] for target in panel.get("targets", []))
        for panel in panels
    ), f"no {panel_type} panel queries {metric}"


def test_the_example_image_tags_follow_the_package_version() -> None:
    """The manifests' image tags cannot be computed; this keeps them on the one version of pyproject.toml."""
    from healnet import __version__

    manifests_text = "".join(p.read_text() for p in sorted(K8S.rglob("*.yaml")))
    tags = re.findall(r"image: \S+:(\S+)", manifests_text) + re.findall(r"newTag: (\S+)", manifests_text)
    assert tags and {tag.removesuffix("-dev") for tag in tags} == {__version__}


DIGEST_PINNED = re.compile(r"^registry\.example\.com/healnet/healnet-service:[^@:/]+@sha256:[0-9a-f]{64}$")


@needs_kubectl
@pytest.mark.parametrize("overlay", ["prod", "shared-store", "canary"])
def test_production_runs_the_service_image_by_digest(overlay: str) -> None:
    (deployment,) = by_kind(kustomize(K8S / "overlays" / overlay), "Deployment")
    images = [c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    assert images and all(DIGEST_PINNED.match(image) for image in images), images


@needs_kubectl
def test_make_pin_image_pins_the_prod_overlay_to_a_digest(tmp_path: Path) -> None:
    """`make pin-image` (docs/deploy.md) writes the tag and digest that the rendered Deployment then runs."""
    shutil.copytree(K8S, tmp_path / "k8s")
    digest = "sha256:" + "ab" * 32
    subprocess.run(
        [
            "make",
            "-s",
            "pin-image",
            f"DIGEST={digest}",
            "IMAGE_TAG=9.8.7",
            f"PROD_KUSTOMIZATION={tmp_path / 'k8s/overlays/prod/kustomization.yaml'}",
        ],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )
    (deployment,) = by_kind(kustomize(tmp_path / "k8s" / "overlays" / "prod"), "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"registry.example.com/healnet/healnet-service:9.8.7@{digest}"
    refused = subprocess.run(
        [
            "make",
            "-s",
            "pin-image",
            "DIGEST=latest",
            f"PROD_KUSTOMIZATION={tmp_path / 'k8s/overlays/prod/kustomization.yaml'}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "sha256:" in refused.stderr


@needs_kubectl
@pytest.mark.parametrize("overlay", ["dev", "prod", "shared-store", "drift", "canary"])
def test_every_object_carries_the_overlays_labels(overlay: str) -> None:
    objects = kustomize(K8S / "overlays" / overlay)
    (deployment,) = by_kind(objects, "Deployment")
    common = {
        key: deployment["metadata"]["labels"][key]
        for key in ("app.kubernetes.io/part-of", "app.kubernetes.io/instance")
    }
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        assert common.items() <= labels.items(), f"{obj['kind']}/{obj['metadata']['name']}: {labels}"


def test_the_drift_cronjob_pushes_its_metrics_under_its_own_namespace() -> None:
    """The CronJob's command parses with the real CLI, and its --namespace is the pod's own namespace (the
    downward API): a Pushgateway scraped with honor_labels then gives the drift series the service's
    namespace, which the alerts and the dashboard's namespace variable select."""
    from healnet.cli import build_parser

    (cronjob,) = by_kind(manifests("overlays/drift"), "CronJob")
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    arguments = container["command"][1:] + container["args"]

    def resolved(value: str) -> str:  # $(NAME) as the kubelet expands it, by the source it names
        return re.sub(r"\$\((\w+)\)", lambda m: f"<{json.dumps(env[m.group(1)]['valueFrom'])}>", value)

    parsed = build_parser().parse_args([resolved(value) for value in arguments])
    assert parsed.command == "drift" and parsed.pushgateway and parsed.tag == "champion"
    assert json.loads(parsed.namespace[1:-1]) == {"fieldRef": {"fieldPath": "metadata.namespace"}}
