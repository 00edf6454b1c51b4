"""The BentoML service class called in-process: predictions, validation, metrics and start-up behaviour."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from pydantic import ValidationError

from devtools.demo import DemoSpec, demo_feature_names, demo_payload, demo_tiles
from healnet.checkpoint import CheckpointError
from healnet.files import sha256_file
from healnet.inference import Case, Predictor
from healnet.preprocess.encoders import StatsEncoder, encode_tiles, make_encoder
from serving.config import ConfigError, Limits
from serving.runtime import champion_poll_seconds, resolve_served_model, tile_encoder
from serving.schemas import PredictRequest, PredictResponse
from serving.service import HEALNetService, padded_patches
from serving.validation import ModelContract, RejectedRequest, decode_tile, open_tile, to_case

pytest_plugins = ("serving_fixtures",)
SPEC = DemoSpec()  # the demo model of the fixtures
LIMIT_ENV = {
    "HEALNET_MAX_PATCHES": "16",
    "HEALNET_MAX_TILES": "2",
    "HEALNET_MAX_TILE_PIXELS": str(100 * 100),
    "HEALNET_MAX_BATCH_CASES": "4",
    "HEALNET_MAX_MISSING_FEATURE_FRACTION": "0.5",
}


@pytest.fixture(scope="module")
def service(demo_registry, poll):
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in LIMIT_ENV.items():
            patch.setenv(key, value)
        service = HEALNetService()
    assert poll(service.__is_ready__, 60), service.load_error
    return service


@pytest.fixture(scope="module")
def reference(demo_registry) -> Predictor:
    """The same checkpoint loaded directly with healnet, to compare the service against."""
    return Predictor.from_dir(demo_registry.checkpoint)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def rejection(response) -> tuple[int, str, str]:
    """Status, reason and message of an error response; rejections (4xx) name their reason in a header."""
    body = json.loads(response.body)
    if response.status_code < 500:
        assert response.headers["x-healnet-rejection"] == body["reason"]
    return response.status_code, body["reason"], body["error"]


def test_the_service_answers_503_until_the_model_is_loaded(demo_registry, poll):
    service = HEALNetService()
    assert not service.__is_ready__()
    status, reason, error = rejection(asyncio.run(service.predict(PredictRequest(**demo_payload(SPEC)))))
    assert (status, reason) == (503, "not_ready") and "loading" in error
    assert poll(service.__is_ready__, 60)
    assert isinstance(asyncio.run(service.predict(PredictRequest(**demo_payload(SPEC)))), PredictResponse)
    assert service.__is_alive__()


@pytest.mark.parametrize("modalities", [("omic", "wsi"), ("omic",), ("wsi",)])
def test_prediction_for_each_modality_pattern_matches_healnet(service, reference, demo_registry, modalities):
    payload = demo_payload(SPEC, modalities, patches=6, seed=1)
    answer = asyncio.run(service.predict(PredictRequest(**payload)))
    bag = np.asarray(payload["wsi_features"], np.float32) if "wsi" in modalities else None
    expected = reference.predict([Case(payload.get("omics", {}), bag)])[0]

    assert answer.modalities_used == list(modalities)
    assert answer.modalities_missing == [m for m in ("omic", "wsi") if m not in modalities]
    assert answer.risk == pytest.approx(expected.risk, abs=1e-5)
    assert answer.survival == pytest.approx(expected.survival, abs=1e-5)
    assert answer.risk == pytest.approx(-sum(answer.survival), abs=1e-5)
    assert len(answer.bin_edges_months) == len(answer.survival) + 1 and answer.bin_edges_months[-1] is None
    assert answer.model_version == demo_registry.tag
    assert answer.imputed_features == 0 and answer.unknown_features == [] and answer.attention is None


def test_partial_omics_report_imputed_and_unknown_features(service):
    names = demo_feature_names(SPEC)
    known = {name: 1.0 for name in names["mut"][:5]} | {names["mut"][5]: None}  # 2 of 8 left out
    given = {"mut": known | {"NOT_A_GENE": 2.0}, "proteome": {"P1": 0.5}}
    answer = asyncio.run(service.predict(PredictRequest(omics=given)))
    total = 3 * SPEC.features_per_table
    assert answer.unknown_features == ["NOT_A_GENE", "P1"]  # ignored, not a reason to refuse
    assert answer.imputed_features == total - 5  # null counts as missing
    assert answer.imputed_fraction == pytest.approx((total - 5) / total)
    without_unknown = asyncio.run(service.predict(PredictRequest(omics={"mut": known})))
    assert answer.risk == pytest.approx(without_unknown.risk, abs=1e-6)


def test_a_table_with_mostly_wrong_names_is_refused_naming_the_expected_ones(service):
    names = demo_feature_names(SPEC)["cnv"]
    wrong = {name.removesuffix("_cnv"): 1.0 for name in names} | {names[0]: 1.0}  # 7 of 8 absent
    status, reason, error = rejection(asyncio.run(service.predict(PredictRequest(omics={"cnv": wrong}))))
    assert (status, reason) == (422, "missing_features")
    assert "omics['cnv'] lacks 7 of the model's 8 cnv features (88%)" in error
    assert str(names[1:6]) in error and "'G1'" in error  # expected names, and the given ones it ignored
    # at the allowed share (half of the table's features absent) the case is answered
    half = {name: 1.0 for name in names[:4]}
    assert asyncio.run(service.predict(PredictRequest(omics={"cnv": half}))).imputed_features == 20


def test_attention_covers_every_patch_and_omic_token(service):
    payload = demo_payload(SPEC, patches=7) | {"return_attention": True}
    attention = asyncio.run(service.predict(PredictRequest(**payload))).attention
    assert len(attention["wsi"]) == 7 and sum(attention["wsi"]) == pytest.approx(1.0, abs=1e-4)
    assert len(attention["omic"]) == 1  # the demo model groups all omic features into one token


def test_tiles_give_the_same_answer_as_their_encoded_features(service):
    tiles = demo_tiles(2, size=48, seed=3)
    images = [decode_tile(i, open_tile(i, tile, 10**6), 224) for i, tile in enumerate(tiles)]
    features = encode_tiles(images, StatsEncoder(), patch_size=224)
    from_tiles = asyncio.run(service.predict(PredictRequest(wsi_tiles=tiles)))
    from_features = asyncio.run(service.predict(PredictRequest(wsi_features=features.tolist())))
    assert from_tiles.modalities_used == ["wsi"]
    assert from_tiles.risk == pytest.approx(from_features.risk, abs=1e-5)


def test_a_batch_predicts_each_case_as_alone(service):
    payloads = [
        demo_payload(SPEC, ("omic", "wsi"), 3, 4),
        demo_payload(SPEC, ("wsi",), 9, 5),
        demo_payload(SPEC, ("omic",)),
    ]
    batch = asyncio.run(service.predict_batch([PredictRequest(**p) for p in payloads]))
    alone = [asyncio.run(service.predict(PredictRequest(**p))) for p in payloads]
    assert [b.risk for b in batch] == pytest.approx([a.risk for a in alone], abs=1e-5)
    assert [b.modalities_used for b in batch] == [["omic", "wsi"], ["wsi"], ["omic"]]


def test_concurrent_requests_share_one_model_pass_and_get_their_own_answers(service):
    # bags of 1 and 2 patches: the merged pass pads them to 6 x 2, within HEALNET_MAX_PATCHES (16)
    payloads = [demo_payload(SPEC, ("omic", "wsi"), 1 + seed % 2, seed) for seed in range(5)]
    payloads.append(demo_payload(SPEC, ("omic",), seed=9))
    alone = [asyncio.run(service.predict(PredictRequest(**p))) for p in payloads]
    before = sample("healnet_batch_cases_count"), sample("healnet_batch_cases_sum")

    async def together():
        return await asyncio.gather(*(service.predict(PredictRequest(**p)) for p in payloads))

    merged = asyncio.run(together())
    assert [m.risk for m in merged] == pytest.approx([a.risk for a in alone], abs=1e-5)
    assert [m.modalities_used for m in merged] == [a.modalities_used for a in alone]
    # All six validated and queued before the first pass started: one pass of six cases.
    assert sample("healnet_batch_cases_count") - before[0] == 6
    assert sample("healnet_batch_cases_sum") - before[1] == 36


def _image(image_format: str, size: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 100, 150)).save(buffer, format=image_format)
    return base64.b64encode(buffer.getvalue()).decode()


def _wsi(rows: int, width: int = SPEC.wsi_dim, value: float = 0.5) -> list[list[float]]:
    return [[value] * width for _ in range(rows)]


def _binary(features: list[list[float]] | np.ndarray) -> str:
    return base64.b64encode(np.asarray(features, dtype="<f4").tobytes()).decode()


def test_binary_patch_features_give_the_same_answer_as_json_numbers(service):
    payload = demo_payload(SPEC, ("omic", "wsi"), 7, 11)
    as_numbers = asyncio.run(service.predict(PredictRequest(**payload)))
    binary = {"omics": payload["omics"], "wsi_features_base64": _binary(payload["wsi_features"])}
    as_binary = asyncio.run(service.predict(PredictRequest(**binary)))
    assert as_binary.risk == pytest.approx(as_numbers.risk, abs=1e-6)
    assert as_binary.modalities_used == ["omic", "wsi"]


GENE = demo_feature_names(SPEC)["mut"][0]
REJECTED = {
    "no modality": ({}, 422, "no_modality"),
    "short patch row": ({"wsi_features": [*_wsi(2), [0.5] * 3]}, 422, "wrong_dimensions"),
    "NaN omic value": ({"omics": {"mut": {GENE: float("nan")}}}, 422, "non_finite"),
    "infinite patch feature": ({"wsi_features": _wsi(2, value=float("inf"))}, 422, "non_finite"),
    "float32 overflow": ({"wsi_features": _wsi(1, value=1e39)}, 422, "non_finite"),
    "overflow in the model": ({"wsi_features": [[3e38, -3e38] * 15 + [3e38]] * 2}, 422, "non_finite"),
    "overflow in the omics transform": (
        {"omics": {"mut": dict.fromkeys(demo_feature_names(SPEC)["mut"], 1e300)}},
        422,
        "non_finite",
    ),
    "a table lacking most of the model's features": (
        {"omics": {"mut": {GENE: 1.0, "A": 1.0, "B": 1.0}}},
        422,
        "missing_features",
    ),
    "only a table the model lacks": ({"omics": {"proteome": {GENE: 1.0}}}, 422, "no_modality"),
    "only covariates the model lacks": ({"clinical": {"age": 61.0}}, 422, "no_modality"),
    "too many patches": ({"wsi_features": _wsi(17)}, 413, "too_large"),
    "too many tiles": ({"wsi_tiles": demo_tiles(3, size=8)}, 413, "too_large"),
    "tile too large": ({"wsi_tiles": [_image("PNG", 101)]}, 413, "too_large"),
    "not base64": ({"wsi_tiles": ["not base64!"]}, 422, "bad_image"),
    "not an image": ({"wsi_tiles": [base64.b64encode(b"plain text").decode()]}, 422, "bad_image"),
    "GIF tile": ({"wsi_tiles": [_image("GIF", 8)]}, 422, "bad_image"),
    "binary not base64": ({"wsi_features_base64": "not base64!"}, 400, "invalid_schema"),
    "binary partial patch": (
        {"wsi_features_base64": _binary(np.zeros(SPEC.wsi_dim + 1))},
        422,
        "wrong_dimensions",
    ),
    "binary NaN": ({"wsi_features_base64": _binary(_wsi(2, value=float("nan")))}, 422, "non_finite"),
    "binary too many patches": ({"wsi_features_base64": _binary(_wsi(17))}, 413, "too_large"),
}


@pytest.mark.parametrize("payload, status, reason", REJECTED.values(), ids=REJECTED.keys())
def test_bad_input_is_rejected_with_its_reason_and_counted(service, payload, status, reason):
    before = {r: sample("healnet_validation_errors_total", reason=r) for r in ("no_modality", reason)}
    requests_before = sum(sample("healnet_requests_total", pattern=p) for p in ("omic", "wsi", "omic+wsi"))
    answer = asyncio.run(service.predict(PredictRequest(**payload)))
    got_status, got_reason, error = rejection(answer)
    assert (got_status, got_reason) == (status, reason), error
    assert sample("healnet_validation_errors_total", reason=reason) == before[reason] + 1
    if reason != "no_modality":
        assert sample("healnet_validation_errors_total", reason="no_modality") == before["no_modality"]
    assert (
        sum(sample("healnet_requests_total", pattern=p) for p in ("omic", "wsi", "omic+wsi"))
        == requests_before
    )


def test_a_batch_is_rejected_as_a_whole_naming_the_bad_case(service):
    cases = [PredictRequest(**demo_payload(SPEC)), PredictRequest(wsi_features=_wsi(1, width=3))]
    status, reason, error = rejection(asyncio.run(service.predict_batch(cases)))
    assert (status, reason) == (422, "wrong_dimensions") and error.startswith("cases[1]:")
    status, reason, _ = rejection(
        asyncio.run(service.predict_batch([PredictRequest(**demo_payload(SPEC))] * 5))
    )
    assert (status, reason) == (413, "too_large")
    assert rejection(asyncio.run(service.predict_batch([])))[:2] == (422, "no_modality")


def test_the_schema_refuses_wrong_types_and_ambiguous_slides():
    with pytest.raises(ValidationError, match="float_type"):
        PredictRequest.model_validate_json('{"omics": {"mut": {"G0_mut": "1.5"}}}')
    with pytest.raises(ValidationError, match="give the slide once"):
        PredictRequest(wsi_features=_wsi(1), wsi_tiles=demo_tiles(1))
    with pytest.raises(ValidationError, match="give the slide once"):
        PredictRequest(wsi_features=_wsi(1), wsi_features_base64=_binary(_wsi(1)))
    with pytest.raises(ValidationError, match="have no feature"):
        PredictRequest(omics={"mut": {}})
    with pytest.raises(ValidationError, match="extra_forbidden"):
        PredictRequest.model_validate({"omic": {}})


def test_metrics_follow_the_predictions(service, demo_registry):
    def snapshot():
        return {
            "omic+wsi": sample("healnet_requests_total", pattern="omic+wsi"),
            "wsi": sample("healnet_requests_total", pattern="wsi"),
            "missing omic": sample("healnet_missing_modality_total", modality="omic"),
            "missing wsi": sample("healnet_missing_modality_total", modality="wsi"),
            "imputed": sample("healnet_imputed_feature_fraction_count"),
            "risk": sample("healnet_risk_score_count"),
            "forward": sample("healnet_inference_duration_seconds_count", stage="forward"),
            "preprocess": sample("healnet_inference_duration_seconds_count", stage="preprocess"),
        }

    before = snapshot()
    asyncio.run(service.predict(PredictRequest(**demo_payload(SPEC))))
    asyncio.run(service.predict_batch([PredictRequest(**demo_payload(SPEC, ("wsi",)))] * 2))
    after = snapshot()
    delta = {key: after[key] - before[key] for key in before}
    expected = {"omic+wsi": 1, "wsi": 2, "missing omic": 2, "missing wsi": 0, "imputed": 1, "risk": 3}
    assert delta == expected | {"forward": 2, "preprocess": 2}  # one observation per request
    version = demo_registry.tag.partition(":")[2]
    assert sample("healnet_model_info", version=version, tag=demo_registry.tag) == 1
    manifest = json.loads((demo_registry.checkpoint / "checkpoint.json").read_text())
    for quantile, value in manifest["metadata"]["reference_risk_quantiles"].items():
        assert sample("healnet_reference_risk_score", training_quantile=quantile) == pytest.approx(value)


def test_an_empty_model_tag_counts_as_unset(demo_registry, demo_checkpoint, monkeypatch):
    """k8s/base passes HEALNET_MODEL_TAG="" from its ConfigMap: the packed model, else the champion, is served."""
    from healnet.registry import register_model

    packed = register_model(demo_checkpoint, labels={"source": "tests"}, metadata={})
    monkeypatch.setenv("HEALNET_MODEL_TAG", "")
    assert resolve_served_model(packed)[0] == packed
    assert resolve_served_model(None)[0] == demo_registry.tag
    monkeypatch.setenv("HEALNET_MODEL_TAG", demo_registry.tag)
    assert resolve_served_model(packed)[0] == demo_registry.tag


def test_a_corrupted_model_stops_the_worker(demo_registry, demo_checkpoint, tmp_path, monkeypatch):
    from healnet.registry import checkpoint_path, register_model

    tag = register_model(demo_checkpoint, labels={"source": "tests"}, metadata={})
    weights = checkpoint_path(tag) / "model.pt"
    weights.write_bytes(weights.read_bytes() + b"tampered")
    monkeypatch.setenv("HEALNET_MODEL_TAG", tag)
    with pytest.raises(CheckpointError, match="sha256"):
        HEALNetService()


def test_a_model_that_fails_to_load_marks_the_worker_dead(
    demo_registry, demo_checkpoint, tmp_path, monkeypatch, poll
):
    """Weights that match their sha256 but cannot be used: the worker stays up, /livez reports it dead."""
    from healnet.registry import register_model

    broken = tmp_path / "broken"
    broken.mkdir()
    payload = torch.load(demo_checkpoint / "model.pt", weights_only=True)
    torch.save(payload | {"format_version": 99}, broken / "model.pt")
    manifest = json.loads((demo_checkpoint / "checkpoint.json").read_text())
    (broken / "checkpoint.json").write_text(
        json.dumps(manifest | {"sha256": sha256_file(broken / "model.pt")})
    )
    monkeypatch.setenv("HEALNET_MODEL_TAG", register_model(broken, labels={}, metadata={}))

    service = HEALNetService()
    assert poll(lambda: not service.__is_alive__(), 60)
    assert not service.__is_ready__()
    status, reason, error = rejection(asyncio.run(service.predict(PredictRequest(**demo_payload(SPEC)))))
    assert (status, reason) == (503, "not_ready") and "unsupported checkpoint format" in error


def test_following_the_champion_is_set_by_the_environment(demo_registry, monkeypatch):
    monkeypatch.delenv("HEALNET_MODEL_TAG", raising=False)
    monkeypatch.delenv("HEALNET_FOLLOW_CHAMPION_S", raising=False)
    assert champion_poll_seconds() is None
    monkeypatch.setenv("HEALNET_FOLLOW_CHAMPION_S", "0.5")
    assert champion_poll_seconds() == 0.5
    # following serves the registry's champion, even from an image with a packed model
    assert resolve_served_model("healnet:packed")[0] == demo_registry.tag
    monkeypatch.setenv("HEALNET_MODEL_TAG", demo_registry.tag)  # a pinned version is never followed away
    assert champion_poll_seconds() is None
    monkeypatch.setenv("HEALNET_FOLLOW_CHAMPION_S", "soon")
    with pytest.raises(ConfigError, match="HEALNET_FOLLOW_CHAMPION_S"):
        champion_poll_seconds()


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("HEALNET_MAX_PATCHES", "12")
    monkeypatch.setenv("HEALNET_MAX_MISSING_FEATURE_FRACTION", "0.2")
    assert Limits.from_env() == Limits(max_patches=12, max_missing_feature_fraction=0.2)
    monkeypatch.setenv("HEALNET_MAX_TILES", "many")
    with pytest.raises(ConfigError, match="HEALNET_MAX_TILES='many' is not a valid int"):
        Limits.from_env()
    monkeypatch.setenv("HEALNET_MAX_TILES", "2")
    monkeypatch.setenv("HEALNET_MAX_MISSING_FEATURE_FRACTION", "1.5")
    with pytest.raises(ConfigError, match="HEALNET_MAX_MISSING_FEATURE_FRACTION"):
        Limits.from_env()
    # the variable of the former unknown-feature guard is refused, pointing at what replaced it
    monkeypatch.setenv("HEALNET_MAX_MISSING_FEATURE_FRACTION", "0.2")
    monkeypatch.setenv("HEALNET_MAX_UNKNOWN_FEATURE_FRACTION", "0.5")
    with pytest.raises(ConfigError, match="no longer read.*HEALNET_MAX_MISSING_FEATURE_FRACTION"):
        Limits.from_env()


def test_a_merged_pass_is_sized_by_its_longest_bag():
    bags = [np.zeros((3, 2), np.float32), None, np.zeros((5, 2), np.float32)]
    assert padded_patches([Case(wsi_features=bag) for bag in bags]) == 15
    assert padded_patches([Case(omics={"mut": {GENE: 1.0}})]) == 0


def test_tiles_are_encoded_only_with_the_encoder_the_model_was_trained_with(
    demo_registry, tmp_path, monkeypatch
):
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Conv2d(3, SPEC.wsi_dim, 16, stride=16), torch.nn.AdaptiveAvgPool2d(1)
    )
    weights = tmp_path / "trained-with.pt"
    torch.jit.script(network.eval()).save(str(weights))
    # TorchScript loads only once the operator has trusted its sha256 (a .pt2 export needs no such step)
    monkeypatch.setenv("HEALNET_TRUSTED_ENCODERS", sha256_file(weights))
    predictor = Predictor.from_dir(demo_registry.checkpoint)
    predictor.preprocessor.wsi_encoder = make_encoder(str(weights), device="cpu").provenance
    request = PredictRequest(wsi_tiles=demo_tiles(2, size=32))

    monkeypatch.setenv("HEALNET_ENCODER_DIR", str(tmp_path / "elsewhere"))
    encoder, reason = tile_encoder(predictor, "cpu")
    assert encoder is None and sha256_file(weights) in reason and "HEALNET_ENCODER_DIR" in reason
    with pytest.raises(RejectedRequest) as refusal:
        to_case(request, ModelContract.from_predictor(predictor, encoder, reason), Limits.from_env())
    assert refusal.value.reason == "no_encoder" and "trained-with" in str(refusal.value)

    # with the weights file in the encoder folder, under any name, tiles are encoded with it
    (tmp_path / "encoders").mkdir()
    (tmp_path / "encoders" / "copy.pt").write_bytes(weights.read_bytes())
    monkeypatch.setenv("HEALNET_ENCODER_DIR", str(tmp_path / "encoders"))
    # found but not trusted: refused, and the reason names the sha256 to trust, not a folder to set
    monkeypatch.delenv("HEALNET_TRUSTED_ENCODERS")
    encoder, reason = tile_encoder(predictor, "cpu")
    assert encoder is None and "not trusted" in reason and "HEALNET_TRUSTED_ENCODERS" in reason
    assert "HEALNET_ENCODER_DIR" not in reason
    monkeypatch.setenv("HEALNET_TRUSTED_ENCODERS", sha256_file(weights))
    encoder, reason = tile_encoder(predictor, "cpu")
    assert encoder is not None and reason == ""
    case = to_case(request, ModelContract.from_predictor(predictor, encoder, reason), Limits.from_env())
    tiles = [decode_tile(i, open_tile(i, tile, 10**6), 224) for i, tile in enumerate(request.wsi_tiles or [])]
    np.testing.assert_allclose(case.wsi_features, encode_tiles(tiles, encoder, 224), rtol=1e-6)
