"""Model steps: training (on the GPU image) and evaluation on the held-out test patients."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.images import cpu_component, gpu_component


@gpu_component
def train(
    cohort: Input[Dataset],
    data_hash: str,
    split_repeat: int,
    recipe: str,
    modalities: str,
    epochs: int,
    batch_size: int,
    patience: int,
    seed: int,
    gpu_count: int,
    features: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train the named recipe (healnet/recipes.py) on the holdout split: a single model trains on the
    training patients and early-stops on the validation ones; an ensemble uses both. `epochs`,
    `batch_size`, `patience` and `seed` override the recipe's when above 0 (`healnet.recipes.pipeline_recipe`).
    With `gpu_count` > 1, a single-model recipe trains data-parallel, one process per GPU; an ensemble recipe
    trains on one device, so it is refused there. `modalities` (resolved by `validate`) are the inputs it
    trains on; `features` are the run's patch features (`merge_features`). The whole preprocessing (omics,
    clinical, slide-feature scaling) and the time bins are fitted here, on the patients the recipe trains on.

    The model folder holds `checkpoint/` (weights sealed by sha256), `metrics.json` and `history.json`.
    """
    import json
    from functools import partial
    from pathlib import Path

    from components.support import record_training
    from healnet.experiment import run_training
    from healnet.preprocess.state import WSI
    from healnet.recipes import pipeline_recipe
    from healnet.train import DistributedTrainingError, launch_data_parallel

    chosen = pipeline_recipe(recipe, epochs=epochs, batch_size=batch_size, patience=patience, seed=seed)
    if gpu_count > 1 and chosen.members > 1:
        raise DistributedTrainingError(
            f"recipe {recipe!r} trains {chosen.members} members as one batched model on one GPU; compile the "
            "pipeline with gpu_count=1 for it (data-parallel training is for single-model recipes)"
        )
    training = partial(
        run_training,
        Path(cohort.path),
        Path(model.path),
        recipe=chosen,
        # a run without slides reads no feature folder: its slides may have files but no features
        features_dir=Path(features.path) if WSI in modalities.split(",") else None,
        modalities=modalities.split(","),
        split_repeat=split_repeat,
        progress=False,
    )
    if gpu_count > 1:
        launch_data_parallel(training, gpu_count)  # the first process writes metrics.json
        result = json.loads((Path(model.path) / "metrics.json").read_text())
    else:
        result = training()
    record_training(result, data_hash, model, metrics)


@cpu_component
def train_trainjob(
    cohort: Input[Dataset],
    data_hash: str,
    split_repeat: int,
    recipe: str,
    modalities: str,
    epochs: int,
    batch_size: int,
    patience: int,
    seed: int,
    num_nodes: int,
    gpus_per_node: int,
    run_id: str,
    settings: dict,
    features: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train as `train` does, but on several GPU nodes: a Kubeflow Trainer TrainJob on the torch-distributed
    runtime runs `torchrun -m healnet train` on the cohort volume (`components.trainjob`). This step only
    stages the inputs there, creates the TrainJob, prints its state as it changes, fails with the job's reason
    when it fails, and copies the checkpoint into `model`. The TrainJob is owned by the step's pod (named by
    the downward-API variables the pipeline sets, `components.trainjob.StepPod`), so Kubernetes deletes it
    with that pod.

    Args:
        cohort: the canonical cohort folder.
        data_hash: the cohort's data hash (`validate`), recorded on the model.
        split_repeat: the stored holdout split to train on.
        recipe: the named recipe (healnet/recipes.py).
        modalities: the inputs to train on (resolved by `validate`).
        epochs: overrides the recipe's when above 0, as do `batch_size`, `patience` and `seed`.
        batch_size: the global batch, split across every process.
        patience: early-stopping patience in epochs.
        seed: the seed of the weights and the batch order.
        num_nodes: training nodes (pods), each running one process per GPU.
        gpus_per_node: GPUs, and processes, per node.
        run_id: the pipeline run's id, which names the TrainJob (`components.trainjob.trainjob_name`).
        settings: the compile-time cluster settings (`components.trainjob.TrainJobSettings`).
        features: the run's patch features (`merge_features`).
        model: the model folder: `checkpoint/`, `metrics.json`, `history.json`, as `train` writes it.
        metrics: the validation metrics and the epochs run, as `train` logs them."""
    from pathlib import Path

    from components.support import record_training
    from components.trainjob import StepPod, TrainJobSettings, in_cluster_api, train_on_trainer, trainjob_name
    from healnet.preprocess.state import WSI
    from healnet.recipes import pipeline_recipe
    from healnet.train import DistributedTrainingError

    chosen = pipeline_recipe(recipe, epochs=epochs, batch_size=batch_size, patience=patience, seed=seed)
    if num_nodes * gpus_per_node > 1 and chosen.members > 1:
        raise DistributedTrainingError(
            f"recipe {recipe!r} trains {chosen.members} members as one batched model on one GPU; it cannot "
            "train on several nodes or GPUs (data-parallel training is for single-model recipes)"
        )
    api, namespace = in_cluster_api()
    owner = StepPod.from_environment()
    train_settings = {
        name: getattr(chosen.train, name) for name in ("epochs", "batch_size", "patience", "seed")
    }
    result = train_on_trainer(
        api,
        namespace,
        owner,
        TrainJobSettings(**settings),
        trainjob_name(run_id),
        {
            "recipe": recipe,
            "train_settings": train_settings,
            "modalities": modalities,
            "split_repeat": split_repeat,
        },
        Path(cohort.path),
        # a run without slides reads no feature folder: its slides may have files but no features
        Path(features.path) if WSI in modalities.split(",") else None,
        num_nodes,
        gpus_per_node,
        Path(model.path),
    )
    record_training(result, data_hash, model, metrics)


@cpu_component
def evaluate(
    cohort: Input[Dataset],
    data_hash: str,
    split_repeat: int,
    model: Input[Model],
    features: Input[Dataset],
    metrics: Output[Metrics],
    predictions: Output[Dataset],
    test_features: Output[Dataset],
    report: Output[HTML],
    evaluation: Output[Artifact],
):
    """Evaluate the model on the held-out test patients through the serving path (`Predictor` on the
    sealed checkpoint, each patient as the case a client would send), `healnet.evaluate.evaluate_checkpoint`.

    Args:
        cohort: the canonical cohort folder.
        data_hash: the cohort's data hash (`validate`), shown in the report.
        split_repeat: the stored holdout split the model was trained on.
        model: the trained model folder (`train`), whose `checkpoint/` is scored.
        features: the run's patch features (`merge_features`).
        metrics: c-index with its patient-bootstrap interval (`c_index_ci_low`, `c_index_ci_high`), Uno's C
            with its interval, the test events, IPCW c-index and integrated Brier score.
        predictions: each test patient's outcome and risk (parquet), which the gate re-samples.
        test_features: the test patients' slide features (when the model reads slides), out of the run's
            `features`, so that the gate and promote can score a champion without the whole cohort's.
        report: the evaluation report (HTML, shown by the Kubeflow UI): intervals, time-dependent AUC,
            Brier curve, calibration, subgroups and their plots (docs/evaluation.md).
        evaluation: `evaluation.json`, every number of the report."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from components.support import evaluation_html, evaluation_json, evaluation_metrics
    from healnet.data.cohort import Cohort
    from healnet.evaluate import evaluate_checkpoint
    from healnet.preprocess.state import WSI
    from healnet.scoring import ScoredPatients, copy_patient_features

    features_dir = Path(features.path)
    with tempfile.TemporaryDirectory(prefix="evaluation-") as scratch:
        result = evaluate_checkpoint(
            Path(model.path) / "checkpoint",
            Path(cohort.path),
            Path(scratch) / "evaluation",
            features_dir=features_dir,
            role="test",
            split_repeat=split_repeat,
        )
        shutil.copyfile(result["predictions_parquet"], predictions.path)
        Path(test_features.path).mkdir(parents=True, exist_ok=True)
        if WSI in result["modalities"]:
            copy_patient_features(
                Cohort.load(Path(cohort.path)),
                ScoredPatients.read_parquet(Path(predictions.path)).patient_ids,
                features_dir,
                Path(test_features.path),
            )
        title = "HEALNet evaluation: held-out test patients"
        Path(report.path).write_text(evaluation_html(result, title, data_hash))
    Path(evaluation.path).write_text(json.dumps(evaluation_json(result), indent=2))
    for name, value in evaluation_metrics(result).items():
        metrics.log_metric(name, value)
    # their patients were trained and scored without those slides
    metrics.log_metric("slides_quarantined", model.metadata.get("slides_quarantined", 0))
    predictions.metadata.update({"patients": result["patients"], "events": result["events"]})
    evaluation.metadata.update({"patients": result["patients"], "events": result["events"]})
    Path(metrics.path).write_text(json.dumps(metrics.metadata))  # the file too, not only the metadata
