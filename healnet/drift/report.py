"""`healnet drift`'s work: a registered version's reference against a spool folder, its text, JSON and
Prometheus metrics (healnet_input_drift_share{modality}, healnet_embedding_drift_score)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from healnet.drift.compare import ALPHA, DRIFT_SHARE_THRESHOLD, DriftReport, compare
from healnet.drift.reference import InputReference
from healnet.drift.spool import MIN_WINDOW_CASES, SpoolContents, SpoolError, read_spool
from healnet.errors import HEALNetError

PUSHGATEWAY_JOB = "healnet-drift"  # the job label of the pushed metrics; HealnetInputDrift selects it


class NoReferenceError(HEALNetError, ValueError):
    """A model version whose checkpoint holds no input reference."""


class MetricsPushError(HEALNetError, OSError):
    """The Pushgateway could not be reached or refused the metrics."""


@dataclass(frozen=True)
class DriftRun:
    tag: str
    report: DriftReport
    spool: SpoolContents

    def to_dict(self) -> dict:
        return {
            "tag": self.tag,
            "spool_files": self.spool.files,
            "spool_from": self.spool.first,
            "spool_to": self.spool.last,
            "other_versions_files": sum(self.spool.skipped.values()),
            **self.report.to_dict(),
        }


def run_drift(tag: str | None, spool_dir: Path, alpha: float = ALPHA) -> DriftRun:
    """Compare the spool's windows of version `tag` (None: the champion) with its training reference."""
    from healnet.checkpoint import load_checkpoint
    from healnet.registry import resolve

    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    tag, checkpoint_dir = resolve(tag)
    checkpoint = load_checkpoint(checkpoint_dir)
    if checkpoint.input_reference is None:
        raise NoReferenceError(
            f"{tag} has no input reference: it was trained before input-drift monitoring; retrain it "
            "(and promote the new version) to watch its inputs"
        )
    reference = InputReference.from_dict(checkpoint.input_reference)
    spool = read_spool(spool_dir, reference)
    if spool.counts.cases < MIN_WINDOW_CASES:
        others = sum(spool.skipped.values())
        elsewhere = f"; {others} file(s) there belong to other model versions" if others else ""
        raise SpoolError(f"the spool {spool_dir} holds no window of {tag}'s requests{elsewhere}")
    return DriftRun(tag, compare(reference, spool.counts, alpha), spool)


def format_run(run: DriftRun) -> str:
    report = run.report
    lines = [
        f"{run.tag}: {report.cases} requests in {run.spool.files} spool file(s), "
        f"{run.spool.first} to {run.spool.last}",
        f"{'modality':<16} {'drifted':>8} {'tested':>7} {'share':>6}",
    ]
    for m in report.modalities:
        share = "-" if math.isnan(m.share) else f"{m.share:.2f}"
        flag = "  DRIFT" if m.has_drifted else ""
        lines.append(f"{m.modality:<16} {m.drifted:>8} {m.tested:>7} {share:>6}{flag}")
    if report.embedding_score is not None:
        lines.append(f"embedding drift score (bias-corrected mean PSI): {report.embedding_score:.3f}")
    drifted = ", ".join(report.drifted)
    lines.append(
        f"verdict: {report.verdict}"
        + (f" in {drifted}" if drifted else "")
        + f" (share of features with Benjamini-Hochberg q < {report.alpha:g} above {DRIFT_SHARE_THRESHOLD:g})"
    )
    return "\n".join(lines)


def drift_metrics(report: DriftReport):
    """A prometheus_client registry holding the report's gauges; modalities with nothing tested are left out."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    share = Gauge(
        "healnet_input_drift_share",
        "Share of a modality's features whose request distribution differs from training (BH q < alpha).",
        ["modality"],
        registry=registry,
    )
    for modality in report.modalities:
        if not math.isnan(modality.share):
            share.labels(modality.modality).set(modality.share)
    if report.embedding_score is not None:
        Gauge(
            "healnet_embedding_drift_score",
            "Bias-corrected mean PSI of the per-slide mean patch embedding against training.",
            registry=registry,
        ).set(report.embedding_score)
    return registry


def export_metrics(
    report: DriftReport, metrics_file: Path | None, pushgateway: str | None, namespace: str | None = None
) -> None:
    """Write the gauges as a textfile (node-exporter format) and/or replace the job's group on a Pushgateway.

    `namespace`, the Kubernetes namespace of the service whose spool was checked, joins the group's key: a
    Pushgateway scraped with honor_labels then gives every series that `namespace` label, not its own
    namespace's, so the alerts and the dashboard's namespace variable find it, and the services of several
    namespaces pushing to one Pushgateway keep a group each."""
    from prometheus_client import push_to_gateway, write_to_textfile

    registry = drift_metrics(report)
    if metrics_file is not None:
        write_to_textfile(str(metrics_file), registry)
    if pushgateway:
        grouping = {"namespace": namespace} if namespace else None
        try:
            push_to_gateway(
                pushgateway, job=PUSHGATEWAY_JOB, registry=registry, grouping_key=grouping, timeout=30
            )
        except OSError as error:
            raise MetricsPushError(f"cannot push the drift metrics to {pushgateway}: {error}") from None
