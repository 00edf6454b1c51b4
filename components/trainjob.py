"""Multi-node training on Kubeflow Trainer: the TrainJob that the pipeline's `train_trainjob` step creates,
and the step's watch of it through the Kubernetes API.

The TrainJob runs `torchrun -m healnet train` on the `torch-distributed` ClusterTrainingRuntime. That
runtime's torch plugin sets torchrun's PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and
PET_MASTER_PORT on every node, so the command names no node or rendezvous flag. The step and the nodes share
the cohort volume (an RWX claim): the step stages the run's cohort and features there, the first process
writes the checkpoint there, and the step copies it into its `model` artifact.

The API is spoken in plain HTTPS with the pod's service-account token: the step image needs no Kubernetes
client. Trainer API: trainer.kubeflow.org/v1alpha1 as of kubeflow/trainer v2.3.0 (k8s/schemas/README.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from components.support import PipelineStepError

POD_BACKEND = "pod"  # one training pod: data-parallel over its GPUs (the default)
TRAINJOB_BACKEND = "trainjob"  # a Kubeflow Trainer TrainJob over several nodes
TRAIN_BACKENDS = (POD_BACKEND, TRAINJOB_BACKEND)

TRAINER_API = "trainer.kubeflow.org/v1alpha1"
# the runtime's replicated job, and its container, that runs the trainer command (Trainer's constants.Node)
TRAINER_NODE = "node"
# the owner of this TrainJob's runtime patch (a runtimePatches list entry is keyed by its manager)
PATCH_MANAGER = "healnet.pipeline/train-trainjob"
STAGING_FOLDER = "trainjobs"  # under the cohort mount: one folder per TrainJob
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
POLL_SECONDS = 15
# a pod of the JobSet is named <trainjob>-node-<job index>-<pod index>, and a pod hostname is a DNS label
MAX_NAME_LENGTH = 63 - len(f"-{TRAINER_NODE}-0-0")

# The pipeline sets these on the step from its pod's metadata (the downward API): the TrainJob's owner.
STEP_POD_NAME_ENV = "HEALNET_STEP_POD_NAME"
STEP_POD_UID_ENV = "HEALNET_STEP_POD_UID"
STEP_POD_FIELD_PATHS = {STEP_POD_NAME_ENV: "metadata.name", STEP_POD_UID_ENV: "metadata.uid"}

CREATED, RUNNING, SUSPENDED, SUCCEEDED, FAILED = "created", "running", "suspended", "succeeded", "failed"
# TrainJob condition types (trainjob_types.go) that settle its state, the first true one winning
CONDITION_STATES = {"Failed": FAILED, "Complete": SUCCEEDED, "Suspended": SUSPENDED}


class TrainJobError(PipelineStepError):
    """The TrainJob could not be created or watched, or it failed; the message says why."""


class KubernetesApiError(TrainJobError):
    """The API server refused a call (`status`: its HTTP status) or could not be reached (`status` None)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TrainJobSettings:
    """The cluster settings of the TrainJob, fixed when the pipeline is compiled (from `ClusterOptions`)."""

    runtime: str  # the ClusterTrainingRuntime, torch-distributed
    image: str  # the GPU image every node runs
    cpu: str  # per node
    memory: str  # per node, request and limit
    shm: str  # /dev/shm per node (memory-backed), for DataLoader workers
    timeout_s: int  # activeDeadlineSeconds: Trainer fails the job with reason DeadlineExceeded after it
    gpu_node_label: str
    gpu_node_value: str
    gpu_taint_key: str
    gpu_taint_effect: str
    cohort_pvc: str  # the RWX claim the step and every node mount at cohort_mount
    cohort_mount: str


@dataclass(frozen=True)
class StepPod:
    """The pod the step runs in, which owns the TrainJob: Kubernetes' garbage collector deletes the TrainJob
    (and through it Trainer's JobSet and the node pods) once that pod is deleted: with its run, or when the
    pipeline backend cleans up a terminated run's pods. A run that is gone then holds no GPU nodes until
    the job's deadline.

    Garbage-collection rules the reference relies on:
    - An ownerReference carries no namespace: a namespaced owner is looked up in its dependent's namespace.
      The TrainJob is created in the namespace of the service account mounted into this pod
      (`in_cluster_api`), which is the pod's namespace. An owner in another namespace counts as absent, as
      does one whose uid differs from the live pod's, and a dependent whose owners are all absent is deleted
      at once; hence the uid comes from the pod itself (the downward API), never from a lookup by name.
    - `blockOwnerDeletion` is left out: it only makes a foreground deletion of the pod wait for the TrainJob,
      which nothing needs, and under the OwnerReferencesPermissionEnforcement admission plugin setting it
      takes `update` on `pods/finalizers`, which the step's service account is not granted. That plugin
      still takes `delete` on the TrainJob itself to set any ownerReference (k8s/training/trainjob-rbac.yaml).
    - `controller` is left out: the pod does not manage the TrainJob, Trainer's controller does.
    """

    name: str
    uid: str

    @classmethod
    def from_environment(cls) -> StepPod:
        missing = [env for env in STEP_POD_FIELD_PATHS if not os.environ.get(env)]
        if missing:
            # refused rather than created unowned: an unowned TrainJob outlives its run on the GPU nodes
            raise TrainJobError(
                f"{' and '.join(missing)} unset: train_backend=trainjob needs the step's pod name and uid "
                f"(the TrainJob's owner), which the pipeline sets from the pod's "
                f"{' and '.join(STEP_POD_FIELD_PATHS[env] for env in missing)}; recompile the pipeline"
            )
        return cls(os.environ[STEP_POD_NAME_ENV], os.environ[STEP_POD_UID_ENV])

    def owner_reference(self) -> dict:
        return {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}


@dataclass(frozen=True)
class TrainJobState:
    phase: str  # CREATED, RUNNING, SUSPENDED, SUCCEEDED or FAILED
    reason: str = ""
    message: str = ""

    def describe(self) -> str:
        detail = ": ".join(part for part in (self.reason, self.message) if part)
        return f"{self.phase} ({detail})" if detail else self.phase


def trainjob_name(run_id: str) -> str:
    """A TrainJob name (an RFC 1035 label short enough for its pods' hostnames) for the pipeline run."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    return f"healnet-{slug}"[:MAX_NAME_LENGTH].rstrip("-")


def staging_dir(settings: TrainJobSettings, name: str) -> Path:
    return Path(settings.cohort_mount) / STAGING_FOLDER / name


def training_command(
    stage: Path,
    recipe: str,
    train_settings: dict[str, int],
    modalities: str,
    split_repeat: int,
    with_features: bool,
) -> list[str]:
    """`torchrun -m healnet train` on the staged cohort, writing to `stage/model`; `train_settings` are the
    resolved recipe's epochs, batch_size, patience and seed, passed as the matching `healnet train` flags."""
    flags = {
        "--cohort": stage / "cohort",
        "--out": stage / "model",
        "--recipe": recipe,
        "--modalities": modalities,
        "--split-repeat": split_repeat,
        **{f"--{setting.replace('_', '-')}": value for setting, value in train_settings.items()},
    }
    if with_features:
        flags["--features"] = stage / "features"
    arguments = [str(part) for flag_and_value in flags.items() for part in flag_and_value]
    return ["torchrun", "-m", "healnet", "train", *arguments, "--no-progress"]


def trainjob_manifest(
    name: str,
    settings: TrainJobSettings,
    num_nodes: int,
    gpus_per_node: int,
    command: list[str],
    owner: StepPod,
) -> dict:
    """The TrainJob: `num_nodes` nodes of `gpus_per_node` GPUs and one process per GPU, on the GPU nodes,
    with the cohort volume and a memory-backed /dev/shm patched into the runtime's node pods, owned by the
    step's pod `owner`."""
    gpus = {"nvidia.com/gpu": gpus_per_node}
    pod_patch = {
        "nodeSelector": {settings.gpu_node_label: settings.gpu_node_value},
        "tolerations": [
            {"key": settings.gpu_taint_key, "operator": "Exists", "effect": settings.gpu_taint_effect}
        ],
        "volumes": [
            {"name": "cohort", "persistentVolumeClaim": {"claimName": settings.cohort_pvc}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm}},
        ],
        "containers": [
            {
                "name": TRAINER_NODE,
                "volumeMounts": [
                    {"name": "cohort", "mountPath": settings.cohort_mount},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
            }
        ],
    }
    node_patch = {"name": TRAINER_NODE, "template": {"spec": {"template": {"spec": pod_patch}}}}
    return {
        "apiVersion": TRAINER_API,
        "kind": "TrainJob",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/part-of": "healnet"},
            "ownerReferences": [owner.owner_reference()],
        },
        "spec": {
            "runtimeRef": {
                "apiGroup": "trainer.kubeflow.org",
                "kind": "ClusterTrainingRuntime",
                "name": settings.runtime,
            },
            # int(): a KFP struct parameter brings every number as a float, and the field is an integer
            "activeDeadlineSeconds": int(settings.timeout_s),
            "trainer": {
                "image": settings.image,
                "command": command,
                "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],  # the nodes' logs as they come
                "numNodes": num_nodes,
                "numProcPerNode": gpus_per_node,
                "resourcesPerNode": {
                    "requests": {"cpu": settings.cpu, "memory": settings.memory, **gpus},
                    "limits": {"memory": settings.memory, **gpus},
                },
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node_patch]}}},
                }
            ],
        },
    }


def trainjob_state(trainjob: dict) -> TrainJobState:
    """Created (no child job active yet), running, suspended, succeeded or failed, with the condition's
    reason and message: from the TrainJob's status conditions (Failed, Complete, Suspended) and jobsStatus."""
    status = trainjob.get("status") or {}
    true_conditions = {c["type"]: c for c in status.get("conditions", []) if c.get("status") == "True"}
    for condition_type, phase in CONDITION_STATES.items():
        if condition_type in true_conditions:
            condition = true_conditions[condition_type]
            return TrainJobState(phase, condition.get("reason", ""), condition.get("message", ""))
    jobs = status.get("jobsStatus", [])
    if any(job.get("active") or job.get("ready") for job in jobs):
        ready = sum(job.get("ready", 0) for job in jobs)
        active = sum(job.get("active", 0) for job in jobs)
        return TrainJobState(RUNNING, message=f"{ready} of {active} active pods ready")
    return TrainJobState(CREATED)


@dataclass(frozen=True)
class KubernetesApi:
    """The few TrainJob calls the step makes, against `base_url` with a bearer token."""

    base_url: str
    token: str = ""
    ssl_context: ssl.SSLContext | None = None

    def _path(self, namespace: str, name: str = "") -> str:
        return f"{self.base_url}/apis/{TRAINER_API}/namespaces/{namespace}/trainjobs" + (
            f"/{name}" if name else ""
        )

    def _call(self, method: str, url: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.ssl_context) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise KubernetesApiError(
                f"{method} {url}: {error.code} {_status_message(error)}", error.code
            ) from None
        except urllib.error.URLError as error:
            raise KubernetesApiError(f"{method} {url}: {error.reason}") from None

    def create_trainjob(self, namespace: str, manifest: dict) -> dict:
        return self._call("POST", self._path(namespace), manifest)

    def get_trainjob(self, namespace: str, name: str) -> dict:
        return self._call("GET", self._path(namespace, name))


def _status_message(error: urllib.error.HTTPError) -> str:
    """The message of the Kubernetes Status object an API error carries, else the HTTP reason."""
    try:
        return json.loads(error.read()).get("message") or error.reason
    except ValueError:
        return error.reason


def in_cluster_api() -> tuple[KubernetesApi, str]:
    """The API server and namespace of the pod this runs in, as its service account sees them."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host or not (SERVICE_ACCOUNT / "token").is_file():
        raise TrainJobError(
            "train_backend=trainjob runs in a Kubernetes pod with a service-account token; none here"
        )
    context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
    api = KubernetesApi(f"https://{host}:{port}", (SERVICE_ACCOUNT / "token").read_text().strip(), context)
    return api, (SERVICE_ACCOUNT / "namespace").read_text().strip()


def run_trainjob(api: KubernetesApi, namespace: str, manifest: dict) -> TrainJobState:
    """Create the TrainJob and poll it every POLL_SECONDS until it succeeds, printing each change of state;
    raise `TrainJobError` with the job's reason and message when it fails."""
    name = manifest["metadata"]["name"]
    trainer = manifest["spec"]["trainer"]
    try:
        api.create_trainjob(namespace, manifest)
    except KubernetesApiError as error:
        # an earlier attempt of this run created it, and its outcome is unknown here
        if error.status == HTTPStatus.CONFLICT:
            raise TrainJobError(
                f"TrainJob {namespace}/{name} exists already; delete it (kubectl delete trainjob {name} -n "
                f"{namespace}) to train again"
            ) from None
        raise
    print(
        f"TrainJob {namespace}/{name} created on {manifest['spec']['runtimeRef']['name']}: "
        f"{trainer['numNodes']} nodes x {trainer['numProcPerNode']} GPUs"
    )
    last = None
    while True:
        state = trainjob_state(api.get_trainjob(namespace, name))
        if state != last:
            print(f"TrainJob {name}: {state.describe()}", flush=True)
            last = state
        if state.phase == FAILED:
            raise TrainJobError(
                f"TrainJob {namespace}/{name} failed: {state.reason or 'no reason'}: {state.message}"
            )
        if state.phase == SUCCEEDED:
            return state
        time.sleep(POLL_SECONDS)


def stage_inputs(stage: Path, cohort_dir: Path, features_dir: Path | None) -> None:
    """Copy the run's cohort (and features) onto the shared volume, where every node reads them: the step's
    artifacts live in its own pod, not on the volume."""
    if stage.exists():  # a retried step: its earlier attempt's copies may be partial
        shutil.rmtree(stage)
    shutil.copytree(cohort_dir, stage / "cohort")
    if features_dir is not None:
        shutil.copytree(features_dir, stage / "features")


def collect_model(stage: Path, model_dir: Path) -> dict:
    """Copy the trained model folder from the volume into the step's `model` artifact, remove the staging
    folder, and return the model's metrics.json."""
    trained = stage / "model"
    if not (trained / "metrics.json").is_file():
        raise TrainJobError(f"the TrainJob succeeded but wrote no {trained / 'metrics.json'}")
    shutil.copytree(trained, model_dir, dirs_exist_ok=True)
    shutil.rmtree(stage)
    return json.loads((model_dir / "metrics.json").read_text())


def train_on_trainer(
    api: KubernetesApi,
    namespace: str,
    owner: StepPod,
    settings: TrainJobSettings,
    job_name: str,
    training: dict,
    cohort_dir: Path,
    features_dir: Path | None,
    num_nodes: int,
    gpus_per_node: int,
    model_dir: Path,
) -> dict:
    """Stage the inputs, run the TrainJob (owned by the step's pod `owner`, in its namespace `namespace`) and
    collect its model into `model_dir`; returns its metrics.json. `training` holds `training_command`'s
    recipe, train_settings, modalities and split_repeat."""
    stage = staging_dir(settings, job_name)
    stage_inputs(stage, cohort_dir, features_dir)
    command = training_command(stage, with_features=features_dir is not None, **training)
    manifest = trainjob_manifest(job_name, settings, num_nodes, gpus_per_node, command, owner)
    run_trainjob(api, namespace, manifest)
    return collect_model(stage, model_dir)
