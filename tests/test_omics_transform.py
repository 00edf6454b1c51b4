import json

import numpy as np
import pandas as pd
import pytest

from healnet.preprocess.omics import OmicsConfig, OmicsTransform, OmicsTransformError

MODALITIES = ("mut", "cnv", "rnaseq")


def make_frames(n_patients: int = 30, n_genes: int = 6, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Small TCGA-like frames: binary mutations, integer CNV, raw-RSEM-like expression."""
    rng = np.random.default_rng(seed)
    ids = [f"TCGA-AA-{i:04d}" for i in range(n_patients)]
    genes = [f"G{i}" for i in range(n_genes)]
    draws = {
        "mut": rng.integers(0, 2, (n_patients, n_genes)),
        "cnv": rng.integers(-2, 3, (n_patients, n_genes)),
        "rnaseq": rng.gamma(2.0, 400.0, (n_patients, n_genes)),
    }
    return {
        m: pd.DataFrame(draws[m].astype(np.float32), index=ids, columns=[f"{g}_{m}" for g in genes])
        for m in MODALITIES
    }


def rows(frames: dict[str, pd.DataFrame], ids) -> dict[str, pd.DataFrame]:
    return {m: f.loc[f.index.isin(ids)] for m, f in frames.items()}


def assert_tokens_equal(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name].values, b[name].values)
        np.testing.assert_array_equal(a[name].present, b[name].present)
        np.testing.assert_array_equal(a[name].imputed_fraction, b[name].imputed_fraction)


def test_fit_uses_training_rows_only():
    frames = make_frames()
    ids = list(frames["mut"].index)
    train, test = ids[:20], ids[20:]
    transform = OmicsTransform.fit(rows(frames, train))

    changed = {m: f.copy() for m, f in frames.items()}
    for frame in changed.values():
        frame.loc[test] = frame.loc[test] * 7 + 3
    refit = OmicsTransform.fit(rows(changed, train))

    assert json.dumps(refit.state_dict()) == json.dumps(transform.state_dict())
    assert_tokens_equal(transform.transform(frames, train), refit.transform(changed, train))
    # the training statistics are the training rows', so the train tokens are z-scored exactly
    train_tokens = transform.transform(frames, train)["cnv"].values[:, 0, :]
    np.testing.assert_allclose(train_tokens.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(train_tokens.std(0), 1, atol=1e-4)
    # the same fit applied to shifted test rows gives different (not re-standardised) tokens
    assert not np.allclose(
        transform.transform(frames, test)["cnv"].values, transform.transform(changed, test)["cnv"].values
    )


def test_state_json_round_trip_is_bit_exact():
    frames = make_frames()
    frames["rnaseq"].iloc[3, 2] = np.nan
    transform = OmicsTransform.fit(frames, OmicsConfig(top_k=4, tokens="groups:3", combine=True))
    restored = OmicsTransform.from_state_dict(json.loads(json.dumps(transform.state_dict())))
    ids = list(frames["mut"].index) + ["TCGA-ZZ-0000"]
    assert restored.feature_names == transform.feature_names
    assert restored.config == transform.config
    assert_tokens_equal(transform.transform(frames, ids), restored.transform(frames, ids))


def test_transform_records_matches_transform_and_reports_unknown_names():
    frames = make_frames()
    frames["cnv"].iloc[5, 0] = np.nan
    transform = OmicsTransform.fit(frames)
    patient = frames["mut"].index[5]
    records = {
        m: {k: (None if pd.isna(v) else float(v)) for k, v in f.loc[patient].items()}
        for m, f in frames.items()
    }
    records["mut"]["NOT_A_GENE_mut"] = 1.0
    records["proteomics"] = {"P53_prot": 2.0}

    tokens, unknown = transform.transform_records([records])

    assert unknown == [["NOT_A_GENE_mut", "P53_prot"]]
    assert_tokens_equal(tokens, transform.transform(frames, [patient]))
    assert tokens["cnv"].imputed_fraction[0] == pytest.approx(1 / 6)


def test_transform_records_of_several_cases_match_transform_row_by_row():
    frames = make_frames()
    frames["rnaseq"].iloc[3, 1] = np.nan
    transform = OmicsTransform.fit(frames)
    patients = list(frames["mut"].index[[1, 3, 7]])
    cases = [
        {m: {k: (None if pd.isna(v) else float(v)) for k, v in f.loc[p].items()} for m, f in frames.items()}
        for p in patients
    ]
    del cases[2]["cnv"]  # the third case has no CNV table: absent, not imputed
    cases[0]["mut"]["NOT_A_GENE_mut"] = 1.0
    frames_without_cnv = {**frames, "cnv": frames["cnv"].drop(index=patients[2])}

    tokens, unknown = transform.transform_records(cases)

    assert unknown == [["NOT_A_GENE_mut"], [], []]
    assert_tokens_equal(tokens, transform.transform(frames_without_cnv, patients))
    assert tokens["cnv"].present.tolist() == [True, True, False]


def test_transform_records_rejects_infinite_values():
    transform = OmicsTransform.fit(make_frames())
    with pytest.raises(OmicsTransformError, match="'G0_mut' is infinite"):
        transform.transform_records([{"mut": {"G0_mut": float("inf")}}])


def test_same_feature_name_in_two_tables_goes_to_the_table_it_is_given_under():
    frames = make_frames(n_genes=3)
    frames["cnv"].columns = frames["mut"].columns  # e.g. a gene symbol used by both tables
    transform = OmicsTransform.fit(frames)
    patient = frames["mut"].index[4]
    cases = [{m: {k: float(v) for k, v in frames[m].loc[patient].items()} for m in ("mut", "cnv")}]
    tokens, unknown = transform.transform_records(cases)
    assert unknown == [[]]
    expected = transform.transform({m: frames[m] for m in ("mut", "cnv")}, [patient])
    for name in ("mut", "cnv"):
        np.testing.assert_array_equal(tokens[name].values, expected[name].values)


def test_transform_records_accepts_the_combined_name():
    frames = make_frames()
    transform = OmicsTransform.fit(frames, OmicsConfig(combine=True))
    patient = frames["mut"].index[2]
    flat = {k: float(v) for f in frames.values() for k, v in f.loc[patient].items()}
    tokens, unknown = transform.transform_records([{"omic": flat}])
    assert unknown == [[]]
    assert_tokens_equal(tokens, transform.transform(frames, [patient]))
    with pytest.raises(OmicsTransformError, match="G0_mut"):
        transform.transform_records([{"omic": {"G0_mut": "high"}}])


def test_combined_modality_is_present_when_any_input_is():
    frames = make_frames(n_genes=4)
    transform = OmicsTransform.fit(frames, OmicsConfig(combine=True))
    only_mut = {"mut": frames["mut"].iloc[:1]}
    tokens = transform.transform(only_mut, ["TCGA-AA-0000", "TCGA-AA-0001"])["omic"]
    assert tokens.present.tolist() == [True, False]
    assert tokens.imputed.tolist() == [8, 0]
    assert tokens.imputed_fraction.tolist() == [8 / 12, 0.0]
    np.testing.assert_array_equal(tokens.values[1], 0.0)


def test_imputed_fraction_counts_missing_and_absent_features():
    frames = make_frames(n_genes=4)
    ids = list(frames["mut"].index)
    frames["rnaseq"].iloc[0, [0, 2]] = np.nan
    transform = OmicsTransform.fit(frames)
    partial = {**frames, "cnv": frames["cnv"].drop(columns=["G1_cnv"])}
    tokens = transform.transform(partial, ids[:2])
    assert tokens["rnaseq"].imputed.tolist() == [2, 0]
    assert tokens["rnaseq"].imputed_fraction.tolist() == [0.5, 0.0]
    assert tokens["cnv"].imputed.tolist() == [1, 1]
    assert tokens["cnv"].imputed_fraction.tolist() == [0.25, 0.25]
    assert tokens["mut"].imputed_fraction.tolist() == [0.0, 0.0]
    # an imputed value is the training median, transformed like any other value
    state = transform.state_dict()["modalities"]["rnaseq"]
    expected = (np.log1p(state["median"][0]) - state["mean"][0]) / state["std"][0]
    assert tokens["rnaseq"].values[0, 0, 0] == pytest.approx(expected, rel=1e-6)


def test_log1p_auto_detects_raw_counts_only():
    frames = make_frames()
    auto = OmicsTransform.fit(frames).state_dict()["modalities"]
    assert {m: auto[m]["log1p"] for m in MODALITIES} == {"mut": False, "cnv": False, "rnaseq": True}
    small = {"rnaseq": frames["rnaseq"] / 100.0}  # non-negative but max < 100: already normalised
    assert OmicsTransform.fit(small).state_dict()["modalities"]["rnaseq"]["log1p"] is False
    never = OmicsTransform.fit(frames, OmicsConfig(log1p="never")).state_dict()["modalities"]
    assert not any(never[m]["log1p"] for m in MODALITIES)
    always = OmicsTransform.fit(frames, OmicsConfig(log1p="always")).state_dict()["modalities"]["rnaseq"]
    np.testing.assert_allclose(always["mean"], np.log1p(frames["rnaseq"].to_numpy(np.float64)).mean(0))


@pytest.mark.parametrize(
    ("tokens", "combine", "expected"),
    [
        ("single", False, {"mut": (1, 6), "cnv": (1, 6), "rnaseq": (1, 6)}),
        ("features", False, {"mut": (6, 1), "cnv": (6, 1), "rnaseq": (6, 1)}),
        ("groups:4", False, {"mut": (2, 4), "cnv": (2, 4), "rnaseq": (2, 4)}),
        ("single", True, {"omic": (1, 18)}),
        ("groups:4", True, {"omic": (5, 4)}),
    ],
)
def test_token_modes_shapes(tokens, combine, expected):
    frames = make_frames()
    transform = OmicsTransform.fit(frames, OmicsConfig(tokens=tokens, combine=combine))
    assert transform.output_modalities == list(expected)
    out = transform.transform(frames, list(frames["mut"].index[:3]))
    for name, shape in expected.items():
        assert transform.token_shape(name) == shape
        assert out[name].values.shape == (3, *shape)
        assert out[name].values.dtype == np.float32


def test_groups_are_zero_padded_in_feature_order():
    frames = {"mut": make_frames()["mut"]}
    single = OmicsTransform.fit(frames).transform(frames, ["TCGA-AA-0001"])["mut"].values.reshape(-1)
    grouped = OmicsTransform.fit(frames, OmicsConfig(tokens="groups:4")).transform(frames, ["TCGA-AA-0001"])
    flat = grouped["mut"].values.reshape(-1)
    np.testing.assert_array_equal(flat[:6], single)
    np.testing.assert_array_equal(flat[6:], 0.0)


def test_absent_modality_is_not_present_and_zero():
    frames = make_frames()
    transform = OmicsTransform.fit(frames)
    only_mut = {"mut": frames["mut"], "cnv": frames["cnv"].iloc[:5]}
    ids = list(frames["mut"].index[3:8])
    tokens = transform.transform(only_mut, ids)
    assert tokens["mut"].present.all()
    assert tokens["cnv"].present.tolist() == [True, True, False, False, False]
    np.testing.assert_array_equal(tokens["cnv"].values[2:], 0.0)
    assert tokens["cnv"].imputed_fraction[2:].tolist() == [0.0, 0.0, 0.0]
    assert not tokens["rnaseq"].present.any()
    np.testing.assert_array_equal(tokens["rnaseq"].values, 0.0)
    record_tokens, _ = transform.transform_records([{"mut": {"G0_mut": 1.0}}])
    assert not record_tokens["cnv"].present[0]
    np.testing.assert_array_equal(record_tokens["cnv"].values, 0.0)


def test_variance_filter_and_top_k_use_training_variance():
    frames = make_frames()
    frames["mut"]["CONST_mut"] = np.float32(1.0)
    transform = OmicsTransform.fit(frames, OmicsConfig(top_k=3))
    assert "CONST_mut" not in transform.feature_names["mut"]
    std = frames["rnaseq"].apply(np.log1p).std(ddof=0)
    expected = [c for c in frames["rnaseq"].columns if c in set(std.nlargest(3).index)]
    assert transform.feature_names["rnaseq"] == expected


def test_bad_input_raises_clear_errors():
    frames = make_frames()
    with pytest.raises(OmicsTransformError, match="tokens"):
        OmicsConfig(tokens="groups:0")
    infinite = {**frames, "cnv": frames["cnv"].copy()}
    infinite["cnv"].iloc[1, 2] = np.inf
    with pytest.raises(OmicsTransformError, match=r"G2_cnv.*TCGA-AA-0001"):
        OmicsTransform.fit(infinite)
    constant = {"mut": frames["mut"] * 0}
    with pytest.raises(OmicsTransformError, match="no feature left"):
        OmicsTransform.fit(constant)
    repeated = {"mut": pd.concat([frames["mut"], frames["mut"].iloc[:1]])}
    with pytest.raises(OmicsTransformError, match=r"duplicated patient ids \['TCGA-AA-0000'\]"):
        OmicsTransform.fit(repeated)
    transform = OmicsTransform.fit(frames)
    with pytest.raises(OmicsTransformError, match="unknown omics modality"):
        transform.token_shape("omic")


def test_real_blca_table_smoke(blca_table):
    table = pd.read_csv(blca_table, compression="gzip").drop_duplicates("case_id").set_index("case_id")
    frames = {m: table.filter(regex=f"_{m}$").astype(np.float32) for m in MODALITIES}
    ids = list(table.index)
    transform = OmicsTransform.fit(rows(frames, ids[:300]), OmicsConfig(top_k=256, tokens="groups:64"))
    tokens = transform.transform(frames, ids[300:])
    assert transform.output_modalities == list(MODALITIES)
    for name in MODALITIES:
        assert 0 < len(transform.feature_names[name]) <= 256
        assert np.isfinite(tokens[name].values).all()
        assert tokens[name].present.all()
    assert tokens["rnaseq"].values.shape[1:] == (4, 64)
    restored = OmicsTransform.from_state_dict(json.loads(json.dumps(transform.state_dict())))
    assert_tokens_equal(tokens, restored.transform(frames, ids[300:]))


def heavy_tailed_frames() -> dict[str, pd.DataFrame]:
    """rnaseq as PORPOISE-like z-scores (signed, a few extreme values, one missing), mut as is."""
    frames = make_frames()
    rna = frames["rnaseq"] / 400.0 - 2.0
    rna.iloc[[1, 7], 0] = [14000.0, -5000.0]
    rna.iloc[4, 3] = np.nan
    return {"mut": frames["mut"], "rnaseq": rna}


def test_signed_log_is_fitted_and_applied_per_named_modality():
    frames = heavy_tailed_frames()
    transform = OmicsTransform.fit(frames, OmicsConfig(signed_log=("rnaseq", "not_in_this_cohort")))
    state = transform.state_dict()["modalities"]
    assert state["rnaseq"]["signed_log"] is True and state["mut"]["signed_log"] is False
    raw = frames["rnaseq"].to_numpy(np.float64)
    logged = np.sign(raw) * np.log1p(np.abs(raw))
    np.testing.assert_allclose(state["rnaseq"]["median"], np.nanmedian(logged, axis=0))
    imputed = np.where(np.isnan(logged), np.nanmedian(logged, axis=0), logged)
    np.testing.assert_allclose(state["rnaseq"]["mean"], imputed.mean(0))
    ids = list(frames["mut"].index)
    tokens = transform.transform(frames, ids)["rnaseq"].values[:, 0, :]
    np.testing.assert_allclose(tokens, (imputed - imputed.mean(0)) / imputed.std(0), rtol=1e-5, atol=1e-6)
    plain = OmicsTransform.fit(frames).transform(frames, ids)
    np.testing.assert_array_equal(plain["mut"].values, transform.transform(frames, ids)["mut"].values)
    with pytest.raises(OmicsTransformError, match="signed_log"):
        OmicsConfig(signed_log="rnaseq")
    with pytest.raises(OmicsTransformError, match="pick one"):
        OmicsConfig(signed_log=("rnaseq",), log1p="always")


def test_signed_log_survives_the_state_and_reaches_records():
    frames = heavy_tailed_frames()
    transform = OmicsTransform.fit(frames, OmicsConfig(top_k=4, signed_log=("rnaseq",)))
    restored = OmicsTransform.from_state_dict(json.loads(json.dumps(transform.state_dict())))
    assert restored.config == transform.config and restored.config.signed_log == ("rnaseq",)
    ids = list(frames["mut"].index)
    assert_tokens_equal(transform.transform(frames, ids), restored.transform(frames, ids))
    for patient in (ids[1], ids[4], ids[7]):  # an extreme value, a missing value, the other extreme
        records = {
            m: {k: (None if pd.isna(v) else float(v)) for k, v in f.loc[patient].items()}
            for m, f in frames.items()
        }
        tokens, _ = restored.transform_records([records])
        assert_tokens_equal(tokens, transform.transform(frames, [patient]))


def test_version_1_states_load_without_signed_log_and_select():
    frames = make_frames()
    transform = OmicsTransform.fit(frames, OmicsConfig(top_k=4))
    state = json.loads(json.dumps(transform.state_dict()))
    state["format_version"] = 1
    del state["config"]["signed_log"], state["config"]["select"]
    for modality in state["modalities"].values():
        del modality["signed_log"]
    old = OmicsTransform.from_state_dict(state)
    assert old.config.signed_log == () and old.config.select == "variance"
    ids = list(frames["mut"].index)
    assert_tokens_equal(old.transform(frames, ids), transform.transform(frames, ids))
    state["format_version"] = 4
    with pytest.raises(OmicsTransformError, match="format 4"):
        OmicsTransform.from_state_dict(state)
