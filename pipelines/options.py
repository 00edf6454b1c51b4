"""Compile-time cluster options and `--param key=value` parsing shared by every CLI command."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from components.trainjob import POD_BACKEND, TRAIN_BACKENDS, TRAINJOB_BACKEND
from healnet.errors import HEALNetError

PARAMETER_TYPES = {"String": str, "Integer": int, "Float": float, "Boolean": bool}
# The key of the notify Secret (ClusterOptions.notify_secret) that holds the https:// webhook URL.
NOTIFY_SECRET_KEY = "webhook_url"


class ParamError(HEALNetError, ValueError):
    """A `--param` that is malformed, unknown or of the wrong type."""


@dataclass(frozen=True)
class ClusterOptions:
    """Kubernetes settings fixed when the pipeline is compiled (ignored by `kfp.local`)."""

    gpu_node_label: str = "nvidia.com/gpu.present"  # node selector on the training step
    gpu_node_value: str = "true"
    gpu_taint_key: str = "nvidia.com/gpu"  # toleration on the training step (operator Exists)
    gpu_taint_effect: str = "NoSchedule"
    gpu_count: int = 1
    train_cpu: str = "4"
    train_memory: str = "16Gi"
    train_shm: str = "2Gi"  # /dev/shm for DataLoader workers (memory-backed emptyDir)
    train_timeout_s: int = 6 * 3600
    step_cpu: str = "1"
    step_memory: str = "4Gi"
    retries: int = 2  # on the data, training and evaluation steps
    retry_backoff: str = "30s"
    shard_parallelism: int = 4
    cohort_pvc: str = ""  # when set, mounted at cohort_mount on the steps that read the cohort
    cohort_mount: str = "/data"
    registry_pvc: str = ""  # when set, the BentoML store (BENTOML_HOME) is this PVC at registry_mount
    registry_mount: str = "/registry"
    # The Secret whose NOTIFY_SECRET_KEY is the exit handler's webhook URL; optional: without it (or with
    # "") the run's end is only logged. kfp.local reads $HEALNET_NOTIFY_WEBHOOK from the environment instead.
    notify_secret: str = "healnet-notify"
    # "pod": the train step is one pod with gpu_count GPUs. "trainjob": it creates a Kubeflow Trainer TrainJob
    # of num_nodes nodes with gpus_per_node GPUs each, on the trainjob_runtime ClusterTrainingRuntime, and
    # needs cohort_pvc, which it shares with the nodes (docs/pipeline.md, multi-node training)
    train_backend: str = POD_BACKEND
    num_nodes: int = 1
    gpus_per_node: int = 1
    trainjob_runtime: str = "torch-distributed"

    def __post_init__(self) -> None:
        if self.train_backend not in TRAIN_BACKENDS:
            raise ParamError(
                f"train_backend must be one of {', '.join(TRAIN_BACKENDS)}, got {self.train_backend!r}"
            )
        if self.num_nodes < 1 or self.gpus_per_node < 1:
            raise ParamError(
                f"num_nodes and gpus_per_node must be at least 1, got {self.num_nodes} and {self.gpus_per_node}"
            )
        if self.train_backend == TRAINJOB_BACKEND and not self.cohort_pvc:
            raise ParamError(
                "train_backend=trainjob needs cohort_pvc: the RWX volume the step shares with the nodes"
            )


DEFAULT_OPTIONS = ClusterOptions()
OPTION_NAMES = tuple(field.name for field in dataclasses.fields(ClusterOptions))


def split_params(pairs: list[str]) -> dict[str, str]:
    """`["a=1", "b=x=y"]` -> `{"a": "1", "b": "x=y"}`."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ParamError(f"--param expects KEY=VALUE, got {pair!r}")
        params[key.strip()] = value
    return params


def convert(name: str, raw: str, kind: type) -> str | int | float | bool:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered not in {"true", "false", "1", "0", "yes", "no"}:
            raise ParamError(f"{name} expects true or false, got {raw!r}")
        return lowered in {"true", "1", "yes"}
    try:
        return kind(raw)
    except ValueError as error:
        raise ParamError(f"{name} expects {kind.__name__}, got {raw!r}") from error


def parse_params(pairs: list[str], pipeline_inputs: dict[str, type]) -> tuple[ClusterOptions, dict]:
    """Sort `--param` pairs into cluster options and typed pipeline arguments; unknown keys are errors."""
    option_types = {field.name: field.type for field in dataclasses.fields(ClusterOptions)}
    options: dict = {}
    arguments: dict = {}
    for name, raw in split_params(pairs).items():
        if name in option_types:
            options[name] = convert(name, raw, int if option_types[name] == "int" else str)
        elif name in pipeline_inputs:
            arguments[name] = convert(name, raw, pipeline_inputs[name])
        else:
            raise ParamError(
                f"unknown parameter {name!r}; pipeline parameters: {', '.join(sorted(pipeline_inputs))}; "
                f"cluster options: {', '.join(OPTION_NAMES)}"
            )
    return ClusterOptions(**options), arguments
