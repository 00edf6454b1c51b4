"""The compiled pipeline package: structure, GPU scheduling, retries, caching, branches, exit handler."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.__main__ import main as pipelines_main

REPO = Path(__file__).resolve().parents[1]


def compile_package(tmp_path: Path, *params: str) -> tuple[dict, dict]:
    output = tmp_path / "pipeline.yaml"
    argv = ["compile", "--output", str(output)]
    for param in params:
        argv += ["--param", param]
    assert pipelines_main(argv) == 0
    spec, platform = yaml.safe_load_all(output.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_package(
        tmp_path_factory.mktemp("compiled"),
        "gpu_node_label=cloud.google.com/gke-accelerator",
        "gpu_node_value=nvidia-l4",
        "gpu_taint_key=dedicated",
        "gpu_count=2",
        "registry_pvc=healnet-registry",
        "cohort_pvc=healnet-cohorts",
        "cohort_dir=/data/demo",
    )


def body_tasks(spec: dict) -> dict:
    return spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]


def test_training_runs_on_gpu_nodes(compiled):
    spec, executors = compiled
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "2"
    assert resources["resourceCpuRequest"] == "4" and resources["resourceMemoryRequest"] == "16Gi"
    train = executors["exec-train"]
    assert train["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert train["tolerations"] == [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "2Gi", "volumeName": "dshm"} in train[
        "emptyDirMounts"
    ]
    assert [mount["mountPath"] for mount in train["pvcMount"]] == ["/data"]
    assert "nodeSelector" not in executors.get("exec-evaluate", {})


def test_retries_on_flaky_steps_and_caching_off_where_state_changes(compiled):
    spec, _ = compiled
    tasks = body_tasks(spec)
    loop_tasks = spec["components"]["comp-for-loop-2"]["dag"]["tasks"]
    for task in (
        tasks["train"],
        tasks["evaluate"],
        tasks["merge-features"],
        tasks["import-features"],
        loop_tasks["preprocess-slides"],
    ):
        assert task["retryPolicy"]["maxRetryCount"] == 2 and task["retryPolicy"]["backoffDuration"] == "30s"
    for first_steps in ("fingerprint", "ingest", "validate"):  # a user's mistake fails once, here
        assert "retryPolicy" not in tasks[first_steps]
    assert tasks["fingerprint"]["cachingOptions"] == {}
    assert tasks["ingest"]["cachingOptions"] == {"enableCache": True}  # keyed by the fingerprint
    branches = spec["components"]["comp-condition-4"]["dag"]["tasks"]
    assert branches["promote"]["cachingOptions"] == {}
    assert tasks["validate"]["cachingOptions"] == {} and tasks["gate"]["cachingOptions"] == {}
    assert tasks["train"]["cachingOptions"] == {"enableCache": True}


def test_slides_fan_out_with_parallel_for_and_fan_in_once_with_collected(compiled):
    spec, _ = compiled
    tasks = body_tasks(spec)
    loop = tasks["for-loop-2"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--validate-Output"
    assert loop["iteratorPolicy"]["parallelismLimit"] == 4
    merge_inputs = tasks["merge-features"]["inputs"]["artifacts"]
    assert merge_inputs["slide_features"]["taskOutputArtifact"] == {
        "outputArtifactKey": "pipelinechannel--preprocess-slides-features",
        "producerTask": "for-loop-2",
    }
    assert merge_inputs["imported_features"]["taskOutputArtifact"] == {
        "outputArtifactKey": "features",
        "producerTask": "import-features",
    }
    # the shards are merged once: train and evaluate read the one merged artifact, nothing else the shards
    for step in ("train", "evaluate"):
        assert tasks[step]["inputs"]["artifacts"]["features"]["taskOutputArtifact"] == {
            "outputArtifactKey": "features",
            "producerTask": "merge-features",
        }
    readers = [
        name for name, task in tasks.items() if "slide_features" in task["inputs"].get("artifacts", {})
    ]
    assert readers == ["merge-features"]
    # each shard's parameters come from its loop item, which kfp.local resolves (other steps' outputs not)
    shard = spec["components"]["comp-for-loop-2"]["dag"]["tasks"]["preprocess-slides"]["inputs"]["parameters"]
    assert shard["data_hash"]["componentInputParameter"] == "pipelinechannel--validate-Output-loop-item"


def test_gate_has_a_promote_and_a_reject_branch(compiled):
    spec, _ = compiled
    branches = spec["components"]["comp-condition-branches-3"]["dag"]["tasks"]
    conditions = {name: task["triggerPolicy"]["condition"] for name, task in branches.items()}
    assert conditions["condition-4"] == "inputs.parameter_values['pipelinechannel--gate-Output'] == 'promote'"
    assert (
        conditions["condition-5"] == "!(inputs.parameter_values['pipelinechannel--gate-Output'] == 'promote')"
    )
    assert "promote" in spec["components"]["comp-condition-4"]["dag"]["tasks"]
    assert "reject" in spec["components"]["comp-condition-5"]["dag"]["tasks"]


def test_everything_runs_inside_an_exit_handler_that_notifies(compiled):
    spec, _ = compiled
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "notify"}
    notify = root["notify"]
    assert notify["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert notify["inputs"]["parameters"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert {"validate", "for-loop-2", "merge-features", "train", "evaluate", "gate"} <= set(body_tasks(spec))


def test_the_registry_is_shared_storage_on_the_release_steps(compiled):
    spec, executors = compiled
    for step in ("gate", "promote", "reject"):
        mounts = {mount["mountPath"]: mount["constant"] for mount in executors[f"exec-{step}"]["pvcMount"]}
        assert mounts["/registry"] == "healnet-registry"
        env = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["env"]
        assert {"name": "BENTOML_HOME", "value": "/registry"} in env
    assert "/data" in [
        mount["mountPath"] for mount in executors["exec-promote"]["pvcMount"]
    ]  # re-hashes the cohort
    assert spec["root"]["inputDefinitions"]["parameters"]["cohort_dir"]["defaultValue"] == "/data/demo"


def test_without_options_no_volume_is_mounted(tmp_path):
    _, executors = compile_package(tmp_path)
    assert set(executors) == {"exec-train", "exec-notify"}
    assert "pvcMount" not in executors["exec-train"]
    assert set(executors["exec-notify"]) == {"secretAsEnv"}


def test_the_notify_webhook_comes_from_an_optional_secret_never_a_parameter(compiled):
    spec, executors = compiled
    (secret,) = executors["exec-notify"]["secretAsEnv"]
    assert secret["secretName"] == "healnet-notify" and secret["optional"] is True
    assert secret["keyToEnv"] == [{"secretKey": "webhook_url", "envVar": "HEALNET_NOTIFY_WEBHOOK"}]
    assert set(spec["components"]["comp-notify"]["inputDefinitions"]["parameters"]) == {"run_name", "status"}
    assert not [name for name in spec["root"]["inputDefinitions"]["parameters"] if "webhook" in name]


def test_the_notify_secret_is_a_cluster_option(tmp_path):
    _, executors = compile_package(tmp_path, "notify_secret=team-alerts")
    assert [s["secretName"] for s in executors["exec-notify"]["secretAsEnv"]] == ["team-alerts"]
    _, executors = compile_package(tmp_path, "notify_secret=")
    assert "exec-notify" not in executors


def test_images_come_from_the_environment(tmp_path):
    env = {
        **os.environ,
        "HEALNET_IMAGE": "ghcr.io/acme/healnet:1.2.3",
        "HEALNET_GPU_IMAGE": "ghcr.io/acme/healnet-gpu:1.2.3",
    }
    output = tmp_path / "pipeline.yaml"
    subprocess.run(
        [sys.executable, "-m", "pipelines", "compile", "--output", str(output)], cwd=REPO, env=env, check=True
    )
    spec, _ = yaml.safe_load_all(output.read_text())
    images = {
        name: executor["container"]["image"] for name, executor in spec["deploymentSpec"]["executors"].items()
    }
    assert images.pop("exec-train") == "ghcr.io/acme/healnet-gpu:1.2.3"
    assert set(images.values()) == {"ghcr.io/acme/healnet:1.2.3"}
    assert (
        "pip install" not in output.read_text()
    )  # the images carry healnet and kfp; nothing installs at run time


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("epochs=many", "epochs expects int"),
        ("colour=red", "unknown parameter 'colour'"),
        ("novalue", "KEY=VALUE"),
        ("notify_webhook=https://hooks.example.com/T0KEN", "unknown parameter 'notify_webhook'"),
    ],
)
def test_bad_params_are_refused(tmp_path, capsys, param, message):
    assert pipelines_main(["compile", "--output", str(tmp_path / "p.yaml"), "--param", param]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()
