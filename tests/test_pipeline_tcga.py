"""A real TCGA table through the whole pipeline with kfp.local, as a new user runs it, and a live
`bentoml serve` of the model it promotes answering a patient's whole profile as the table holds it."""

import json
from pathlib import Path

import httpx
import pandas as pd
import pytest

from healnet.data.readers import OMIC_SUFFIXES
from pipelines.__main__ import main as pipelines_main

pytest_plugins = ("serving_fixtures",)
pytestmark = pytest.mark.slow
BLCA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tcga" / "tcga_blca_all_clean.csv.gz"
GATE_FIELDS = {"decision", "rule", "c_index", "c_index_ci", "test_events"}


def printed_run_dir(printed: str) -> Path:
    return Path(printed.split("pipeline run folder: ")[1].split(" (")[0])


@pytest.fixture(scope="module")
def blca_run(tmp_path_factory):
    """The README's command on the BLCA table; when the gate rejects, the same run again with dry_run
    (the cache reuses its training), so that a model is promoted to serve."""
    if not BLCA.is_file():
        pytest.skip(f"the TCGA BLCA table is not at {BLCA}")
    root = tmp_path_factory.mktemp("blca")
    argv = ["run-local", "--pipeline-root", str(root / "kfp"), "--cache"]
    argv += [
        "--param",
        f"source={BLCA}",
        "--param",
        "recipe=tcga",
        "--param",
        f"registry_dir={root / 'registry'}",
    ]
    assert pipelines_main(argv) == 0
    run_dir = max((root / "kfp").glob("healnet-training-*"), key=lambda path: path.stat().st_mtime)
    gate = json.loads((run_dir / "gate.json").read_text())
    if gate["decision"] != "promote":
        assert pipelines_main([*argv, "--param", "dry_run=true"]) == 0
    return root / "registry", run_dir, gate


def test_the_blca_table_ends_in_a_gate_decision_that_states_its_numbers(blca_run):
    _, run_dir, gate = blca_run
    assert set(gate) >= GATE_FIELDS
    assert gate["decision"] in {"promote", "reject"} and gate["rule"]
    low, high = gate["c_index_ci"]
    assert low <= gate["c_index"] <= high and high - low > 0.02, "56 test patients leave a wide interval"
    assert gate["test_events"] >= 1
    validation = (run_dir / "validation.md").read_text()
    assert "Trained on: omic, clinical; slides: none" in validation


def test_the_served_model_answers_a_whole_profile_and_refuses_an_impossible_age(blca_run, serve, tmp_path):
    from devtools.live_server import DemoRegistry, bentoml_home
    from healnet.registry import checkpoint_path, get_champion

    registry, _, _ = blca_run
    table = pd.read_csv(BLCA, nrows=3)
    row = table.iloc[0]
    omics = {
        name: {column: float(row[column]) for column in table.columns if column.endswith(f"_{name}")}
        for name in OMIC_SUFFIXES
    }
    body = {"omics": omics, "clinical": {"age": float(row["age"]), "is_female": float(row["is_female"])}}
    with bentoml_home(registry):
        tag = get_champion()["tag"]
        checkpoint = checkpoint_path(tag)
    with serve(DemoRegistry(registry, tag, checkpoint), tmp_path / "serve.log") as url:
        answered = httpx.post(f"{url}/predict", json=body, timeout=60)
        assert answered.status_code == 200, answered.text
        result = answered.json()
        assert result["model_version"] == tag
        assert {"mut", "cnv", "rnaseq", "clinical"} <= set(result["modalities_used"])  # the tcga recipe's
        sent = sum(len(features) for features in omics.values())
        assert 0 < len(result["unknown_features"]) < sent, "the features the model does not use are listed"
        too_old = {**body, "clinical": {**body["clinical"], "age": 300.0}}
        refused = httpx.post(f"{url}/predict", json=too_old, timeout=60)
        assert refused.status_code == 422 and refused.json()["reason"] == "out_of_range"
        assert "age" in refused.json()["error"]
