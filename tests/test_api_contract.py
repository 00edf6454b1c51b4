"""The API contract against a live `bentoml serve` of the demo champion: the served document is the
checked-in one, Schemathesis finds no failure in it, BentoML's own clients and the documented examples
work, and every rejection reaches a client as an error that names its reason."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
from http import HTTPStatus
from pathlib import Path

import bentoml
import httpx
import pytest
from bentoml.exceptions import BentoMLException

from devtools.demo import demo_payload, demo_tiles

pytest_plugins = ("serving_fixtures",)
pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
OMICS_ONLY = demo_payload(modalities=("omic",))
WITH_ATTENTION = {**demo_payload(patches=4), "wsi_coords": [[0, 0], [256, 0], [0, 256], [256, 256]]}
REJECTED = {  # a request, and the status and reason a client must see
    "no_modality": ({}, 422),
    "wrong_dimensions": ({"wsi_features": [[0.1, 0.2]]}, 422),
    "invalid_schema": ({"omics": {"mut": {"G0_mut": "high"}}}, 400),
    "too_large": ({"wsi_features": [[0.0] * 31] * 9000}, 413),
}


@pytest.fixture(scope="module")
def server(demo_registry, serve, tmp_path_factory):
    with serve(demo_registry, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


def test_the_served_document_is_the_checked_in_one(server):
    served = httpx.get(f"{server}/docs.json", timeout=30).json()
    assert served == json.loads((REPO_ROOT / "docs" / "openapi.json").read_text())


def test_schemathesis_finds_no_failure(server):
    """All checks, a fixed seed, a bounded number of examples; schemathesis.toml from the repository root.
    No example database: a checkout's .hypothesis folder would replay what earlier runs found there, so the
    same commit could pass in CI's fresh clone and fail in a working copy."""
    run = subprocess.run(
        [str(SCHEMATHESIS), "run", f"{server}/docs.json", "--checks", "all", "--seed", "1"]
        + ["--max-examples", "100", "--no-color", "--generation-database", "none"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-4000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert generated, run.stdout[-2000:]
    assert int(generated[1]) >= 500 and generated[1] == generated[2]


def check_answers(single: dict, with_attention: dict, batch: list) -> None:
    assert single["modalities_used"] == ["omic"] and "attention" not in single
    assert "attention_coords" not in single and isinstance(single["risk"], float)
    assert set(with_attention["attention"]) >= {"wsi"} and len(with_attention["attention"]["wsi"]) == 4
    assert with_attention["attention_coords"] == WITH_ATTENTION["wsi_coords"]
    assert [answer["risk"] for answer in batch] == pytest.approx([single["risk"], with_attention["risk"]])


def test_bentomls_sync_client(server):
    with bentoml.SyncHTTPClient(server) as client:
        single = client.predict(OMICS_ONLY)
        with_attention = client.predict({**WITH_ATTENTION, "return_attention": True})
        batch = client.predict_batch([OMICS_ONLY, WITH_ATTENTION])
        check_answers(single, with_attention, batch)
        for reason, (body, status) in REJECTED.items():
            with pytest.raises(BentoMLException) as raised:
                client.predict(body)
            assert raised.value.error_code == HTTPStatus(status)
            assert json.loads(str(raised.value))["reason"] == reason


def test_bentomls_async_client(server):
    async def calls():
        async with bentoml.AsyncHTTPClient(server) as client:
            answers = await asyncio.gather(
                client.predict(OMICS_ONLY),
                client.predict({**WITH_ATTENTION, "return_attention": True}),
                client.predict_batch([OMICS_ONLY, WITH_ATTENTION]),
            )
            with pytest.raises(BentoMLException) as raised:
                await client.predict_batch([{"clinical": {}}])
            return answers, raised.value

    (single, with_attention, batch), error = asyncio.run(calls())
    check_answers(single, with_attention, batch)
    assert error.error_code == HTTPStatus.UNPROCESSABLE_ENTITY and "no_modality" in str(error)


def test_the_multipart_form(server):
    tiles = [
        ("wsi_tiles", (f"tile{i}.png", base64.b64decode(t), "image/png")) for i, t in enumerate(demo_tiles(2))
    ]
    parts = {
        "omics": json.dumps(OMICS_ONLY["omics"]),
        "wsi_coords": "[[0, 0], [64, 0]]",
        "return_attention": "true",
    }
    answer = httpx.post(f"{server}/predict", files=tiles, data=parts, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["attention_coords"] == [[0, 0], [64, 0]]
    empty = httpx.post(f"{server}/predict", files={"return_attention": (None, "true")}, timeout=60)
    assert empty.status_code == 422 and empty.json()["reason"] == "no_modality"


def documented_examples() -> list[tuple[str, str]]:
    """(language, code) of each fenced block in docs/serving.md's client section."""
    text = (REPO_ROOT / "docs" / "serving.md").read_text()
    section = text.split("## The API contract and clients", 1)[1].split("### Fuzzing the API", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.DOTALL)


def test_the_documented_client_examples_work(server, tmp_path):
    examples = documented_examples()
    assert [language for language, _ in examples] == ["bash", "python", "python"]
    (tmp_path / "case.json").write_text(json.dumps(demo_payload()))
    for language, code in examples:
        code = code.replace("http://localhost:3000", server)
        command = ["bash", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        output = json.loads(run.stdout) if language == "bash" else run.stdout
        assert "risk" in output, run.stdout
