"""Our corpus of hostile and faulty requests to the service, and the answer each must get.

Every entry is generated here (nothing binary is stored): the memory bombs, malformed bodies and
unbounded labels that a deliberate test found, and their neighbours. `tests/test_hostile_corpus.py`
sends each one to a live `bentoml serve` of the demo model (omic + wsi, no clinical modality, the
"stats" tile encoder); `benchmarks/adversarial_soak.py` mixes them with good requests under load.

An entry expects a 4xx, or 200 where the input is legitimate (the largest request the limits accept).
A 5xx is never an expected answer.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from devtools.demo import DemoSpec, demo_feature_names, demo_payload, demo_tiles
from serving.config import Limits

SPEC = DemoSpec()
JSON_TYPE = "application/json"
# A 1-bit PNG compresses a blank 4096×4096 tile to about 2 KB: the decoder, not the body, is the bomb.
BOMB_TILE_SIDE = 4096
BOMB_TILES = 48
# Rows of patch features in a body just under the default 64 MiB body limit (row 2 of the issue).
FLOOD_PATCH_ROWS = 1_000_000
NESTING = 100_000


@dataclass(frozen=True)
class HostileRequest:
    """One request: `name` says what it attacks, `expected` the statuses it may be answered with."""

    name: str
    method: str
    path: str
    expected: frozenset[int]
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": JSON_TYPE})
    heavy: bool = False  # megabytes of body or seconds of work if it got through: sent sparingly in the soak

    @property
    def legitimate(self) -> bool:
        return self.expected == frozenset({200})


def _json(payload: object) -> bytes:
    return json.dumps(payload).encode()


def _rejected(*statuses: int) -> frozenset[int]:
    return frozenset(statuses)


ANY_4XX = frozenset(range(400, 500))


@cache
def bomb_tile() -> bytes:
    """A blank 4096×4096 1-bit PNG: about 2 KB on the wire, 48 MiB once decoded to RGB."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (BOMB_TILE_SIDE, BOMB_TILE_SIDE)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


@cache
def declared_giant_png() -> bytes:
    """A PNG whose header declares 100,000 × 100,000 pixels, followed by nothing it could decode."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def multipart(parts: Sequence[tuple[str, str | None, bytes, str | None]]) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body of (field, filename or None, content, content type or None) parts."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, filename, content, content_type in parts:
        body.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body.write(f"Content-Disposition: {disposition}\r\n".encode())
        if content_type:
            body.write(f"Content-Type: {content_type}\r\n".encode())
        body.write(b"\r\n" + content + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), {"content-type": f"multipart/form-data; boundary={boundary}"}


def _patch_flood(rows: int) -> bytes:
    """A /predict body with `rows` patch-feature rows of the demo width, as compact JSON numbers."""
    row = "[" + ",".join(["0"] * SPEC.wsi_dim) + "]"
    return ('{"wsi_features":[' + ",".join([row] * rows) + "]}").encode()


def largest_accepted_batch(limits: Limits) -> bytes:
    """The largest /predict_batch the limits accept: max_batch_cases cases of binary patch features, each
    with max_patches patches or as many as the body limit leaves room for."""
    rng = np.random.default_rng(0)
    base64_row_bytes = 4 * SPEC.wsi_dim * 4 / 3
    room = int(0.98 * limits.max_body_bytes / limits.max_batch_cases / base64_row_bytes)
    patches = rng.normal(size=(min(limits.max_patches, room), SPEC.wsi_dim)).astype("<f4")
    case = {"wsi_features_base64": base64.b64encode(patches.tobytes()).decode()}
    return _json([case] * limits.max_batch_cases)


def random_path_request() -> HostileRequest:
    """A GET of a path never seen before: a client-chosen label if the metrics took paths as they come."""
    path = f"/{uuid.uuid4().hex}"
    return HostileRequest(f"row 9: GET {path}", "GET", path, ANY_4XX)


def good_requests() -> list[HostileRequest]:
    """Legitimate requests of every input kind: their latency is what the soak protects."""
    tile_payload = {"wsi_tiles": demo_tiles(4, 64)}
    return [
        HostileRequest(
            "good: omics", "POST", "/predict", frozenset({200}), _json(demo_payload(SPEC, ("omic",)))
        ),
        HostileRequest(
            "good: omics + patches", "POST", "/predict", frozenset({200}), _json(demo_payload(SPEC))
        ),
        HostileRequest("good: tiles", "POST", "/predict", frozenset({200}), _json(tile_payload)),
        HostileRequest(
            "good: batch of 4",
            "POST",
            "/predict_batch",
            frozenset({200}),
            _json([demo_payload(SPEC, seed=seed) for seed in range(4)]),
        ),
    ]


def _hostile_builders(limits: Limits) -> list[Callable[[], HostileRequest]]:
    bomb = base64.b64encode(bomb_tile()).decode()
    gene = demo_feature_names(SPEC)["mut"][0]
    tiles_png = [base64.b64decode(tile) for tile in demo_tiles(2, 40)]
    post = "POST"

    def bomb_tiles_json() -> HostileRequest:
        body = _json({"wsi_tiles": [bomb] * BOMB_TILES})
        return HostileRequest("row 1: 48 decompression-bomb tiles, JSON", post, "/predict", ANY_4XX, body)

    def bomb_tiles_multipart() -> HostileRequest:
        parts = [("wsi_tiles", f"t{i}.png", bomb_tile(), "image/png") for i in range(BOMB_TILES)]
        body, headers = multipart(parts)
        return HostileRequest(
            "row 1: 48 decompression-bomb tiles, multipart", post, "/predict", ANY_4XX, body, headers
        )

    def patch_flood() -> HostileRequest:
        body = _patch_flood(FLOOD_PATCH_ROWS)
        return HostileRequest(
            "row 2: 10^6 patch rows under the body limit", post, "/predict", ANY_4XX, body, heavy=True
        )

    def largest_batch() -> HostileRequest:
        body = largest_accepted_batch(limits)
        return HostileRequest(
            "row 3: the largest batch the limits accept",
            post,
            "/predict_batch",
            frozenset({200}),
            body,
            heavy=True,
        )

    def nested_omics_part() -> HostileRequest:
        body, headers = multipart([("omics", None, b"[" * 1000 + b"]" * 1000, None)])
        return HostileRequest(
            "row 10: multipart omics nested 1000 deep", post, "/predict", ANY_4XX, body, headers
        )

    def huge_integer_part() -> HostileRequest:
        body, headers = multipart(
            [("omics", None, b'{"mut": {"%s": %s}}' % (gene.encode(), b"9" * 5000), None)]
        )
        return HostileRequest(
            "row 10: multipart 5,000-digit integer", post, "/predict", ANY_4XX, body, headers
        )

    def clinical_only() -> HostileRequest:
        body = _json({"clinical": {"age": 61}})
        return HostileRequest(
            "row 11: clinical to a model without it", post, "/predict", _rejected(422), body
        )

    def nested_json() -> HostileRequest:
        body = b'{"omics": {"mut": ' + b"[" * NESTING + b"]" * NESTING + b"}}"
        return HostileRequest("JSON nested 10^5 deep", post, "/predict", ANY_4XX, body)

    def huge_integer_json() -> HostileRequest:
        body = b'{"omics": {"mut": {"%s": %s}}}' % (gene.encode(), b"9" * 5000)
        return HostileRequest("JSON 5,000-digit integer", post, "/predict", ANY_4XX, body)

    def nan_literal() -> HostileRequest:
        body = b'{"omics": {"mut": {"%s": NaN}}}' % gene.encode()
        return HostileRequest("JSON NaN literal", post, "/predict", ANY_4XX, body)

    def declared_giant_tile() -> HostileRequest:
        body = _json({"wsi_tiles": [base64.b64encode(declared_giant_png()).decode()]})
        return HostileRequest("tile header declaring 10^10 pixels", post, "/predict", ANY_4XX, body)

    def truncated_tile() -> HostileRequest:
        body = _json({"wsi_tiles": [base64.b64encode(tiles_png[0][: len(tiles_png[0]) // 2]).decode()]})
        return HostileRequest("truncated PNG tile", post, "/predict", ANY_4XX, body)

    def too_many_patches() -> HostileRequest:
        body = _json(demo_payload(SPEC, ("wsi",), patches=limits.max_patches + 1))
        return HostileRequest("one patch over the limit", post, "/predict", _rejected(413), body)

    def too_many_cases() -> HostileRequest:
        body = _json([demo_payload(SPEC, ("omic",))] * (limits.max_batch_cases + 1))
        return HostileRequest("one case over the batch limit", post, "/predict_batch", _rejected(413), body)

    def ragged_base64() -> HostileRequest:
        body = _json({"wsi_features_base64": base64.b64encode(b"\0" * 7).decode()})
        return HostileRequest("base64 features of a partial patch", post, "/predict", ANY_4XX, body)

    def truncated_multipart() -> HostileRequest:
        body, headers = multipart([("wsi_tiles", "t.png", tiles_png[0], "image/png")])
        return HostileRequest(
            "multipart cut before its end", post, "/predict", ANY_4XX, body[: len(body) // 2], headers
        )

    def multipart_without_boundary() -> HostileRequest:
        body, _ = multipart([("wsi_tiles", "t.png", tiles_png[0], "image/png")])
        headers = {"content-type": "multipart/form-data"}
        return HostileRequest("multipart without a boundary", post, "/predict", ANY_4XX, body, headers)

    def multipart_unknown_field() -> HostileRequest:
        body, headers = multipart([("shell", None, b"rm -rf /", None)])
        return HostileRequest("multipart unknown field", post, "/predict", ANY_4XX, body, headers)

    def multipart_text_tile() -> HostileRequest:
        body, headers = multipart([("wsi_tiles", None, b"not a file", None)])
        return HostileRequest("multipart tile sent as text", post, "/predict", ANY_4XX, body, headers)

    def wrong_content_type() -> HostileRequest:
        return HostileRequest(
            "XML body", post, "/predict", _rejected(415), b"<predict/>", {"content-type": "application/xml"}
        )

    def empty_body() -> HostileRequest:
        return HostileRequest("empty body", post, "/predict", ANY_4XX, b"")

    def string_numbers() -> HostileRequest:
        body = _json({"omics": {"mut": {gene: "1.0"}}})
        return HostileRequest("numbers as strings", post, "/predict", _rejected(400), body)

    def unknown_field() -> HostileRequest:
        return HostileRequest(
            "unknown top-level field", post, "/predict", _rejected(400), _json({"__class__": 1})
        )

    def long_path() -> HostileRequest:
        return HostileRequest("an 8 KB path", "GET", "/" + "a" * 8000, ANY_4XX)

    return [
        bomb_tiles_json,
        bomb_tiles_multipart,
        patch_flood,
        largest_batch,
        random_path_request,
        nested_omics_part,
        huge_integer_part,
        clinical_only,
        nested_json,
        huge_integer_json,
        nan_literal,
        declared_giant_tile,
        truncated_tile,
        too_many_patches,
        too_many_cases,
        ragged_base64,
        truncated_multipart,
        multipart_without_boundary,
        multipart_unknown_field,
        multipart_text_tile,
        wrong_content_type,
        empty_body,
        string_numbers,
        unknown_field,
        long_path,
    ]


def hostile_requests(limits: Limits | None = None) -> list[HostileRequest]:
    """Every hostile entry of the corpus, for a service running with `limits` (default: the defaults).
    Entries with random parts (paths) differ on each call."""
    return [build() for build in _hostile_builders(limits or Limits())]
