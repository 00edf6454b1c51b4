"""Turn a request into a healnet `Case`, or reject it with a `Reason`."""

from __future__ import annotations

import base64
import binascii
import io
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from operator import is_not
from typing import assert_never, cast

import numpy as np
from PIL import Image, UnidentifiedImageError

from healnet.inference import Case, Predictor
from healnet.preprocess.clinical import ClinicalProblem, ClinicalTransform, ClinicalValueError
from healnet.preprocess.encoders import PatchEncoder, encode_tiles
from healnet.preprocess.omics import COMBINED_MODALITY
from serving.config import Limits
from serving.reasons import Reason
from serving.schemas import SLIDE_INPUTS, PredictRequest

IMAGE_FORMATS = ("PNG", "JPEG")
DEFAULT_PATCH_SIZE = 224
EXAMPLE_NAMES = 5  # feature names quoted in a missing_features rejection, to show the expected naming
_is_given = partial(is_not, None)  # an omic value that is not null


class RejectedRequest(Exception):
    """A request the model cannot answer; `reason` is its metric label, the message names the problem."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason
        self.status = reason.http_status


class RequestAbandoned(Exception):
    """Nobody waits for the answer any more (the request timed out): its work stops here."""


@dataclass
class TileBudget:
    """What decoding a request's tiles may still cost: pixels, counted from the tiles' headers before any
    is decoded, and `abandoned`, set once the request timed out so that its thread stops decoding."""

    max_pixels: int
    spent_pixels: int = 0
    abandoned: threading.Event = field(default_factory=threading.Event)

    def charge(self, pixels: int) -> None:
        total = self.spent_pixels + pixels
        if total > self.max_pixels:
            raise RejectedRequest(
                Reason.TOO_LARGE,
                f"the tiles of the request hold {total} pixels or more, above the limit of {self.max_pixels} "
                "per request",
            )
        self.spent_pixels = total


@dataclass(frozen=True)
class ModelContract:
    """What the loaded model accepts: omic tables and feature names, clinical covariates (the checks of
    its clinical transform), slide feature width, tile encoder."""

    modalities: list[str]
    # per omic table a request may give (with the combined grouping, also "omic"): the model's features in it
    table_features: dict[str, frozenset[str]]
    feature_names: dict[str, list[str]]  # per omic model modality
    wsi_dim: int | None
    encoder: PatchEncoder | None
    patch_size: int
    clinical: ClinicalTransform | None = None  # None: the model has no clinical modality
    encoder_unavailable: str = "the model has no slide modality"  # why tiles are refused without an encoder

    @classmethod
    def from_predictor(
        cls, predictor: Predictor, encoder: PatchEncoder | None, encoder_unavailable: str = ""
    ) -> ModelContract:
        omics, clinical = predictor.preprocessor.omics, predictor.preprocessor.clinical
        tables = {t: frozenset(names) for t, names in omics.input_feature_names.items()} if omics else {}
        if omics and omics.config.combine:
            tables[COMBINED_MODALITY] = frozenset(chain.from_iterable(tables.values()))
        return cls(
            modalities=list(predictor.modalities),
            table_features=tables,
            feature_names=dict(omics.feature_names) if omics else {},
            wsi_dim=predictor.wsi_dim,
            encoder=encoder,
            patch_size=int(predictor.preprocessor.tiling.get("patch_size", DEFAULT_PATCH_SIZE)),
            clinical=clinical,
            encoder_unavailable=encoder_unavailable or cls.encoder_unavailable,
        )

    @property
    def omic_tables(self) -> frozenset[str]:
        return frozenset(self.table_features)

    @property
    def clinical_covariates(self) -> frozenset[str]:
        return frozenset(self.clinical.covariates if self.clinical else ())


def to_case(
    request: PredictRequest, contract: ModelContract, limits: Limits, tile_budget: TileBudget | None = None
) -> Case:
    """Validate one request against the model and the limits; raises RejectedRequest. The tiles of the
    cases of one request share `tile_budget` (default: a budget of their own)."""
    has_slide = any(getattr(request, name) is not None for name in SLIDE_INPUTS)
    if not request.omics and not request.clinical and not has_slide:
        raise RejectedRequest(
            Reason.NO_MODALITY,
            f"the case has no modality: give omics, clinical or the slide as one of {list(SLIDE_INPUTS)}",
        )
    _check_omics(request.omics, contract, limits)
    _check_clinical(request.clinical, contract)
    if not has_slide:
        _check_some_modality_is_the_models(request, contract)
    bag = coords = None
    if has_slide:
        if contract.wsi_dim is None:
            raise RejectedRequest(
                Reason.INVALID_SCHEMA, "this model was trained without slides: leave out wsi input"
            )
        if request.wsi_features is not None:
            bag = _patch_features(request.wsi_features, contract.wsi_dim, limits)
        elif request.wsi_features_base64 is not None:
            bag = _binary_patch_features(request.wsi_features_base64, contract.wsi_dim, limits)
        else:
            tiles = cast(list[str], request.wsi_tiles)  # the one left
            _patch_coords(request.wsi_coords, len(tiles))  # refused before the costly encoding
            budget = tile_budget or TileBudget(limits.max_request_pixels)
            bag = _encode_tiles(tiles, contract, limits, budget)
        coords = _patch_coords(request.wsi_coords, len(bag))
    return Case(omics=request.omics, wsi_features=bag, clinical=request.clinical, wsi_coords=coords)


def _check_some_modality_is_the_models(request: PredictRequest, contract: ModelContract) -> None:
    """Inputs the model does not use are ignored, so a case made only of them would be predicted from
    nothing: refused, naming what the model takes."""
    given_covariates = {name for name, value in request.clinical.items() if value is not None}
    if set(request.omics) & contract.omic_tables or given_covariates & contract.clinical_covariates:
        return
    inputs = {"omic tables": contract.omic_tables, "clinical covariates": contract.clinical_covariates}
    takes = "; ".join(f"{kind} {sorted(names)}" for kind, names in inputs.items() if names)
    slide = " or a slide" if contract.wsi_dim is not None else ""
    raise RejectedRequest(
        Reason.NO_MODALITY,
        f"the case gives no input the model uses (omic tables {sorted(request.omics)}, clinical values "
        f"for {sorted(given_covariates)}): the model takes {takes}{slide}",
    )


def _check_clinical(clinical: Mapping[str, float | str | None], contract: ModelContract) -> None:
    """Every given value as the model's clinical transform reads it (`ClinicalTransform.check_value`), so
    that the model refuses no case this accepted. A model without the clinical modality reads none: the
    response lists them as unknown."""
    if contract.clinical is None:
        return
    for name, value in clinical.items():
        try:
            contract.clinical.check_value(name, value)
        except ClinicalValueError as error:
            raise RejectedRequest(_clinical_reason(error.problem), str(error)) from None


def _clinical_reason(problem: ClinicalProblem) -> Reason:
    match problem:
        case ClinicalProblem.WRONG_TYPE:
            return Reason.INVALID_SCHEMA
        case ClinicalProblem.NOT_FINITE:
            return Reason.NON_FINITE
        case ClinicalProblem.IMPLAUSIBLE:
            return Reason.OUT_OF_RANGE
        case _:
            assert_never(problem)


def _check_omics(
    omics: Mapping[str, Mapping[str, float | None]], contract: ModelContract, limits: Limits
) -> None:
    """Finite values, and each given table with most of the model's features of that table. Names the
    model does not use are ignored (the prediction lists them); a table the model lacks is not checked."""
    for table, features in omics.items():
        # C-level passes over the values and names: this runs for every feature of every request.
        if not all(map(math.isfinite, cast(Iterable[float], filter(_is_given, features.values())))):
            feature, value = next(
                (f, v) for f, v in features.items() if v is not None and not math.isfinite(v)
            )
            raise RejectedRequest(
                Reason.NON_FINITE, f"omics[{table!r}][{feature!r}] is {value}: use null for missing"
            )
        expected = contract.table_features.get(table)
        if not expected:
            continue
        missing = len(expected) - len(expected.intersection(features))
        if missing / len(expected) > limits.max_missing_feature_fraction:
            unknown = sorted(features.keys() - expected)[:EXAMPLE_NAMES]
            raise RejectedRequest(
                Reason.MISSING_FEATURES,
                f"omics[{table!r}] lacks {missing} of the model's {len(expected)} {table} features "
                f"({missing / len(expected):.0%}), above the allowed share {limits.max_missing_feature_fraction}: "
                f"the model expects names such as {sorted(expected.difference(features))[:EXAMPLE_NAMES]}"
                + (f"; given names it does not use include {unknown}" if unknown else ""),
            )


def _check_patch_count(count: int, limits: Limits) -> None:
    if count > limits.max_patches:
        raise RejectedRequest(Reason.TOO_LARGE, f"{count} patches exceed the limit of {limits.max_patches}")


def _patch_features(rows: list[list[float]], wsi_dim: int, limits: Limits) -> np.ndarray:
    _check_patch_count(len(rows), limits)
    if set(map(len, rows)) != {wsi_dim}:
        index, row = next((i, row) for i, row in enumerate(rows) if len(row) != wsi_dim)
        raise RejectedRequest(
            Reason.WRONG_DIMENSIONS,
            f"wsi_features row {index} has {len(row)} values, the model expects {wsi_dim}",
        )
    with np.errstate(over="ignore"):  # beyond float32: inf, refused below
        values = np.fromiter(chain.from_iterable(rows), dtype=np.float32, count=len(rows) * wsi_dim)
    bag = values.reshape(len(rows), wsi_dim)
    if not np.isfinite(bag).all():
        row, column = np.argwhere(~np.isfinite(bag))[0]
        raise RejectedRequest(
            Reason.NON_FINITE, f"wsi_features[{row}][{column}] = {rows[row][column]} is not finite in float32"
        )
    return bag


def _binary_patch_features(data: str, wsi_dim: int, limits: Limits) -> np.ndarray:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RejectedRequest(
            Reason.INVALID_SCHEMA, f"wsi_features_base64 is not valid base64: {error}"
        ) from None
    row_bytes = 4 * wsi_dim
    if len(raw) % row_bytes:
        raise RejectedRequest(
            Reason.WRONG_DIMENSIONS,
            f"wsi_features_base64 holds {len(raw)} bytes, not a whole number of patches of {wsi_dim} "
            f"float32 values ({row_bytes} bytes each)",
        )
    rows = len(raw) // row_bytes
    _check_patch_count(rows, limits)
    bag = np.frombuffer(raw, dtype="<f4").reshape(rows, wsi_dim).astype(np.float32)
    if not np.isfinite(bag).all():
        row, column = np.argwhere(~np.isfinite(bag))[0]
        raise RejectedRequest(
            Reason.NON_FINITE, f"wsi_features_base64 patch {row} value {column} is {bag[row, column]}"
        )
    return bag


def _patch_coords(coords: list[list[int]] | None, patches: int) -> np.ndarray | None:
    """wsi_coords as (patches, 2) int64: one [x, y] per patch of the slide input."""
    if coords is None:
        return None
    if len(coords) != patches:
        raise RejectedRequest(
            Reason.WRONG_DIMENSIONS,
            f"wsi_coords has {len(coords)} rows for {patches} patches: give one [x, y] per patch",
        )
    if set(map(len, coords)) != {2}:
        index, row = next((i, row) for i, row in enumerate(coords) if len(row) != 2)
        raise RejectedRequest(
            Reason.WRONG_DIMENSIONS, f"wsi_coords row {index} has {len(row)} values, not [x, y]"
        )
    try:
        return np.array(coords, dtype=np.int64)
    except OverflowError:
        raise RejectedRequest(
            Reason.INVALID_SCHEMA, "wsi_coords values must fit in 64-bit integers"
        ) from None


def _encode_tiles(
    tiles: list[str], contract: ModelContract, limits: Limits, budget: TileBudget
) -> np.ndarray:
    """Every header read and charged to `budget` before the first tile is decoded; then one tile at a time
    decoded and shrunk to the patch size, so that one full-size tile at most is in memory."""
    if contract.encoder is None:
        raise RejectedRequest(Reason.NO_ENCODER, f"tiles cannot be encoded: {contract.encoder_unavailable}")
    if len(tiles) > limits.max_tiles:
        raise RejectedRequest(Reason.TOO_LARGE, f"{len(tiles)} tiles exceed the limit of {limits.max_tiles}")
    images = [open_tile(index, tile, limits.max_tile_pixels) for index, tile in enumerate(tiles)]
    budget.charge(sum(image.width * image.height for image in images))
    patches = []
    for index, image in enumerate(images):
        if budget.abandoned.is_set():
            raise RequestAbandoned(f"stopped before tile {index} of {len(images)}")
        patches.append(decode_tile(index, image, contract.patch_size))
    return encode_tiles(patches, contract.encoder, contract.patch_size)


def open_tile(index: int, data: str, max_pixels: int) -> Image.Image:
    """A base64 PNG/JPEG tile with its header read (format and size checked), not yet decoded."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RejectedRequest(Reason.BAD_IMAGE, f"wsi_tiles[{index}] is not valid base64: {error}") from None
    try:
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        raise RejectedRequest(Reason.TOO_LARGE, f"wsi_tiles[{index}]: {error}") from None
    except UnidentifiedImageError:
        raise RejectedRequest(Reason.BAD_IMAGE, f"wsi_tiles[{index}] is not a PNG or JPEG image") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise RejectedRequest(
            Reason.BAD_IMAGE, f"wsi_tiles[{index}] has an unreadable header: {error}"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise RejectedRequest(
            Reason.TOO_LARGE,
            f"wsi_tiles[{index}] has {width}x{height} pixels, above the limit of {max_pixels}",
        )
    return image


def decode_tile(index: int, image: Image.Image, patch_size: int) -> np.ndarray:
    """An opened tile as RGB uint8 (patch_size, patch_size, 3), resized as `encode_tiles` resizes; the
    full-size pixels are released on return. A JPEG is decoded at the smallest DCT scale (1/2 to 1/8)
    still at least the patch size; PNG decodes only at full size."""
    try:
        image.draft("RGB", (patch_size, patch_size))  # JPEG only; other formats ignore it
        rgb = image.convert("RGB")
        if rgb.size != (patch_size, patch_size):
            rgb = rgb.resize((patch_size, patch_size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as error:
        raise RejectedRequest(Reason.BAD_IMAGE, f"wsi_tiles[{index}] cannot be decoded: {error}") from None
    finally:
        image.close()
