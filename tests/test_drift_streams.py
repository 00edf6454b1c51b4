"""Input drift end to end: the held-out patients of a demo cohort sent to the in-process service with its
drift spool on, then `healnet drift` on the spool; clean, with one omic table shifted by 1 SD, and with
patch features from another encoder. Then a real Prometheus scrapes the metrics of the clean and the shifted
run with the real HealnetInputDrift rule loaded: the alert fires for the shifted run only.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REQUIRES_PROMETHEUS

from devtools.demo import DemoSpec, demo_cohort, train_demo_checkpoint
from devtools.k8s_queries import load_prometheus_rule
from devtools.live_server import champion_registry, free_port, stop_server, wait_until
from devtools.monitoring_stack import by_labels, prometheus_binary, query
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
            results[name] = {"report": drift_json(registry.tag, root / name, metrics), "metrics": metrics}
    return results


def drift_json(tag: str, spool: Path, metrics: Path) -> dict:
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
            "--json",
            "--metrics-file",
            str(metrics),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


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


@contextmanager
def serve_file(path: Path) -> Iterator[str]:
    """`path` on a loopback HTTP server as /metrics (how a Pushgateway would expose the pushed gauges)."""
    (path.parent / "metrics").write_text(path.read_text())
    handler = partial(SimpleHTTPRequestHandler, directory=str(path.parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@REQUIRES_PROMETHEUS
def test_the_alert_fires_on_the_shifted_stream_only(runs, tmp_path):
    """The real rule, evaluated every second with its `for` shortened to 1s; each run's metrics are a
    target of job healnet-drift, labelled namespace=<stream>."""
    groups = load_prometheus_rule()["spec"]["groups"]
    for group in groups:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if rule.get("alert") == ALERT:
                rule["for"] = "1s"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    folders = {name: tmp_path / name for name in ("clean", "omic_shifted")}
    for name, folder in folders.items():
        folder.mkdir()
        (folder / "drift.prom").write_text(runs[name]["metrics"].read_text())
    with (
        serve_file(folders["clean"] / "drift.prom") as clean,
        serve_file(folders["omic_shifted"] / "drift.prom") as shifted,
    ):
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yaml")],
            "scrape_configs": [
                {
                    "job_name": "healnet-drift",
                    "honor_labels": True,
                    "static_configs": [
                        {"targets": [clean], "labels": {"namespace": "clean"}},
                        {"targets": [shifted], "labels": {"namespace": "omic_shifted"}},
                    ],
                }
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        url = f"http://127.0.0.1:{free_port()}"
        process = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address={url.removeprefix('http://')}",
            ],
            stdout=(tmp_path / "prometheus.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:

            def firing() -> dict:
                try:
                    return by_labels(query(url, f'ALERTS{{alertname="{ALERT}", alertstate="firing"}}'))
                except Exception:
                    return {}

            fired = wait_until(lambda: bool(firing()), 40, 0.5)
            log = (tmp_path / "prometheus.log").read_text()[-2000:]
            assert fired, log
            # both targets scraped and evaluated for a few more rounds: the clean one stays quiet
            scraped = by_labels(
                query(url, 'count by (namespace) (healnet_input_drift_share{job="healnet-drift"})')
            )
            assert set(scraped) == {("clean",), ("omic_shifted",)}, log
            wait_until(lambda: False, 3)
            namespaces = {labels for labels in firing()}
            assert all("omic_shifted" in labels for labels in namespaces), namespaces
            assert any(SHIFTED_TABLE in labels for labels in namespaces), namespaces
            assert not any("clean" in labels for labels in namespaces)
        finally:
            stop_server(process)
