"""Cross-validation with baselines on a small PORPOISE-format table with a known signal."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from healnet.ablation import AblationConfig, format_ablation, requirement, run_ablation, with_missing, without
from healnet.baselines import (
    BaselineError,
    BaselineFeatures,
    CoxNetConfig,
    ForestConfig,
    age_risk,
    fit_coxnet,
    fit_forest,
)
from healnet.cli import main
from healnet.cv import (
    CVConfig,
    CVError,
    cross_validate,
    format_pooled,
    format_table,
    pool_cohorts,
    run_fold,
    summarize,
)
from healnet.data.cohort import ingest
from healnet.data.splits import kfold_splits
from healnet.fitting import CohortData
from healnet.preprocess.clinical import ClinicalConfig
from healnet.preprocess.omics import OmicsConfig
from healnet.recipes import ModelOptions, Recipe
from healnet.survival import SurvivalBins
from healnet.survival_metrics import harrell_c
from healnet.train import TrainConfig, drop_modalities

TINY = Recipe(
    name="tiny",
    omics=OmicsConfig(top_k=20, combine=False, signed_log=("rnaseq",)),
    model=ModelOptions(
        depth=1, n_latents=4, latent_dim=16, cross_dim_head=8, latent_dim_head=8, linear_path=("clinical",)
    ),
    train=TrainConfig(epochs=4, patience=4, monitor="loss"),
    members=2,
)
FAST = CVConfig(
    folds=3,
    repeats=1,
    healnet=TINY,
    coxnet=CoxNetConfig(omics=OmicsConfig(signed_log=("rnaseq",)), n_alphas=10, inner_folds=3),
    coxnet_topk=CoxNetConfig(omics=OmicsConfig(top_k=20, signed_log=("rnaseq",)), n_alphas=10, inner_folds=3),
    coxnet_mid=CoxNetConfig(omics=OmicsConfig(signed_log=("rnaseq",)), n_alphas=10, penalty="path_middle"),
    forest=ForestConfig(omics=OmicsConfig(top_k=20, signed_log=("rnaseq",)), n_estimators=20),
)


def write_porpoise_table(path, n: int = 120, seed: int = 0) -> None:
    """One row per slide (some patients have two); rnaseq G0-G4 carry the log-hazard, with outliers."""
    rng = np.random.default_rng(seed)
    patients = [f"TCGA-AB-{i:04d}" for i in range(n)]
    z = rng.normal(size=n)
    event_time = rng.exponential(30 * np.exp(-1.5 * z))
    censor_time = rng.uniform(20, 150, n)
    rna = rng.normal(size=(n, 40))
    rna[:, :5] += 1.5 * z[:, None]
    rna[rng.integers(0, n, 3), 10:13] = 5000.0  # PORPOISE-like extreme z-scores
    frame = pd.DataFrame(
        {
            "case_id": patients,
            "slide_id": [f"{p}-01Z-00-DX1.{i:04d}.svs" for i, p in enumerate(patients)],
            "age": rng.integers(40, 80, n),
            "survival_months": np.round(np.maximum(np.minimum(event_time, censor_time), 0.1), 2),
            "censorship": (event_time > censor_time).astype(int),
            "is_female": rng.integers(0, 2, n),
        }
    )
    omics = pd.DataFrame(rna, columns=[f"G{i}_rnaseq" for i in range(40)])
    omics[[f"M{i}_mut" for i in range(15)]] = (rng.random((n, 15)) < 0.2).astype(int)
    omics[[f"C{i}_cnv" for i in range(15)]] = rng.integers(-2, 3, (n, 15))
    table = pd.concat([frame, omics], axis=1)
    second = table.iloc[::7].copy()
    second["slide_id"] = second["slide_id"].str.replace("DX1", "DX2")
    pd.concat([table, second]).to_csv(path, index=True)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("porpoise") / "tcga_test_all_clean.csv.gz"
    write_porpoise_table(path)
    return path


@pytest.fixture(scope="module")
def data(table) -> CohortData:
    torch.set_num_threads(1)
    return CohortData.from_cohort(ingest(table))


@pytest.fixture(scope="module")
def folds(data):
    clinical = data.clinical
    splits = kfold_splits(clinical.index, clinical["event"], folds=3, seed=0)
    return [
        {role: split.loc[split["role"] == role, "patient_id"].tolist() for role in ("train", "val", "test")}
        for _, split in splits.groupby("fold")
    ]


@pytest.fixture(scope="module")
def fold_results(data, folds):
    return [run_fold(data, f["train"], f["val"], f["test"], FAST, seed=i) for i, f in enumerate(folds)]


def test_no_patient_leaks_between_train_val_and_test(data, folds, fold_results):
    assert sorted(pid for f in folds for pid in f["test"]) == sorted(data.clinical.index)
    for fold, result in zip(folds, fold_results, strict=True):
        pool = set(fold["train"]) | set(fold["val"])
        assert not pool & set(fold["test"])
        stopping = []
        for fit_ids, stop_ids in result.healnet.member_splits:
            assert not set(fit_ids) & set(stop_ids)
            assert set(fit_ids) | set(stop_ids) == pool
            stopping += stop_ids
        assert sorted(stopping) == sorted(pool)  # each training patient early-stops exactly one member
    with pytest.raises(CVError, match="overlap"):
        run_fold(data, folds[0]["train"], folds[0]["val"], folds[0]["train"][:3], FAST)


def test_bins_and_transforms_are_fit_on_each_training_fold(data, folds, fold_results):
    clinical = data.clinical
    edges = []
    for fold, result in zip(folds, fold_results, strict=True):
        pool = fold["train"] + fold["val"]
        expected = SurvivalBins.fit(clinical.loc[pool, "survival_months"], clinical.loc[pool, "event"], 4)
        assert result.healnet.bins == expected
        edges.append(tuple(expected.edges))
        # the baselines' z-scores are centred on this fold's training patients, not on everyone
        assert np.abs(result.features["coxnet"](data, pool).mean(axis=0)).max() < 1e-6
        assert np.abs(result.features["coxnet"](data, list(clinical.index)).mean(axis=0)).max() > 1e-3
        assert result.features["coxnet"].feature_names[:2] == ["age", "is_female"]
        # the ensemble's one omics transform is centred on the training fold (signed-log rnaseq)
        state = result.healnet.preprocessor.omics.state_dict()["modalities"]["rnaseq"]
        raw = data.omics["rnaseq"].loc[pool, state["features"]].to_numpy(np.float64)
        assert state["signed_log"]
        np.testing.assert_allclose(
            state["mean"], (np.sign(raw) * np.log1p(np.abs(raw))).mean(axis=0), atol=1e-5
        )
    assert len(set(edges)) == len(edges)


def test_test_fold_values_do_not_change_the_fitted_models(data, folds, fold_results):
    fold = folds[0]
    shifted = CohortData(data.clinical.copy(), {k: v.copy() for k, v in data.omics.items()}, {})
    shifted.clinical.loc[fold["test"], "survival_months"] *= 40
    shifted.omics["rnaseq"].loc[fold["test"]] += 25.0
    again = run_fold(shifted, fold["train"], fold["val"], fold["test"], FAST, seed=0)
    before = fold_results[0]
    assert again.healnet.bins == before.healnet.bins
    assert again.coxnet.alpha == before.coxnet.alpha
    pool = fold["train"] + fold["val"]
    np.testing.assert_array_equal(again.features["coxnet"](data, pool), before.features["coxnet"](data, pool))
    for new, old in zip(again.healnet.members, before.healnet.members, strict=True):
        np.testing.assert_array_equal(new.predict(data, pool), old.predict(data, pool))


def test_baselines_recover_a_strong_signal(data, folds):
    clinical = data.clinical
    fold = folds[0]
    pool, test = fold["train"] + fold["val"], fold["test"]
    matrix = BaselineFeatures.fit(data, pool, OmicsConfig(top_k=20), ClinicalConfig())
    x_train, x_test = matrix(data, pool), matrix(data, test)
    times, events = clinical.loc[pool, "survival_months"].to_numpy(), clinical.loc[pool, "event"].to_numpy()
    coxnet = fit_coxnet(x_train, times, events, CoxNetConfig(n_alphas=15, inner_folds=3))
    forest = fit_forest(x_train, times, events, ForestConfig(n_estimators=50))
    assert coxnet.inner_c_index.shape == coxnet.alphas.shape == (15,)
    assert coxnet.alpha in coxnet.alphas and 0 < coxnet.n_nonzero <= x_train.shape[1]
    signal = [matrix.feature_names.index(f"G{i}_rnaseq") for i in range(5)]
    assert np.abs(coxnet.model.coef_[signal, list(coxnet.alphas).index(coxnet.alpha)]).min() > 0
    test_rows = clinical.loc[test]
    assert harrell_c(test_rows["survival_months"], test_rows["event"], coxnet.risk(x_test)) > 0.7
    assert harrell_c(test_rows["survival_months"], test_rows["event"], forest.predict(x_test)) > 0.7


def test_coxnet_inner_folds_without_a_comparable_pair_do_not_vote():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    times = np.concatenate([[1.0, 2.0, 200.0, 201.0], rng.uniform(10, 100, 36)])
    events = np.r_[np.ones(4), np.zeros(36)].astype(int)
    config = CoxNetConfig(n_alphas=5, inner_folds=4)  # one event per inner fold: two have no comparable pair
    fit = fit_coxnet(x, times, events, config)
    assert np.isfinite(fit.inner_c_index).all() and fit.alpha in fit.alphas
    late = times.copy()
    late[:2] = [202.0, 203.0]  # every event after every censoring time: nothing to score
    with pytest.raises(BaselineError, match="comparable pair"):
        fit_coxnet(x, late, events, config)


def test_fold_results_report_every_model(fold_results):
    models = fold_results[0].record["models"]
    assert set(models) == {"healnet", "healnet_single", "age", "coxnet", "coxnet_topk", "coxnet_mid", "rsf"}
    for name in ("healnet", "age", "coxnet", "coxnet_topk", "coxnet_mid", "rsf"):
        assert 0.0 <= models[name]["c_index"] <= 1.0 and models[name]["seconds"] >= 0
    assert models["coxnet"]["c_index"] > 0.7
    assert models["coxnet"]["features"] > models["coxnet_topk"]["features"]  # all omics against the top-k
    assert 0.0 < models["healnet"]["integrated_brier_score"] < 1.0


def test_age_alone_fits_nothing_and_imputes_the_training_median():
    train = pd.DataFrame({"age": [40.0, 50.0, 70.0]})
    test = pd.DataFrame({"age": [65.0, np.nan]})
    np.testing.assert_array_equal(age_risk(train, test), [65.0, 50.0])
    with pytest.raises(BaselineError, match="no training patient has one"):
        age_risk(pd.DataFrame({"age": [np.nan]}), test)


def test_summary_pairs_folds_and_names_the_best_baseline():
    folds = [
        {
            "models": {
                "healnet": {"c_index": h, "c_index_ipcw": h},
                "coxnet": {"c_index": c, "c_index_ipcw": c},
                "age": {"c_index": a, "c_index_ipcw": a},
            }
        }
        for h, c, a in [(0.7, 0.6, 0.62), (0.6, 0.65, 0.64), (0.8, 0.6, 0.63)]
    ]
    summary = summarize(folds)
    assert summary["healnet"]["c_index"]["mean"] == pytest.approx(0.7)
    assert summary["healnet"]["c_index"]["std"] == pytest.approx(0.1)
    assert summary["best_baseline"] == "age"  # mean 0.63 against CoxNet's 0.6167
    paired = summary["healnet"]["c_index_minus_age"]
    differences = np.array([0.08, -0.04, 0.17])
    assert paired["mean"] == pytest.approx(differences.mean()) and paired["folds_higher"] == 2
    assert paired["standard_error"] == pytest.approx(differences.std(ddof=1) / np.sqrt(3))
    assert summary["healnet"]["c_index_minus_coxnet"]["folds_higher"] == 2


def test_unknown_model_is_rejected():
    with pytest.raises(CVError, match="subset"):
        CVConfig(models=("healnet", "deepsurv"))


def test_cross_validate_report_is_complete(data):
    config = CVConfig(**{**FAST.__dict__, "models": ("coxnet",), "repeats": 2})
    report = cross_validate(data, config, progress=False)
    assert len(report["folds"]) == 6
    for repeat in (0, 1):
        tests = [pid for f in report["folds"] if f["repeat"] == repeat for pid in f["test_ids"]]
        assert sorted(tests) == sorted(data.clinical.index)
    assert report["summary"]["coxnet"]["c_index"]["mean"] > 0.7
    json.dumps(report)


def test_worker_processes_give_the_same_report(data):
    config = CVConfig(**{**FAST.__dict__, "models": ("healnet", "coxnet")})
    alone = cross_validate(data, config, progress=False)
    parallel = cross_validate(data, config, progress=False, jobs=2)
    assert parallel["environment"]["jobs"] == 2
    for one, two in zip(alone["folds"], parallel["folds"], strict=True):
        assert one["test_ids"] == two["test_ids"]
        for name in ("healnet", "healnet_single", "coxnet"):
            # one thread in a worker against the caller's threads: equal up to float rounding
            assert one["models"][name]["c_index"] == pytest.approx(two["models"][name]["c_index"], abs=1e-9)
    with pytest.raises(CVError, match="jobs"):
        cross_validate(data, config, jobs=0)


def test_cli_writes_json(table, tmp_path, capsys):
    out = tmp_path / "cv.json"
    code = main(
        ["cv", "--table", str(table), "--folds", "3", "--repeats", "1", "--members", "2", "--epochs", "3"]
        + [
            "--top-k",
            "20",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["patients"] == 120 and len(report["folds"]) == 3
    assert set(report["summary"]) == {
        "healnet",
        "healnet_single",
        "age",
        "coxnet",
        "coxnet_topk",
        "coxnet_mid",
        "rsf",
        "best_baseline",
    }
    assert report["config"]["healnet"]["members"] == 2 and report["config"]["healnet"]["name"] == "tcga"
    printed = capsys.readouterr().out
    assert "Age alone" in printed and "best baseline by mean Harrell C" in printed and str(out) in printed
    assert printed.count("\n") >= 8 and format_table(report) in printed


def multimodal_data(n: int = 100, seed: int = 0) -> CohortData:
    """Omics carry one risk factor and patch bags another, as in `healnet synth`."""
    rng = np.random.default_rng(seed)
    index = pd.Index([f"TCGA-CD-{i:04d}" for i in range(n)], name="patient_id")
    z_omic, z_wsi = rng.normal(size=n), rng.normal(size=n)
    event_time = rng.exponential(30 * np.exp(-1.5 * (z_omic + z_wsi)))
    censor_time = rng.uniform(20, 150, n)
    clinical = pd.DataFrame(
        {
            "survival_months": np.maximum(np.minimum(event_time, censor_time), 0.1),
            "event": (event_time <= censor_time).astype(int),
        },
        index=index,
    )
    rna = rng.normal(size=(n, 12))
    rna[:, :3] += 1.5 * z_omic[:, None]
    bags = {}
    for i, pid in enumerate(index):
        bag = rng.normal(size=(int(rng.integers(4, 10)), 5)).astype(np.float32)
        bag[:, 0] += 1.5 * z_wsi[i]
        bags[pid] = bag
    omics = {"rnaseq": pd.DataFrame(rna, index=index, columns=[f"G{i}_rnaseq" for i in range(12)])}
    return CohortData(clinical, omics, bags), pd.DataFrame({"z_omic": z_omic, "z_wsi": z_wsi}, index=index)


def test_modalities_can_be_removed_for_serving_or_for_some_training_patients():
    data, _ = multimodal_data()
    assert without(data, "wsi").wsi_bags == {} and without(data, "wsi").omics is data.omics
    assert without(data, "omic").omics == {} and without(data, "omic").wsi_bags is data.wsi_bags
    pool = list(data.clinical.index[:60])
    missing = with_missing(data, pool, 0.3, seed=1)
    no_omics = set(pool) - set(missing.omics["rnaseq"].index)
    no_wsi = set(pool) - set(missing.wsi_bags)
    assert len(no_omics) + len(no_wsi) == 18 and not no_omics & no_wsi
    assert set(data.clinical.index[60:]) <= set(missing.wsi_bags) & set(missing.omics["rnaseq"].index)


def test_modality_dropout_keeps_one_modality_per_sample():
    generator = torch.Generator().manual_seed(0)
    present = {"omic": torch.ones(2000, dtype=torch.bool), "wsi": torch.arange(2000) % 2 == 0}
    kept = drop_modalities(present, 0.5, generator)
    assert (kept["omic"] | kept["wsi"]).all()
    assert not (kept["wsi"] & ~present["wsi"]).any()
    assert kept["omic"][1::2].all()  # the only modality of a sample is never dropped
    # a two-modality sample loses one with probability p(1 - p): when both are drawn, it keeps both
    assert 0.2 < 1 - kept["wsi"][::2].float().mean() < 0.3
    assert 0.2 < 1 - kept["omic"][::2].float().mean() < 0.3
    with pytest.raises(ValueError, match="modality_dropout"):
        TrainConfig(modality_dropout=1.0)


def test_requirement_compares_the_served_model_with_the_specialist_within_its_tolerance():
    means = {"omic": {"omic": 0.6}, "wsi": {"wsi": 0.7}, "both": {"both": 0.8, "omic": 0.595, "wsi": 0.68}}
    checks = requirement(means)
    assert checks["without_wsi"]["gap"] == pytest.approx(0.005) and checks["without_wsi"]["holds"]
    assert (
        checks["without_omic"]["needed"] == pytest.approx(0.69) and checks["without_omic"]["holds"] is False
    )
    means["both"]["wsi"] = 0.691  # within the tolerance below the specialist
    assert requirement(means)["without_omic"]["holds"]


def test_ablation_scores_every_condition():
    data, truth = multimodal_data()
    recipe = replace(TINY, members=1, train=replace(TINY.train, epochs=6, patience=6, modality_dropout=0.3))
    report = run_ablation({"toy": data}, AblationConfig(folds=2, recipe=recipe), False, {"toy": truth})
    assert len(report["splits"]) == 2
    assert set(report["summary"]) == {"omic", "wsi", "both", "missing", "oracle"}
    assert set(report["summary"]["both"]) == {"both", "omic", "wsi"}
    assert report["summary"]["oracle"]["both"]["mean"] > 0.75
    assert all(0 <= s["mean"] <= 1 for row in report["summary"].values() for s in row.values())
    assert "true-factor bound" in format_ablation(report)


def test_cli_names_the_quarantined_rows_and_keeps_them_in_the_report(table, tmp_path, capsys):
    damaged = tmp_path / "tcga_damaged_all_clean.csv.gz"
    rows = pd.read_csv(table, index_col=0).reset_index(drop=True)  # a second slide repeats its first's label
    rows.loc[[1, 2], "survival_months"] = -1.0  # two patients with one slide each get an unusable time
    # the second slide row of a patient lacks the age its first holds
    gap_patient = rows.loc[rows["case_id"].duplicated(), "case_id"].iloc[0]
    gap_rows = rows.index[rows["case_id"] == gap_patient]
    rows.loc[gap_rows[-1], "age"] = np.nan
    rows.to_csv(damaged)
    out = tmp_path / "cv.json"
    code = main(["cv", "--table", str(damaged), "--models", "age", "--repeats", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["patients"] == 118
    assert [row["id"] for row in report["quarantine"]] == ["TCGA-AB-0001", "TCGA-AB-0002"]
    assert all("survival_months must be positive" in row["reason"] for row in report["quarantine"])
    stderr = capsys.readouterr().err
    assert f"rows: {len(rows)} read, {len(rows) - 2} kept, 2 quarantined" in stderr
    assert "TCGA-AB-0001" in stderr and "survival_months must be positive" in stderr
    note = f"{damaged.name}: patient {gap_patient}: age missing on 1 of {len(gap_rows)} rows, taken from the others"
    assert report["filled"] == [note]
    assert f"values taken from a patient's other rows: 1 patient(s)\n  {note}" in stderr


def test_coxnet_at_the_middle_of_its_path_tunes_nothing():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6))
    times = rng.exponential(30 * np.exp(-x[:, 0]))
    events = (rng.random(60) < 0.7).astype(int)
    fit = fit_coxnet(x, times, events, CoxNetConfig(n_alphas=9, penalty="path_middle"))
    assert fit.alpha == fit.alphas[4] and np.isnan(fit.inner_c_index).all()
    with pytest.raises(BaselineError, match="penalty"):
        CoxNetConfig(penalty="best_on_test")


def report_with(differences: list[float], baseline: str = "age") -> dict:
    folds = [
        {"models": {"healnet": {"c_index": 0.6 + d}, baseline: {"c_index": 0.6}, "rsf": {"c_index": 0.5}}}
        for d in differences
    ]
    return {"summary": summarize(folds)}


def test_pooling_averages_each_cohorts_paired_difference_to_its_best_baseline():
    first, second = report_with([0.02, 0.04, 0.0]), report_with([-0.01, 0.01, -0.03], baseline="coxnet")
    pooled = pool_cohorts({"a": first, "b": second})
    assert pooled["cohorts"]["b"]["best_baseline"] == "coxnet"
    assert pooled["best_baseline"]["mean"] == pytest.approx((0.02 - 0.01) / 2)
    errors = [
        r["summary"]["healnet"][f"c_index_minus_{b}"]["standard_error"]
        for r, b in ((first, "age"), (second, "coxnet"))
    ]
    assert pooled["best_baseline"]["standard_error"] == pytest.approx(np.hypot(*errors) / 2)
    assert pooled["best_baseline"]["cohorts_higher"] == 1
    assert set(pooled["baselines"]) == {"rsf"}  # the one baseline both cohorts have
    with pytest.raises(CVError, match="at least 2"):
        pool_cohorts({"a": first})


def test_cli_runs_a_protocol_on_several_cohorts_and_pools_them(table, tmp_path, capsys):
    other = tmp_path / "tcga_other_all_clean.csv.gz"
    write_porpoise_table(other, seed=1)
    out = tmp_path / "pooled.json"
    args = ["cv", "--table", str(table), "--table", str(other), "--protocol", "heldout"]
    tiny = ["--models", "healnet,age", "--members", "2", "--epochs", "2", "--top-k", "10", "--no-progress"]
    assert main(args + tiny + ["--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["protocol"] == "heldout" and len(report["cohorts"]) == 2
    for cohort in report["cohorts"].values():
        assert (
            len(cohort["folds"]) == 5 and cohort["config"]["repeats"] == 1 and cohort["protocol"] == "heldout"
        )
    printed = capsys.readouterr().out
    assert "pooled over 2 cohorts" in printed and format_pooled(report["pooled"]) in printed

    singles = []
    for name, cohort in report["cohorts"].items():
        singles.append(tmp_path / f"{name}.json")
        singles[-1].write_text(json.dumps(cohort))
    assert main(["cv", "--pool", *map(str, singles)]) == 0
    assert format_pooled(report["pooled"]) in capsys.readouterr().out


def test_a_protocol_refuses_flags_that_would_change_it(table, capsys):
    assert main(["cv", "--table", str(table), "--protocol", "predeclared", "--repeats", "1"]) == 2
    error = capsys.readouterr().err
    assert "fixes the folds, repeats and seed; leave out --repeats 1" in error and "Traceback" not in error
    assert main(["cv", "--pool", str(table)]) == 2
    assert "cannot read the report" in capsys.readouterr().err
