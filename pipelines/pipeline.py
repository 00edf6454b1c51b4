"""The HEALNet training pipeline: validate → slide shards or import → merged features → train (which
fits all the preprocessing) → evaluate → gate → promote or report the rejection, all inside an exit handler
that notifies how the run ended.

One definition serves the cluster and `kfp.local`; `build_pipeline(options)` applies the
compile-time Kubernetes settings (which `kfp.local` ignores).
"""

import dataclasses

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask
from kfp.dsl.graph_component import GraphComponent

from components.images import HEALNET_GPU_IMAGE
from components.model_steps import evaluate, train, train_trainjob
from components.release_steps import gate, notify, promote, reject
from components.trainjob import STEP_POD_FIELD_PATHS, TRAINJOB_BACKEND, TrainJobSettings
from healnet.gate import PROMOTE, GatePolicy
from healnet.recipes import DEFAULT_RECIPE
from healnet.validation.thresholds import DEFAULT_THRESHOLDS
from pipelines.cohort_steps import cohort_steps
from pipelines.options import DEFAULT_OPTIONS, PARAMETER_TYPES, ClusterOptions
from pipelines.task_settings import cpu_step, mount_cohort, mount_registry, notify_webhook, with_retries

PIPELINE_NAME = "healnet-training"


def _gpu_training(task: PipelineTask, options: ClusterOptions) -> PipelineTask:
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(options.gpu_count)
    task.set_cpu_request(options.train_cpu).set_memory_request(options.train_memory)
    task.set_memory_limit(options.train_memory)
    kubernetes.add_node_selector(task, label_key=options.gpu_node_label, label_value=options.gpu_node_value)
    kubernetes.add_toleration(
        task, key=options.gpu_taint_key, operator="Exists", effect=options.gpu_taint_effect
    )
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=options.train_shm
    )
    kubernetes.set_timeout(task, options.train_timeout_s)
    return mount_cohort(with_retries(task, options), options)


def trainjob_settings(options: ClusterOptions) -> dict:
    """The TrainJob's cluster settings, the same GPU scheduling and sizes as the single training pod's."""
    return dataclasses.asdict(
        TrainJobSettings(
            runtime=options.trainjob_runtime,
            image=HEALNET_GPU_IMAGE,
            cpu=options.train_cpu,
            memory=options.train_memory,
            shm=options.train_shm,
            timeout_s=options.train_timeout_s,
            gpu_node_label=options.gpu_node_label,
            gpu_node_value=options.gpu_node_value,
            gpu_taint_key=options.gpu_taint_key,
            gpu_taint_effect=options.gpu_taint_effect,
            cohort_pvc=options.cohort_pvc,
            cohort_mount=options.cohort_mount,
        )
    )


def _trainjob_training(task: PipelineTask, options: ClusterOptions) -> PipelineTask:
    """The step that runs the TrainJob only waits on it, on the cohort volume it stages the inputs on. Not
    retried: a second attempt would meet the first one's TrainJob, whose outcome it cannot know."""
    task.set_cpu_request(options.step_cpu).set_memory_request(options.step_memory)
    # the job's own deadline counts from its start; as long again to be scheduled, so that a namespace
    # without a running Trainer controller (the job never leaves "created") fails the step, not hangs it
    kubernetes.set_timeout(task, 2 * options.train_timeout_s)
    # the step's pod name and uid, which make it the TrainJob's owner
    for env_name, field_path in STEP_POD_FIELD_PATHS.items():
        kubernetes.use_field_path_as_env(task, env_name=env_name, field_path=field_path)
    return mount_cohort(task, options)


def build_pipeline(options: ClusterOptions = DEFAULT_OPTIONS) -> GraphComponent:
    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Validate a cohort, preprocess slides (sharded), train and evaluate HEALNet, "
        "and promote the model to the registry when it passes the gate.",
    )
    def healnet_pipeline(
        source: str = "",
        cohort_dir: str = "",
        slide_dir: str = "",
        features_dir: str = "",
        encoder_name: str = "",
        weights_sha256: str = "",
        mpp: float = 0.0,
        patch_size: int = 0,
        modalities: str = "",
        split_seed: int = 0,
        registry_dir: str = "",
        slide_shards: int = 2,
        max_quarantined_fraction: float = DEFAULT_THRESHOLDS.max_quarantined_row_fraction,
        min_events_per_split: int = DEFAULT_THRESHOLDS.min_events_per_split,
        split_repeat: int = 0,
        recipe: str = DEFAULT_RECIPE,
        epochs: int = 0,
        batch_size: int = 0,
        patience: int = 0,
        seed: int = 0,
        min_c_index: float = GatePolicy.min_c_index,
        tolerance: float = GatePolicy.tolerance,
        min_test_events: int = GatePolicy.min_test_events,
        dry_run: bool = GatePolicy.dry_run,
    ):
        finished = notify_webhook(notify(run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER), options)
        finished.set_caching_options(False)
        with dsl.ExitHandler(finished, name="healnet-run"):
            prepared = cohort_steps(
                options,
                source=source,
                cohort_dir=cohort_dir,
                slide_dir=slide_dir,
                split_seed=split_seed,
                import_settings={
                    "features_dir": features_dir,
                    "encoder_name": encoder_name,
                    "weights_sha256": weights_sha256,
                    "mpp": mpp,
                    "patch_size": patch_size,
                },
                slide_shards=slide_shards,
                max_quarantined_fraction=max_quarantined_fraction,
                min_events_per_split=min_events_per_split,
                modalities=modalities,
            )
            cohort, checked, features = prepared.cohort, prepared.checked, prepared.features
            data_hash = checked.outputs["data_hash"]
            chosen_modalities = checked.outputs["chosen_modalities"]
            training_inputs = {
                "cohort": cohort,
                "data_hash": data_hash,
                "split_repeat": split_repeat,
                "recipe": recipe,
                "modalities": chosen_modalities,
                "epochs": epochs,
                "batch_size": batch_size,
                "patience": patience,
                "seed": seed,
                "features": features,
            }
            if options.train_backend == TRAINJOB_BACKEND:
                trained = _trainjob_training(
                    train_trainjob(
                        **training_inputs,
                        num_nodes=options.num_nodes,
                        gpus_per_node=options.gpus_per_node,
                        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                        settings=trainjob_settings(options),
                    ),
                    options,
                )
            else:
                trained = _gpu_training(train(**training_inputs, gpu_count=options.gpu_count), options)
            evaluated = evaluate(
                cohort=cohort,
                data_hash=data_hash,
                split_repeat=split_repeat,
                model=trained.outputs["model"],
                features=features,
            )
            cpu_step(evaluated, options, retry=True)
            # the gate scores a comparable champion on the test patients: it reads the cohort and features
            decided = gate(
                cohort=cohort,
                data_hash=data_hash,
                model=trained.outputs["model"],
                metrics=evaluated.outputs["metrics"],
                predictions=evaluated.outputs["predictions"],
                test_features=evaluated.outputs["test_features"],
                min_c_index=min_c_index,
                tolerance=tolerance,
                min_test_events=min_test_events,
                dry_run=dry_run,
                registry_dir=registry_dir,
            )
            # the champion changes between runs
            mount_registry(cpu_step(decided, options), options).set_caching_options(False)
            with dsl.If(decided.outputs["Output"] == PROMOTE, name="promote-candidate"):
                promoted = promote(
                    cohort=cohort,
                    data_hash=data_hash,
                    registry_dir=registry_dir,
                    run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                    run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                    model=trained.outputs["model"],
                    metrics=evaluated.outputs["metrics"],
                    predictions=evaluated.outputs["predictions"],
                    test_features=evaluated.outputs["test_features"],
                    gate_json=decided.outputs["gate_json"],
                    evaluation=evaluated.outputs["evaluation"],
                    validation=checked.outputs["validation"],
                )
                mount_registry(cpu_step(promoted, options), options).set_caching_options(False)
            with dsl.Else(name="keep-champion"):
                # the rejected candidate's model card reads the cohort and the checkpoint
                rejected = reject(
                    cohort=cohort,
                    data_hash=data_hash,
                    registry_dir=registry_dir,
                    run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                    run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                    model=trained.outputs["model"],
                    gate_json=decided.outputs["gate_json"],
                    gate_report=decided.outputs["report"],
                    evaluation=evaluated.outputs["evaluation"],
                    validation=checked.outputs["validation"],
                )
                mount_registry(cpu_step(rejected, options), options).set_caching_options(False)

    return healnet_pipeline


def pipeline_inputs(pipeline: GraphComponent) -> dict[str, type]:
    """Pipeline parameter names and their Python types, for typed `--param` parsing."""
    return {name: PARAMETER_TYPES[spec.type] for name, spec in pipeline.component_spec.inputs.items()}
