"""Input drift: the reference (fitted on training patients only, saved in the checkpoint), the spool's
bounds and privacy, the service's spool never failing a request, the tests, and `healnet drift`'s errors."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REQUIRES_PUSHGATEWAY

from devtools.demo import DemoSpec, demo_cohort
from devtools.k8s_queries import load_prometheus_rule
from healnet.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, load_checkpoint, save_checkpoint
from healnet.cli import main
from healnet.drift.compare import DRIFT_SHARE_THRESHOLD, PATTERN, compare, homogeneity_p
from healnet.drift.reference import InputReference, ModalityBins, fit_input_reference
from healnet.drift.report import drift_metrics
from healnet.drift.spool import MIN_WINDOW_CASES, SpoolBounds, SpoolError, SpoolWriter, trim
from healnet.files import sha256_file
from healnet.inference import Case
from healnet.preprocess.state import Preprocessor
from serving import metrics
from serving.config import ConfigError
from serving.drift_spool import DriftSpool

pytest_plugins = ("serving_fixtures",)
SPEC = DemoSpec()
# a value that no bin edge or count can equal by chance: it must never appear in a spool file
MARKER = 987.654321


def omics_case(value: float | None = None, **extra) -> Case:
    names = {
        table: [f"G{i}_{table}" for i in range(SPEC.features_per_table)] for table in ("mut", "cnv", "rnaseq")
    }
    rng = np.random.default_rng(0)
    omics = {
        table: {name: value if value is not None else float(rng.normal()) for name in features}
        for table, features in names.items()
    }
    return Case(omics=omics, **extra)


@pytest.fixture(scope="module")
def reference(demo_checkpoint) -> InputReference:
    return InputReference.from_dict(load_checkpoint(demo_checkpoint).input_reference)


def test_the_checkpoint_holds_a_reference_of_the_training_patients_only(demo_checkpoint, reference):
    data = demo_cohort(SPEC)
    ids = list(data.clinical.index)
    train = ids[: int(len(ids) * 0.75)]  # devtools.demo trains on the first 75 %
    preprocessor = load_checkpoint(demo_checkpoint).preprocessor
    refit = fit_input_reference(data.omics, data.clinical, data.wsi_bags, train, preprocessor)
    assert reference.to_dict() == refit.to_dict()
    assert reference.patients == len(train) == 36
    assert set(reference.modalities) == {"mut", "cnv", "rnaseq", "wsi"}
    assert (reference.omics["cnv"].reference.sum(axis=1) == len(train)).all()
    assert reference.patterns == Counter({"mut+cnv+rnaseq+wsi": len(train)})
    # a held-out patient changed beyond recognition changes nothing
    data.omics["cnv"].loc[ids[-1]] = 1e6
    unchanged = fit_input_reference(data.omics, data.clinical, data.wsi_bags, train, preprocessor)
    assert unchanged.to_dict() == reference.to_dict()
    everyone = fit_input_reference(data.omics, data.clinical, data.wsi_bags, ids, preprocessor)
    assert everyone.omics["cnv"].reference.sum() > reference.omics["cnv"].reference.sum()


def test_a_checkpoint_without_a_reference_loads_and_drift_asks_for_a_retrain(
    demo_checkpoint, tmp_path, capsys, registry
):
    from healnet.registry import register_model

    old = tmp_path / "old"
    save_checkpoint(old, load_checkpoint(demo_checkpoint))
    payload = torch.load(old / WEIGHTS_FILE, weights_only=True)
    del payload["input_reference"]  # as written before the reference existed
    torch.save(payload, old / WEIGHTS_FILE)
    manifest = json.loads((old / MANIFEST_FILE).read_text())
    (old / MANIFEST_FILE).write_text(json.dumps({**manifest, "sha256": sha256_file(old / WEIGHTS_FILE)}))
    assert load_checkpoint(old).input_reference is None
    tag = register_model(old, labels={}, metadata={})
    (tmp_path / "spool").mkdir()
    assert main(["drift", "--tag", tag, "--current", str(tmp_path / "spool")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "has no input reference" in error and "retrain" in error


def test_binning_numeric_tied_and_categorical_values():
    ages = [float(v) for v in range(1, 101)]
    mutated = [0.0] * 70 + [1.0] * 30
    bins = ModalityBins.fit(
        ["age", "mutated", "stage"],
        np.array([[age, flag, np.nan] for age, flag in zip(ages, mutated, strict=True)]),
        {2: ["I"] * 50 + ["II"] * 30 + [None] * 20},
    )
    assert bins.n_bins == 19
    # continuous: ten deciles of 10 patients in the even bins, the edges' own bins empty
    assert bins.reference[0, ::2].tolist() == [10] * 10 and not bins.reference[0, 1::2].any()
    # tied: 0 and 1 each fill a bin of their own
    assert sorted(bins.reference[1][bins.reference[1] > 0].tolist()) == [30, 70]
    assert bins.reference[2, :3].tolist() == [50, 30, 0]
    counts = bins.histogram(
        np.array([[0.0, 0.0, np.nan], [55.5, 0.5, np.nan], [1e9, 1.0, np.nan]]), {2: ["II", "IV", None]}
    )
    assert np.flatnonzero(counts[0]).tolist() == [0, 10, 18]
    assert counts[1][bins.reference[1] == 0].sum() == 1  # 0.5 falls between the training's 0 and 1
    assert counts[2, :3].tolist() == [0, 1, 1]  # IV was not seen in training: the last bin
    assert ModalityBins.from_dict(json.loads(json.dumps(bins.to_dict()))).to_dict() == bins.to_dict()


def test_a_window_below_the_minimum_is_never_written(reference, tmp_path):
    writer = SpoolWriter(tmp_path, reference, "healnet:t", SpoolBounds(window_cases=MIN_WINDOW_CASES))
    for _ in range(MIN_WINDOW_CASES - 1):
        assert writer.record([omics_case()]) is None
    assert writer.close() is None
    assert list(tmp_path.iterdir()) == []
    for _ in range(MIN_WINDOW_CASES - 1):
        writer.record([omics_case()])
    assert writer.record([omics_case()]) is not None  # the 20th case fills the window
    assert len(list(tmp_path.glob("*.drift.json"))) == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_spool_files_hold_counts_only(reference, tmp_path):
    bag = np.full((5, SPEC.wsi_dim), MARKER, dtype=np.float32)
    writer = SpoolWriter(tmp_path, reference, "healnet:t", SpoolBounds(window_cases=MIN_WINDOW_CASES))
    path = writer.record([omics_case(MARKER, wsi_features=bag)] * MIN_WINDOW_CASES)
    text = path.read_text()
    assert "987.65" not in text and "987" not in text
    body = json.loads(text)
    assert set(body) == {
        "format",
        "model_tag",
        "reference",
        "started",
        "ended",
        "cases",
        "modalities",
        "patterns",
    }
    assert body["cases"] == MIN_WINDOW_CASES
    values = [v for counts in body["modalities"].values() for row in counts for v in row]
    assert all(isinstance(v, int) for v in values)
    # each feature's counts are marginal: the case's values sit in the top bin, nothing links them
    assert body["modalities"]["cnv"] == [[0] * 18 + [MIN_WINDOW_CASES]] * SPEC.features_per_table
    assert body["patterns"] == {"mut+cnv+rnaseq+wsi": MIN_WINDOW_CASES}
    assert re.fullmatch(r"[\w.]+-\d+-[0-9a-f]{16}-\d{8}\.drift\.json", path.name)


def test_the_spool_keeps_at_most_max_files(reference, tmp_path):
    bounds = SpoolBounds(window_cases=MIN_WINDOW_CASES, max_files=3)
    writer = SpoolWriter(tmp_path, reference, "healnet:t", bounds)
    written = [writer.record([omics_case()] * MIN_WINDOW_CASES) for _ in range(7)]
    assert sorted(tmp_path.glob("*.drift.json")) == written[-3:]  # the oldest went first


def test_the_spool_keeps_at_most_max_bytes(reference, tmp_path):
    writer = SpoolWriter(tmp_path, reference, "healnet:t", SpoolBounds(window_cases=MIN_WINDOW_CASES))
    first = writer.record([omics_case()] * MIN_WINDOW_CASES)
    size = first.stat().st_size
    writer.bounds = SpoolBounds(window_cases=MIN_WINDOW_CASES, max_bytes=int(2.5 * size))
    for _ in range(5):
        writer.record([omics_case()] * MIN_WINDOW_CASES)
    files = sorted(tmp_path.glob("*.drift.json"))
    assert len(files) == 2 and sum(f.stat().st_size for f in files) <= 2.5 * size
    assert trim(tmp_path, SpoolBounds(max_files=1)) == files[:1]


def test_spool_bounds_and_settings(monkeypatch):
    with pytest.raises(SpoolError, match="at least 20"):
        SpoolBounds(window_cases=MIN_WINDOW_CASES - 1)
    monkeypatch.delenv("HEALNET_DRIFT_SPOOL_DIR", raising=False)
    assert DriftSpool.from_env() is None  # off by default
    monkeypatch.setenv("HEALNET_DRIFT_SPOOL_DIR", "/tmp/spool")
    monkeypatch.setenv("HEALNET_DRIFT_WINDOW_CASES", "5")
    with pytest.raises(ConfigError, match="HEALNET_DRIFT_WINDOW_CASES"):
        DriftSpool.from_env()


def test_spool_errors_are_counted_never_raised(demo_checkpoint, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    spool = DriftSpool(blocked, SpoolBounds(window_cases=MIN_WINDOW_CASES))
    before = metrics.DRIFT_SPOOL_ERRORS._value.get()
    reference = load_checkpoint(demo_checkpoint).input_reference
    spool.record("healnet:t", reference, [omics_case()])  # cannot create the folder
    spool.record("healnet:u", {"version": 99}, [omics_case()])  # an unreadable reference
    spool.record("healnet:old", None, [omics_case()])  # no reference: not spooled, and no error
    spool.close()
    assert metrics.DRIFT_SPOOL_ERRORS._value.get() == before + 2
    spool.record("healnet:t", reference, [omics_case()])  # closed: dropped
    assert metrics.DRIFT_SPOOL_ERRORS._value.get() == before + 3


def test_a_spool_that_falls_behind_drops_batches(demo_checkpoint, tmp_path, monkeypatch):
    import serving.drift_spool

    monkeypatch.setattr(serving.drift_spool, "MAX_PENDING", 2)
    spool = DriftSpool(tmp_path, SpoolBounds(window_cases=MIN_WINDOW_CASES))
    gate = threading.Event()
    spool.executor.submit(gate.wait)  # the spool's thread is busy
    before = metrics.DRIFT_SPOOL_ERRORS._value.get()
    reference = load_checkpoint(demo_checkpoint).input_reference
    for _ in range(3):
        spool.record("healnet:t", reference, [omics_case()] * 10)
    assert metrics.DRIFT_SPOOL_ERRORS._value.get() == before + 1
    gate.set()
    spool.close()
    (written,) = tmp_path.glob("*.drift.json")
    assert json.loads(written.read_text())["cases"] == 20


def test_a_model_swap_keeps_the_previous_window_open(demo_checkpoint, tmp_path):
    reference = load_checkpoint(demo_checkpoint).input_reference
    spool = DriftSpool(tmp_path, SpoolBounds(window_cases=100))
    spool.record("healnet:a", reference, [omics_case()] * 10)
    spool.record("healnet:b", reference, [omics_case()] * 19)
    spool.record("healnet:a", reference, [omics_case()] * 10)  # a request of a finishing after the swap
    # a third version closes the window used least recently, b's: 19 cases, too few for a file
    spool.record("healnet:c", reference, [omics_case()] * 5)
    spool.executor.submit(lambda: None).result()  # the spool's thread has done the work queued before
    assert not list(tmp_path.glob("*.drift.json"))
    spool.close()  # a's 20 cases make a file, c's 5 do not
    (written,) = tmp_path.glob("*.drift.json")
    assert json.loads(written.read_text())["cases"] == 20


def test_homogeneity_and_the_verdict(reference):
    assert homogeneity_p(np.array([50, 50, 0]), np.array([48, 52, 0])) > 0.5
    assert homogeneity_p(np.array([50, 50]), np.array([5, 95])) < 1e-6
    assert homogeneity_p(np.array([50, 0]), np.array([50, 0])) == 1.0
    current = reference.empty_counts()
    current.cases = 100
    for name, bins in reference.modalities.items():  # the reference's own proportions: no drift
        current.modalities[name] = bins.reference * 3
    current.patterns = Counter({"mut+cnv+rnaseq+wsi": 100})
    report = compare(reference, current)
    assert report.verdict == "no drift" and report.embedding_score == 0.0
    current.modalities["rnaseq"][:, :] = 0
    current.modalities["rnaseq"][:, -1] = 100  # every value in the top decile
    current.patterns = Counter({"mut": 60, "mut+cnv+rnaseq+wsi": 40})
    report = compare(reference, current)
    assert report.drifted == ["rnaseq", PATTERN]
    text = drift_metrics(report)
    assert text.get_sample_value("healnet_input_drift_share", {"modality": "rnaseq"}) == 1.0
    assert text.get_sample_value("healnet_input_drift_share", {"modality": "cnv"}) == 0.0


def test_the_alert_threshold_is_the_verdicts():
    (rule,) = [
        rule
        for group in load_prometheus_rule()["spec"]["groups"]
        for rule in group["rules"]
        if rule.get("alert") == "HealnetInputDrift"
    ]
    assert rule["expr"].rstrip().endswith(f"> {DRIFT_SHARE_THRESHOLD}")


def test_drift_errors_are_one_line(tmp_path, capsys, demo_registry):
    assert main(["drift", "--current", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"healnet drift: spool folder {tmp_path / 'nowhere'} does not exist\n"
    (tmp_path / "bad.drift.json").write_text("{not json")
    assert main(["drift", "--current", str(tmp_path)]) == 2
    assert "bad.drift.json is unreadable" in capsys.readouterr().err
    (tmp_path / "bad.drift.json").unlink()
    assert main(["drift", "--current", str(tmp_path)]) == 2
    assert "holds no window" in capsys.readouterr().err


def test_the_kustomize_component_mounts_the_spool(tmp_path):
    patch = yaml.safe_load(
        (Path(__file__).parents[1] / "k8s/components/drift/deployment-drift.yaml").read_text()
    )
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["drift-spool"]
    assert env["HEALNET_DRIFT_SPOOL_DIR"] == mount


def test_preprocessor_without_slides_has_no_wsi_reference():
    data = demo_cohort(SPEC)
    ids = list(data.clinical.index)[:30]
    from healnet.preprocess.omics import OmicsConfig

    preprocessor = Preprocessor.fit(data.omics, {}, ids, OmicsConfig())
    reference = fit_input_reference(data.omics, data.clinical, data.wsi_bags, ids, preprocessor)
    assert reference.wsi is None and "wsi" not in reference.modalities
    assert compare(reference, reference.summarise([omics_case()] * 30)).embedding_score is None


@pytest.mark.slow
def test_a_live_server_spools_and_writes_its_last_window_at_shutdown(demo_registry, serve, tmp_path):
    """`bentoml serve` with the spool on: 45 answered cases in windows of 20 give two files while it runs
    and the last 5 cases are dropped at shutdown; then 25 more give a third file only at shutdown."""
    import httpx

    from devtools.demo import demo_payload

    spool = tmp_path / "spool"
    env = {"HEALNET_DRIFT_SPOOL_DIR": str(spool), "HEALNET_DRIFT_WINDOW_CASES": str(MIN_WINDOW_CASES)}
    with serve(demo_registry, tmp_path / "serve.log", **env) as url:
        for seed in range(45):
            assert (
                httpx.post(f"{url}/predict", json=demo_payload(SPEC, seed=seed), timeout=30).status_code
                == 200
            )
        assert poll_files(spool, 2)
    assert sorted(json.loads(f.read_text())["cases"] for f in spool.glob("*.drift.json")) == [20, 20]
    env["HEALNET_DRIFT_WINDOW_CASES"] = "100"
    with serve(demo_registry, tmp_path / "serve2.log", **env) as url:
        batch = [demo_payload(SPEC, seed=seed) for seed in range(25)]
        assert httpx.post(f"{url}/predict_batch", json=batch, timeout=30).status_code == 200
        assert len(list(spool.glob("*.drift.json"))) == 2
    assert sorted(json.loads(f.read_text())["cases"] for f in spool.glob("*.drift.json")) == [20, 20, 25]


def poll_files(folder: Path, count: int) -> bool:
    from devtools.live_server import wait_until

    return wait_until(lambda: len(list(folder.glob("*.drift.json"))) >= count, 10, 0.1)


def samples(text: str, job: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(name, sorted labels but job and instance, which the Pushgateway adds to a pushed
    group): value}; with `job`, that job's samples only."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if job is None or sample.labels.get("job") == job:
                labels = {k: v for k, v in sample.labels.items() if k not in {"job", "instance"}}
                found[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return found


def pushed_reports(reference):
    """Two reports to push: one of every modality at the reference's own proportions (twice the counts),
    and the same without the slides (no wsi share, no embedding score)."""
    from healnet.drift.compare import DriftReport

    current = reference.empty_counts()
    current.cases = 60
    for name, bins in reference.modalities.items():
        current.modalities[name] = bins.reference * 2
    report = compare(reference, current)
    without_slides = DriftReport(
        [m for m in report.modalities if m.modality != "wsi"], None, report.alpha, report.cases
    )
    return report, without_slides


@REQUIRES_PUSHGATEWAY
def test_the_metrics_replace_the_job_group_on_a_pushgateway(reference, tmp_path):
    """A real Pushgateway on loopback: a push holds the metrics file's gauges under job healnet-drift and
    stamps push_time_seconds; the next push replaces the group (a gauge it lacks is gone); a gateway
    answering 404 or not listening is a MetricsPushError."""
    import httpx

    from devtools.monitoring_stack import run_pushgateway
    from healnet.drift.report import PUSHGATEWAY_JOB, MetricsPushError, export_metrics

    def pushed(gateway: str) -> dict:
        return samples(httpx.get(f"{gateway}/metrics", timeout=10).text, PUSHGATEWAY_JOB)

    report, without_slides = pushed_reports(reference)
    assert report.embedding_score is not None
    pushed_after = time.time()
    with run_pushgateway(tmp_path) as gateway:
        export_metrics(report, tmp_path / "drift.prom", gateway)
        first = pushed(gateway)
        export_metrics(without_slides, None, gateway)
        second = pushed(gateway)
        with pytest.raises(MetricsPushError, match="cannot push the drift metrics.*404"):
            export_metrics(report, None, f"{gateway}/not-the-pushgateway")
    with pytest.raises(MetricsPushError, match="cannot push the drift metrics"):
        export_metrics(report, None, gateway)

    written = samples((tmp_path / "drift.prom").read_text())
    wsi_share = ("healnet_input_drift_share", (("modality", "wsi"),))
    assert first[wsi_share] == 0.0
    assert first[("healnet_embedding_drift_score", ())] == pytest.approx(report.embedding_score)
    assert {key: first[key] for key in written} == written
    assert first[("push_time_seconds", ())] >= pushed_after - 1
    assert wsi_share not in second and ("healnet_embedding_drift_score", ()) not in second
    assert ("healnet_input_drift_share", (("modality", "cnv"),)) in second
    assert second[("push_time_seconds", ())] >= first[("push_time_seconds", ())]


@REQUIRES_PUSHGATEWAY
def test_each_namespace_keeps_its_own_group_on_a_shared_pushgateway(reference, tmp_path):
    """`namespace` joins the group's key: every pushed series carries it, and a push from one namespace
    replaces that namespace's group only."""
    import httpx

    from devtools.monitoring_stack import run_pushgateway
    from healnet.drift.report import PUSHGATEWAY_JOB, export_metrics

    report, without_slides = pushed_reports(reference)
    with run_pushgateway(tmp_path) as gateway:
        export_metrics(report, None, gateway, namespace="oncology")
        export_metrics(report, None, gateway, namespace="research")
        export_metrics(without_slides, None, gateway, namespace="research")
        pushed = samples(httpx.get(f"{gateway}/metrics", timeout=10).text, PUSHGATEWAY_JOB)

    def wsi_share(namespace: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return ("healnet_input_drift_share", (("modality", "wsi"), ("namespace", namespace)))

    assert wsi_share("oncology") in pushed and wsi_share("research") not in pushed
    assert {labels for name, labels in pushed if name == "push_time_seconds"} == {
        (("namespace", "oncology"),),
        (("namespace", "research"),),
    }
    assert all(dict(labels).get("namespace") in {"oncology", "research"} for _, labels in pushed)
