"""Input drift end to end: the held-out patients of a demo cohort sent to the in-process service with its
drift spool on, then `healnet drift` on the spool; clean, with one omic table shifted by 1 SD, and with
patch features from another encoder. Then the CronJob's `healnet drift --pushgateway --namespace` pushes the
clean and the shifted run, each as its own namespace, to a real Pushgateway that a real Prometheus scrapes
with the real HealnetInputDrift rule loaded: the alert fires for the shifted run only, and the dashboard's
drift panels show the pushed values, per namespace.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REQUIRES_PROMETHEUS, REQUIRES_PUSHGATEWAY

from devtools.demo import DemoSpec, demo_cohort, train_demo_checkpoint
from devtools.k8s_queries import (
    dashboard_panels,
    load_dashboard,
    substitute_grafana_variables,
    variable_values,
)
from devtools.live_server import champion_registry, wait_until
from devtools.monitoring_stack import (
    PUSHGATEWAY_NAMESPACE,
    by_labels,
    pushgateway_scrape_config,
    query,
    run_prometheus_config,
    run_pushgateway,
    write_rule_file,
)
from healnet.drift.compare import DRIFT_SHARE_THRESHOLD
from serving.drift_spool import DriftSpool
from serving.schemas import PredictRequest
from serving.service import HEALNetService

pytestmark = pytest.mark.slow
# 240 random patients: the demo model trains on 180 (its input reference is theirs) and never sees the other
# 60, the held-out patients whose requests make the streams
SPEC = DemoSpec(patients=240)
TRAINED = 180
WINDOW = 20  # cases per spool file, the least a file may hold
SHIFTED_TABLE = "cnv"
ALERT = "HealnetInputDrift"
PUSHED_STREAMS = ("clean", "omic_shifted")
SHARE_PANEL, EMBEDDING_PANEL = "Input drift share by modality", "Embedding drift score"


def held_out_requests(shift_table: str | None = None, other_encoder: bool = False) -> list[PredictRequest]:
    """A /predict body per held-out patient: every omic table and the patch features. `shift_table`: that
    table's values + 1 training SD per feature. `other_encoder`: the patch features mapped as another
    encoder's would be, a random rotation of the embedding space, a rescale of each dimension (x0.5 to x2)
    and a shift of its mean (N(0, 0.25) in units of a patch feature's SD). A rotation alone cannot be
    seen here: the demo's random features are isotropic, so a rotated bag has the same distribution."""
    data = demo_cohort(SPEC)
    ids = list(data.clinical.index)
    rng = np.random.default_rng(7)
    rotation, _ = np.linalg.qr(rng.normal(size=(SPEC.wsi_dim, SPEC.wsi_dim)))
    scale = rng.uniform(0.5, 2.0, SPEC.wsi_dim)
    offset = rng.normal(0.0, 0.25, SPEC.wsi_dim)
    requests = []
    for pid in ids[TRAINED:]:
        omics = {}
        for table, frame in data.omics.items():
            sd = frame.loc[ids[:TRAINED]].std() if table == shift_table else 0.0 * frame.iloc[0]
            omics[table] = {name: float(value) for name, value in (frame.loc[pid] + sd).items()}
        bag = data.wsi_bags[pid]
        if other_encoder:
            bag = (bag @ rotation) * scale + offset
        requests.append(PredictRequest(omics=omics, wsi_features=bag.astype(np.float32).tolist()))
    return requests


STREAMS = {
    "clean": partial(held_out_requests),
    "omic_shifted": partial(held_out_requests, shift_table=SHIFTED_TABLE),
    "other_encoder": partial(held_out_requests, other_encoder=True),
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    checkpoint = train_demo_checkpoint(tmp_path_factory.mktemp("drift-demo") / "checkpoint", SPEC)
    with champion_registry(checkpoint, tmp_path_factory.mktemp("bentoml_home"), "tests") as registry:
        yield registry


@pytest.fixture(scope="module")
def runs(registry, tmp_path_factory) -> dict[str, dict]:
    """Per stream: `healnet drift --json` on the spool the service wrote, and its metrics file."""
    root = tmp_path_factory.mktemp("streams")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEALNET_DRIFT_SPOOL_DIR", str(root / "clean"))
        patch.setenv("HEALNET_DRIFT_WINDOW_CASES", str(WINDOW))
        torch.set_num_threads(1)
        service = HEALNetService()
        assert wait_until(service.__is_ready__, 60), service.load_error
        results = {}
        for name, stream in STREAMS.items():
            patch.setenv("HEALNET_DRIFT_SPOOL_DIR", str(root / name))
            service.drift_spool = DriftSpool.from_env()
            requests = stream()
            for start in range(0, len(requests), 10):
                answers = asyncio.run(service.predict_batch(requests[start : start + 10]))
                assert isinstance(answers, list), answers
            service.close_drift_spool()
            assert len(list((root / name).glob("*.drift.json"))) == len(requests) // WINDOW
            metrics = root / f"{name}.prom"
            report = json.loads(healnet_drift(registry.tag, root / name, "--json", "--metrics-file", metrics))
            results[name] = {"report": report, "metrics": metrics, "spool": root / name}
    return results


def healnet_drift(tag: str, spool: Path, *options: str | Path) -> str:
    """`healnet drift --tag TAG --current SPOOL OPTIONS...`; its standard output."""
    out = subprocess.run(
        [
            ".venv/bin/python",
            "-m",
            "healnet",
            "drift",
            "--tag",
            tag,
            "--current",
            str(spool),
            *map(str, options),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def shares(report: dict) -> dict[str, float]:
    return {m["modality"]: m["share"] for m in report["modalities"]}


def test_the_clean_stream_shows_no_drift(runs):
    report = runs["clean"]["report"]
    assert report["cases"] == 60 and report["spool_files"] == 3
    assert report["verdict"] == "no drift", report
    assert max(shares(report).values()) <= DRIFT_SHARE_THRESHOLD


def test_one_omic_table_shifted_by_one_sd_drifts(runs):
    report = runs["omic_shifted"]["report"]
    assert report["drifted_modalities"] == [SHIFTED_TABLE], report
    assert shares(report)[SHIFTED_TABLE] > DRIFT_SHARE_THRESHOLD


def test_patch_features_of_another_encoder_drift(runs):
    report = runs["other_encoder"]["report"]
    assert report["drifted_modalities"] == ["wsi"], report
    assert shares(report)["wsi"] > DRIFT_SHARE_THRESHOLD
    assert report["embedding_drift_score"] > 2 * runs["clean"]["report"]["embedding_drift_score"]


def test_the_metrics_file_holds_the_shares(runs):
    text = runs["omic_shifted"]["metrics"].read_text()
    assert f'healnet_input_drift_share{{modality="{SHIFTED_TABLE}"}} 1.0' in text
    assert "healnet_embedding_drift_score " in text


@pytest.fixture(scope="module")
def drift_prometheus(registry, runs, tmp_path_factory) -> Iterator[str]:
    """One real Pushgateway, pushed to by the CronJob's command on each stream of PUSHED_STREAMS with the
    stream's name as its namespace (`--namespace`, as the CronJob passes its pod's), and scraped as the
    Pushgateway chart's ServiceMonitor does: honor_labels, the target labelled with the Pushgateway's own
    namespace, which the pushed one overrides. A real Prometheus evaluates the real rules every second,
    HealnetInputDrift's `for` shortened to 1s. Its URL, once both groups are scraped."""
    folder = tmp_path_factory.mktemp("drift-prometheus")
    rules = write_rule_file(folder / "rules.yaml", "1s", alert_for={ALERT: "1s"})
    with run_pushgateway(folder) as gateway:
        for name in PUSHED_STREAMS:
            healnet_drift(registry.tag, runs[name]["spool"], "--pushgateway", gateway, "--namespace", name)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                pushgateway_scrape_config({gateway: {"namespace": PUSHGATEWAY_NAMESPACE}}, "1s")
            ],
        }
        with run_prometheus_config(config, folder) as url:
            scraped = 'count by (namespace) (push_time_seconds{job="healnet-drift"})'
            log = folder / "prometheus.log"
            assert wait_until(lambda: len(query(url, scraped)) == len(PUSHED_STREAMS), 20, 0.25), (
                log.read_text()
            )
            yield url


@REQUIRES_PROMETHEUS
@REQUIRES_PUSHGATEWAY
def test_the_alert_fires_on_the_shifted_stream_only(drift_prometheus):
    def firing() -> dict:
        return by_labels(query(drift_prometheus, f'ALERTS{{alertname="{ALERT}", alertstate="firing"}}'))

    assert wait_until(lambda: bool(firing()), 40, 0.5)
    wait_until(lambda: False, 3)  # a few more evaluations: the clean stream stays quiet
    namespaces = set(firing())
    assert all("omic_shifted" in labels for labels in namespaces), namespaces
    assert any(SHIFTED_TABLE in labels for labels in namespaces), namespaces
    assert not any("clean" in labels for labels in namespaces)


@REQUIRES_PROMETHEUS
@REQUIRES_PUSHGATEWAY
def test_the_dashboard_drift_panels_show_the_pushed_values(drift_prometheus, runs):
    """The panels' PromQL against the scraped gateway: with every namespace selected, per modality the
    larger share of the two runs and the larger embedding score; with one namespace selected, that run's
    values; and HealnetDriftCheckStale's age of the last push, per namespace."""
    dashboard = load_dashboard()
    values = variable_values(dashboard)
    panels = {panel["title"]: panel for panel in dashboard_panels(dashboard)}

    def panel_result(title: str, namespace: str | None = None) -> dict[tuple[str, ...], float]:
        (target,) = panels[title]["targets"]
        chosen = values if namespace is None else {**values, "namespace": namespace}
        return by_labels(query(drift_prometheus, substitute_grafana_variables(target["expr"], chosen)))

    reports = [runs[name]["report"] for name in PUSHED_STREAMS]
    expected_shares: dict[tuple[str, ...], float] = {}
    for report in reports:
        for modality, share in shares(report).items():
            if share is not None:  # nothing tested: no gauge pushed
                expected_shares[(modality,)] = max(share, expected_shares.get((modality,), share))
    assert panel_result(SHARE_PANEL) == pytest.approx(expected_shares)
    assert panel_result(SHARE_PANEL)[(SHIFTED_TABLE,)] > DRIFT_SHARE_THRESHOLD
    expected_score = max(report["embedding_drift_score"] for report in reports)
    assert panel_result(EMBEDDING_PANEL) == pytest.approx({(): expected_score})
    for name in PUSHED_STREAMS:
        report = runs[name]["report"]
        own = {(modality,): share for modality, share in shares(report).items() if share is not None}
        assert panel_result(SHARE_PANEL, name) == pytest.approx(own)
        assert panel_result(EMBEDDING_PANEL, name) == pytest.approx({(): report["embedding_drift_score"]})
    ages = by_labels(
        query(drift_prometheus, 'time() - max by (namespace) (push_time_seconds{job="healnet-drift"})')
    )
    assert set(ages) == {(name,) for name in PUSHED_STREAMS}
    assert all(0 <= age < 120 for age in ages.values()), ages
