"""Adversarial soak of the HEALNet service: good requests mixed with every hostile class of our corpus.

Starts `bentoml serve` (one worker, default limits) on loopback with a demo champion in a temporary
registry, then runs two phases at the same concurrency:

1. baseline: good requests only (omics, omics + patches, tiles, a batch of four), `--baseline-seconds`;
2. soak: the same good requests, each slot sending a hostile entry of devtools/hostile_corpus.py in
   place of a good one with probability `--hostile-share`, for `--seconds`. Heavy entries (tens of
   megabytes of body) are sent by at most one slot at a time.

A thread polls /livez every 0.25 s throughout. Reports the counts by status, the p99 of the good
requests in both phases, the worker's resident memory at the start, its peak and its value after
the soak, and the slowest /livez answer; checks the targets:

- no 5xx (and every answer one its entry allows),
- good-request p99 in the soak under 4x the baseline's,
- resident memory after the soak within 10 % of its start,
- /livez always answered within 2 s.

    python benchmarks/adversarial_soak.py --seconds 300 --concurrency 8 --json build/adversarial_soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

from devtools.hostile_corpus import HostileRequest, good_requests, hostile_requests, random_path_request
from devtools.process_memory import reset_peak, service_workers, status_mib

P99_FACTOR_TARGET = 4.0
RSS_RETURN_TARGET = 0.10
LIVEZ_TARGET_S = 2.0
SETTLE_S = 5.0  # after the soak, before the final memory reading: answers in flight finish


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=300.0, help="length of the soak phase")
    parser.add_argument("--baseline-seconds", type=float, default=30.0, help="length of the good-only phase")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument(
        "--hostile-share", type=float, default=0.5, help="share of hostile requests in the soak"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args()


@dataclass
class Phase:
    name: str
    good_latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)  # (kind, status) -> count
    unexpected: Counter = field(default_factory=Counter)  # (entry name, status) -> count
    sent: int = 0

    def p99_ms(self) -> float:
        return float(np.percentile(np.asarray(self.good_latencies) * 1000, 99))


class LivezProbe(threading.Thread):
    """/livez every 0.25 s from its own thread; keeps the slowest answer and the failures."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.slowest, self.failures = url, 0.0, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stopped.is_set():
                start = time.perf_counter()
                try:
                    ok = client.get(f"{self.url}/livez").status_code == 200
                except httpx.TransportError:
                    ok = False
                self.slowest = max(self.slowest, time.perf_counter() - start)
                self.failures += not ok
                self.stopped.wait(0.25)


async def run_phase(
    url: str, phase: Phase, seconds: float, concurrency: int, hostile_share: float, seed: int
) -> None:
    good = good_requests()
    hostile = [entry for entry in hostile_requests() if not entry.name.startswith("row 9")]
    light = itertools.cycle([entry for entry in hostile if not entry.heavy])
    heavy = itertools.cycle([entry for entry in hostile if entry.heavy])
    heavy_in_flight = asyncio.Lock()
    deadline = time.monotonic() + seconds

    async def send(client: httpx.AsyncClient, entry: HostileRequest) -> int:
        response = await client.request(entry.method, entry.path, content=entry.body, headers=entry.headers)
        return response.status_code

    async def slot(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        async with httpx.AsyncClient(base_url=url, timeout=90) as client:
            while time.monotonic() < deadline:
                if rng.random() >= hostile_share:
                    entry = rng.choice(good)
                    start = time.perf_counter()
                    status = await send(client, entry)
                    phase.good_latencies.append(time.perf_counter() - start)
                    kind = "good"
                elif rng.random() < 0.05 and not heavy_in_flight.locked():
                    async with heavy_in_flight:
                        entry = next(heavy)
                        status = await send(client, entry)
                    kind = "hostile"
                else:
                    entry = random_path_request() if rng.random() < 0.1 else next(light)
                    status = await send(client, entry)
                    kind = "hostile"
                phase.sent += 1
                phase.statuses[(kind, status)] += 1
                if status not in entry.expected:
                    phase.unexpected[(entry.name, status)] += 1

    await asyncio.gather(*(slot(i) for i in range(concurrency)))


@contextmanager
def demo_service():
    """A temporary registry with a demo champion served by one `bentoml serve` worker; yields its URL."""
    from devtools.demo import train_demo_checkpoint
    from devtools.live_server import live_server
    from healnet.registry import register_model, set_champion

    with tempfile.TemporaryDirectory(prefix="adversarial_soak_") as tmp:
        os.environ["BENTOML_HOME"] = os.environ["HEALNET_REGISTRY_DIR"] = str(Path(tmp) / "home")
        checkpoint = train_demo_checkpoint(Path(tmp) / "checkpoint")
        set_champion(
            register_model(checkpoint, labels={"source": "benchmark"}, metadata={}), "adversarial soak"
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1", "BENTOML_DO_NOT_TRACK": "True"}
        with live_server(env, Path(tmp) / "serve.log", timeout=180) as url:
            yield url


def main() -> int:
    args = parse_args()
    with demo_service() as url:
        (worker,) = service_workers(urlsplit(url).port or 0)
        baseline = Phase("baseline")
        asyncio.run(run_phase(url, Phase("warm-up"), 5.0, args.concurrency, 0.0, args.seed))
        asyncio.run(run_phase(url, baseline, args.baseline_seconds, args.concurrency, 0.0, args.seed))
        gc.collect()
        start_rss = status_mib(worker, "VmRSS")
        reset_peak(worker)
        soak = Phase("soak")
        probe = LivezProbe(url)
        probe.start()
        asyncio.run(run_phase(url, soak, args.seconds, args.concurrency, args.hostile_share, args.seed))
        time.sleep(SETTLE_S)
        probe.stopped.set()
        probe.join()
        peak_rss, final_rss = status_mib(worker, "VmHWM"), status_mib(worker, "VmRSS")
    server_errors = sum(count for (_, status), count in soak.statuses.items() if status >= 500)
    results = {
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "hostile_share": args.hostile_share,
        "requests": soak.sent,
        "statuses": {f"{kind} {status}": count for (kind, status), count in sorted(soak.statuses.items())},
        "unexpected": {f"{name}: {status}": count for (name, status), count in soak.unexpected.items()},
        "good_p99_ms_baseline": baseline.p99_ms(),
        "good_p99_ms_soak": soak.p99_ms(),
        "rss_mib_start": start_rss,
        "rss_mib_peak": peak_rss,
        "rss_mib_final": final_rss,
        "livez_slowest_s": probe.slowest,
        "livez_failures": probe.failures,
    }
    checks = {
        "no 5xx, every answer allowed": server_errors == 0 and not soak.unexpected,
        f"good p99 < {P99_FACTOR_TARGET:g}x baseline": soak.p99_ms() < P99_FACTOR_TARGET * baseline.p99_ms(),
        f"final RSS within {RSS_RETURN_TARGET:.0%} of start": abs(final_rss - start_rss)
        <= RSS_RETURN_TARGET * start_rss,
        f"/livez within {LIVEZ_TARGET_S:g} s": probe.slowest < LIVEZ_TARGET_S and probe.failures == 0,
    }
    results["checks"] = checks
    print(f"{soak.sent} requests in {args.seconds:g} s at concurrency {args.concurrency}")
    print("| answer | count |\n|---|---:|")
    for label, count in results["statuses"].items():
        print(f"| {label} | {count} |")
    for label, count in results["unexpected"].items():
        print(f"unexpected: {label} x{count}")
    print(
        f"good p99: {baseline.p99_ms():.1f} ms baseline, {soak.p99_ms():.1f} ms in the soak; "
        f"worker RSS {start_rss:.0f} MiB at start, {peak_rss:.0f} peak, {final_rss:.0f} after; "
        f"slowest /livez {probe.slowest:.2f} s"
    )
    for check, met in checks.items():
        print(f"{'met' if met else 'NOT met'}: {check}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
