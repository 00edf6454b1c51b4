"""Model registry (healnet/registry.py): versions in a BentoML store, champion pointer, rollback."""

import errno
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from healnet.checkpoint import WEIGHTS_FILE, Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from healnet.cli import main as healnet_main
from healnet.fitting import CohortData, model_config_for
from healnet.gate import GatePolicy, assess_champion, model_inputs, promote_if_still_better
from healnet.inference import Predictor
from healnet.model import HEALNet
from healnet.preprocess.omics import OmicsConfig
from healnet.preprocess.state import Preprocessor
from healnet.recipes import ModelOptions
from healnet.registry import (
    CARD_JSON,
    CARD_MARKDOWN,
    ChampionChangedError,
    ChampionPointerError,
    RegistryError,
    champion_lineage,
    checkpoint_path,
    get_champion,
    list_versions,
    model_card,
    model_folder,
    register_model,
    replace_model_card,
    resolve,
    rollback,
    set_champion,
    show_version,
    update_version_metadata,
    version_tag,
)
from healnet.scoring import CohortPatients
from healnet.survival import SurvivalBins


def small_checkpoint(directory, seed: int = 0) -> str:
    """A real (untrained) omics-only HEALNet checkpoint; returns its weights' sha256."""
    rng = np.random.default_rng(seed)
    ids = [f"TCGA-AA-{i:04d}" for i in range(12)]
    frame = pd.DataFrame(rng.normal(size=(12, 6)), index=ids, columns=[f"g{j}_rnaseq" for j in range(6)])
    preprocessor = Preprocessor.fit({"rnaseq": frame}, {}, ids, OmicsConfig(combine=True))
    bins = SurvivalBins.fit(rng.uniform(1, 60, 12), rng.integers(0, 2, 12), 4)
    torch.manual_seed(seed)
    model = HEALNet(
        model_config_for(
            preprocessor, preprocessor.modalities, bins.n_bins, ModelOptions(depth=1, n_latents=4)
        )
    )
    return save_checkpoint(directory, Checkpoint(model.config, [model.state_dict()], bins, preprocessor, {}))


@pytest.fixture
def checkpoints(tmp_path):
    paths = []
    for seed in range(3):
        path = tmp_path / f"checkpoint-{seed}"
        small_checkpoint(path, seed)
        paths.append(path)
    return paths


def test_register_records_labels_metadata_and_the_weights_sha256(registry, checkpoints):
    sha = small_checkpoint(checkpoints[0])  # rewritten: same seed, same weights
    tag = register_model(checkpoints[0], {"git_sha": "abc123"}, {"c_index": 0.66, "data_hash": "d" * 64})
    [row] = list_versions()
    assert row["tag"] == tag and tag.startswith("healnet:")
    assert row["labels"] == {"framework": "pytorch", "git_sha": "abc123"}
    assert row["metadata"]["sha256"] == sha
    assert row["metadata"]["c_index"] == 0.66 and row["metadata"]["modalities"] == ["omic"]
    assert show_version(tag.split(":")[1])["tag"] == tag
    assert not row["champion"]


def test_champion_pointer_and_resolve(registry, checkpoints):
    first = register_model(checkpoints[0])
    second = register_model(checkpoints[1])
    assert get_champion() is None
    with pytest.raises(RegistryError, match="no champion"):
        resolve()
    set_champion(first, "first")
    pointer = set_champion(second, "better")
    assert pointer["tag"] == second and [entry["tag"] for entry in pointer["history"]] == [first]
    assert json.loads((registry / "champion.json").read_text())["tag"] == second
    assert not list(registry.glob(".champion-*")), "the temporary pointer file must be renamed away"
    tag, path = resolve()
    assert tag == second and (path / WEIGHTS_FILE).is_file()
    assert [row["tag"] for row in list_versions() if row["champion"]] == [second]


def test_rollback_to_the_previous_and_to_a_named_version(registry, checkpoints):
    tags = [register_model(path) for path in checkpoints]
    for tag in tags:
        set_champion(tag, "promoted")
    assert rollback()["tag"] == tags[1]
    assert get_champion()["reason"] == f"rollback from {tags[2]}"
    assert rollback(tags[0])["tag"] == tags[0]
    with pytest.raises(RegistryError, match="already the champion"):
        rollback(tags[0])
    with pytest.raises(RegistryError, match="no model version"):
        rollback("healnet:doesnotexist")


def test_rollback_needs_a_champion_with_history(registry, checkpoints):
    with pytest.raises(RegistryError, match="no champion"):
        rollback()
    set_champion(register_model(checkpoints[0]), "first")
    with pytest.raises(RegistryError, match="no earlier version"):
        rollback()


def test_corrupted_weights_are_refused(registry, checkpoints):
    tag = register_model(checkpoints[0])
    weights = checkpoints[1] / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        register_model(checkpoints[1])
    stored = registry / "models" / "healnet" / tag.split(":")[1] / WEIGHTS_FILE
    stored.write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="corrupted"):
        set_champion(tag, "should not happen")
    assert get_champion() is None


def test_registry_cli_lists_and_rolls_back(registry, checkpoints, capsys):
    tags = [
        register_model(path, metadata={"c_index": 0.6 + i / 100}) for i, path in enumerate(checkpoints[:2])
    ]
    for tag in tags:
        set_champion(tag, "promoted")
    assert healnet_main(["registry", "list"]) == 0
    listed = capsys.readouterr().out
    assert f"* {tags[1]}" in listed and "c-index 0.6100" in listed and tags[0] in listed
    assert healnet_main(["registry", "rollback"]) == 0
    assert f"champion is now {tags[0]}" in capsys.readouterr().out
    assert healnet_main(["registry", "show", "healnet:missing"]) == 2


def test_an_empty_registry_lists_nothing(registry, capsys):
    assert list_versions() == []
    assert healnet_main(["registry", "list"]) == 0
    assert "no model versions registered" in capsys.readouterr().out


def test_a_promotion_goes_ahead_only_if_the_champion_is_the_one_compared_against(registry, checkpoints):
    first, second, third = (register_model(path) for path in checkpoints)
    assert set_champion(first, "first", expected=None)["tag"] == first
    with pytest.raises(ChampionChangedError, match=f"from none to {first}"):
        set_champion(second, "stale", expected=None)
    set_champion(second, "compared against the first", expected=first)
    with pytest.raises(ChampionChangedError):
        set_champion(third, "compared against the first again", expected=first)
    pointer = get_champion()
    assert pointer["tag"] == second and [entry["tag"] for entry in pointer["history"]] == [first]


def test_the_gate_is_taken_again_when_the_champion_changed(registry, checkpoints):
    """The champion changes between the gate and the promotion: the new one is scored on the candidate's
    test patients through the serving path and judged by the same rules."""
    weak, strong, candidate = (register_model(path) for path in checkpoints)
    patients = [f"TCGA-CC-{i:04d}" for i in range(40)]
    rng = np.random.default_rng(5)
    omics = {
        "rnaseq": pd.DataFrame(
            rng.normal(size=(40, 6)), index=patients, columns=[f"g{j}_rnaseq" for j in range(6)]
        )
    }
    unknown_outcomes = pd.DataFrame({"survival_months": 1.0, "event": 1}, index=patients)
    strong_risk = (
        CohortPatients(CohortData(unknown_outcomes, omics, {}), patients)
        .score(Predictor.from_dir(checkpoints[1]))
        .risk
    )
    # every patient dies, in the order of the strong model's risk: its Harrell C is 1
    outcomes = pd.DataFrame(
        {"survival_months": 1.0 + np.argsort(np.argsort(-strong_risk)), "event": 1}, index=patients
    )
    test_patients = CohortPatients(CohortData(outcomes, omics, {}), patients)
    scored = test_patients.score(Predictor.from_dir(checkpoints[2]))
    inputs = model_inputs(load_checkpoint(checkpoints[2]))

    def assess(tag):
        return assess_champion(tag, inputs, lambda: test_patients)

    seen = []  # each repeated decision, with the champion at the time it is handed on

    def reason_of(run):
        return lambda regated: (
            run if regated is None else f"{run}, gate taken again against {regated.champion.tag}"
        )

    def on_regate(result):
        seen.append((result.decision, result.champion.tag, get_champion()["tag"]))

    set_champion(weak, "first")
    set_champion(strong, "promoted by another run meanwhile")
    result, pointer = promote_if_still_better(
        candidate, scored, GatePolicy(tolerance=0.02), weak, reason_of("run b"), assess, on_regate=on_regate
    )
    assert pointer is None and result.decision == "reject" and result.champion.tag == strong
    assert result.champion_c_index == 1.0 and result.paired_difference.low < -0.02
    assert get_champion()["tag"] == strong
    # the new champion no better than the tolerance allows: the second decision promotes
    set_champion(weak, "rolled back")
    result, pointer = promote_if_still_better(
        candidate, scored, GatePolicy(tolerance=1.0), strong, reason_of("run c"), assess, on_regate=on_regate
    )
    assert result.decision == "promote" and result.champion.tag == weak and pointer["tag"] == candidate
    # the pointer's reason is the one of the gate that decided
    assert pointer["reason"] == f"run c, gate taken again against {weak}"
    # handed on before it is acted on: the promoting decision while the candidate is not yet the champion
    assert seen == [("reject", strong, strong), ("promote", weak, weak)]


def test_a_versions_model_card_is_replaced_whole_and_only_the_card(registry, checkpoints):
    tag = register_model(checkpoints[0], files=lambda _: {CARD_JSON: "{}", CARD_MARKDOWN: "# first"})
    replace_model_card(tag, {CARD_JSON: '{"gate": "again"}', CARD_MARKDOWN: "# again"})
    assert model_card(tag) == ({"gate": "again"}, "# again")
    assert not list(model_folder(tag).glob(".model_card*")), "the temporary files must be renamed away"
    with pytest.raises(RegistryError, match="a model card is"):
        replace_model_card(tag, {WEIGHTS_FILE: "overwritten"})
    checkpoint_path(tag)  # the checkpoint beside the card is untouched


def test_a_versions_metadata_is_updated_in_place_keeping_its_other_fields(registry, checkpoints):
    first = {"c_index": 0.66, "gate_rule": "no champion: min_c_index", "gate_reasons": ["judged alone"]}
    tag = register_model(checkpoints[0], {"git_sha": "abc123"}, first)
    update_version_metadata(tag, {"gate_rule": "paired-bootstrap", "gate_reasons": ["against healnet:b"]})
    metadata = show_version(tag)["metadata"]
    assert metadata["gate_rule"] == "paired-bootstrap" and metadata["gate_reasons"] == ["against healnet:b"]
    assert metadata["c_index"] == 0.66 and metadata["modalities"] == ["omic"] and "sha256" in metadata
    assert show_version(tag)["labels"] == {"framework": "pytorch", "git_sha": "abc123"}
    assert not list(model_folder(tag).glob(".model*")), "the temporary file must be renamed away"
    with pytest.raises(RegistryError, match="no model version"):
        update_version_metadata("healnet:missing", {"gate_rule": "x"})
    with pytest.raises(yaml.representer.RepresenterError):  # YAML cannot hold it: the stored file stays whole
        update_version_metadata(tag, {"gate_rule": object()})
    assert show_version(tag)["metadata"] == metadata
    checkpoint_path(tag)  # the checkpoint beside it is untouched


def test_a_corrupt_pointer_is_a_clear_error_and_a_named_rollback_repairs_it(registry, checkpoints):
    tag = register_model(checkpoints[0])
    (registry / "champion.json").write_text('{"tag": "healnet:x", "since"')
    with pytest.raises(ChampionPointerError, match="champion.json is corrupt.*rollback --to TAG"):
        get_champion()
    (registry / "champion.json").write_text('{"tag": "healnet:x"}')
    with pytest.raises(ChampionPointerError, match="not a champion pointer"):
        resolve()
    with pytest.raises(ChampionPointerError):
        rollback()  # without a tag there is nothing to go back to
    assert rollback(tag)["tag"] == tag
    kept = list(registry.glob("champion.json.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_text() == '{"tag": "healnet:x"}'


def _promote_repeatedly(home: str, tags: list[str], writer: int, times: int) -> None:
    """One writer process: `times` champion changes, alternating between the tags."""
    os.environ["BENTOML_HOME"] = os.environ["HEALNET_REGISTRY_DIR"] = home
    for i in range(times):
        set_champion(tags[(writer + i) % len(tags)], f"writer {writer} change {i}")


@pytest.mark.slow
def test_concurrent_writers_in_separate_processes_lose_no_history_entry(registry, checkpoints):
    tags = [register_model(path) for path in checkpoints]
    context = multiprocessing.get_context("spawn")
    writers = [
        context.Process(target=_promote_repeatedly, args=(str(registry), tags, writer, 10))
        for writer in range(4)
    ]
    for process in writers:
        process.start()
    for process in writers:
        process.join(120)
        assert process.exitcode == 0
    pointer = get_champion()
    reasons = [entry["reason"] for entry in pointer["history"]] + [pointer["reason"]]
    assert len(reasons) == 40 and len(set(reasons)) == 40  # every change is in the history, once
    for writer in range(4):
        mine = [int(r.split()[-1]) for r in reasons if r.startswith(f"writer {writer} ")]
        assert mine == list(range(10))  # each writer's changes in its own order


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("given", "concrete"),
    [
        ("r4yktrxqb6wdsax4", "healnet:r4yktrxqb6wdsax4"),
        ("healnet:r4yktrxqb6wdsax4", "healnet:r4yktrxqb6wdsax4"),
        ("  HEALNet:R4YKTRXQB6WDSAX4\n", "healnet:r4yktrxqb6wdsax4"),
        ("v1.0-rc_2", "healnet:v1.0-rc_2"),
    ],
)
def test_a_tag_is_normalised_to_the_concrete_version(given, concrete):
    assert version_tag(given) == concrete


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ("latest", "is an alias, not a version"),
        ("healnet:latest", "is an alias, not a version"),
        (" Healnet:LATEST ", "is an alias, not a version"),
        ("healnet", "is an alias, not a version"),
        ("healnet:", "is an alias, not a version"),
        ("other:abc", "is not a healnet version"),
        ("healnet:ab/c", "is not a valid version"),
        ("healnet:..", "is not a valid version"),
        ("", "is an alias, not a version"),
    ],
)
def test_aliases_and_malformed_tags_are_refused(given, error):
    with pytest.raises(RegistryError, match=error):
        version_tag(given)


def test_the_pointer_only_ever_holds_a_stored_concrete_version(registry, checkpoints):
    first, second = register_model(checkpoints[0]), register_model(checkpoints[1])
    for alias in ("latest", "healnet:latest", "healnet"):
        with pytest.raises(RegistryError, match="alias"):
            set_champion(alias, "promoted")
        with pytest.raises(RegistryError, match="alias"):
            resolve(alias)
    with pytest.raises(RegistryError, match="no model version 'healnet:doesnotexist'"):
        set_champion("DoesNotExist", "promoted")
    assert get_champion() is None
    pointer = set_champion(f"  {first.upper()} ", "promoted")
    assert pointer["tag"] == first and get_champion()["tag"] == first
    assert set_champion(second.partition(":")[2], "promoted")["tag"] == second
    assert show_version(second.upper())["tag"] == second
    with pytest.raises(RegistryError, match="alias"):
        rollback("latest")
    assert get_champion()["tag"] == second


def test_a_pointer_holding_an_alias_is_corrupt_and_a_named_rollback_repairs_it(registry, checkpoints):
    first = register_model(checkpoints[0])
    set_champion(first, "promoted")
    pointer = json.loads((registry / "champion.json").read_text())
    (registry / "champion.json").write_text(json.dumps(pointer | {"tag": "healnet:latest"}))
    with pytest.raises(ChampionPointerError, match="holds 'healnet:latest', not a healnet:VERSION"):
        get_champion()
    assert rollback(first)["tag"] == first


def test_rollback_walks_back_through_earlier_champions(registry, checkpoints):
    """A → B → C: rollbacks go C → B → A, never back to the version just left."""
    a, b, c = (register_model(path) for path in checkpoints)
    for tag in (a, b, c):
        set_champion(tag, "promoted")
    assert rollback()["tag"] == b
    assert rollback()["tag"] == a
    with pytest.raises(RegistryError, match=f"champion {a} has no earlier version"):
        rollback()
    pointer = get_champion()
    assert [(entry["tag"], entry["kind"]) for entry in pointer["history"]] == [
        (a, "promotion"),
        (b, "promotion"),
        (c, "promotion"),
        (b, "rollback"),
    ]
    assert (pointer["tag"], pointer["kind"], pointer["reason"]) == (a, "rollback", f"rollback from {b}")
    # a promotion after the rollbacks: a rollback returns to the champion it replaced
    set_champion(c, "promoted again")
    assert champion_lineage(get_champion()) == [a, c]
    assert rollback()["tag"] == a


def test_rollback_to_names_any_earlier_champion_and_nothing_else(registry, checkpoints):
    a, b, c = (register_model(path) for path in checkpoints)
    for tag in (a, b):
        set_champion(tag, "promoted")
    with pytest.raises(RegistryError, match=f"{c} was never the champion"):
        rollback(c)  # registered, never promoted: only the gate promotes
    set_champion(c, "promoted")
    assert rollback(a.partition(":")[2])["tag"] == a  # skips B
    with pytest.raises(RegistryError, match="no earlier version"):
        rollback()
    assert rollback(c)["tag"] == c  # undoes the rollback
    assert rollback()["tag"] == a  # and back again, not to B
    with pytest.raises(RegistryError, match="already the champion"):
        rollback(a)


def test_rollback_reads_pointers_written_before_the_kind_was_recorded(registry, checkpoints):
    a, b, c = (register_model(path) for path in checkpoints)
    # with an alias that a rollback once wrote, before aliases were refused
    entries = [
        (a, "first"),
        (b, "promoted"),
        ("healnet:latest", f"rollback from {b}"),
        (c, "promoted"),
        (b, f"rollback from {c}"),
    ]
    history = [{"tag": tag, "since": "2026-01-01T00:00:00+00:00", "reason": why} for tag, why in entries]
    legacy = {
        "tag": a,
        "since": "2026-01-02T00:00:00+00:00",
        "reason": f"rollback from {b}",
        "history": history,
    }
    (registry / "champion.json").write_text(json.dumps(legacy))
    assert champion_lineage(get_champion()) == [a]
    with pytest.raises(RegistryError, match="no earlier version"):
        rollback()


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda path: path.mkdir(), "cannot be read"),
        (lambda path: path.write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
        (lambda path: path.write_bytes(b"\xff\xfe{"), "is corrupt"),
    ],
    ids=["a directory", "nested 10^5 deep", "not text"],
)
def test_an_unreadable_pointer_is_a_pointer_error(registry, damage, error):
    damage(registry / "champion.json")
    with pytest.raises(ChampionPointerError, match=error):
        get_champion()


def test_an_io_error_of_the_volume_is_a_pointer_error(registry, checkpoints, monkeypatch):
    set_champion(register_model(checkpoints[0]), "promoted")

    def stale(self):
        raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), str(self))

    monkeypatch.setattr(Path, "read_bytes", stale)
    with pytest.raises(ChampionPointerError, match="cannot be read.*Stale"):
        get_champion()


def registry_cli(home, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m healnet registry ARGS` in a child process, on the registry at `home`."""
    env = os.environ | {
        "BENTOML_HOME": str(home),
        "HEALNET_REGISTRY_DIR": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
    }
    command = [sys.executable, "-m", "healnet", "registry", *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_registry_cli_refuses_aliases_and_walks_back(registry, checkpoints):
    """Rows 6 and 7 of the hostile-inputs issue, through the command line."""
    a, b, c = (register_model(path) for path in checkpoints)
    for tag in (a, b, c):
        set_champion(tag, "promoted")
    before = (registry / "champion.json").read_text()
    for alias in ("latest", "healnet:latest"):
        result = registry_cli(registry, "rollback", "--to", alias)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr == (
            f"healnet registry: {alias!r} is an alias, not a version: name one with healnet:VERSION "
            "(`healnet registry list` shows them)\n"
        )
    result = registry_cli(registry, "rollback", "--to", "healnet:no/such")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and "is not a valid version" in result.stderr
    assert (registry / "champion.json").read_text() == before
    walked = []
    for _ in range(3):
        result = registry_cli(registry, "rollback")
        walked.append((result.returncode, result.stdout.strip(), result.stderr.strip()))
    assert walked == [
        (0, f"champion is now {b} (rollback from {c})", ""),
        (0, f"champion is now {a} (rollback from {b})", ""),
        (2, "", f"healnet registry: champion {a} has no earlier version to roll back to"),
    ]
    result = registry_cli(registry, "rollback", "--to", f" {c.upper()} ")
    assert (result.returncode, result.stdout) == (0, f"champion is now {c} (rollback from {a})\n")
