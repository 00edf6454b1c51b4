"""BentoML service of the champion HEALNet: `bentoml serve` from the repository root (bentofile.yaml).

Start-up: the `bentoml serve` process verifies the model's sha256 before any worker starts and exits
non-zero on a missing or corrupted model. Each worker then loads the model in a background thread,
so /livez answers at once and /readyz (and the APIs) answer 503 until the model is loaded.

Following the champion ($HEALNET_FOLLOW_CHAMPION_S > 0, unless $HEALNET_MODEL_TAG pins a version): each worker
polls the champion pointer and, when it moves (promotion or rollback), loads the new version in the
background, verifies its sha256, warms it up and swaps it in between requests; a version that fails to
load is counted (healnet_model_reload_failures_total) and the worker keeps serving the one it has.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from pathlib import Path
from typing import cast

import bentoml
import numpy as np
from starlette.responses import JSONResponse

from healnet.inference import Case, Prediction
from healnet.registry import RegistryError, get_champion, resolve
from serving import metrics
from serving.batching import ContinuousBatcher
from serving.bentoml_patches import cancel_request_timers
from serving.config import Limits
from serving.middleware import REJECTION_HEADER, RequestGuard
from serving.runtime import ServedModel, champion_poll_seconds, resolve_served_model, serving_device
from serving.schemas import ErrorResponse, PredictRequest, PredictResponse
from serving.validation import RejectedRequest, to_case

logger = logging.getLogger("healnet.serving")
# `bentoml build --arg model_tag=healnet:VERSION` packs that version into the Bento (and its image).
PACKED_MODEL_TAG: str | None = getattr(bentoml.use_arguments(), "model_tag", None)
cancel_request_timers()
# Model passes up to this many padded patch rows run on the event loop (CPU only): 17 ms for 16 cases of
# 1,024 patches with the demo model's 31 features per patch. Bigger ones go to the model thread.
INLINE_PASS_PATCHES = 16_384


def _error(status: int, reason: str, message: str) -> JSONResponse:
    headers = {REJECTION_HEADER: reason} if status < 500 else {}
    return JSONResponse(
        ErrorResponse(error=message, reason=reason).model_dump(), status_code=status, headers=headers
    )


@bentoml.service(name="healnet", traffic={"timeout": 60})
class HEALNetService:
    if PACKED_MODEL_TAG:
        packed_model = bentoml.models.BentoModel(PACKED_MODEL_TAG)

    @bentoml.on_deployment
    def verify_model() -> None:
        """Runs once in the `bentoml serve` process before workers start: no model, no server."""
        try:
            Limits.from_env()
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
        self.refused_tag: str | None = None  # a champion that failed to load; retried once the pointer moves
        self.limits = Limits.from_env()
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
            threading.Thread(target=self._follow_champion, name="healnet-follow", daemon=True).start()

    def _swap_in(self, model: ServedModel) -> None:
        """Serve `model` from the next request on; requests already running finish on the previous one."""
        on_cpu = model.predictor.device.type == "cpu"
        batcher: ContinuousBatcher[Case, Prediction] = ContinuousBatcher(
            model.predictor.predict_timed,
            self.limits.adaptive_batch_max_cases,
            fits=lambda cases: padded_patches(cases) <= self.limits.max_patches,
            inline=lambda cases: on_cpu and padded_patches(cases) <= INLINE_PASS_PATCHES,
        )
        previous = self.serving
        self.serving = (model, batcher)
        clinical = model.predictor.preprocessor.clinical
        metrics.model_loaded(
            model.tag,
            model.contract.modalities,
            model.reference_risk_quantiles,
            list(clinical.training_ranges) if clinical else [],
        )
        if previous is not None and previous[0].tag != model.tag:
            metrics.model_unloaded(previous[0].tag)

    def _follow_champion(self) -> None:
        """Poll the champion pointer every `follow_s` seconds and swap in each new champion that loads."""
        interval = cast(float, self.follow_s)  # started only when following
        while True:
            time.sleep(interval)
            serving = cast(
                tuple[ServedModel, ContinuousBatcher], self.serving
            )  # started after the first load
            current = serving[0].tag
            try:
                pointer = get_champion()
            except RegistryError as error:  # a corrupt pointer: keep serving, say why
                logger.error("champion pointer unreadable, still serving %s: %s", current, error)
                continue
            tag = pointer["tag"] if pointer else None
            if tag is None or tag in (current, self.refused_tag):
                continue
            try:
                _, checkpoint_dir = resolve(tag)  # verifies the weights' sha256
                model = ServedModel.load(tag, checkpoint_dir)
            except Exception as error:  # whatever stops it, the current model keeps answering
                self.refused_tag = tag
                metrics.model_reload_failed(tag)
                logger.error("champion %s refused, still serving %s: %s", tag, current, error)
                continue
            self.refused_tag = None
            self._swap_in(model)
            logger.info("now serving the champion %s", tag)

    def __is_ready__(self) -> bool:
        return self.serving is not None

    def __is_alive__(self) -> bool:
        return self.load_error is None

    @bentoml.api(route="/predict")
    async def predict(self, request: PredictRequest, /) -> PredictResponse:
        """Survival prediction for one case with any subset of modalities."""
        answer = await self._answer([request], batch=False)
        return answer[0] if isinstance(answer, list) else answer

    @bentoml.api(route="/predict_batch")
    async def predict_batch(self, cases: list[PredictRequest], /) -> list[PredictResponse]:
        """Survival predictions for a list of cases in one forward pass; one invalid case rejects the request."""
        return await self._answer(cases, batch=True)

    async def _answer(
        self, requests: list[PredictRequest], batch: bool
    ) -> list[PredictResponse] | JSONResponse:
        serving = self.serving
        if serving is None:
            return _error(503, "not_ready", self.load_error or "the model is still loading")
        model, batcher = serving
        try:
            predictions = await self._predict(requests, model, batcher, batch)
        except RejectedRequest as rejection:
            metrics.record_rejection(rejection.reason)
            return _error(rejection.status, rejection.reason, str(rejection))
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
        if any(request.wsi_tiles for request in requests):  # decoding and encoding tiles: off the event loop
            cases = await asyncio.to_thread(self._cases, requests, model, batch)
        else:
            cases = self._cases(requests, model, batch)
        decoding = time.perf_counter() - start
        attention = any(request.return_attention for request in requests)
        outcome = await batcher.submit(cases, return_attention=attention)
        for index, prediction in enumerate(outcome.results):
            if not np.isfinite([prediction.risk, *prediction.survival, *prediction.hazards]).all():
                where = f"cases[{index}]: " if batch else ""
                raise RejectedRequest(
                    "non_finite", f"{where}the inputs are finite but so large that the model's output is not"
                )
        metrics.record_stage("preprocess", decoding + outcome.preparing)
        metrics.record_stage("forward", outcome.forward)
        metrics.record_batch(outcome.batch_cases)
        return outcome.results

    def _cases(self, requests: list[PredictRequest], model: ServedModel, batch: bool) -> list[Case]:
        if batch and not requests:
            raise RejectedRequest("no_modality", "the batch holds no case")
        if len(requests) > self.limits.max_batch_cases:
            raise RejectedRequest(
                "too_large", f"{len(requests)} cases exceed the limit of {self.limits.max_batch_cases}"
            )
        cases = []
        for index, request in enumerate(requests):
            try:
                cases.append(to_case(request, model.contract, self.limits))
            except RejectedRequest as rejection:
                if batch:
                    raise RejectedRequest(rejection.reason, f"cases[{index}]: {rejection}") from None
                raise
        return cases


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


HEALNetService.add_asgi_middleware(RequestGuard, paths=("/predict", "/predict_batch"))
