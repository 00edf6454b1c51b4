"""Release steps: the promotion gate, promotion into the registry, the rejection report, and the
exit-handler notification."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.images import cpu_component


@cpu_component
def gate(
    cohort: Input[Dataset],
    data_hash: str,
    model: Input[Model],
    metrics: Input[Metrics],
    predictions: Input[Dataset],
    test_features: Input[Dataset],
    min_c_index: float,
    tolerance: float,
    min_test_events: int,
    dry_run: bool,
    registry_dir: str,
    report: Output[Markdown],
    gate_json: Output[Artifact],
    gate_metrics: Output[Metrics],
) -> str:
    """Apply the versioned promotion policy (`healnet.gate`) to the candidate's risks on its test patients
    (evaluate's `predictions`) and to the current champion, scored on the same patients (and evaluate's
    `test_features`) through the serving path when it is comparable; returns "promote" or "reject". Writes
    the reasons to the report (gate.md), every number and the rule that decided to `gate_json` (gate.json),
    and the numbers to `gate_metrics`."""
    import json
    from pathlib import Path

    from components.support import champion_assessor, use_registry

    use_registry(registry_dir)
    from healnet.gate import GatePolicy, current_champion_tag, decide
    from healnet.scoring import ScoredPatients

    candidate = ScoredPatients.read_parquet(Path(predictions.path))
    assess = champion_assessor(Path(model.path) / "checkpoint", cohort.path, candidate, test_features.path)
    champion = assess(current_champion_tag())
    result = decide(candidate, champion, GatePolicy(min_c_index, tolerance, min_test_events, dry_run))
    record = {**result.to_dict(), "data_hash": data_hash, "candidate_metrics": dict(metrics.metadata)}
    Path(gate_json.path).write_text(json.dumps(record, indent=2), encoding="utf-8")
    Path(report.path).write_text(result.to_markdown(), encoding="utf-8")
    report.metadata.update(record)
    for name, value in result.metrics().items():
        gate_metrics.log_metric(name, value)
    Path(gate_metrics.path).write_text(json.dumps(gate_metrics.metadata))  # the file too, for the cache
    print(result.to_markdown())
    return result.decision


@cpu_component
def promote(
    cohort: Input[Dataset],
    data_hash: str,
    registry_dir: str,
    run_id: str,
    run_name: str,
    model: Input[Model],
    metrics: Input[Metrics],
    predictions: Input[Dataset],
    test_features: Input[Dataset],
    gate_json: Input[Artifact],
    evaluation: Input[Artifact],
    validation: Input[Artifact],
    report: Output[Markdown],
    model_card: Output[Markdown],
    model_card_json: Output[Artifact],
) -> str:
    """Register the checkpoint in the BentoML model store with its provenance (metrics, data hash,
    git sha, pipeline run, weights sha256, the gate's interval and rule) and its model card, and make it the
    champion; returns the model tag. The cohort is an immutable artifact of this run, so nothing can change it
    between the gate and here: its data hash is recorded, not checked again.

    The model card (`healnet.model_card`, from the checkpoint, the cohort, `validation`'s validation.json,
    `evaluation`'s evaluation.json and the gate's gate.json) is stored in the version's folder (`healnet
    registry card TAG`, the service's GET /model_card) and written to `model_card` (Markdown) and
    `model_card_json`; the report ends with it.

    The champion moves by compare-and-swap: only if it is still the one the gate judged against. If it
    changed, the gate is taken again by the same rules, scoring the new champion on the same test patients
    (a reject fails the step with its reasons, leaving the candidate registered but not the champion). The
    card and the version's gate metadata (gate_rule, gate_reasons, c_index_ci, test_events) then show the
    gate taken again, stored with the version before the candidate can become the champion."""
    import json
    from pathlib import Path

    from components.support import (
        PipelineStepError,
        candidate_card_files,
        champion_assessor,
        git_sha,
        use_registry,
        write_card_artifacts,
    )

    use_registry(registry_dir)
    from healnet.checkpoint import verify_checkpoint
    from healnet.gate import GatePolicy, GateResult, promote_if_still_better, regate_record
    from healnet.registry import CARD_MARKDOWN, register_model, replace_model_card, update_version_metadata
    from healnet.scoring import ScoredPatients

    gated = json.loads(Path(gate_json.path).read_text(encoding="utf-8"))
    checkpoint = Path(model.path) / "checkpoint"
    weights_sha256 = verify_checkpoint(checkpoint)
    scores = {
        name: float(metrics.metadata[name]) for name in ("c_index", "c_index_ipcw", "integrated_brier_score")
    }
    code_version = git_sha()
    gate_version = str(gated["gate_version"])
    labels = {
        "pipeline": "healnet",
        "gate_version": gate_version,
        "data_hash": data_hash[:12],
        "git_sha": code_version[:12],
        "pipeline_run_id": run_id,
    }

    def gate_fields(record: dict) -> dict:  # the version's metadata of the gate that decided
        return {
            "c_index_ci": record["c_index_ci"],
            "test_events": record["test_events"],
            "gate_rule": record["rule"],
            "gate_reasons": list(record["reasons"]),
        }

    metadata = {
        **scores,
        **gate_fields(gated),
        "data_hash": data_hash,
        "git_sha": code_version,
        "pipeline_run_id": run_id,
        "pipeline_run_name": run_name,
        "cohort": cohort.path,
        "weights_sha256": weights_sha256,
        "gate_version": gate_version,
    }
    champion = gated["champion"]
    policy = GatePolicy(**{k: v for k, v in gated["policy"].items() if k != "version"})
    candidate = ScoredPatients.read_parquet(Path(predictions.path))

    def card_for(version: str, gate_record: dict) -> dict[str, str]:
        return candidate_card_files(
            version,
            model=model,
            cohort_path=cohort.path,
            gate=gate_record,
            evaluation_file=evaluation.path,
            validation_file=validation.path,
            data_hash=data_hash,
            code_version=code_version,
            run_id=run_id,
            run_name=run_name,
        )

    cards: dict[str, str] = {}  # the card as stored with the version: of the gate that decided

    def files_for(version: str) -> dict[str, str]:  # made for the new tag inside register_model
        cards.update(card_for(version, gated))
        evaluated = Path(evaluation.path)  # the full report's numbers, kept with the version beside its card
        return (
            {**cards, "evaluation.json": evaluated.read_text(encoding="utf-8")}
            if evaluated.is_file()
            else dict(cards)
        )

    def store_regated_gate(result: GateResult) -> None:
        # the card and the version's metadata both describe the gate that decided, as the report does
        decided = regate_record(gated, result)
        cards.update(card_for(tag, decided))
        replace_model_card(tag, cards)
        fields = gate_fields(decided)
        metadata.update(fields)
        update_version_metadata(tag, fields)

    tag = register_model(checkpoint, labels, metadata, files=files_for)

    def reason(regated: GateResult | None) -> str:  # the pointer's, of the gate that decided
        passed = regated.passed if regated is not None else gated["passed"]
        outcome = f"passed gate v{gate_version}" if passed else f"gate v{gate_version} dry run, checks failed"
        if regated is not None:
            against = regated.champion.tag if regated.champion else "no champion"
            outcome += f" taken again against {against}"
        return f"pipeline run {run_name or run_id}: test c-index {scores['c_index']:.4f}, {outcome}"

    assess = champion_assessor(checkpoint, cohort.path, candidate, test_features.path)
    # a compare-and-swap: only if the champion is still the one the gate judged against
    regated, pointer = promote_if_still_better(
        tag,
        candidate,
        policy,
        champion["tag"] if champion else None,
        reason,
        assess,
        on_regate=store_regated_gate,
    )
    if pointer is None:  # the gate, taken again, rejected the candidate
        assert regated is not None and regated.champion is not None
        raise PipelineStepError(
            f"{tag} is registered but not promoted: the champion changed to {regated.champion.tag} after the "
            f"gate, and the gate taken again rejects the candidate by the rule: {regated.rule} ("
            + "; ".join(regated.reasons)
            + ")"
        )
    write_card_artifacts(cards, model_card.path, model_card_json.path)
    previous = pointer["history"][-1]["tag"] if pointer["history"] else None
    rows = [f"| {key} | {value} |" for key, value in {**metadata, "previous champion": previous}.items()]
    if regated is not None:
        rows.append(
            f"| gate taken again against {regated.champion.tag if regated.champion else 'none'} | {regated.rule} |"
        )
    text = "\n".join([f"# Promoted {tag}", "", "| field | value |", "| --- | --- |", *rows]) + "\n"
    text += ("\n" + cards[CARD_MARKDOWN]).replace("\n#", "\n##")  # the card's headings one level down
    Path(report.path).write_text(text, encoding="utf-8")
    print(text)
    return tag


@cpu_component
def reject(
    cohort: Input[Dataset],
    data_hash: str,
    registry_dir: str,
    run_id: str,
    run_name: str,
    model: Input[Model],
    gate_json: Input[Artifact],
    gate_report: Input[Markdown],
    evaluation: Input[Artifact],
    validation: Input[Artifact],
    report: Output[Markdown],
    model_card: Output[Markdown],
    model_card_json: Output[Artifact],
):
    """The gate's "reject" branch: report why the candidate was not promoted (the rule that decided, with
    the interval) and which champion stays; write the rejected candidate's model card (`healnet.model_card`,
    decision "reject" with the gate's rule) to `model_card` (Markdown) and `model_card_json`."""
    import json
    from pathlib import Path

    from components.support import candidate_card_files, git_sha, use_registry, write_card_artifacts

    use_registry(registry_dir)
    from healnet.registry import get_champion

    gated = json.loads(Path(gate_json.path).read_text(encoding="utf-8"))
    champion = get_champion()
    kept = f"the champion stays {champion['tag']}" if champion else "no model is promoted yet"
    c_index, (low, high) = gated["c_index"], gated["c_index_ci"]
    shown = "not a number" if c_index is None else f"{c_index:.4f}"
    interval = (
        ""
        if low is None or high is None
        else f", {gated['bootstrap']['confidence'] * 100:g} % CI {low:.4f}–{high:.4f}"
    )
    text = (
        f"# Candidate rejected\n\nThe candidate (test c-index {shown}{interval}, {gated['test_events']} test "
        f"events) was not registered; {kept}.\n\n" + Path(gate_report.path).read_text(encoding="utf-8")
    )
    Path(report.path).write_text(text, encoding="utf-8")
    print(text)
    files = candidate_card_files(
        None,
        model=model,
        cohort_path=cohort.path,
        gate=gated,
        evaluation_file=evaluation.path,
        validation_file=validation.path,
        data_hash=data_hash,
        code_version=git_sha(),
        run_id=run_id,
        run_name=run_name,
    )
    write_card_artifacts(files, model_card.path, model_card_json.path)


@cpu_component
def notify(status: dsl.PipelineTaskFinalStatus, run_name: str):
    """Exit handler: log how the run ended and POST it as JSON to the https:// webhook of the notify Secret,
    when there is one (`components.notification`: https only, logs name its host only)."""
    from components.notification import post_to_webhook

    message = {
        "pipeline_run": run_name,
        "pipeline_job": status.pipeline_job_resource_name,
        "state": status.state,
        "error_code": status.error_code,
        "error_message": status.error_message,
    }
    error = f": {status.error_message}" if status.error_message else ""
    print(f"HEALNet pipeline run {run_name} finished {status.state}{error}")
    post_to_webhook(message)
