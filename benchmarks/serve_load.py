"""Load benchmark of the HEALNet service against the same model called in-process.

Starts `bentoml serve` on loopback with a demo model in a temporary registry (or targets --url, whose
model must be the champion, or --tag, of the local registry), sends a bounded load at each concurrency
(a minimal keep-alive HTTP/1.1 client), and runs `Predictor.predict` on the same payloads in a loop. Prints a Markdown
table and whether the targets are met: p50 overhead over in-process < 5 ms at concurrency 1, and
>= 70 % of the in-process throughput at concurrency 8.

    python benchmarks/serve_load.py --requests 200 --concurrency 1 4 8 --json build/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from devtools.demo import DemoSpec, demo_payload

P50_OVERHEAD_TARGET_MS = 5.0
WARM_UP = 20  # requests per mode before measuring
THROUGHPUT_TARGET = 0.7


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="benchmark this running service instead of starting one")
    parser.add_argument("--tag", help="with --url: the model it serves (default: the registry's champion)")
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="concurrency levels")
    parser.add_argument("--patches", type=int, default=64, help="WSI patches per request")
    parser.add_argument("--features", type=int, default=100, help="omic features per table of the demo model")
    parser.add_argument(
        "--encoding",
        choices=("json", "base64"),
        default="json",
        help="patch features as JSON numbers (wsi_features) or as base64 float32 (wsi_features_base64)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in the server and in-process")
    parser.add_argument("--workers", type=int, default=1, help="BentoML workers of the started service")
    parser.add_argument("--rounds", type=int, default=4, help="rounds that interleave the modes")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args()


@dataclass
class Level:
    """Latencies and wall time of one mode and concurrency, summed over the rounds."""

    mode: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    server_seconds: float = 0.0
    server_requests: float = 0.0

    def row(self) -> dict:
        ms = np.asarray(self.latencies) * 1000
        row = {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "requests": len(self.latencies),
            "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)),
            "rps": len(self.latencies) / self.elapsed,
        }
        if self.server_requests:
            row["server_mean_ms"] = self.server_seconds / self.server_requests * 1000
        return row


def run_in_process(predictor, cases: list, level: Level) -> None:
    """`Predictor.predict` on each case in turn, one case per call."""
    start = time.perf_counter()
    for case in cases:
        begin = time.perf_counter()
        predictor.predict([case])
        level.latencies.append(time.perf_counter() - begin)
    level.elapsed += time.perf_counter() - start


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs pre-encoded JSON bodies.

    The load generator shares the machine's cores with the server, so it is kept to a few socket
    calls per request (a general-purpose async client costs about 1 ms of CPU per request).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> Connection:
        address = urlsplit(url)
        reader, writer = await asyncio.open_connection(address.hostname, address.port or 80)
        return cls(reader, writer, address.netloc)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            return status, await self.reader.readexactly(int(headers["content-length"]))
        chunks = []  # Transfer-Encoding: chunked
        while size := int((await self.reader.readline()).split(b";")[0], 16):
            chunks.append(await self.reader.readexactly(size))
            await self.reader.readline()
        await self.reader.readline()
        return status, b"".join(chunks)

    def close(self) -> None:
        self.writer.close()


async def run_http(url: str, bodies: list[bytes], level: Level) -> None:
    """POST each body to /predict with at most `level.concurrency` requests in flight."""
    pending = iter(bodies)
    connections = [await Connection.open(url) for _ in range(level.concurrency)]

    async def worker(connection: Connection) -> None:
        for body in pending:
            begin = time.perf_counter()
            status, answer = await connection.post("/predict", body)
            level.latencies.append(time.perf_counter() - begin)
            if status != 200:
                raise RuntimeError(f"/predict answered {status}: {answer[:500]!r}")

    seconds_before, requests_before = await server_time(url)
    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker(connection) for connection in connections))
    finally:
        for connection in connections:
            connection.close()
    level.elapsed += time.perf_counter() - start
    seconds_after, requests_after = await server_time(url)
    level.server_seconds += seconds_after - seconds_before
    level.server_requests += requests_after - requests_before


async def server_time(url: str) -> tuple[float, float]:
    """Seconds and count of successful /predict requests as BentoML measures them inside the server."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        text = (await client.get("/metrics")).text
    totals = {"_sum": 0.0, "_count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            suffix = sample.name.removeprefix("bentoml_service_request_duration_seconds")
            labels = sample.labels
            if (
                suffix in totals
                and labels.get("endpoint") == "/predict"
                and labels.get("http_response_code") == "200"
            ):
                totals[suffix] += sample.value
    return totals["_sum"], totals["_count"]


async def measure(
    url: str, checkpoint_dir: Path, payloads: list[dict], args: argparse.Namespace
) -> list[dict]:
    """Interleave the modes in `args.rounds` rounds, so that a change of machine load hits them alike."""
    import torch

    from healnet.inference import Case, Predictor

    torch.set_num_threads(args.threads)
    predictor = Predictor.from_dir(checkpoint_dir)
    cases = [
        Case(p.get("omics", {}), np.asarray(p["wsi_features"], np.float32) if "wsi_features" in p else None)
        for p in payloads
    ]
    bodies = [json.dumps(encoded(p, args.encoding)).encode() for p in payloads]
    levels = [Level("in-process", 1)] + [Level("HTTP /predict", c) for c in args.concurrency]
    warm_up = Level("warm-up", 1)
    run_in_process(predictor, cases[:WARM_UP], warm_up)
    await run_http(url, bodies[:WARM_UP], warm_up)
    for chunk in np.array_split(np.arange(len(payloads)), args.rounds):
        run_in_process(predictor, [cases[i] for i in chunk], levels[0])
        for level in levels[1:]:
            await run_http(url, [bodies[i] for i in chunk], level)
    return [level.row() for level in levels]


def encoded(payload: dict, encoding: str) -> dict:
    """The request body: patch features as JSON numbers, or as base64 of little-endian float32."""
    if encoding == "json":
        return payload
    features = np.asarray(payload["wsi_features"], dtype="<f4")
    body = {key: value for key, value in payload.items() if key != "wsi_features"}
    return body | {"wsi_features_base64": base64.b64encode(features.tobytes()).decode()}


@contextmanager
def demo_service(spec: DemoSpec, threads: int, workers: int):
    """A temporary registry with a demo champion, served by `bentoml serve`; yields (url, checkpoint).

    The registry location goes to the environment before BentoML is first used in this process.
    """
    from devtools.demo import train_demo_checkpoint
    from devtools.live_server import live_server
    from healnet.registry import register_model, set_champion

    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        os.environ["BENTOML_HOME"] = os.environ["HEALNET_REGISTRY_DIR"] = str(Path(tmp) / "home")
        checkpoint = train_demo_checkpoint(Path(tmp) / "checkpoint", spec)
        set_champion(
            register_model(checkpoint, labels={"source": "benchmark"}, metadata={}), "load benchmark"
        )
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "BENTOML_DO_NOT_TRACK": "True",
            "BENTOML_CONFIG_OPTIONS": f"services.healnet.workers={workers}",
        }
        with live_server(env, Path(tmp) / "serve.log", timeout=180) as url:
            yield url, checkpoint


def table(rows: list[dict]) -> str:
    lines = [
        "| mode | concurrency | requests | p50 ms | p95 ms | p99 ms | req/s | server-side mean ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        server = f"{row['server_mean_ms']:.2f}" if "server_mean_ms" in row else "-"
        lines.append(
            f"| {row['mode']} | {row['concurrency']} | {row['requests']} | {row['p50_ms']:.2f} | "
            f"{row['p95_ms']:.2f} | {row['p99_ms']:.2f} | {row['rps']:.1f} | {server} |"
        )
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    # HEALNet's default sizes (model_options=()), one training epoch: only the speed matters here.
    spec = DemoSpec(
        features_per_table=args.features, patches=(args.patches, args.patches + 1), epochs=1, model_options=()
    )
    payloads = [demo_payload(spec, ("omic", "wsi"), args.patches, seed) for seed in range(args.requests)]
    with ExitStack() as stack:
        if args.url:
            from healnet.registry import resolve

            url, checkpoint = args.url.rstrip("/"), resolve(args.tag)[1]
        else:
            url, checkpoint = stack.enter_context(demo_service(spec, args.threads, args.workers))
        rows = asyncio.run(measure(url, checkpoint, payloads, args))

    baseline = rows[0]
    by_concurrency = {row["concurrency"]: row for row in rows[1:]}
    results: dict[str, object] = {
        "rows": rows,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "args": vars(args) | {"json": str(args.json)},
    }
    print(table(rows))
    print()
    if 1 in by_concurrency:
        overhead_ms: float = by_concurrency[1]["p50_ms"] - baseline["p50_ms"]
        results["p50_overhead_ms"] = overhead_ms
        met = overhead_ms < P50_OVERHEAD_TARGET_MS
        print(
            f"p50 overhead at concurrency 1: {overhead_ms:.2f} ms (target < 5 ms: {'met' if met else 'NOT met'})"
        )
    if 8 in by_concurrency:
        throughput_ratio: float = by_concurrency[8]["rps"] / baseline["rps"]
        results["throughput_ratio_at_8"] = throughput_ratio
        met = throughput_ratio >= THROUGHPUT_TARGET
        print(
            f"throughput at concurrency 8: {throughput_ratio:.0%} of in-process (target >= 70 %: {'met' if met else 'NOT met'})"
        )
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
