"""Security and wiring policy over the rendered overlays.

`policy_violations` returns one readable line per broken rule; the tests run it on the real
overlays (expecting none) and on deliberately broken copies (expecting the matching line).
"""

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from test_k8s_manifests import K8S, manifests

Obj = dict[str, Any]
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
# Argo Rollouts (overlays/canary): scaled like a workload, running the pod template of a Deployment
ROLLOUT_KIND = "Rollout"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
SERVING_PORT = 3000
PSS_ENFORCE = "pod-security.kubernetes.io/enforce"
DNS_PORTS = [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
CLUSTER_DNS = {"k8s-app": "kube-dns"}
PUSHGATEWAY = (
    {"app.kubernetes.io/name": "prometheus-pushgateway"},
    "monitoring",
    [{"port": 9091, "protocol": "TCP"}],
)
# What each NetworkPolicy (by name) opens besides the cluster DNS: exactly these ingress ports, and egress
# rules (a peer's pod labels, its namespace and the ports). The drift Job serves nothing and pushes its
# result to the Pushgateway.
POLICY_TRAFFIC: dict[str, tuple[set[int], list]] = {
    "healnet-service": ({SERVING_PORT}, []),
    "healnet-drift": (set(), [PUSHGATEWAY]),
}


def name_of(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """An equality selector matches when every pair is among the labels (an empty one matches nothing here)."""
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def containers(pod_spec: Obj) -> Iterator[Obj]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


def image_problem(image: str) -> str | None:
    if "@sha256:" in image:
        return None
    last_part = image.rsplit("/", 1)[-1]
    if ":" not in last_part:
        return "has no tag"
    if last_part.endswith(":latest"):
        return "uses the mutable :latest tag"
    return None


def container_violations(where: str, pod_spec: Obj, container: Obj, long_running: bool) -> list[str]:
    pod_security = pod_spec.get("securityContext", {})
    security = container.get("securityContext", {})

    def effective(field: str) -> Any:
        return security.get(field, pod_security.get(field))

    found = []
    if effective("runAsNonRoot") is not True:
        found.append(f"{where}: runAsNonRoot is not true")
    if effective("runAsUser") == 0:
        found.append(f"{where}: runAsUser is 0 (root)")
    if security.get("readOnlyRootFilesystem") is not True:
        found.append(f"{where}: readOnlyRootFilesystem is not true")
    if security.get("allowPrivilegeEscalation") is not False:
        found.append(f"{where}: allowPrivilegeEscalation is not false")
    if "ALL" not in security.get("capabilities", {}).get("drop", []):
        found.append(f"{where}: capabilities do not drop ALL")
    if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
        found.append(f"{where}: seccompProfile is not RuntimeDefault")
    resources = container.get("resources", {})
    for resource in ("cpu", "memory"):
        if resource not in resources.get("requests", {}):
            found.append(f"{where}: no {resource} request")
    if "memory" not in resources.get("limits", {}):
        found.append(f"{where}: no memory limit")
    for kind in ("requests", "limits"):
        if "ephemeral-storage" not in resources.get(kind, {}):
            found.append(f"{where}: no ephemeral-storage in {kind}")
    if long_running:
        found += [f"{where}: no {probe}" for probe in PROBES if probe not in container]
        env = {variable["name"]: variable.get("value") for variable in container.get("env", [])}
        if env.get("BENTOML_DO_NOT_TRACK") != "True":
            found.append(f"{where}: BENTOML_DO_NOT_TRACK is not True (BentoML would report usage)")
    if problem := image_problem(container["image"]):
        found.append(f"{where}: image {container['image']} {problem}")
    return found


def workload_violations(workload: Obj) -> list[str]:
    where = name_of(workload)
    template = workload["spec"]["template"]
    pod_spec = template["spec"]
    found = []
    if not selects(
        workload["spec"]["selector"].get("matchLabels", {}), template["metadata"].get("labels", {})
    ):
        found.append(f"{where}: selector does not match the pod template labels")
    if pod_spec.get("automountServiceAccountToken") is not False:
        found.append(f"{where}: automountServiceAccountToken is not false")
    for container in containers(pod_spec):
        long_running = container in pod_spec["containers"]
        found += container_violations(
            f"{where} container {container['name']}", pod_spec, container, long_running
        )
    return found


def pod_labels(objects: list[Obj]) -> list[dict[str, str]]:
    """The pod template labels of the workloads and the CronJobs' Jobs."""
    labels = [
        obj["spec"]["template"]["metadata"]["labels"] for obj in objects if obj["kind"] in WORKLOAD_KINDS
    ]
    return labels + [
        obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
        for obj in objects
        if obj["kind"] == "CronJob"
    ]


def container_port_names(objects: list[Obj]) -> set[str]:
    return {
        port["name"]
        for obj in objects
        if obj["kind"] in WORKLOAD_KINDS
        for container in obj["spec"]["template"]["spec"]["containers"]
        for port in container.get("ports", [])
        if "name" in port
    }


def wiring_violations(objects: list[Obj]) -> list[str]:
    """Services, PDBs, HPAs, NetworkPolicies and ServiceMonitors point at what exists."""
    found = []
    pods = pod_labels(objects)
    workloads = {
        (obj["kind"], obj["metadata"]["name"])
        for obj in objects
        if obj["kind"] in WORKLOAD_KINDS | {ROLLOUT_KIND}
    }
    services = [obj for obj in objects if obj["kind"] == "Service"]
    policies = [obj for obj in objects if obj["kind"] == "NetworkPolicy"]
    for labels in pods:
        if not any(selects(p["spec"]["podSelector"].get("matchLabels", {}), labels) for p in policies):
            found.append(
                f"pods labelled {labels.get('app.kubernetes.io/name')}: no NetworkPolicy selects them"
            )
    for service in services:
        if not any(selects(service["spec"].get("selector", {}), labels) for labels in pods):
            found.append(f"{name_of(service)}: selector matches no pod template")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str) and target not in container_port_names(objects):
                found.append(f"{name_of(service)}: targetPort {target} is not a container port name")
    for obj in objects:
        if obj["kind"] == "PodDisruptionBudget" and not any(
            selects(obj["spec"]["selector"].get("matchLabels", {}), labels) for labels in pods
        ):
            found.append(f"{name_of(obj)}: selector matches no pod template")
        if obj["kind"] == "NetworkPolicy":
            if not any(selects(obj["spec"]["podSelector"].get("matchLabels", {}), labels) for labels in pods):
                found.append(f"{name_of(obj)}: podSelector matches no pod template")
            ports = {
                port["port"] for rule in obj["spec"].get("ingress", []) for port in rule.get("ports", [])
            }
            allowed = POLICY_TRAFFIC.get(obj["metadata"]["name"], (set(), []))[0]
            if ports != allowed or any(not rule.get("ports") for rule in obj["spec"].get("ingress", [])):
                found.append(
                    f"{name_of(obj)}: ingress is open to ports {sorted(ports)}, not only {sorted(allowed)}"
                )
            found += egress_violations(obj)
        if obj["kind"] == ROLLOUT_KIND:
            found += rollout_violations(obj, objects)
        if obj["kind"] == "HorizontalPodAutoscaler":
            target = obj["spec"]["scaleTargetRef"]
            if (target["kind"], target["name"]) not in workloads:
                found.append(
                    f"{name_of(obj)}: scaleTargetRef {target['kind']}/{target['name']} does not exist"
                )
            if obj["spec"].get("minReplicas", 1) > obj["spec"]["maxReplicas"]:
                found.append(f"{name_of(obj)}: minReplicas exceeds maxReplicas")
            scaled = [
                o for o in objects if (o["kind"], o["metadata"]["name"]) == (target["kind"], target["name"])
            ]
            if any("replicas" in o["spec"] for o in scaled):
                found.append(
                    f"{name_of(obj)}: {target['name']} also sets spec.replicas, which fights the autoscaler"
                )
        if obj["kind"] == "ServiceMonitor":
            found += service_monitor_violations(obj, services)
        if obj["kind"] == "Namespace" and obj["metadata"].get("labels", {}).get(PSS_ENFORCE) != "restricted":
            found.append(f"{name_of(obj)}: does not enforce the restricted Pod Security Standard")
        if obj["kind"] == "Secret":
            found.append(f"{name_of(obj)}: Secrets must be created in the cluster, never committed")
    return found


def rollout_violations(rollout: Obj, objects: list[Obj]) -> list[str]:
    """A Rollout runs the pod template of a Deployment of the same overlay, so the workload checks cover its
    pods, and selects those pods."""
    where = name_of(rollout)
    reference = rollout["spec"].get("workloadRef")
    if reference is None:
        return [f"{where}: has a pod template of its own instead of a workloadRef to the Deployment"]
    referenced = [
        obj
        for obj in objects
        if obj["kind"] in WORKLOAD_KINDS
        and (obj["kind"], obj["metadata"]["name"]) == (reference["kind"], reference["name"])
    ]
    if not referenced:
        return [f"{where}: workloadRef {reference['kind']}/{reference['name']} does not exist"]
    found = []
    template_labels = referenced[0]["spec"]["template"]["metadata"].get("labels", {})
    if not selects(rollout["spec"]["selector"].get("matchLabels", {}), template_labels):
        found.append(f"{where}: selector does not match the pod template labels of {reference['name']}")
    found += [
        f"{name_of(hpa)}: scales {reference['kind']}/{reference['name']}, whose pods {where} runs:"
        " scale the Rollout instead"
        for hpa in objects
        if hpa["kind"] == "HorizontalPodAutoscaler"
        and (hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
        == (reference["kind"], reference["name"])
    ]
    return found


def egress_violations(policy: Obj) -> list[str]:
    """The pods may reach the cluster DNS, and what POLICY_TRAFFIC allows their policy, and nothing else."""
    if "Egress" not in policy["spec"].get("policyTypes", []):
        return [f"{name_of(policy)}: does not restrict egress"]
    allowed = [
        (CLUSTER_DNS, "kube-system", DNS_PORTS),
        *POLICY_TRAFFIC.get(policy["metadata"]["name"], (set(), []))[1],
    ]
    found = []
    for rule in policy["spec"].get("egress", []):
        peers = rule.get("to", [])
        if not peers or not any(
            rule.get("ports") == ports
            and all(
                peer.get("podSelector", {}).get("matchLabels") == labels
                and peer.get("namespaceSelector", {}).get("matchLabels")
                == {"kubernetes.io/metadata.name": namespace}
                and "ipBlock" not in peer
                for peer in peers
            )
            for labels, namespace, ports in allowed
        ):
            found.append(f"{name_of(policy)}: egress is open beyond the cluster DNS: {rule}")
    return found


def service_monitor_violations(monitor: Obj, services: list[Obj]) -> list[str]:
    selected = [
        s
        for s in services
        if selects(monitor["spec"]["selector"].get("matchLabels", {}), s["metadata"]["labels"])
    ]
    if not selected:
        return [f"{name_of(monitor)}: selector matches no Service labels"]
    port_names = {port.get("name") for service in selected for port in service["spec"]["ports"]}
    return [
        f"{name_of(monitor)}: endpoint port {endpoint.get('port')} is not a port name of the selected Service"
        for endpoint in monitor["spec"]["endpoints"]
        if endpoint.get("port") not in port_names
    ]


def policy_violations(objects: list[Obj]) -> list[str]:
    found = [v for obj in objects if obj["kind"] in WORKLOAD_KINDS for v in workload_violations(obj)]
    return found + wiring_violations(objects)


@pytest.mark.parametrize(
    "overlay",
    ["overlays/dev", "overlays/prod", "overlays/shared-store", "overlays/drift", "overlays/canary"],
)
def test_overlay_follows_the_policy(overlay: str) -> None:
    objects = manifests(overlay)
    assert policy_violations(objects) == []


def test_no_secret_is_committed_under_k8s() -> None:
    for path in sorted(K8S.rglob("*.yaml")):
        kinds = {doc.get("kind") for doc in yaml.safe_load_all(path.read_text()) if isinstance(doc, dict)}
        assert "Secret" not in kinds, f"{path} commits a Secret"


def the(kind: str, objects: list[Obj]) -> Obj:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def pod(objects: list[Obj]) -> Obj:
    return the("Deployment", objects)["spec"]["template"]["spec"]


def container(objects: list[Obj]) -> Obj:
    return pod(objects)["containers"][0]


BREAKAGES: dict[str, tuple[Callable[[list[Obj]], None], str]] = {
    "root-user": (lambda o: pod(o)["securityContext"].update(runAsUser=0), "runAsUser is 0"),
    "no-run-as-non-root": (
        lambda o: [
            pod(o)["securityContext"].pop("runAsNonRoot"),
            container(o)["securityContext"].pop("runAsNonRoot"),
        ],
        "runAsNonRoot is not true",
    ),
    "writable-root": (
        lambda o: container(o)["securityContext"].update(readOnlyRootFilesystem=False),
        "readOnlyRootFilesystem is not true",
    ),
    "privilege-escalation": (
        lambda o: container(o)["securityContext"].update(allowPrivilegeEscalation=True),
        "allowPrivilegeEscalation is not false",
    ),
    "capabilities-kept": (
        lambda o: container(o)["securityContext"].pop("capabilities"),
        "capabilities do not drop ALL",
    ),
    "no-seccomp": (
        lambda o: pod(o)["securityContext"].pop("seccompProfile"),
        "seccompProfile is not RuntimeDefault",
    ),
    "service-account-token": (
        lambda o: pod(o).update(automountServiceAccountToken=True),
        "automountServiceAccountToken is not false",
    ),
    "no-memory-limit": (lambda o: container(o)["resources"].pop("limits"), "no memory limit"),
    "no-cpu-request": (lambda o: container(o)["resources"]["requests"].pop("cpu"), "no cpu request"),
    "no-ephemeral-storage-request": (
        lambda o: container(o)["resources"]["requests"].pop("ephemeral-storage"),
        "no ephemeral-storage in requests",
    ),
    "no-ephemeral-storage-limit": (
        lambda o: container(o)["resources"]["limits"].pop("ephemeral-storage"),
        "no ephemeral-storage in limits",
    ),
    "usage-tracking-on": (
        lambda o: container(o).update(
            env=[e for e in container(o)["env"] if e["name"] != "BENTOML_DO_NOT_TRACK"]
        ),
        "BENTOML_DO_NOT_TRACK is not True",
    ),
    "no-startup-probe": (lambda o: container(o).pop("startupProbe"), "no startupProbe"),
    "no-readiness-probe": (lambda o: container(o).pop("readinessProbe"), "no readinessProbe"),
    "no-liveness-probe": (lambda o: container(o).pop("livenessProbe"), "no livenessProbe"),
    "latest-tag": (
        lambda o: container(o).update(image="registry.example.com/healnet/healnet-service:latest"),
        "uses the mutable :latest tag",
    ),
    "untagged-image": (
        lambda o: container(o).update(image="registry.example.com:5000/healnet/healnet-service"),
        "has no tag",
    ),
    "selector-mismatch": (
        lambda o: the("Deployment", o)["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/name": "other"}
        ),
        "selector does not match the pod template labels",
    ),
    "service-selects-nothing": (
        lambda o: the("Service", o)["spec"].update(selector={"app.kubernetes.io/name": "other"}),
        "Service/healnet-service: selector matches no pod template",
    ),
    "service-unknown-target-port": (
        lambda o: the("Service", o)["spec"]["ports"][0].update(targetPort="web"),
        "targetPort web is not a container port name",
    ),
    "pdb-selects-nothing": (
        lambda o: the("PodDisruptionBudget", o)["spec"]["selector"].update(matchLabels={"app": "other"}),
        "PodDisruptionBudget/healnet-service: selector matches no pod template",
    ),
    "hpa-missing-target": (
        lambda o: the("HorizontalPodAutoscaler", o)["spec"]["scaleTargetRef"].update(name="healnet"),
        "scaleTargetRef Deployment/healnet does not exist",
    ),
    "hpa-fights-replicas": (
        lambda o: the("Deployment", o)["spec"].update(replicas=2),
        "also sets spec.replicas",
    ),
    "networkpolicy-extra-port": (
        lambda o: the("NetworkPolicy", o)["spec"]["ingress"][0]["ports"].append(
            {"port": 22, "protocol": "TCP"}
        ),
        "ingress is open to ports [22, 3000]",
    ),
    "networkpolicy-serves-nothing": (
        lambda o: the("NetworkPolicy", o)["spec"].update(ingress=[]),
        "NetworkPolicy/healnet-service: ingress is open to ports [], not only [3000]",
    ),
    "networkpolicy-ingress-only": (
        lambda o: the("NetworkPolicy", o)["spec"].update(policyTypes=["Ingress"]),
        "NetworkPolicy/healnet-service: does not restrict egress",
    ),
    "networkpolicy-egress-anywhere": (
        lambda o: the("NetworkPolicy", o)["spec"]["egress"].append({}),
        "egress is open beyond the cluster DNS",
    ),
    "networkpolicy-egress-https": (
        lambda o: the("NetworkPolicy", o)["spec"]["egress"].append(
            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
        ),
        "egress is open beyond the cluster DNS",
    ),
    "servicemonitor-wrong-port": (
        lambda o: the("ServiceMonitor", o)["spec"]["endpoints"][0].update(port="metrics"),
        "endpoint port metrics is not a port name",
    ),
    "servicemonitor-selects-nothing": (
        lambda o: the("ServiceMonitor", o)["spec"]["selector"].update(matchLabels={"app": "other"}),
        "ServiceMonitor/healnet-service: selector matches no Service labels",
    ),
    "namespace-baseline-only": (
        lambda o: the("Namespace", o)["metadata"]["labels"].update({PSS_ENFORCE: "baseline"}),
        "does not enforce the restricted Pod Security Standard",
    ),
    "committed-secret": (
        lambda o: o.append(
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}, "stringData": {}}
        ),
        "Secrets must be created in the cluster",
    ),
}


def drift_policy(objects: list[Obj]) -> Obj:
    return next(
        o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "healnet-drift"
    )


DRIFT_BREAKAGES: dict[str, tuple[Callable[[list[Obj]], None], str]] = {
    "drift-job-unguarded": (
        lambda o: o.remove(drift_policy(o)),
        "pods labelled healnet-drift: no NetworkPolicy selects them",
    ),
    "drift-pushgateway-https-anywhere": (
        lambda o: drift_policy(o)["spec"]["egress"][1]["to"][0].pop("podSelector"),
        "NetworkPolicy/healnet-drift: egress is open beyond the cluster DNS",
    ),
    "drift-ingress-opened": (
        lambda o: drift_policy(o)["spec"].update(ingress=[{"from": [{"podSelector": {}}]}]),
        "NetworkPolicy/healnet-drift: ingress is open to ports [], not only []",
    ),
}


@pytest.fixture(scope="module")
def prod_objects() -> list[Obj]:
    return manifests("overlays/prod")


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_policy_reports_a_broken_copy(prod_objects: list[Obj], breakage: str) -> None:
    break_it, expected = BREAKAGES[breakage]
    objects = copy.deepcopy(prod_objects)
    break_it(objects)
    violations = policy_violations(objects)
    assert any(expected in violation for violation in violations), violations


def test_policy_checks_init_containers_too(prod_objects: list[Obj]) -> None:
    objects = copy.deepcopy(prod_objects)
    pod(objects)["initContainers"] = [{"name": "fetch-model", "image": "busybox"}]
    violations = "\n".join(policy_violations(objects))
    assert "container fetch-model: readOnlyRootFilesystem is not true" in violations
    assert "image busybox has no tag" in violations
    assert "container fetch-model: no ephemeral-storage in limits" in violations
    assert "fetch-model: no startupProbe" not in violations, "init containers run to completion: no probes"


def test_training_pvc_is_shared_read_write() -> None:
    (claim,) = [o for o in manifests("training") if o["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


ROLLOUT_BREAKAGES: dict[str, tuple[Callable[[list[Obj]], None], str]] = {
    "own-pod-template": (
        lambda o: [
            the(ROLLOUT_KIND, o)["spec"].pop("workloadRef"),
            the(ROLLOUT_KIND, o)["spec"].update(template=the("Deployment", o)["spec"]["template"]),
        ],
        "has a pod template of its own instead of a workloadRef",
    ),
    "missing-deployment": (
        lambda o: the(ROLLOUT_KIND, o)["spec"]["workloadRef"].update(name="healnet"),
        "workloadRef Deployment/healnet does not exist",
    ),
    "selector-mismatch": (
        lambda o: the(ROLLOUT_KIND, o)["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/name": "other"}
        ),
        "selector does not match the pod template labels of healnet-service",
    ),
    "fights-the-autoscaler": (
        lambda o: the(ROLLOUT_KIND, o)["spec"].update(replicas=2),
        "healnet-service also sets spec.replicas",
    ),
    "autoscaler-on-the-deployment": (
        lambda o: the("HorizontalPodAutoscaler", o)["spec"]["scaleTargetRef"].update(
            apiVersion="apps/v1", kind="Deployment"
        ),
        "scales Deployment/healnet-service, whose pods Rollout/healnet-service runs",
    ),
}


# Breakages of the overlays other than prod's: (overlay, breakages)
OVERLAY_BREAKAGES = [("overlays/drift", DRIFT_BREAKAGES), ("overlays/canary", ROLLOUT_BREAKAGES)]


@pytest.mark.parametrize(
    ("overlay", "breakage"),
    [(overlay, name) for overlay, breakages in OVERLAY_BREAKAGES for name in sorted(breakages)],
)
def test_policy_reports_a_broken_overlay(overlay: str, breakage: str) -> None:
    break_it, expected = dict(OVERLAY_BREAKAGES)[overlay][breakage]
    objects = copy.deepcopy(manifests(overlay))
    break_it(objects)
    violations = policy_violations(objects)
    assert any(expected in violation for violation in violations), violations
