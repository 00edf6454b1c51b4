"""Patch encoders: pixels → features, shared by slide preprocessing and serving, and their provenance.

Every encoder carries an `EncoderProvenance` (name, weights sha256, output width, input size,
normalisation). Feature files record it, training refuses features of mixed encoders, the checkpoint
keeps it, and serving encodes tiles only with an encoder whose provenance matches the model's.
Torch, numpy and Pillow only (no OpenSlide, pandas or pyarrow), so that the service can encode tiles
without the slide-reading stack.

Weight files are code as well as weights, so loading one must not run code it carries (see
`check_export_archive` and `trusted_sha256s`): a torch.export (`.pt2`) archive loads only when it holds
raw tensors and a plain aten graph (no pickle, no compiled libraries, no code strings), and a TorchScript
file only when the operator has put its sha256 on the trusted list ($HEALNET_TRUSTED_ENCODERS).
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from einops import rearrange
from PIL import Image

from healnet.errors import HEALNetError
from healnet.files import UnsafeNameError, check_file_name, sha256_file

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class TileError(HEALNetError, ValueError):
    """An image tile is not an RGB uint8 array."""


class EncoderError(HEALNetError, ValueError):
    """An encoder file that cannot be loaded or run, or features whose encoder does not match."""


class EncoderNotFoundError(EncoderError):
    """No file in the encoder folders has the weights a model was trained with."""


# Input normalisations an encoder may expect; "none": raw uint8 pixels (the statistics encoder).
NORMALISATIONS = ("none", "imagenet")
ENCODER_INPUT_SIZE = 224  # px side of the probe batch that tells a weight file's feature width
TORCHSCRIPT_PREFIX, EXPORT_PREFIX = "torchscript:", "export:"
# sha256 values (comma or whitespace separated) of the TorchScript encoder files the operator trusts
TRUSTED_ENCODERS_ENV = "HEALNET_TRUSTED_ENCODERS"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class EncoderProvenance:
    """Which encoder made a set of patch features. Two feature sets are comparable only when their
    provenances are equal; `key` names their folder."""

    name: str  # "stats", the weight file's stem, or the name given when importing features
    weights_sha256: str | None  # None: no weights (the statistics encoder) or not known (imported)
    dim: int
    input_size: int
    normalisation: str

    def __post_init__(self) -> None:
        try:  # the name becomes the feature folder's name (`key`)
            check_file_name(self.name, "encoder name")
        except UnsafeNameError as error:
            raise EncoderError(str(error)) from error
        if self.normalisation not in NORMALISATIONS and not self.normalisation.startswith("custom:"):
            raise EncoderError(
                f"encoder normalisation must be one of {NORMALISATIONS} or 'custom:<description>', "
                f"got {self.normalisation!r}"
            )
        if self.dim < 1 or self.input_size < 1:
            raise EncoderError(
                f"encoder dim and input_size must be positive, got {self.dim}, {self.input_size}"
            )

    @property
    def key(self) -> str:
        """Folder name of this encoder's feature files: the name, and the weights' first 12 hex digits."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("-")
        slug = slug.lstrip(".-") or "encoder"  # never '..' nor hidden: it names a folder
        return slug if self.weights_sha256 is None else f"{slug}-{self.weights_sha256[:12]}"

    def describe(self) -> str:
        weights = f"weights sha256 {self.weights_sha256[:12]}…" if self.weights_sha256 else "no weights file"
        return f"{self.name} ({weights}, {self.dim} features, {self.input_size} px, {self.normalisation})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> EncoderProvenance:
        try:
            return cls(
                str(state["name"]),
                None if state.get("weights_sha256") is None else str(state["weights_sha256"]),
                int(state["dim"]),
                int(state["input_size"]),
                str(state["normalisation"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise EncoderError(f"malformed encoder provenance {dict(state)!r}: {error}") from error


class PatchEncoder(Protocol):
    name: str
    dim: int
    provenance: EncoderProvenance

    def encode(self, patches: np.ndarray) -> np.ndarray:
        """uint8 (n, patch_size, patch_size, 3) -> float32 (n, dim)."""
        ...


# ---------------------------------------------------------------------------------------------
# Encoders

STATS_FEATURE_NAMES: tuple[str, ...] = (
    # RGB intensities in [0, 1]
    *(f"rgb_mean_{c}" for c in "rgb"),
    *(f"rgb_std_{c}" for c in "rgb"),
    # HSV: hue as the unit vector of the mean colour-opponent direction, saturation and value
    "hue_cos",
    "hue_sin",
    "hsv_mean_s",
    "hsv_std_s",
    "hsv_mean_v",
    "hsv_std_v",
    # optical density -log10(I / 255) per channel, and Ruifrok-Johnston stain concentrations
    *(f"od_mean_{c}" for c in "rgb"),
    "haematoxylin_mean",
    "haematoxylin_std",
    "eosin_mean",
    "eosin_std",
    # texture on grey levels in [0, 1]
    "gradient_energy",  # mean squared finite difference, x and y summed
    "laplacian_var",  # variance of the 4-neighbour Laplacian
    "dark_fraction",  # grey < 0.4 (nuclei)
    "white_fraction",  # grey > 0.85 (glass)
    # coarse grey histogram: fraction of pixels in 8 equal bins over [0, 1]
    *(f"grey_hist_{i}" for i in range(8)),
)

# Stain optical-density vectors (rows: haematoxylin, eosin, DAB); its inverse unmixes OD into stains.
STAIN_MATRIX = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
STAIN_MATRIX /= np.linalg.norm(STAIN_MATRIX, axis=1, keepdims=True)
UNMIX_HE = np.linalg.inv(STAIN_MATRIX)[:, :2].astype(np.float32)
OPTICAL_DENSITY = (-np.log10(np.maximum(np.arange(256), 1) / 255.0)).astype(np.float32)
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# dark and white thresholds, then the inner edges of the 8-bin grey histogram
GREY_EDGES = np.array([0.4, 0.85, *np.arange(1, 8) / 8], dtype=np.float32)


class StatsEncoder:
    """Weight-free colour and texture statistics per patch (`STATS_FEATURE_NAMES`), vectorised.

    Colour statistics sample every eighth pixel in each direction (784 of a 224 px patch); texture
    uses the green channel (the strongest H&E contrast) at every fourth pixel, i.e. nuclear-scale
    contrast at 4 px. Sampling keeps the encoder several times cheaper than reading the patch.
    """

    name = "stats"
    feature_names = STATS_FEATURE_NAMES
    dim = len(STATS_FEATURE_NAMES)
    provenance = EncoderProvenance("stats", None, len(STATS_FEATURE_NAMES), ENCODER_INPUT_SIZE, "none")

    def encode(self, patches: np.ndarray) -> np.ndarray:
        columns = colour_statistics(patches[:, ::8, ::8]) | texture_statistics(patches[:, ::4, ::4, 1])
        return np.stack([columns[name] for name in STATS_FEATURE_NAMES], axis=1).astype(np.float32)


def colour_statistics(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Colour features of (n, h, w, 3) uint8 pixels, each an (n,) array keyed by its name."""
    planes_u8 = np.ascontiguousarray(rearrange(pixels, "n h w c -> c n (h w)"))
    planes = planes_u8.astype(np.float32) / np.float32(255)
    red, green, blue = planes
    means, stds = planes.mean(-1), planes.std(-1)  # (3, n)

    value = np.maximum(np.maximum(red, green), blue)
    saturation = (value - np.minimum(np.minimum(red, green), blue)) / np.maximum(value, 1e-6)
    opponent = np.stack([means[0] - (means[1] + means[2]) / 2, np.sqrt(3) / 2 * (means[1] - means[2])])
    hue = opponent / np.maximum(np.linalg.norm(opponent, axis=0), 1e-6)

    optical_density = OPTICAL_DENSITY[planes_u8]
    haematoxylin, eosin = (
        sum(weight * od for weight, od in zip(UNMIX_HE[:, k], optical_density, strict=True)) for k in range(2)
    )
    grey = sum(weight * plane for weight, plane in zip(GREY_WEIGHTS, planes, strict=True))
    below = (grey[..., None] < GREY_EDGES).mean(1)  # (n, 9): fraction of pixels below each edge
    histogram = np.diff(below[:, 2:], axis=1, prepend=0.0, append=1.0)

    return {
        **{f"rgb_mean_{c}": means[i] for i, c in enumerate("rgb")},
        **{f"rgb_std_{c}": stds[i] for i, c in enumerate("rgb")},
        "hue_cos": hue[0],
        "hue_sin": hue[1],
        "hsv_mean_s": saturation.mean(-1),
        "hsv_std_s": saturation.std(-1),
        "hsv_mean_v": value.mean(-1),
        "hsv_std_v": value.std(-1),
        **{f"od_mean_{c}": od for c, od in zip("rgb", optical_density.mean(-1), strict=True)},
        "haematoxylin_mean": haematoxylin.mean(-1),
        "haematoxylin_std": haematoxylin.std(-1),
        "eosin_mean": eosin.mean(-1),
        "eosin_std": eosin.std(-1),
        "dark_fraction": below[:, 0],
        "white_fraction": 1.0 - below[:, 1],
        **{f"grey_hist_{i}": histogram[:, i] for i in range(8)},
    }


def texture_statistics(grey_u8: np.ndarray) -> dict[str, np.ndarray]:
    """Gradient energy and Laplacian variance of (n, h, w) uint8 grey images, in [0, 1] units."""
    image = grey_u8.astype(np.float32) / np.float32(255)
    dx, dy = np.diff(image, axis=2), np.diff(image, axis=1)
    laplacian = image[:, 1:-1, :-2] + image[:, 1:-1, 2:] + image[:, :-2, 1:-1] + image[:, 2:, 1:-1]
    laplacian -= 4 * image[:, 1:-1, 1:-1]
    return {
        "gradient_energy": np.square(dx).mean((1, 2)) + np.square(dy).mean((1, 2)),
        "laplacian_var": laplacian.reshape(len(image), -1).var(-1),
    }


@dataclass(frozen=True)
class FeatureProvenance:
    """The encoder and patch grid of a feature file; files are comparable only when these are equal."""

    encoder: EncoderProvenance
    patch_size: int
    target_mpp: float

    @property
    def tiling(self) -> dict:
        return {"patch_size": self.patch_size, "target_mpp": self.target_mpp}

    def describe(self) -> str:
        return f"{self.encoder.describe()}, {self.patch_size} px patches at {self.target_mpp} µm/px"


class WeightsEncoder:
    """A user's exported network (ResNet50-trunc, UNI, CONCH, ...) from a local file: TorchScript
    (`torch.jit.save`) or `torch.export` (`.pt2`). It takes ImageNet-normalised NCHW float input of
    ENCODER_INPUT_SIZE px (`scripts/export_encoders.py` wraps networks that expect another size or
    normalisation). Nothing in the file runs before it passes `check_weights_file`."""

    def __init__(self, path: Path, exported: bool, device: str | None = None, trusted: Collection[str] = ()):
        import torch

        weights_sha256 = check_weights_file(path, exported, trusted)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            if exported:
                # check_guards=False: the guards are Python source that .module() would exec
                program = torch.export.load(str(path))
                self.model = program.module(check_guards=False).to(self.device)
            else:
                self.model = torch.jit.load(str(path), map_location=self.device).eval()
        except (RuntimeError, ValueError, OSError, zipfile.BadZipFile) as error:
            kind = "torch.export (.pt2)" if exported else "TorchScript"
            raise EncoderError(f"{path} is not a loadable {kind} encoder: {error}") from error
        self.name = path.stem
        probe = np.zeros((1, ENCODER_INPUT_SIZE, ENCODER_INPUT_SIZE, 3), dtype=np.uint8)
        try:
            dim = self._forward(probe).shape[1]
        except RuntimeError as error:
            raise EncoderError(
                f"encoder {path} fails on a (1, 3, {ENCODER_INPUT_SIZE}, {ENCODER_INPUT_SIZE}) batch: {error}"
            ) from error
        self.dim = int(dim)
        self.provenance = EncoderProvenance(
            self.name, weights_sha256, self.dim, ENCODER_INPUT_SIZE, "imagenet"
        )

    def _forward(self, patches: np.ndarray) -> np.ndarray:
        import torch

        scaled = (patches.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        batch = torch.from_numpy(rearrange(scaled, "n h w c -> n c h w")).to(self.device)
        with torch.inference_mode():
            output = self.model(batch)
        return rearrange(output.float().cpu().numpy(), "n ... -> n (...)")

    def encode(self, patches: np.ndarray) -> np.ndarray:
        return self._forward(patches).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Loading weight files without running code they carry


def trusted_sha256s(extra: Collection[str] = ()) -> frozenset[str]:
    """The sha256 values of the TorchScript files the operator trusts: $HEALNET_TRUSTED_ENCODERS (comma or
    whitespace separated) and `extra` (e.g. --trust-encoder). A value that is not 64 hex digits is an
    EncoderError: a typo must not silently trust nothing."""
    values = [*re.split(r"[\s,]+", os.environ.get(TRUSTED_ENCODERS_ENV, "")), *extra]
    digests = {value.strip().lower() for value in values if value.strip()}
    malformed = sorted(digest for digest in digests if not SHA256_HEX.fullmatch(digest))
    if malformed:
        raise EncoderError(
            f"trusted encoder sha256 {malformed[0]!r} (${TRUSTED_ENCODERS_ENV} or --trust-encoder) is not "
            "64 hex digits; use the output of `sha256sum FILE`"
        )
    return frozenset(digests)


def check_weights_file(path: Path, exported: bool, trusted: Collection[str] = ()) -> str:
    """The file's sha256 when it may be loaded, else EncoderError saying why: a torch.export archive must
    pass `check_export_archive`; a TorchScript file, whose loader can run code it carries, must have its
    sha256 in `trusted_sha256s(trusted)`."""
    digest = sha256_file(path)
    if exported:
        check_export_archive(path)
    elif digest not in trusted_sha256s(trusted):
        raise EncoderError(
            f"refusing TorchScript encoder {path}: loading it can run code it carries, and its sha256 "
            f"{digest} is not trusted; once you know where the file comes from, add that sha256 to "
            f"${TRUSTED_ENCODERS_ENV} (or pass --trust-encoder {digest}), or export the encoder with "
            "torch.export (.pt2)"
        )
    return digest


# What a torch.export archive (torch 2.13, `torch.export.save`) may hold, below its one root folder. No
# pickle (weights_config/constants_config entries with use_pickle, custom or opaque objects, legacy .pt
# weights), no AOTInductor libraries: those are code.
EXPORT_ARCHIVE_ENTRIES = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[\w.-]+\.json|extra/[^/]+"
    r"|data/weights/[\w.-]+_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/[\w.-]+_constants_config\.json|data/constants/tensor_\d+"
    r"|data/sample_inputs/[\w.-]+\.pt"
)
MAX_ARCHIVE_JSON_BYTES = 1 << 30  # a ViT-L graph is a few MB; more is a zip bomb, not a graph
# Graph operators an encoder may call: aten and prims ops, Python's arithmetic operators and math, and
# torch's symbolic-shape helpers. Any other `torch.` path is an arbitrary torch function (e.g. one that
# loads a library), and `#` names an extension the deserializer would import.
SAFE_OPERATOR = re.compile(
    r"torch\.ops\.(aten|prims)\.(_?[A-Za-z][A-Za-z0-9_]*)(\._?[A-Za-z][A-Za-z0-9_]*)?"
    r"|_operator\.(getitem|add|sub|mul|truediv|floordiv|mod|neg|pow|eq|ne|lt|le|gt|ge|and_|or_|not_)"
    r"|math\.[a-z][a-z0-9_]*|torch\.sym_[a-z_]+"
)
# Symbolic shape expressions are parsed with sympy.sympify, which evaluates Python: only calls of these
# sympy and torch.utils._sympy classes on constants and shape symbols (s0, u3) may appear.
# fmt: off
SYMPY_CALLS = frozenset([
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Eq", "Ne", "Lt",
    "Le", "Gt", "Ge", "And", "Or", "Not", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
    "Equality", "Unequality", "Mod", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv",
    "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity",
])
# fmt: on
SYMPY_NAMES = re.compile(r"[a-z]+\d+|True|False|oo|zoo|nan")
SYMPY_NODES = (
    ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.BinOp, ast.UnaryOp,
    ast.Compare, ast.BoolOp, ast.operator, ast.unaryop, ast.cmpop, ast.boolop,
)  # fmt: skip


def check_export_archive(path: Path) -> None:
    """EncoderError (one line naming the problem) unless the torch.export archive at `path` can be loaded
    without running code it carries: only `EXPORT_ARCHIVE_ENTRIES`, weights and constants stored as raw
    tensors, sample inputs that torch's weights-only unpickler reads, and graphs that call only
    `SAFE_OPERATOR`s, hold no guard code and no symbolic expression beyond `SYMPY_CALLS`. Reads the archive
    as a zip; nothing is unpickled except by the weights-only unpickler."""
    import torch

    def refuse(problem: str) -> EncoderError:
        return EncoderError(
            f"refusing torch.export encoder {path}: {problem}; only plain exports of aten graphs with raw "
            "tensor weights load (scripts/export_encoders.py writes them)"
        )

    try:
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if not name.endswith("/")]
            roots = {name.split("/", 1)[0] for name in names}
            if len(roots) != 1 or any("/" not in name for name in names):
                raise refuse("not a torch.export archive (its files are not in one root folder)")
            root = roots.pop() + "/"
            entries = {name.removeprefix(root): name for name in names}
            unexpected = sorted(entry for entry in entries if not EXPORT_ARCHIVE_ENTRIES.fullmatch(entry))
            if unexpected:
                raise refuse(f"unexpected entry {unexpected[0]} (pickled, compiled or unknown content)")
            if not any(entry.startswith("models/") for entry in entries):
                raise refuse("no models/*.json graph in the archive")
            for entry, name in entries.items():
                if entry.endswith(".json") and archive.getinfo(name).file_size > MAX_ARCHIVE_JSON_BYTES:
                    raise refuse(f"{entry} declares {archive.getinfo(name).file_size} bytes of JSON")
                if entry.endswith("_config.json"):
                    _check_payload_config(entry, json.loads(archive.read(name)), refuse)
                elif entry.startswith("models/"):
                    _check_graph(entry, json.loads(archive.read(name)), refuse)
                elif entry.startswith("data/sample_inputs/"):
                    try:
                        torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                    except Exception as error:  # torch.export.load would retry with weights_only=False
                        lines = [line for line in str(error).splitlines() if line.strip()] or [""]
                        blocked = next((line for line in lines if "GLOBAL" in line), lines[0])
                        raise refuse(f"{entry} needs pickle beyond tensors ({blocked[:160]})") from error
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise refuse(f"not a readable torch.export archive ({type(error).__name__}: {error})") from error


def _check_payload_config(entry: str, config: Any, refuse: Callable[[str], EncoderError]) -> None:
    payloads = config.get("config") if isinstance(config, dict) else None
    if not isinstance(payloads, dict):
        raise refuse(f"{entry} is not a payload config")
    for fqn, payload in payloads.items():
        if not isinstance(payload, dict) or payload.get("use_pickle") is not False:
            raise refuse(f"{entry}: {fqn} is stored with pickle")
        if not re.fullmatch(r"(weight|tensor)_\d+", str(payload.get("path_name"))):
            raise refuse(f"{entry}: {fqn} is not a raw tensor ({payload.get('path_name')})")


def _check_graph(entry: str, program: Any, refuse: Callable[[str], EncoderError]) -> None:
    if not isinstance(program, dict):
        raise refuse(f"{entry} is not an exported program")
    if program.get("guards_code"):
        raise refuse(f"{entry} carries guard code (Python source)")
    for key, value in _json_items(program):
        if key in ("target", "as_operator") and isinstance(value, str):
            if not SAFE_OPERATOR.fullmatch(value):
                raise refuse(f"{entry} calls {value[:80]!r}, not an aten operator")
        elif key == "expr_str" and isinstance(value, str):
            if not _plain_sympy(value):
                raise refuse(
                    f"{entry} holds the symbolic expression {value[:80]!r}, which is not plain sympy"
                )
        elif key == "as_custom_obj":
            raise refuse(f"{entry} uses a custom (pickled) object")


def _json_items(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of the dictionaries nested in a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from _json_items(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_items(item)


def _plain_sympy(expression: str) -> bool:
    """Whether `expression` is arithmetic on constants, shape symbols and `SYMPY_CALLS` only, so that
    sympify evaluating it cannot call anything else."""
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if not isinstance(node, SYMPY_NODES):
            return False
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name) and node.func.id in SYMPY_CALLS
        ):
            return False
        if isinstance(node, ast.Name) and node.id not in SYMPY_CALLS and not SYMPY_NAMES.fullmatch(node.id):
            return False
        if isinstance(node, ast.keyword) and (node.arg is None or not isinstance(node.value, ast.Constant)):
            return False
    return True


def make_encoder(
    spec: str = "stats", device: str | None = None, trusted: Collection[str] = ()
) -> PatchEncoder:
    """`"stats"`, `"torchscript:PATH"`, `"export:PATH"`, or a PATH (`.pt2`: torch.export, else
    TorchScript). Weight files run on CUDA when available unless `device` says otherwise; a TorchScript
    file loads only when its sha256 is in `trusted_sha256s(trusted)` (see `check_weights_file`)."""
    if spec == "stats":
        return StatsEncoder()
    exported = spec.startswith(EXPORT_PREFIX) or (
        not spec.startswith(TORCHSCRIPT_PREFIX) and spec.endswith(".pt2")
    )
    path = Path(spec.removeprefix(EXPORT_PREFIX).removeprefix(TORCHSCRIPT_PREFIX))
    if not path.is_file():
        raise EncoderError(
            f"encoder {spec!r}: expected 'stats' or the path of a TorchScript or torch.export (.pt2) file, "
            f"and {path} is not a file"
        )
    return WeightsEncoder(path, exported, device, trusted)


def find_encoder(
    provenance: EncoderProvenance, search_dirs: Sequence[Path], device: str | None = None
) -> PatchEncoder:
    """An encoder matching `provenance`: the statistics encoder, or the weight file in `search_dirs`
    whose sha256 is the provenance's (loaded only when `check_weights_file` allows it: a TorchScript
    file's sha256 must be in $HEALNET_TRUSTED_ENCODERS). Raises EncoderError naming what is missing."""
    if provenance == StatsEncoder.provenance:
        return StatsEncoder()
    if provenance.weights_sha256 is None:
        raise EncoderError(
            f"the model's patch encoder {provenance.describe()} has no recorded weights file "
            "(features imported from elsewhere): send patch features, not tiles"
        )
    candidates = sorted(
        path
        for folder in search_dirs
        if folder.is_dir()
        for path in folder.iterdir()
        if path.is_file() and path.suffix in (".pt", ".pt2", ".ts", ".jit", ".pth")
    )
    for path in candidates:
        if sha256_file(path) == provenance.weights_sha256:
            encoder = make_encoder(str(path), device)
            if encoder.provenance.dim != provenance.dim:
                raise EncoderError(
                    f"encoder {path} gives {encoder.dim} features, the model expects {provenance.dim}"
                )
            return encoder
    where = ", ".join(str(folder) for folder in search_dirs) or "no encoder folder"
    raise EncoderNotFoundError(
        f"the model's patch encoder {provenance.describe()} is not available here: no file with weights "
        f"sha256 {provenance.weights_sha256} in {where}"
    )


def encode_tiles(tiles: Sequence[np.ndarray], encoder: PatchEncoder, patch_size: int = 224) -> np.ndarray:
    """RGB uint8 tiles of any size → resized to `patch_size` → float32 (n, encoder.dim) features.

    The one path from pixels to features, shared by slide preprocessing and serving.
    """
    resized = []
    for index, tile in enumerate(tiles):
        if tile.dtype != np.uint8 or tile.ndim != 3 or tile.shape[2] != 3 or 0 in tile.shape:
            raise TileError(
                f"tile {index} must be a non-empty (h, w, 3) uint8 RGB array, got {tile.dtype} {tile.shape}"
            )
        if tile.shape[:2] != (patch_size, patch_size):
            tile = np.asarray(
                Image.fromarray(tile).resize((patch_size, patch_size), Image.Resampling.BILINEAR)
            )
        resized.append(tile)
    if not resized:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    features = encoder.encode(np.stack(resized))
    if features.shape != (len(resized), encoder.dim):
        raise ValueError(
            f"encoder {encoder.name} returned {features.shape}, expected ({len(resized)}, {encoder.dim})"
        )
    return features.astype(np.float32, copy=False)
