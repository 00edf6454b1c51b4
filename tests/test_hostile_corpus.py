"""Our corpus of hostile requests (devtools/hostile_corpus.py) against a live `bentoml serve` with the
default limits: each gets the answer it must (a 4xx, or 200 where legitimate), the worker's memory grows
by less than the per-request budget, and /livez keeps answering while the requests are worked on."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from devtools.hostile_corpus import HostileRequest, good_requests, hostile_requests, random_path_request
from devtools.process_memory import reset_peak, service_workers, status_mib

pytest_plugins = ("serving_fixtures",)
pytestmark = pytest.mark.slow
PEAK_GROWTH_BUDGET_MIB = 600  # per request, over the worker's resident memory before it
LIVEZ_DEADLINE_S = 2.0
RANDOM_PATHS = 300


class LivenessProbe:
    """Polls /livez from a thread, as a kubelet would, and keeps the slowest answer and any failure."""

    def __init__(self, url: str, interval: float = 0.25):
        self.url, self.interval = url, interval
        self.slowest = 0.0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=LIVEZ_DEADLINE_S * 5) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    status = client.get(f"{self.url}/livez").status_code
                except httpx.TransportError as error:
                    status, detail = None, repr(error)
                else:
                    detail = f"HTTP {status}"
                self.slowest = max(self.slowest, time.perf_counter() - start)
                if status != 200:
                    self.failures.append(detail)
                self._stop.wait(self.interval)

    def __enter__(self) -> LivenessProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(demo_registry, serve, tmp_path_factory) -> Iterator[str]:
    with serve(demo_registry, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


def send(client: httpx.Client, url: str, entry: HostileRequest) -> httpx.Response:
    return client.request(entry.method, f"{url}{entry.path}", content=entry.body, headers=entry.headers)


def test_every_corpus_entry_gets_its_answer_within_the_memory_budget_while_livez_answers(server):
    (worker,) = service_workers(urlsplit(server).port or 0)
    outcomes = []
    with httpx.Client(timeout=90) as client, LivenessProbe(server) as probe:
        for entry in good_requests():  # warm every path first: the budget is for the request, not start-up
            assert send(client, server, entry).status_code == 200, entry.name
        for entry in hostile_requests():
            before = status_mib(worker, "VmRSS")
            reset_peak(worker)
            status = send(client, server, entry).status_code
            growth = status_mib(worker, "VmHWM") - before
            outcomes.append((entry.name, status, round(growth)))
            assert status in entry.expected, f"{entry.name}: HTTP {status}"
            assert growth < PEAK_GROWTH_BUDGET_MIB, f"{entry.name}: worker grew by {growth:.0f} MiB"
    assert not probe.failures, probe.failures
    assert probe.slowest < LIVEZ_DEADLINE_S, f"/livez took {probe.slowest:.1f} s during {outcomes}"


def test_client_chosen_paths_do_not_grow_the_metrics(server):
    """Row 9: BentoML labelled its request metrics by raw path; 300 random paths must add no series."""
    with httpx.Client(timeout=10) as client:
        client.get(f"{server}/not-a-route")
        before = client.get(f"{server}/metrics").text
        for _ in range(RANDOM_PATHS):
            assert send(client, server, random_path_request()).status_code == 404
        after = client.get(f"{server}/metrics").text
    series = [line for line in after.splitlines() if line and not line.startswith("#")]
    assert (
        len(series) <= len([line for line in before.splitlines() if line and not line.startswith("#")]) + 20
    )
    assert len(after) < 1.1 * len(before) + 4096
