"""BentoML service of the champion HEALNet: `bentoml serve` from the repository root (bentofile.yaml).

Start-up: the `bentoml serve` process verifies the model's sha256 before any worker starts and exits
non-zero on a missing or corrupted model. Each worker then loads the model in a background thread,
so /livez answers at once and /readyz (and the APIs) answer 503 until the model is loaded.

Following the champion ($HEALNET_FOLLOW_CHAMPION_S > 0, unless $HEALNET_MODEL_TAG pins a version): each worker
polls the champion pointer and, when it moves (promotion or rollback), loads the new version in the
background, verifies its sha256, warms it up and swaps it in between requests (serving/follower.py); a
failure is counted (healnet_model_reload_failures_total) and the worker keeps serving the one it has. A
follower that stops polling makes /livez answer 503.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from pathlib import Path

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from healnet.inference import Case, Prediction
from healnet.registry import model_card
from serving import metrics
from serving.batching import ContinuousBatcher
from serving.bentoml_patches import (
    bound_request_metric_labels,
    cancel_request_timers,
    parse_list_inputs_with_pydantic,
)
from serving.config import Limits
from serving.drift_spool import DriftSpool
from serving.follower import ChampionFollower
from serving.middleware import REJECTION_HEADER, RequestGuard
from serving.openapi import MODEL_CARD_PATH, NO_MODEL_CARD, NOT_READY
from serving.reasons import Reason
from serving.runtime import ServedModel, champion_poll_seconds, resolve_served_model, serving_device
from serving.schemas import ErrorResponse, PredictRequest, PredictResponse
from serving.validation import RejectedRequest, TileBudget, to_case

logger = logging.getLogger("healnet.serving")
# `bentoml build --arg model_tag=healnet:VERSION` packs that version into the Bento (and its image).
PACKED_MODEL_TAG: str | None = getattr(bentoml.use_arguments(), "model_tag", None)
cancel_request_timers()
bound_request_metric_labels()
parse_list_inputs_with_pydantic()
# Model passes up to this many padded patch rows run on the event loop (CPU only): 17 ms for 16 cases of
# 1,024 patches with the demo model's 31 features per patch. Bigger ones go to the model thread.
INLINE_PASS_PATCHES = 16_384
# Requests with up to this many patch-feature values are validated and decoded on the event loop
# (about 2 ms); the largest accepted batch (64 bags of 6,215 patches × 31 values) took 0.45 s there.
INLINE_VALIDATION_VALUES = INLINE_PASS_PATCHES * 32


def _rejection(rejection: RejectedRequest) -> JSONResponse:
    return JSONResponse(
        ErrorResponse(error=str(rejection), reason=rejection.reason).model_dump(),
        status_code=rejection.status,
        headers={REJECTION_HEADER: rejection.reason},
    )


def _not_ready(message: str) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=message, reason=NOT_READY).model_dump(), status_code=503)


@bentoml.service(name="healnet", traffic={"timeout": 60})
class HEALNetService:
    if PACKED_MODEL_TAG:
        packed_model = bentoml.models.BentoModel(PACKED_MODEL_TAG)

    @bentoml.on_deployment
    def verify_model() -> None:
        """Runs once in the `bentoml serve` process before workers start: no model, no server."""
        try:
            Limits.from_env()
            DriftSpool.from_env()
            serving_device()
            tag, _ = resolve_served_model(PACKED_MODEL_TAG)
        except Exception as error:
            logger.critical("refusing to start: %s", error)
            raise
        logger.info("serving model %s", tag)

    def __init__(self) -> None:
        # the answering model and its batcher, replaced together by one assignment when the champion moves
        self.serving: tuple[ServedModel, ContinuousBatcher[Case, Prediction]] | None = None
        self.load_error: str | None = None
        self.follower: ChampionFollower | None = None  # started after the first load, when following
        self.limits = Limits.from_env()
        self.drift_spool = DriftSpool.from_env()  # None: off ($HEALNET_DRIFT_SPOOL_DIR unset)
        tag, checkpoint_dir = resolve_served_model(PACKED_MODEL_TAG)
        self.follow_s = champion_poll_seconds()
        threading.Thread(
            target=self._load, args=(tag, checkpoint_dir), name="healnet-load", daemon=True
        ).start()

    def _load(self, tag: str, checkpoint_dir: Path) -> None:
        start = time.perf_counter()
        try:
            model = ServedModel.load(tag, checkpoint_dir)
        except Exception as error:  # whatever stops loading: the worker reports itself dead via /livez
            self.load_error = f"model {tag} failed to load: {error}"
            logger.critical(self.load_error, exc_info=True)
            return
        self._swap_in(model)
        # Hide the start-up objects (torch, pandas, BentoML, the model) from the garbage collector:
        # full collections then take milliseconds instead of stalling every request for ~0.2-0.3 s.
        gc.collect()
        gc.freeze()
        logger.info("model %s loaded in %.1f s", tag, time.perf_counter() - start)
        if self.follow_s:
            self.follower = ChampionFollower(self.follow_s, self._served_tag, self._swap_in)
            self.follower.start()

    def _served_tag(self) -> str:
        assert self.serving is not None, "the follower starts after the first load"
        return self.serving[0].tag

    def _swap_in(self, model: ServedModel) -> None:
        """Serve `model` from the next request on; requests already running finish on the previous one."""
        on_cpu = model.predictor.device.type == "cpu"
        batcher: ContinuousBatcher[Case, Prediction] = ContinuousBatcher(
            model.predictor.predict_timed,
            self.limits.adaptive_batch_max_cases,
            fits=lambda cases: padded_patches(cases) <= self.limits.max_patches,
            inline=lambda cases: on_cpu and padded_patches(cases) <= INLINE_PASS_PATCHES,
        )
        clinical = model.predictor.preprocessor.clinical
        # before the first request it answers can count a prediction in its metrics
        metrics.model_loaded(
            model.tag,
            model.contract.modalities,
            model.reference_risk_quantiles,
            list(clinical.training_ranges) if clinical else [],
            model.predictor.checkpoint.bins.n_bins,
        )
        previous = self.serving
        self.serving = (model, batcher)
        if previous is not None and previous[0].tag != model.tag:
            metrics.model_unloaded(previous[0].tag)

    @bentoml.on_shutdown
    def close_drift_spool(self) -> None:
        if self.drift_spool is not None:
            self.drift_spool.close()

    def __is_ready__(self) -> bool:
        return self.serving is not None

    def __is_alive__(self) -> bool:
        if self.follower is not None and self.follower.stalled():
            logger.error(
                "the champion follower has finished no poll in the last %.0f s: reporting the worker dead",
                self.follower.stall_after_s,
            )
            return False
        return self.load_error is None

    def model_card_answer(self) -> JSONResponse:
        """GET /model_card: the model card of the version answering now, read from its folder in the store;
        404 for a version registered before model cards were written."""
        serving = self.serving
        if serving is None:
            return _not_ready(self.load_error or "the model is still loading")
        tag = serving[0].tag
        card = model_card(tag)
        if card is None:
            error = f"model {tag} has no model card: it was registered before model cards were written"
            return JSONResponse(
                ErrorResponse(error=error, reason=NO_MODEL_CARD).model_dump(), status_code=404
            )
        return JSONResponse(card[0])

    @bentoml.api(route="/predict")
    async def predict(self, request: PredictRequest, /) -> PredictResponse:
        """Survival prediction for one case with any subset of modalities."""
        answer = await self._answer([request], batch=False)
        return answer[0] if isinstance(answer, list) else answer

    @bentoml.api(route="/predict_batch")
    async def predict_batch(self, cases: list[PredictRequest], /) -> list[PredictResponse]:
        """Survival predictions for a list of cases; one invalid case rejects the request."""
        return await self._answer(cases, batch=True)

    async def _answer(
        self, requests: list[PredictRequest], batch: bool
    ) -> list[PredictResponse] | JSONResponse:
        serving = self.serving
        if serving is None:
            return _not_ready(self.load_error or "the model is still loading")
        model, batcher = serving
        try:
            predictions = await self._predict(requests, model, batcher, batch)
        except RejectedRequest as rejection:
            metrics.record_rejection(rejection.reason)
            return _rejection(rejection)
        return [
            _response(model, request, prediction)
            for request, prediction in zip(requests, predictions, strict=True)
        ]

    async def _predict(
        self,
        requests: list[PredictRequest],
        model: ServedModel,
        batcher: ContinuousBatcher[Case, Prediction],
        batch: bool,
    ) -> list[Prediction]:
        start = time.perf_counter()
        tile_budget = TileBudget(self.limits.max_request_pixels)
        # Decoding tiles, or many patch-feature values: off the event loop
        if any(request.wsi_tiles for request in requests) or (
            sum(_patch_values_given(request, model.contract.wsi_dim or 0) for request in requests)
            > INLINE_VALIDATION_VALUES
        ):
            try:
                cases = await asyncio.to_thread(self._cases, requests, model, batch, tile_budget)
            except asyncio.CancelledError:  # timed out (504): the thread stops before its next tile
                tile_budget.abandoned.set()
                raise
        else:
            cases = self._cases(requests, model, batch, tile_budget)
        decoding = time.perf_counter() - start
        attention = any(request.return_attention for request in requests)
        outcome = await batcher.submit(cases, return_attention=attention)
        for index, prediction in enumerate(outcome.results):
            if not np.isfinite([prediction.risk, *prediction.survival, *prediction.hazards]).all():
                where = f"cases[{index}]: " if batch else ""
                raise RejectedRequest(
                    Reason.NON_FINITE,
                    f"{where}the inputs are finite but so large that the model's output is not",
                )
        metrics.record_stage("preprocess", decoding + outcome.preparing)
        metrics.record_stage("forward", outcome.forward)
        metrics.record_batch(outcome.batch_cases)
        if self.drift_spool is not None:
            self.drift_spool.record(model.tag, model.predictor.checkpoint.input_reference, cases)
        return outcome.results

    def _cases(
        self, requests: list[PredictRequest], model: ServedModel, batch: bool, tile_budget: TileBudget
    ) -> list[Case]:
        if batch and not requests:
            raise RejectedRequest(Reason.NO_MODALITY, "the batch holds no case")
        if len(requests) > self.limits.max_batch_cases:
            raise RejectedRequest(
                Reason.TOO_LARGE, f"{len(requests)} cases exceed the limit of {self.limits.max_batch_cases}"
            )
        cases = []
        for index, request in enumerate(requests):
            try:
                cases.append(to_case(request, model.contract, self.limits, tile_budget))
            except RejectedRequest as rejection:
                if batch:
                    raise RejectedRequest(rejection.reason, f"cases[{index}]: {rejection}") from None
                raise
        return cases


def _patch_values_given(request: PredictRequest, wsi_dim: int) -> int:
    """Patch-feature values a request sends, counted before decoding: from the length of
    wsi_features_base64 (3 bytes per 4 characters, 4 bytes per value), or the rows of wsi_features."""
    if request.wsi_features_base64 is not None:
        return len(request.wsi_features_base64) * 3 // 16
    return len(request.wsi_features or ()) * wsi_dim


def padded_patches(cases: list[Case]) -> int:
    """Patch rows of one model pass over `cases`: every bag is padded to the longest."""
    longest = max((len(case.wsi_features) for case in cases if case.wsi_features is not None), default=0)
    return len(cases) * longest


def _response(model: ServedModel, request: PredictRequest, prediction: Prediction) -> PredictResponse:
    """The answer to one case, counted in the prediction metrics."""
    has_omics = any(modality in model.contract.feature_names for modality in prediction.modalities_used)
    metrics.record_prediction(
        prediction.modalities_used,
        prediction.modalities_missing,
        prediction.imputed_fraction if has_omics else None,
        prediction.risk,
        prediction.out_of_training_range,
    )
    return PredictResponse(
        risk=prediction.risk,
        survival=prediction.survival,
        hazards=prediction.hazards,
        bin_edges_months=prediction.bin_edges_months,
        modalities_used=prediction.modalities_used,
        modalities_missing=prediction.modalities_missing,
        imputed_features=prediction.imputed_features,
        imputed_fraction=prediction.imputed_fraction,
        unknown_features=prediction.unknown_features,
        out_of_training_range=prediction.out_of_training_range,
        model_version=model.tag,
        attention=prediction.attention if request.return_attention else None,
        attention_coords=prediction.attention_coords if request.return_attention else None,
    )


async def _model_card(request: Request) -> JSONResponse:
    service: HEALNetService = bentoml.get_current_service()  # this worker's instance
    return await asyncio.to_thread(service.model_card_answer)  # a file read, off the event loop


HEALNetService.add_asgi_middleware(RequestGuard, paths=("/predict", "/predict_batch"))
# BentoML's API routes take POST only: the GET route is a mounted app, beside them
HEALNetService.mount_asgi_app(
    Starlette(routes=[Route(MODEL_CARD_PATH, _model_card, methods=["GET"])]), path="/"
)
