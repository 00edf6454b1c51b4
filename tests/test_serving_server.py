"""A real `bentoml serve` (two workers) from the repository root: every modality pattern and kind of bad
input over HTTP, then /metrics scraped and each of our counters compared with what was sent."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from devtools.demo import DemoSpec, demo_feature_names, demo_payload, demo_tiles
from serving.reasons import Reason

pytest_plugins = ("serving_fixtures",)
pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC = DemoSpec()
GENE = demo_feature_names(SPEC)["mut"][0]
# every omic feature of the demo model under the combined name, as a slide request's omics
ALL_OMICS = {"omic": {name: 0.3 for names in demo_feature_names(SPEC).values() for name in names}}
SERVER_ENV = {
    "HEALNET_MAX_BODY_BYTES": str(256 * 1024),
    "HEALNET_MAX_PATCHES": "64",
    "HEALNET_MAX_TILES": "4",
}
PROMTOOL = shutil.which("promtool")


@pytest.fixture(scope="module")
def server(demo_registry, serve, tmp_path_factory):
    with serve(demo_registry, tmp_path_factory.mktemp("serve") / "serve.log", **SERVER_ENV) as url:
        yield url


def post(
    url: str, path: str, body: object = None, raw: bytes | None = None, content_type: str = "application/json"
):
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, headers={"content-type": content_type}, timeout=30)


@dataclass(frozen=True)
class Multipart:
    """A multipart/form-data body: (field, (filename or None, bytes)) parts."""

    parts: list[tuple[str, tuple[str | None, bytes]]]


TILE_FILES = [("wsi_tiles", (f"tile{i}.png", base64.b64decode(t))) for i, t in enumerate(demo_tiles(2, 40))]

# (name, path, body or raw bytes, expected status, modality patterns predicted, rejection reason)
GOOD = [
    ("omic+wsi", "/predict", demo_payload(SPEC, ("omic", "wsi"), 6, 1), ["omic+wsi"]),
    (
        "omic+wsi attention",
        "/predict",
        demo_payload(SPEC, ("omic", "wsi"), 3, 2) | {"return_attention": True},
        ["omic+wsi"],
    ),
    ("omic", "/predict", demo_payload(SPEC, ("omic",), seed=3), ["omic"]),
    (
        "partial omic, with names the model does not use",
        "/predict",
        {"omics": {"mut": dict.fromkeys(demo_feature_names(SPEC)["mut"][:5], 1.0) | {"UNLISTED": 2.0}}},
        ["omic"],
    ),
    ("wsi", "/predict", demo_payload(SPEC, ("wsi",), 9, 4), ["wsi"]),
    (
        "binary wsi",
        "/predict",
        {"wsi_features_base64": base64.b64encode(bytes(4 * SPEC.wsi_dim * 3)).decode()},
        ["wsi"],
    ),
    ("wsi tiles", "/predict", {"omics": ALL_OMICS, "wsi_tiles": demo_tiles(2, 40)}, ["omic+wsi"]),
    (
        "multipart tiles",
        "/predict",
        Multipart([*TILE_FILES, ("omics", (None, json.dumps(ALL_OMICS).encode()))]),
        ["omic+wsi"],
    ),
    (
        "batch",
        "/predict_batch",
        [demo_payload(SPEC, ("omic",)), demo_payload(SPEC, ("wsi",), 2)],
        ["omic", "wsi"],
    ),
]
BAD = [
    ("no modality", "/predict", {}, 422, "no_modality"),
    ("wrong width", "/predict", {"wsi_features": [[0.1] * (SPEC.wsi_dim + 1)]}, 422, "wrong_dimensions"),
    ("NaN", "/predict", b'{"omics": {"mut": {"%s": NaN}}}' % GENE.encode(), 422, "non_finite"),
    ("wrong feature names", "/predict", {"omics": {"mut": {"X1": 1.0, "X2": 2.0}}}, 422, "missing_features"),
    ("too many patches", "/predict", demo_payload(SPEC, ("wsi",), 65), 413, "too_large"),
    ("body too large", "/predict", demo_payload(SPEC, ("wsi",), 2000), 413, "too_large"),
    ("malformed JSON", "/predict", b'{"omics":', 400, "invalid_schema"),
    (
        "multipart tile as text",
        "/predict",
        Multipart([("wsi_tiles", (None, b"tile.png"))]),
        400,
        "invalid_schema",
    ),
    (
        "wrong type",
        "/predict",
        {"return_attention": "yes", "omics": {"mut": {GENE: 1}}},
        400,
        "invalid_schema",
    ),
    ("bad image", "/predict", {"wsi_tiles": [base64.b64encode(b"GIF89a...").decode()]}, 422, "bad_image"),
    ("bad batch case", "/predict_batch", [demo_payload(SPEC, ("omic",)), {}], 422, "no_modality"),
]
OUR_METRICS = (
    "healnet_requests_total",
    "healnet_missing_modality_total",
    "healnet_validation_errors_total",
    "healnet_imputed_feature_fraction_count",
    "healnet_risk_score_count",
    "healnet_inference_duration_seconds_count",
    "healnet_batch_cases_count",
    "healnet_batch_cases_sum",
)


def counters(samples: dict) -> dict:
    return {key: value for key, value in samples.items() if key[0] in OUR_METRICS}


def send(url: str, path: str, body: object):
    if isinstance(body, Multipart):
        return httpx.post(f"{url}{path}", files=body.parts, timeout=30)
    return post(url, path, raw=body) if isinstance(body, bytes) else post(url, path, body)


def test_metrics_count_exactly_what_was_sent(server, metrics_of, demo_registry):
    before = counters(metrics_of(server))
    patterns, rejections, requests_served = Counter(), Counter(), 0
    for name, path, body, predicted in GOOD:
        response = send(server, path, body)
        assert response.status_code == 200, f"{name}: {response.text}"
        answers = response.json() if path == "/predict_batch" else [response.json()]
        assert ["+".join(answer["modalities_used"]) for answer in answers] == predicted, name
        assert all(answer["model_version"] == demo_registry.tag for answer in answers)
        patterns.update(predicted)
        requests_served += 1
    for name, path, body, status, reason in BAD:
        response = send(server, path, body)
        assert response.status_code == status, f"{name}: {response.text}"
        assert set(response.json()) == {"error", "reason"} and response.json()["error"], name
        assert response.json()["reason"] == reason, name  # every 4xx body in one shape
        rejections[reason] += 1
    wrong_media = post(server, "/predict", raw=b"omics=1", content_type="text/plain")
    assert wrong_media.status_code == 415
    rejections["invalid_schema"] += 1

    after = counters(metrics_of(server))
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    cases = sum(patterns.values())
    missing = Counter(
        m
        for pattern, n in patterns.items()
        for m in ("omic", "wsi")
        if m not in pattern.split("+")
        for _ in range(n)
    )
    expected = {}
    for pattern in ("omic", "wsi", "omic+wsi"):
        expected[("healnet_requests_total", (("pattern", pattern),))] = patterns[pattern]
    for modality in ("omic", "wsi"):
        expected[("healnet_missing_modality_total", (("modality", modality),))] = missing[modality]
    for reason in Reason:  # the values are pinned in test_serving_reasons.py
        expected[("healnet_validation_errors_total", (("reason", reason),))] = rejections[reason]
    expected[("healnet_imputed_feature_fraction_count", ())] = sum(
        n for p, n in patterns.items() if "omic" in p
    )
    expected[("healnet_risk_score_count", ())] = cases
    for stage in ("preprocess", "forward"):
        expected[("healnet_inference_duration_seconds_count", (("stage", stage),))] = requests_served
    # Sent one at a time, so every model pass holds exactly one request's cases.
    expected[("healnet_batch_cases_count", ())] = requests_served
    expected[("healnet_batch_cases_sum", ())] = cases
    assert delta == expected


def test_model_info_and_reference_quantiles_are_exported(server, metrics_of, demo_registry):
    samples = metrics_of(server)
    version = demo_registry.tag.partition(":")[2]
    assert samples[("healnet_model_info", (("tag", demo_registry.tag), ("version", version)))] == 1
    quantiles = json.loads((demo_registry.checkpoint / "checkpoint.json").read_text())["metadata"]
    for quantile, value in quantiles["reference_risk_quantiles"].items():
        assert samples[("healnet_reference_risk_score", (("training_quantile", quantile),))] == pytest.approx(
            value
        )
    assert any(name == "bentoml_service_request_total" for name, _ in samples), (
        "BentoML's own metrics are gone"
    )


def test_health_endpoints_of_the_live_server(server):
    assert httpx.get(f"{server}/livez").status_code == 200
    assert httpx.get(f"{server}/readyz").status_code == 200


@pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: install the Debian/Ubuntu package `prometheus`"
)
def test_promtool_finds_nothing_in_a_real_scrape(server):
    post(server, "/predict", demo_payload(SPEC))
    post(server, "/predict", {})
    scrape = httpx.get(f"{server}/metrics").text
    assert "healnet_reference_risk_score{" in scrape and "healnet_requests_total{" in scrape
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=30
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert (result.returncode, problems) == (0, [])


def test_a_corrupted_model_stops_bentoml_serve(demo_registry, demo_checkpoint, tmp_path):
    from healnet.registry import checkpoint_path, register_model

    tag = register_model(demo_checkpoint, labels={"source": "tests"}, metadata={})
    weights = checkpoint_path(tag) / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-8])
    command = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "serving.service:HEALNetService",
        "--host",
        "127.0.0.1",
    ]
    env = demo_registry.server_env(HEALNET_MODEL_TAG=tag)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, "--port", "0"],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        returncode = process.wait(timeout=90)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    text = log.read_text()
    assert returncode != 0, text
    assert "refusing to start" in text and "sha256" in text, text
