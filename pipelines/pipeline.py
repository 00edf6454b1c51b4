"""The HEALNet training pipeline: validate → slide shards ∥ omics → train → evaluate → gate →
promote or report the rejection, all inside an exit handler that notifies how the run ended.

One definition serves the cluster and `kfp.local`; `build_pipeline(options)` applies the
compile-time Kubernetes settings (which `kfp.local` ignores).
"""

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask
from kfp.dsl.graph_component import GraphComponent

from components.data_steps import preprocess_omics, preprocess_slides, validate
from components.model_steps import evaluate, train
from components.release_steps import gate, notify, promote, reject
from healnet.gate import PROMOTE, GatePolicy
from healnet.recipes import DEFAULT_RECIPE
from healnet.validation.thresholds import DEFAULT_THRESHOLDS
from pipelines.options import DEFAULT_OPTIONS, PARAMETER_TYPES, ClusterOptions

PIPELINE_NAME = "healnet-training"


def _mount_cohort(task: PipelineTask, options: ClusterOptions) -> PipelineTask:
    if options.cohort_pvc:
        kubernetes.mount_pvc(task, pvc_name=options.cohort_pvc, mount_path=options.cohort_mount)
    return task


def _mount_registry(task: PipelineTask, options: ClusterOptions) -> PipelineTask:
    """The BentoML store and champion pointer on shared storage, so serving sees what was promoted."""
    if options.registry_pvc:
        kubernetes.mount_pvc(task, pvc_name=options.registry_pvc, mount_path=options.registry_mount)
        task.set_env_variable("BENTOML_HOME", options.registry_mount)
        task.set_env_variable("HEALNET_REGISTRY_DIR", options.registry_mount)
    return task


def _retry(task: PipelineTask, options: ClusterOptions) -> PipelineTask:
    """Retries with exponential back-off for steps that can fail transiently (storage, preemption)."""
    if options.retries:
        task.set_retry(
            num_retries=options.retries, backoff_duration=options.retry_backoff, backoff_factor=2.0
        )
    return task


def _cpu_step(task: PipelineTask, options: ClusterOptions, retry: bool = False) -> PipelineTask:
    task.set_cpu_request(options.step_cpu).set_memory_request(options.step_memory)
    if retry:
        _retry(task, options)
    return _mount_cohort(task, options)


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
    return _mount_cohort(_retry(task, options), options)


def build_pipeline(options: ClusterOptions = DEFAULT_OPTIONS) -> GraphComponent:
    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Validate a cohort, preprocess slides (sharded) and omics, train and evaluate HEALNet, "
        "and promote the model to the registry when it passes the gate.",
    )
    def healnet_pipeline(
        cohort_dir: str,
        registry_dir: str = "",
        slide_shards: int = 2,
        max_quarantined_fraction: float = DEFAULT_THRESHOLDS.max_quarantined_row_fraction,
        split_repeat: int = 0,
        recipe: str = DEFAULT_RECIPE,
        epochs: int = 0,
        batch_size: int = 0,
        patience: int = 0,
        seed: int = 0,
        min_c_index: float = GatePolicy.min_c_index,
        tolerance: float = GatePolicy.tolerance,
        dry_run: bool = GatePolicy.dry_run,
        notify_webhook: str = "",
    ):
        finished = notify(run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, webhook_url=notify_webhook)
        finished.set_caching_options(False)
        with dsl.ExitHandler(finished, name="healnet-run"):
            checked = _cpu_step(
                validate(
                    cohort_dir=cohort_dir,
                    slide_shards=slide_shards,
                    max_quarantined_fraction=max_quarantined_fraction,
                ),
                options,
            )
            checked.set_caching_options(False)  # the cohort is read by path: always re-check it
            data_hash = checked.outputs["data_hash"]
            with dsl.ParallelFor(checked.outputs["Output"], parallelism=options.shard_parallelism) as shard:
                slides = preprocess_slides(
                    cohort_dir=cohort_dir, shard_index=shard, shard_count=slide_shards, data_hash=data_hash
                )
                _cpu_step(slides, options, retry=True)
            omics = preprocess_omics(
                cohort_dir=cohort_dir, split_repeat=split_repeat, recipe=recipe, data_hash=data_hash
            )
            _cpu_step(omics, options, retry=True)
            trained = train(
                cohort_dir=cohort_dir,
                data_hash=data_hash,
                split_repeat=split_repeat,
                recipe=recipe,
                epochs=epochs,
                batch_size=batch_size,
                patience=patience,
                seed=seed,
                gpu_count=options.gpu_count,
                slide_features=dsl.Collected(slides.outputs["features"]),
                omics_transform=omics.outputs["transform"],
            )
            _gpu_training(trained, options)
            evaluated = evaluate(
                cohort_dir=cohort_dir,
                data_hash=data_hash,
                split_repeat=split_repeat,
                model=trained.outputs["model"],
                slide_features=dsl.Collected(slides.outputs["features"]),
            )
            _cpu_step(evaluated, options, retry=True)
            decided = gate(
                metrics=evaluated.outputs["metrics"],
                min_c_index=min_c_index,
                tolerance=tolerance,
                dry_run=dry_run,
                registry_dir=registry_dir,
            )
            _mount_registry(decided, options).set_caching_options(False)  # the champion changes between runs
            with dsl.If(decided.outputs["Output"] == PROMOTE, name="promote-candidate"):
                promoted = promote(
                    cohort_dir=cohort_dir,
                    data_hash=data_hash,
                    registry_dir=registry_dir,
                    run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                    run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                    model=trained.outputs["model"],
                    metrics=evaluated.outputs["metrics"],
                    gate_report=decided.outputs["report"],
                )
                _mount_registry(_cpu_step(promoted, options), options).set_caching_options(False)
            with dsl.Else(name="keep-champion"):
                rejected = reject(
                    registry_dir=registry_dir,
                    metrics=evaluated.outputs["metrics"],
                    gate_report=decided.outputs["report"],
                )
                _mount_registry(rejected, options).set_caching_options(False)

    return healnet_pipeline


def pipeline_inputs(pipeline: GraphComponent) -> dict[str, type]:
    """Pipeline parameter names and their Python types, for typed `--param` parsing."""
    return {name: PARAMETER_TYPES[spec.type] for name, spec in pipeline.component_spec.inputs.items()}
