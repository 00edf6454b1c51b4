"""Soak: mixed load on a real `bentoml serve` that follows the champion, with a promotion and a rollback in
the middle. Loopback only, bounded in time and in requests.

    python benchmarks/promotion_soak.py --seconds 30 --concurrency 4 --poll 1

A temporary registry holds two demo models; the service follows its champion every `--poll` seconds.
Clients send a mix of valid requests (omics + slide, omics only, slide only) and invalid ones (no
modality: 422). At one third of the run the second model is promoted, at two thirds the champion is rolled
back. Reported: requests by status and by answering version, 5xx count, how long each change took to
reach the answers, and answers that named a version other than the champion of their time (counted after
each change has had the poll interval plus a load allowance to take effect).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from serve_load import demo_service

from devtools.demo import DemoSpec, demo_payload, train_demo_checkpoint

LOAD_ALLOWANCE_S = 5.0  # loading, verifying and warming the demo model on a busy 2-core machine
MAX_REQUESTS = 50_000


def payloads(spec: DemoSpec) -> list[tuple[str, dict]]:
    return [
        ("omic+wsi", demo_payload(spec, ("omic", "wsi"), patches=8, seed=1)),
        ("omic", demo_payload(spec, ("omic",), seed=2)),
        ("wsi", demo_payload(spec, ("wsi",), patches=4, seed=3)),
        ("invalid", {}),
    ]


def client(
    url: str, deadline: float, answers: list, lock: threading.Lock, offset: int, spec: DemoSpec
) -> None:
    mix = payloads(spec)
    with httpx.Client(timeout=30) as session:
        index = offset
        while time.monotonic() < deadline and len(answers) < MAX_REQUESTS:
            kind, body = mix[index % len(mix)]
            index += 1
            sent = time.monotonic()
            response = session.post(f"{url}/predict", json=body)
            version = response.json().get("model_version") if response.status_code == 200 else None
            with lock:
                answers.append((sent, time.monotonic(), kind, response.status_code, version))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the load (bounded)")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads")
    parser.add_argument("--poll", type=float, default=1.0, help="HEALNET_FOLLOW_CHAMPION_S of the service")
    parser.add_argument("--workers", type=int, default=1, help="BentoML workers")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    os.environ["HEALNET_FOLLOW_CHAMPION_S"] = str(args.poll)
    spec = DemoSpec()
    with demo_service(spec, threads=1, workers=args.workers) as (url, _):
        from healnet.registry import get_champion, register_model, rollback, set_champion

        champion = get_champion()
        if champion is None:
            raise SystemExit("the demo service registered no champion")
        first = champion["tag"]
        with tempfile.TemporaryDirectory(prefix="soak_") as tmp:
            second = register_model(train_demo_checkpoint(Path(tmp) / "second", DemoSpec(seed=1)))
        answers: list = []
        lock = threading.Lock()
        started = time.monotonic()
        deadline = started + args.seconds
        threads = [
            threading.Thread(target=client, args=(url, deadline, answers, lock, i, spec), daemon=True)
            for i in range(args.concurrency)
        ]
        for thread in threads:
            thread.start()
        changes = []
        for fraction, action, tag in (
            (1 / 3, lambda: set_champion(second, "soak"), second),
            (2 / 3, rollback, first),
        ):
            time.sleep(max(0.0, started + fraction * args.seconds - time.monotonic()))
            changes.append((time.monotonic(), tag))
            action()
        for thread in threads:
            thread.join(args.seconds + 60)

    statuses = Counter(status for _, _, _, status, _ in answers)
    versions = Counter(version for _, _, _, _, version in answers if version)
    report = {
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "poll_s": args.poll,
        "requests": len(answers),
        "by_status": dict(sorted(statuses.items())),
        "by_version": dict(versions),
        "server_errors": sum(n for status, n in statuses.items() if status >= 500),
        "changes": [],
    }
    bounds = [changed for changed, _ in changes[1:]] + [float("inf")]
    for (changed, tag), until in zip(changes, bounds, strict=True):
        reached = [received for sent, received, _, _, version in answers if sent > changed and version == tag]
        settled = changed + args.poll + LOAD_ALLOWANCE_S
        stale = sum(
            1 for sent, _, _, _, version in answers if settled < sent < until and version not in (None, tag)
        )
        report["changes"].append(
            {
                "to": tag,
                "took_s": round(min(reached) - changed, 2) if reached else None,
                "stale_answers": stale,
            }
        )
    print(json.dumps(report, indent=2))
    print("| requests | 2xx | 4xx | 5xx | promotion took | rollback took | stale answers |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    count = lambda low: sum(n for status, n in statuses.items() if low <= status < low + 100)  # noqa: E731
    took = [f"{change['took_s']} s" for change in report["changes"]]
    stale = sum(change["stale_answers"] for change in report["changes"])
    print(
        f"| {len(answers)} | {count(200)} | {count(400)} | {count(500)} | {took[0]} | {took[1]} | {stale} |"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["server_errors"] == 0 and stale == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
