"""The memory budget of a request: what the guard and the tile decoder refuse before doing the work, and
that the largest request each input kind may send stays within the budget on a live `bentoml serve`."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from devtools.demo import DemoSpec, demo_payload, demo_tiles
from devtools.hostile_corpus import declared_giant_png, multipart
from devtools.process_memory import reset_peak, service_workers, status_mib
from healnet.preprocess.encoders import StatsEncoder
from serving import validation
from serving.config import LARGE_REQUEST_BYTES, Limits
from serving.middleware import RequestGuard, json_values
from serving.schemas import PredictRequest
from serving.validation import (
    ModelContract,
    RejectedRequest,
    RequestAbandoned,
    TileBudget,
    decode_tile,
    open_tile,
    to_case,
)

pytest_plugins = ("serving_fixtures",)
SPEC = DemoSpec()
LIMITS = Limits()
PEAK_GROWTH_BUDGET_MIB = 600  # what the worst accepted request may add to a worker's resident memory
REFUSAL_GROWTH_MIB = 50  # a request refused before the work costs about its body
PATCH_SIZE = 224


def png(side: int, mode: str = "RGBA") -> bytes:
    """A blank PNG: a few kilobytes on the wire, side² pixels once decoded."""
    buffer = io.BytesIO()
    Image.new(mode, (side, side)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tile_contract() -> ModelContract:
    return ModelContract(
        modalities=["wsi"],
        table_features={},
        feature_names={},
        wsi_dim=StatsEncoder().dim,
        encoder=StatsEncoder(),
        patch_size=PATCH_SIZE,
    )


def patch_rows_json(rows: int) -> bytes:
    """A /predict body of `rows` patch-feature rows of the demo width, the shortest JSON numbers."""
    row = "[" + ",".join(["0"] * SPEC.wsi_dim) + "]"
    return ('{"wsi_features":[' + ",".join([row] * rows) + "]}").encode()


# --- the checks themselves, in-process -----------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [[], {}, [[1, 2], [3]], {"a": [1, {"b": [2, 3]}], "c": "x,[{"}, [[[]]], list(range(1000))],
    ids=["empty array", "empty object", "rows", "nested", "deep", "flat"],
)
def test_json_values_never_undercounts_the_items_and_members(value):
    def items(node) -> int:
        if isinstance(node, list):
            return len(node) + sum(map(items, node))
        if isinstance(node, dict):
            return len(node) + sum(map(items, node.values()))
        return 0

    text = json.dumps(value).encode()
    assert items(value) <= json_values(text) <= items(value) + text.count(b"[") + text.count(b"{") + 2
    # counted chunk by chunk as the body arrives, the sum is the same
    assert sum(json_values(text[i : i + 7]) for i in range(0, len(text), 7)) == json_values(text)


def test_large_requests_wait_unread_for_their_turn_and_small_ones_never_wait(monkeypatch):
    """At most HEALNET_MAX_LARGE_REQUESTS bodies over LARGE_REQUEST_BYTES are read and answered at once:
    the bound the pod memory limits are sized on."""
    monkeypatch.setenv("HEALNET_MAX_LARGE_REQUESTS", "2")
    answering, most_answering, release = 0, 0, asyncio.Event()
    bodies_read: list[int] = []

    async def app(scope, receive, send):
        nonlocal answering, most_answering
        bodies_read.append(len((await receive())["body"]))
        answering += 1
        most_answering = max(most_answering, answering)
        await release.wait()
        answering -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guard = RequestGuard(app, ["/predict"])

    def request(size: int):
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/predict",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(size).encode())],
        }

        async def receive():
            return {"type": "http.request", "body": b" " * size, "more_body": False}

        async def send(message):
            pass

        return guard(scope, receive, send)

    async def scenario():
        large = [asyncio.create_task(request(LARGE_REQUEST_BYTES + 1)) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert len(bodies_read) == 2  # the other two large requests wait with their bodies unread
        small = asyncio.create_task(request(100))
        await asyncio.sleep(0.05)
        assert sorted(bodies_read) == [100, *[LARGE_REQUEST_BYTES + 1] * 2]  # a small one goes past
        release.set()
        await asyncio.gather(*large, small)

    asyncio.run(scenario())
    assert len(bodies_read) == 5 and most_answering == 3  # two large and the small one


def test_a_tile_too_large_is_refused_from_its_header():
    start = time.perf_counter()
    with pytest.raises(RejectedRequest) as refusal:
        open_tile(0, b64(declared_giant_png()), LIMITS.max_tile_pixels)
    assert refusal.value.reason == "too_large" and "10000000000 pixels" in str(refusal.value)
    assert time.perf_counter() - start < 0.5


def test_tiles_over_the_request_pixel_budget_are_refused_before_any_is_decoded(monkeypatch):
    limits = Limits(max_request_pixels=2 * 512 * 512)
    tile = b64(png(512))
    budget = TileBudget(limits.max_request_pixels)
    to_case(PredictRequest(wsi_tiles=[tile] * 2), tile_contract(), limits, budget)
    assert budget.spent_pixels == 2 * 512 * 512

    def refuse_to_decode(*args):
        raise AssertionError("a tile was decoded")

    monkeypatch.setattr(validation, "decode_tile", refuse_to_decode)
    # the cases of one request share its budget: a second case's tile is over it
    with pytest.raises(RejectedRequest, match=f"hold {2 * 512 * 512 + 64} pixels or more"):
        to_case(PredictRequest(wsi_tiles=[b64(png(8))]), tile_contract(), limits, budget)
    with pytest.raises(RejectedRequest) as refusal:
        to_case(PredictRequest(wsi_tiles=[tile] * 3), tile_contract(), limits)
    assert refusal.value.reason == "too_large" and f"hold {3 * 512 * 512} pixels" in str(refusal.value)


def test_an_abandoned_request_stops_decoding_at_the_next_tile(monkeypatch):
    budget = TileBudget(LIMITS.max_request_pixels)
    decoded = []

    def decode_then_time_out(index, image, patch_size):
        decoded.append(index)
        budget.abandoned.set()  # as _predict does when the request times out
        return decode_tile(index, image, patch_size)

    monkeypatch.setattr(validation, "decode_tile", decode_then_time_out)
    request = PredictRequest(wsi_tiles=demo_tiles(5, size=32))
    with pytest.raises(RequestAbandoned, match="before tile 1 of 5"):
        to_case(request, tile_contract(), LIMITS, budget)
    assert decoded == [0]


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGBA", "RGB"])
def test_every_tile_is_decoded_to_rgb_at_the_patch_size(mode):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 260, 3), np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    expected = np.asarray(image.convert("RGB").resize((PATCH_SIZE, PATCH_SIZE), Image.Resampling.BILINEAR))
    decoded = decode_tile(0, open_tile(0, b64(buffer.getvalue()), LIMITS.max_tile_pixels), PATCH_SIZE)
    np.testing.assert_array_equal(decoded, expected)  # PNG: exactly what encode_tiles would resize to


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_close_to_the_full_decode():
    side = 8 * PATCH_SIZE + 40
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (side, 1)), np.full((side, side), 90)], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    tile = b64(buffer.getvalue())
    opened = open_tile(0, tile, LIMITS.max_tile_pixels)
    opened.draft("RGB", (PATCH_SIZE, PATCH_SIZE))
    assert opened.size == (side // 8, side // 8)  # what decode_tile decodes: 1/64 of the pixels
    full = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    expected = np.asarray(full.resize((PATCH_SIZE, PATCH_SIZE), Image.Resampling.BILINEAR), np.float32)
    decoded = decode_tile(0, open_tile(0, tile, LIMITS.max_tile_pixels), PATCH_SIZE)
    assert decoded.shape == (PATCH_SIZE, PATCH_SIZE, 3)
    assert np.abs(decoded - expected).mean() < 2.0


@pytest.fixture(scope="module")
def service(demo_registry, ready_service):
    return ready_service()


def test_a_timed_out_tile_request_stops_decoding_in_its_thread(service, monkeypatch):
    decoded = []

    def slow_decode(index, image, patch_size):
        decoded.append(index)
        time.sleep(0.1)
        return decode_tile(index, image, patch_size)

    monkeypatch.setattr(validation, "decode_tile", slow_decode)

    async def cancel_after(seconds: float) -> None:
        task = asyncio.ensure_future(service.predict(PredictRequest(wsi_tiles=demo_tiles(40, size=16))))
        await asyncio.sleep(seconds)
        task.cancel()  # what BentoML's timeout does to the request (504)
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)

    asyncio.run(cancel_after(0.35))
    stopped_at = len(decoded)
    time.sleep(0.3)
    assert len(decoded) == stopped_at < 10, decoded  # 40 tiles would have taken 4 s


# --- a live server with the default limits --------------------------------------------------------------


@pytest.fixture(scope="module")
def server(demo_registry, serve, tmp_path_factory):
    with serve(demo_registry, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


def peak_growth(url: str, send) -> tuple[httpx.Response, float, float]:
    """The response of `send(client)`, its seconds, and how many MiB the worker's peak grew over it."""
    (worker,) = service_workers(int(url.rsplit(":", 1)[1]))
    reset_peak(worker)
    before = status_mib(worker, "VmRSS")
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=60) as client:
        response = send(client)
    return response, time.perf_counter() - start, status_mib(worker, "VmHWM") - before


def rejections(metrics_of, url: str) -> dict[str, float]:
    samples = metrics_of(url)
    return {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "healnet_validation_errors_total"
    }


MALFORMED_PARTS = {
    "omics nested 1000 deep": ([("omics", None, b"[" * 1000 + b"]" * 1000, None)], 400, "invalid_schema"),
    "omics with a 5,000-digit integer": (
        [("omics", None, b'{"mut": {"G0_mut": ' + b"9" * 5000 + b"}}", None)],
        400,
        "invalid_schema",
    ),
    "clinical not JSON": ([("clinical", None, b"age=61", None)], 400, "invalid_schema"),
    "text parts of too many values": (
        [(name, None, b"[" + b"0," * 450_000 + b"0]", None) for name in ("omics", "clinical", "wsi_coords")],
        413,
        "too_large",
    ),
    "text part over 1 MiB": ([("omics", None, b" " * 2**21 + b"{}", None)], 413, "too_large"),
    "tile as text": ([("wsi_tiles", None, b"tile.png", None)], 400, "invalid_schema"),
    "tile not an image": ([("wsi_tiles", "t.png", b"GIF89a", "image/png")], 422, "bad_image"),
    "tile over the pixel limit": ([("wsi_tiles", "t.png", declared_giant_png(), None)], 413, "too_large"),
    "unknown part": ([("shell", None, b"rm -rf /", None)], 400, "invalid_schema"),
    "clinical only, to a model without it": ([("clinical", None, b'{"age": 61}', None)], 422, "no_modality"),
}


@pytest.mark.slow
@pytest.mark.parametrize("parts, status, reason", MALFORMED_PARTS.values(), ids=MALFORMED_PARTS.keys())
def test_every_malformed_multipart_part_is_refused_within_a_second_and_counted(
    server, metrics_of, parts, status, reason
):
    before = rejections(metrics_of, server).get(reason, 0.0)
    body, headers = multipart(parts)
    start = time.perf_counter()
    response = httpx.post(f"{server}/predict", content=body, headers=headers, timeout=60)
    assert time.perf_counter() - start < 1.0
    assert (response.status_code, response.json()["reason"]) == (status, reason), response.text
    assert rejections(metrics_of, server)[reason] == before + 1


MALFORMED_JSON = {
    "nested 100,000 deep": b'{"omics": {"mut": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
    "a 5,000-digit integer": b'{"omics": {"mut": {"G0_mut": ' + b"9" * 5000 + b"}}}",
    "a 5,000-digit coordinate": b'{"wsi_features": [[0]], "wsi_coords": [[' + b"9" * 5000 + b", 0]]}",
}


@pytest.mark.slow
@pytest.mark.parametrize("body", MALFORMED_JSON.values(), ids=MALFORMED_JSON.keys())
def test_unreadable_json_is_400_invalid_schema_within_a_second_and_counted(server, metrics_of, body):
    before = rejections(metrics_of, server).get("invalid_schema", 0.0)
    start = time.perf_counter()
    response = httpx.post(f"{server}/predict", content=body, headers={"content-type": "application/json"})
    assert time.perf_counter() - start < 1.0
    assert (response.status_code, response.json()["reason"]) == (400, "invalid_schema"), response.text
    assert rejections(metrics_of, server)["invalid_schema"] == before + 1


@pytest.mark.slow
def test_a_cut_or_unbounded_multipart_body_is_refused_and_counted(server, metrics_of):
    before = rejections(metrics_of, server).get("invalid_schema", 0.0)
    body, headers = multipart([("wsi_tiles", "t.png", png(8), "image/png")])
    cut = httpx.post(f"{server}/predict", content=body[: len(body) // 2], headers=headers, timeout=10)
    unbounded = httpx.post(
        f"{server}/predict", content=body, headers={"content-type": "multipart/form-data"}, timeout=10
    )
    assert [cut.status_code, unbounded.status_code] == [400, 400], (cut.text, unbounded.text)
    assert rejections(metrics_of, server)["invalid_schema"] == before + 2


@pytest.mark.slow
def test_clinical_values_alone_for_a_model_without_them_are_422_no_modality(server):
    response = httpx.post(f"{server}/predict", json={"clinical": {"age": 61}}, timeout=10)
    assert (response.status_code, response.json()["reason"]) == (422, "no_modality")
    assert "omic tables" in response.json()["error"]


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["json", "multipart"])
def test_decompression_bomb_tiles_are_refused_from_their_headers(server, encoding):
    bomb = png(4096, "1")  # about 2 KB, 48 MiB as RGB
    if encoding == "json":
        body, headers = (
            json.dumps({"wsi_tiles": [b64(bomb)] * 48}).encode(),
            {"content-type": "application/json"},
        )
    else:
        body, headers = multipart([("wsi_tiles", f"t{i}.png", bomb, "image/png") for i in range(48)])
    response, seconds, growth = peak_growth(
        server, lambda c: c.post("/predict", content=body, headers=headers)
    )
    assert (response.status_code, response.json()["reason"]) == (413, "too_large")
    assert "pixels" in response.json()["error"]
    assert seconds < 1.0 and growth < REFUSAL_GROWTH_MIB


@pytest.mark.slow
def test_a_flood_of_json_values_is_refused_before_parsing_and_livez_answers(server):
    flood = patch_rows_json(1_000_000)  # about 60 MiB, under the body limit
    assert len(flood) < LIMITS.max_body_bytes
    response, seconds, growth = peak_growth(server, lambda c: c.post("/predict", content=flood))
    assert (response.status_code, response.json()["reason"]) == (413, "too_large")
    assert "JSON values" in response.json()["error"]
    assert seconds < 3.0 and growth < REFUSAL_GROWTH_MIB


def patch_batch_json(values: int) -> bytes:
    """A /predict_batch of cases of max_patches JSON patch rows (the last one shorter) that holds just
    under `values` JSON values as the guard counts them."""
    per_row = SPEC.wsi_dim + 1  # its numbers, the comma before it and its bracket
    rows = (values - 100) // per_row
    row = [0.5] * SPEC.wsi_dim
    sizes = [LIMITS.max_patches] * (rows // LIMITS.max_patches) + [rows % LIMITS.max_patches]
    return json.dumps([{"wsi_features": [row] * size} for size in sizes if size]).encode()


def omics_batch_json(values: int) -> bytes:
    """A /predict_batch of max_batch_cases cases, each with every omic feature of the model and as many
    names it does not use (listed in the answer's unknown_features) as bring the batch just under
    `values` JSON values."""
    case = demo_payload(SPEC, ("omic",))
    room = values // LIMITS.max_batch_cases - json_values(json.dumps(case).encode()) - 1
    case["omics"]["mut"] |= {f"UNUSED{i}_mut": 0.5 for i in range(room)}
    return json.dumps([case] * LIMITS.max_batch_cases).encode()


def largest_binary_batch() -> bytes:
    """max_batch_cases cases of base64 patch features, as many patches each as the body limit leaves."""
    row_bytes = 4 * SPEC.wsi_dim * 4 / 3
    patches = min(LIMITS.max_patches, int(0.98 * LIMITS.max_body_bytes / LIMITS.max_batch_cases / row_bytes))
    bag = np.random.default_rng(0).normal(size=(patches, SPEC.wsi_dim)).astype("<f4")
    return json.dumps([{"wsi_features_base64": b64(bag.tobytes())}] * LIMITS.max_batch_cases).encode()


def noise_png(side: int) -> bytes:
    """An incompressible RGB PNG: its bytes on the wire are about its pixels."""
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


def multipart_tiles_at_the_body_limit() -> tuple[bytes, dict[str, str]]:
    tile = noise_png(512)
    count = min(LIMITS.max_tiles, int(0.98 * LIMITS.max_body_bytes) // (len(tile) + 200))
    return multipart([("wsi_tiles", f"t{i}.png", tile, "image/png") for i in range(count)])


JSON = {"content-type": "application/json"}
# The largest request of each input kind that the default limits accept: (path, body, headers).
WORST_ACCEPTED = {
    "tiles at the request pixel budget": lambda: (
        "/predict",
        json.dumps({"wsi_tiles": [b64(png(4096))] * (LIMITS.max_request_pixels // 4096**2)}).encode(),
        JSON,
    ),
    "tiles at the body limit, multipart": lambda: ("/predict", *multipart_tiles_at_the_body_limit()),
    "JSON patch features at the value budget": lambda: (
        "/predict_batch",
        patch_batch_json(LIMITS.max_json_values),
        JSON,
    ),
    "omics at the value budget": lambda: ("/predict_batch", omics_batch_json(LIMITS.max_json_values), JSON),
    "binary patch features at the body limit": lambda: ("/predict_batch", largest_binary_batch(), JSON),
}


class LivezProbe:
    """Times GET /livez every 0.1 s from a thread while the block runs: the slowest answer, in seconds."""

    def __init__(self, url: str):
        self.url, self.slowest = url, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.wait(0.1):
                start = time.perf_counter()
                assert client.get("/livez").status_code == 200
                self.slowest = max(self.slowest, time.perf_counter() - start)

    def __enter__(self) -> LivezProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
@pytest.mark.parametrize("build", WORST_ACCEPTED.values(), ids=WORST_ACCEPTED.keys())
def test_the_largest_accepted_request_of_each_kind_stays_within_the_memory_budget(server, build):
    path, body, headers = build()
    assert len(body) <= LIMITS.max_body_bytes
    with LivezProbe(server) as livez:
        response, _, growth = peak_growth(server, lambda c: c.post(path, content=body, headers=headers))
    assert response.status_code == 200, response.text
    assert growth < PEAK_GROWTH_BUDGET_MIB
    assert livez.slowest < 2.0
