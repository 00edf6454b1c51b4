"""Multi-node training on Kubeflow Trainer: the TrainJob the compiled pipeline creates passes the Trainer
CRD's schema (k8s/schemas/), and the `train_trainjob` step against a fake Kubernetes API follows the job
through created, running and succeeded (the checkpoint handed on) or failed (the job's reason)."""

import copy
import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest
import yaml
from kfp.dsl import Dataset, Metrics, Model
from test_components import artifact, synth_validated_cohort
from test_k8s_manifests import KUBERNETES_VERSIONS, by_kind, manifests, schema_errors

import components.trainjob as trainjob
from components.model_steps import train_trainjob
from components.trainjob import (
    STEP_POD_NAME_ENV,
    STEP_POD_UID_ENV,
    KubernetesApi,
    StepPod,
    TrainJobError,
    TrainJobSettings,
    training_command,
    trainjob_manifest,
    trainjob_name,
)
from healnet.checkpoint import verify_checkpoint
from pipelines.__main__ import main as pipelines_main

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "k8s" / "schemas" / "trainjob-trainer-v1alpha1.json").read_text())
RUN_ID = "0F3A9C2E-7B1D-4E8F-9A6B-5C4D3E2F1A0B"  # a KFP run id; upper case, as some back-ends write them
NAMESPACE = "kubeflow-user"
STEP_POD = StepPod("healnet-training-abc12-system-container-impl-123", "6c1d9f4e-2b7a-4c3e-9f81-0d5a7e3b2c19")
OWNER_REFERENCE = {"apiVersion": "v1", "kind": "Pod", "name": STEP_POD.name, "uid": STEP_POD.uid}
# what the Trainer CRD checks with CEL (x-kubernetes-validations), which jsonschema does not run
NAME_RULE = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


def compiled_package(tmp_path: Path, *params: str) -> tuple[dict, dict]:
    """The compiled pipeline's body tasks and its Kubernetes executor settings."""
    output = tmp_path / "pipeline.yaml"
    argv = ["compile", "--output", str(output)]
    for param in params:
        argv += ["--param", param]
    assert pipelines_main(argv) == 0
    spec, platform = yaml.safe_load_all(output.read_text())
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    return tasks, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def constant(task: dict, name: str):
    return task["inputs"]["parameters"][name]["runtimeValue"]["constant"]


@pytest.fixture(scope="module")
def compiled_trainjob_package(tmp_path_factory) -> tuple[dict, dict]:
    return compiled_package(
        tmp_path_factory.mktemp("trainjob"),
        "train_backend=trainjob",
        "num_nodes=2",
        "gpus_per_node=4",
        "cohort_pvc=healnet-data",
    )


@pytest.fixture(scope="module")
def compiled_manifest(compiled_trainjob_package) -> dict:
    """The TrainJob the compiled pipeline's step would create, built from the step's compiled inputs."""
    tasks, _ = compiled_trainjob_package
    task = tasks["train-trainjob"]
    assert constant(task, "run_id") == "{{$.pipeline_job_uuid}}"
    settings = TrainJobSettings(**constant(task, "settings"))
    name = trainjob_name(RUN_ID)
    command = training_command(
        trainjob.staging_dir(settings, name),
        recipe="demo",
        train_settings={"epochs": 40, "batch_size": 16, "patience": 8, "seed": 0},
        modalities="omic,clinical,wsi",
        split_repeat=0,
        with_features=True,
    )
    return trainjob_manifest(
        name, settings, constant(task, "num_nodes"), constant(task, "gpus_per_node"), command, STEP_POD
    )


def test_the_compiled_trainjob_passes_the_trainer_crd_schema(compiled_manifest):
    jsonschema.validate(compiled_manifest, SCHEMA)
    spec = compiled_manifest["spec"]
    assert compiled_manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    assert spec["trainer"]["numNodes"] == 2 and spec["trainer"]["numProcPerNode"] == 4
    assert spec["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    assert spec["trainer"]["command"][:5] == ["torchrun", "-m", "healnet", "train", "--cohort"]
    assert isinstance(spec["activeDeadlineSeconds"], int)
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod_spec = pod["template"]["spec"]["template"]["spec"]
    assert {"name": "cohort", "persistentVolumeClaim": {"claimName": "healnet-data"}} in pod_spec["volumes"]
    assert pod_spec["containers"][0]["volumeMounts"][0] == {"name": "cohort", "mountPath": "/data"}
    # every node reads the cohort where the step staged it, on the shared volume
    assert spec["trainer"]["command"][5].startswith("/data/trainjobs/")


def test_the_trainjob_is_owned_by_the_steps_pod(compiled_manifest):
    # no blockOwnerDeletion (it would take update on pods/finalizers) and no controller flag
    assert compiled_manifest["metadata"]["ownerReferences"] == [OWNER_REFERENCE]


def test_the_trainjob_step_gets_its_pod_name_and_uid_from_the_downward_api(compiled_trainjob_package):
    _, executors = compiled_trainjob_package
    assert executors["exec-train-trainjob"]["fieldPathAsEnv"] == [
        {"name": STEP_POD_NAME_ENV, "fieldPath": "metadata.name"},
        {"name": STEP_POD_UID_ENV, "fieldPath": "metadata.uid"},
    ]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "trainer", "numNode"), 2),  # misspelt: strict validation refuses unknown fields
        (("spec", "trainer", "numNodes"), "two"),
        (("spec", "runtimePatches", 0, "trainingRuntimeSpec", "template", "spec", "nodes"), []),
    ],
)
def test_a_broken_trainjob_fails_the_schema(compiled_manifest, path, value):
    broken = copy.deepcopy(compiled_manifest)
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_the_trainjob_name_is_a_dns_label_its_pods_can_extend():
    name = trainjob_name(RUN_ID)
    assert name == "healnet-0f3a9c2e-7b1d-4e8f-9a6b-5c4d3e2f1a0b"
    long_name = trainjob_name("run_" + "x" * 80)
    assert len(f"{long_name}-node-0-0") <= 63
    assert re.fullmatch(NAME_RULE, name) and re.fullmatch(NAME_RULE, long_name)


def test_the_pipeline_service_account_may_create_read_and_delete_trainjobs_and_nothing_else():
    objects = manifests("training")
    (role,), (binding,) = by_kind(objects, "Role"), by_kind(objects, "RoleBinding")
    # the step's two calls, POST (create) and GET (get) on trainjobs, and delete, which the
    # OwnerReferencesPermissionEnforcement admission plugin asks of whoever sets an ownerReference; nothing
    # on pods: the owner's name and uid come from the downward API
    assert role["rules"] == [
        {
            "apiGroups": ["trainer.kubeflow.org"],
            "resources": ["trainjobs"],
            "verbs": ["create", "get", "delete"],
        }
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}
    ]
    for version in KUBERNETES_VERSIONS:
        assert not schema_errors(role, version) + schema_errors(binding, version)


def test_single_pod_training_stays_the_default(tmp_path):
    tasks, _ = compiled_package(tmp_path)
    assert "train" in tasks and "train-trainjob" not in tasks


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (["train_backend=slurm"], "train_backend must be one of pod, trainjob, got 'slurm'"),
        (["train_backend=trainjob"], "train_backend=trainjob needs cohort_pvc"),
        (["num_nodes=0"], "num_nodes and gpus_per_node must be at least 1"),
    ],
)
def test_bad_training_backends_are_refused_when_compiling(tmp_path, capsys, params, message):
    argv = ["compile", "--output", str(tmp_path / "p.yaml")]
    for param in params:
        argv += ["--param", param]
    assert pipelines_main(argv) == 2
    assert message in capsys.readouterr().err


def test_run_local_refuses_the_trainjob_backend(tmp_path, capsys):
    argv = ["run-local", "--pipeline-root", str(tmp_path / "root")]
    argv += ["--param", "train_backend=trainjob", "--param", "cohort_pvc=healnet-data"]
    assert pipelines_main(argv) == 2
    assert "train_backend=trainjob needs a cluster" in capsys.readouterr().err


class FakeTrainer:
    """The TrainJob endpoints of a Kubernetes API server and the Trainer controller behind them: a created
    TrainJob reports `statuses` one GET after another (the last one from then on), and `on_running` runs
    when it first reports running nodes, as the nodes would train."""

    def __init__(self, statuses: list[dict], on_running=None, create_error: tuple[int, str] | None = None):
        self.statuses, self.on_running, self.create_error = statuses, on_running, create_error
        self.created: list[dict] = []
        self.gets = 0

    def handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                assert self.path == f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NAMESPACE}/trainjobs"
                assert self.headers["Authorization"] == "Bearer service-account-token"
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if fake.create_error:
                    code, message = fake.create_error
                    return self.reply(code, {"kind": "Status", "status": "Failure", "message": message})
                fake.created.append(body)
                self.reply(201, body)

            def do_GET(self):
                job = fake.created[0]
                assert self.path.endswith(f"/namespaces/{NAMESPACE}/trainjobs/{job['metadata']['name']}")
                status = fake.statuses[min(fake.gets, len(fake.statuses) - 1)]
                fake.gets += 1
                if status.get("jobsStatus") and fake.on_running:
                    fake.on_running(job)
                    fake.on_running = None
                self.reply(200, {**job, "status": status} if status else job)

        return Handler


RUNNING = {"jobsStatus": [{"name": "node", "active": 2, "ready": 2, "succeeded": 0, "failed": 0}]}


def condition(kind: str, reason: str, message: str) -> dict:
    return {"conditions": [{"type": kind, "status": "True", "reason": reason, "message": message}]}


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch):
    """Start a FakeTrainer as the step's in-cluster API; the cohort volume is a local folder."""
    servers = []

    def start(fake: FakeTrainer) -> FakeTrainer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        api = KubernetesApi(f"http://127.0.0.1:{server.server_port}", "service-account-token")
        monkeypatch.setattr(trainjob, "in_cluster_api", lambda: (api, NAMESPACE))
        monkeypatch.setattr(trainjob, "POLL_SECONDS", 0.01)
        monkeypatch.setenv(STEP_POD_NAME_ENV, STEP_POD.name)
        monkeypatch.setenv(STEP_POD_UID_ENV, STEP_POD.uid)
        return fake

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return synth_validated_cohort(tmp_path_factory.mktemp("trainjob") / "cohort", patients=48, seed=3)


def run_step(cohort: Path, out: Path, volume: Path) -> tuple[Model, Metrics]:
    model, metrics = artifact(Model, out, "model"), artifact(Metrics, out, "metrics")
    settings = TrainJobSettings(
        runtime="torch-distributed",
        image="healnet-gpu:test",
        cpu="4",
        memory="16Gi",
        shm="2Gi",
        timeout_s=600,
        gpu_node_label="nvidia.com/gpu.present",
        gpu_node_value="true",
        gpu_taint_key="nvidia.com/gpu",
        gpu_taint_effect="NoSchedule",
        cohort_pvc="healnet-data",
        cohort_mount=str(volume),
    )
    train_trainjob.python_func(
        cohort=artifact(Dataset, cohort.parent, cohort.name),
        data_hash="data-hash",
        split_repeat=0,
        recipe="demo",
        modalities="omic,clinical",
        epochs=2,
        batch_size=16,
        patience=2,
        seed=0,
        num_nodes=2,
        gpus_per_node=1,
        run_id=RUN_ID,
        settings=settings.__dict__,
        features=artifact(Dataset, out, "features"),
        model=model,
        metrics=metrics,
    )
    return model, metrics


def train_like_the_nodes(job: dict) -> None:
    """What the TrainJob's nodes do, in one process: its command without torchrun, as the first rank."""
    command = job["spec"]["trainer"]["command"]
    assert command[:3] == ["torchrun", "-m", "healnet"]
    subprocess.run([sys.executable, "-m", "healnet", *command[3:]], check=True, capture_output=True)


def test_the_step_follows_a_trainjob_to_success_and_hands_the_checkpoint_on(
    fake_cluster, cohort, tmp_path, capsys
):
    fake = fake_cluster(
        FakeTrainer([{}, RUNNING, RUNNING, condition("Complete", "JobsCompleted", "")], train_like_the_nodes)
    )
    model, metrics = run_step(cohort, tmp_path / "out", tmp_path / "volume")
    printed = capsys.readouterr().out
    states = [line.split(": ", 1)[1] for line in printed.splitlines() if line.startswith("TrainJob healnet-")]
    assert [state.split(" ")[0] for state in states] == ["created", "running", "succeeded"]
    assert "2 nodes x 1 GPUs" in printed
    (job,) = fake.created
    jsonschema.validate(job, SCHEMA)
    assert job["metadata"]["name"] == trainjob_name(RUN_ID)
    assert job["metadata"]["ownerReferences"] == [OWNER_REFERENCE]
    checkpoint = Path(model.path) / "checkpoint"
    assert verify_checkpoint(checkpoint) == model.metadata["sha256"]
    assert model.metadata["data_hash"] == "data-hash" and model.metadata["recipe"] == "demo"
    assert metrics.metadata["epochs_run"] >= 1
    assert not (tmp_path / "volume" / "trainjobs" / job["metadata"]["name"]).exists()  # staging removed


def test_the_step_fails_with_the_trainjobs_reason(fake_cluster, cohort, tmp_path, capsys):
    failed = condition("Failed", "DeadlineExceeded", "TrainJob exceeded its activeDeadlineSeconds")
    fake_cluster(FakeTrainer([{}, RUNNING, failed]))
    with pytest.raises(TrainJobError, match="failed: DeadlineExceeded: TrainJob exceeded its activeDead"):
        run_step(cohort, tmp_path / "out", tmp_path / "volume")
    assert "failed (DeadlineExceeded" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (403, 'trainjobs.trainer.kubeflow.org is forbidden: User "x" cannot create', "403 trainjobs"),
        (409, 'trainjobs.trainer.kubeflow.org "healnet-0f3a" already exists', "exists already; delete it"),
    ],
)
def test_a_refused_trainjob_is_a_one_line_error(fake_cluster, cohort, tmp_path, code, message, expected):
    fake_cluster(FakeTrainer([{}], create_error=(code, message)))
    with pytest.raises(TrainJobError, match=expected) as raised:
        run_step(cohort, tmp_path / "out", tmp_path / "volume")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("unset", [[STEP_POD_UID_ENV], [STEP_POD_NAME_ENV, STEP_POD_UID_ENV]])
def test_a_step_that_cannot_name_its_pod_creates_no_trainjob(
    fake_cluster, cohort, tmp_path, monkeypatch, unset
):
    fake = fake_cluster(FakeTrainer([{}]))
    for env in unset:
        monkeypatch.delenv(env)
    with pytest.raises(TrainJobError, match=f"{' and '.join(unset)} unset: .*recompile the pipeline"):
        run_step(cohort, tmp_path / "out", tmp_path / "volume")
    assert fake.created == []
    assert not (tmp_path / "volume" / "trainjobs").exists()  # refused before staging
