"""Release steps: the promotion gate, promotion into the registry, the rejection report, and the
exit-handler notification."""

from kfp import dsl
from kfp.dsl import Input, Markdown, Metrics, Model, Output

from components.images import cpu_component


@cpu_component
def gate(
    metrics: Input[Metrics],
    min_c_index: float,
    tolerance: float,
    dry_run: bool,
    registry_dir: str,
    report: Output[Markdown],
) -> str:
    """Apply the versioned promotion policy (`healnet.gate`) to the candidate's test c-index and the
    current champion; returns "promote" or "reject" and writes the reasons to the report."""
    from pathlib import Path

    from components.support import PipelineStepError, use_registry

    use_registry(registry_dir)
    from healnet.gate import GatePolicy, current_champion, decide

    if "c_index" not in metrics.metadata:
        raise PipelineStepError(f"the evaluation metrics carry no c_index (have {sorted(metrics.metadata)})")
    result = decide(
        metrics.metadata["c_index"], current_champion(), GatePolicy(min_c_index, tolerance, dry_run)
    )
    Path(report.path).write_text(result.to_markdown(), encoding="utf-8")
    report.metadata.update(result.to_dict())
    report.metadata["candidate_metrics"] = dict(metrics.metadata)
    print(result.to_markdown())
    return result.decision


@cpu_component
def promote(
    cohort_dir: str,
    data_hash: str,
    registry_dir: str,
    run_id: str,
    run_name: str,
    model: Input[Model],
    metrics: Input[Metrics],
    gate_report: Input[Markdown],
    report: Output[Markdown],
) -> str:
    """Register the checkpoint in the BentoML model store with its provenance (metrics, data hash,
    git sha, pipeline run, weights sha256) and make it the champion; returns the model tag."""
    from pathlib import Path

    from components.support import PipelineStepError, cohort_data_hash, git_sha, use_registry

    use_registry(registry_dir)
    from healnet.checkpoint import verify_checkpoint
    from healnet.gate import GATE_VERSION, Champion, GatePolicy, promote_if_still_better
    from healnet.registry import register_model

    if cohort_data_hash(cohort_dir) != data_hash:
        raise PipelineStepError(
            f"cohort {cohort_dir} changed during the run: the model no longer matches its data"
        )
    checkpoint = Path(model.path) / "checkpoint"
    weights_sha256 = verify_checkpoint(checkpoint)
    scores = {
        name: float(metrics.metadata[name]) for name in ("c_index", "c_index_ipcw", "integrated_brier_score")
    }
    code_version = git_sha()
    gate_version = str(gate_report.metadata.get("policy", {}).get("version", GATE_VERSION))
    labels = {
        "pipeline": "healnet",
        "gate_version": gate_version,
        "data_hash": data_hash[:12],
        "git_sha": code_version[:12],
        "pipeline_run_id": run_id,
    }
    metadata = {
        **scores,
        "data_hash": data_hash,
        "git_sha": code_version,
        "pipeline_run_id": run_id,
        "pipeline_run_name": run_name,
        "cohort": cohort_dir,
        "weights_sha256": weights_sha256,
        "gate_version": gate_version,
        "gate_reasons": list(gate_report.metadata.get("reasons", [])),
    }
    gated = gate_report.metadata.get("champion")
    gated = Champion(gated["tag"], gated["c_index"]) if gated else None
    policy = GatePolicy(**{k: v for k, v in gate_report.metadata["policy"].items() if k != "version"})
    tag = register_model(checkpoint, labels, metadata)
    passed = gate_report.metadata.get("passed", True)
    outcome = f"passed gate v{gate_version}" if passed else f"gate v{gate_version} dry run, checks failed"
    reason = f"pipeline run {run_name or run_id}: test c-index {scores['c_index']:.4f}, {outcome}"
    # a compare-and-swap: only if the champion is still the one the gate compared against
    regated, pointer = promote_if_still_better(tag, scores["c_index"], policy, gated, reason)
    if pointer is None:  # the gate, taken again, rejected the candidate
        assert regated is not None and regated.champion is not None
        raise PipelineStepError(
            f"{tag} is registered but not promoted: the champion changed to {regated.champion.tag} after the "
            "gate, and the gate taken again rejects the candidate: " + "; ".join(regated.reasons)
        )
    previous = pointer["history"][-1]["tag"] if pointer["history"] else None
    rows = [f"| {key} | {value} |" for key, value in {**metadata, "previous champion": previous}.items()]
    text = "\n".join([f"# Promoted {tag}", "", "| field | value |", "| --- | --- |", *rows]) + "\n"
    Path(report.path).write_text(text, encoding="utf-8")
    print(text)
    return tag


@cpu_component
def reject(
    registry_dir: str, metrics: Input[Metrics], gate_report: Input[Markdown], report: Output[Markdown]
):
    """The gate's "reject" branch: report why the candidate was not promoted and which champion stays."""
    from pathlib import Path

    from components.support import use_registry

    use_registry(registry_dir)
    from healnet.registry import get_champion

    champion = get_champion()
    kept = f"the champion stays {champion['tag']}" if champion else "no model is promoted yet"
    c_index = metrics.metadata.get("c_index")
    text = (
        f"# Candidate rejected\n\nThe candidate (test c-index {c_index:.4f}) was not registered; {kept}.\n\n"
        + Path(gate_report.path).read_text(encoding="utf-8")
    )
    Path(report.path).write_text(text, encoding="utf-8")
    print(text)


@cpu_component
def notify(status: dsl.PipelineTaskFinalStatus, run_name: str, webhook_url: str):
    """Exit handler: log how the run ended and, when `webhook_url` is set, POST it there as JSON."""
    import json
    import urllib.request

    message = {
        "pipeline_run": run_name,
        "pipeline_job": status.pipeline_job_resource_name,
        "state": status.state,
        "error_code": status.error_code,
        "error_message": status.error_message,
    }
    error = f": {status.error_message}" if status.error_message else ""
    print(f"HEALNet pipeline run {run_name} finished {status.state}{error}")
    if webhook_url:
        request = urllib.request.Request(
            webhook_url,
            data=json.dumps(message).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            print(f"notified {webhook_url}: HTTP {response.status}")
