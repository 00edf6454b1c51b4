"""The canary's AnalysisTemplate (k8s/overlays/canary) on a real Prometheus.

One synthetic /metrics endpoint exposes several canaries at once, each under its own
rollouts_pod_template_hash (the label the canary overlay's ServiceMonitor adds to every series): a healthy
one, one per failure the analysis must catch, one whose pods answered no request yet and one that was never
scraped. Each metric's query, with the Rollout's arguments filled in, goes through Prometheus's HTTP API, and
its successCondition is applied to the result as Argo Rollouts does.
"""

from __future__ import annotations

import operator
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REQUIRES_PROMETHEUS

from devtools.live_server import wait_until
from devtools.monitoring_stack import NAMESPACE, run_prometheus
from devtools.monitoring_stack import query as instant_query
from serving.metrics import risk_buckets

ANALYSIS_TEMPLATE = (
    Path(__file__).resolve().parents[1] / "k8s" / "overlays" / "canary" / "analysistemplate.yaml"
)
DATA_TIMEOUT_S = 30.0
N_BINS = 4
REFERENCE_RISK = {"0.25": -2.5, "0.5": -2.0, "0.75": -1.5}
# the risk scores of every ten requests, around the reference median (-2.0: five at or below it)
RISK_OFFSETS = (-0.9, -0.6, -0.45, -0.3, -0.1, 0.1, 0.3, 0.45, 0.6, 0.9)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class Canary:
    """What one canary's pods served since the endpoint started, per second."""

    requests_per_s: float = 50.0
    server_error_share: float = 0.0
    invalid_share: float = 0.01
    latency_s: float = 0.08
    risk_shift: float = 0.0


CANARIES = {
    "healthy": Canary(),
    "server-errors": Canary(server_error_share=0.2),
    "invalid-inputs": Canary(invalid_share=0.3),
    "slow": Canary(latency_s=3.0),
    "shifted-risk": Canary(risk_shift=1.5),
    # started and scraped, no request yet: every counter and bucket stays at 0 (rates 0, ratios 0/0)
    "idle": Canary(requests_per_s=0.0),
}
NEVER_SCRAPED = "never-scraped"
FAILING_METRIC = {
    "server-errors": "server-error-ratio",
    "invalid-inputs": "validation-error-ratio",
    "slow": "request-latency-p95",
    "shifted-risk": "risk-median-shift",
}


def _series(name: str, labels: dict[str, str], value: float) -> str:
    rendered = ",".join(f'{key}="{label}"' for key, label in labels.items())
    return f"{name}{{{rendered}}} {value}"


def _histogram(
    name: str, labels: dict[str, str], bounds: tuple[float, ...], observations: dict[float, float]
) -> list[str]:
    """Cumulative bucket lines (bounds, then +Inf) of a histogram whose `observations` are {observed value: how many times}."""
    lines = [
        _series(
            f"{name}_bucket",
            labels | {"le": "+Inf" if bound == float("inf") else str(bound)},
            sum(times for value, times in observations.items() if value <= bound),
        )
        for bound in (*bounds, float("inf"))
    ]
    lines.append(_series(f"{name}_count", labels, sum(observations.values())))
    lines.append(_series(f"{name}_sum", labels, sum(value * times for value, times in observations.items())))
    return lines


def exposition(elapsed_s: float) -> str:
    """The Prometheus text exposition of every canary, `elapsed_s` seconds after the endpoint started."""
    families: dict[str, list[str]] = {
        "bentoml_service_request_total counter": [],
        "bentoml_service_request_duration_seconds histogram": [],
        "healnet_validation_errors_total counter": [],
        "healnet_risk_score histogram": [],
        "healnet_reference_risk_score gauge": [],
    }
    for pod_hash, canary in CANARIES.items():
        pod = {"rollouts_pod_template_hash": pod_hash}
        requests = canary.requests_per_s * elapsed_s
        server_errors = requests * canary.server_error_share
        invalid = requests * canary.invalid_share
        answers = {"200": requests - server_errors - invalid, "422": invalid, "500": server_errors}
        for code, count in answers.items():
            families["bentoml_service_request_total counter"].append(
                _series(
                    "bentoml_service_request_total",
                    pod | {"endpoint": "/predict", "http_response_code": code},
                    count,
                )
            )
        # A starting pod's readiness answers 503: not an API error, the analysis must not count it.
        families["bentoml_service_request_total counter"].append(
            _series(
                "bentoml_service_request_total",
                pod | {"endpoint": "/readyz", "http_response_code": "503"},
                10 * elapsed_s,
            )
        )
        families["bentoml_service_request_duration_seconds histogram"] += _histogram(
            "bentoml_service_request_duration_seconds",
            pod | {"endpoint": "/predict", "http_response_code": "200"},
            LATENCY_BUCKETS,
            {canary.latency_s: requests},
        )
        families["healnet_validation_errors_total counter"].append(
            _series("healnet_validation_errors_total", pod | {"reason": "wrong_dimensions"}, invalid)
        )
        scores = {
            REFERENCE_RISK["0.5"] + canary.risk_shift + offset: requests / len(RISK_OFFSETS)
            for offset in RISK_OFFSETS
        }
        families["healnet_risk_score histogram"] += _histogram(
            "healnet_risk_score", pod, risk_buckets(N_BINS), scores
        )
        families["healnet_reference_risk_score gauge"] += [
            _series("healnet_reference_risk_score", pod | {"training_quantile": quantile}, value)
            for quantile, value in REFERENCE_RISK.items()
        ]
    lines = []
    for family, series in families.items():
        lines.append(f"# TYPE {family}")
        lines += series
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def metrics_endpoint() -> Iterator[str]:
    started = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = exposition(time.monotonic() - started).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            """Quiet: Prometheus scrapes every second."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def analysis_template() -> dict[str, Any]:
    return yaml.safe_load(ANALYSIS_TEMPLATE.read_text())


def with_arguments(text: str, arguments: dict[str, str]) -> str:
    """`{{args.NAME}}` replaced as Argo Rollouts resolves an AnalysisRun's arguments."""
    return re.sub(r"\{\{\s*args\.([\w-]+)\s*\}\}", lambda match: arguments[match.group(1)], text)


def canary_query(metric: dict[str, Any], pod_hash: str) -> str:
    return with_arguments(
        metric["provider"]["prometheus"]["query"], {"canary-hash": pod_hash, "namespace": NAMESPACE}
    )


COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}
CONDITION = re.compile(r"result\[0\] (<=|<|>=|>) (-?[0-9.]+)")


def argo_phase(success_condition: str, result: list[float]) -> str:
    """The measurement phase Argo Rollouts (utils/evaluate) gives a vector result under a success condition
    alone: Error when `result[0]` does not exist, Failed when the condition is false (NaN makes every
    comparison false, in Go as in Python)."""
    match = CONDITION.fullmatch(success_condition)
    assert match, (
        f"{success_condition!r} is beyond this evaluator: keep the conditions `result[0] <op> number`"
    )
    if not result:
        return "Error"
    comparison, threshold = match.groups()
    return "Successful" if COMPARISONS[comparison](result[0], float(threshold)) else "Failed"


def measure(prometheus: str, metric: dict[str, Any], query: str) -> str:
    result = [float(series["value"][1]) for series in instant_query(prometheus, query)]
    return argo_phase(metric["successCondition"], result)


@pytest.fixture(scope="module")
def prometheus(metrics_endpoint: str, analysis_template: dict[str, Any], tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("prometheus")
    with run_prometheus(metrics_endpoint, folder) as url:
        # Every canary with traffic has served enough scores for a median, over at least two scrapes.
        enough = "sum by (rollouts_pod_template_hash) (increase(healnet_risk_score_count[10m])) >= 50"
        with_traffic = sum(canary.requests_per_s > 0 for canary in CANARIES.values())
        ready = wait_until(lambda: len(instant_query(url, enough)) == with_traffic, DATA_TIMEOUT_S, 0.25)
        assert ready, (folder / "prometheus.log").read_text()[-3000:]
        yield url


def test_the_conditions_are_ones_the_evaluator_reads(analysis_template: dict[str, Any]) -> None:
    metrics = analysis_template["spec"]["metrics"]
    assert {metric["name"] for metric in metrics} == set(FAILING_METRIC.values())
    for metric in metrics:
        assert CONDITION.fullmatch(metric["successCondition"]), metric["name"]
        assert "failureCondition" not in metric, "argo_phase models a success condition alone"


def test_argo_phase_follows_argo_rollouts() -> None:
    assert argo_phase("result[0] <= 0.05", [0.01]) == "Successful"
    assert argo_phase("result[0] <= 0.05", [0.2]) == "Failed"
    assert argo_phase("result[0] <= 0.05", [float("nan")]) == "Failed"
    assert argo_phase("result[0] <= 0.05", []) == "Error"


@pytest.mark.slow
@REQUIRES_PROMETHEUS
def test_the_analysis_passes_a_healthy_canary_and_fails_each_broken_one(
    prometheus: str, analysis_template: dict[str, Any]
) -> None:
    metrics = analysis_template["spec"]["metrics"]
    measured = {
        pod_hash: {
            metric["name"]: measure(prometheus, metric, canary_query(metric, pod_hash)) for metric in metrics
        }
        for pod_hash in [*CANARIES, NEVER_SCRAPED]
    }
    expected = {
        pod_hash: {
            metric["name"]: "Failed" if FAILING_METRIC.get(pod_hash) == metric["name"] else "Successful"
            for metric in metrics
        }
        for pod_hash in [*CANARIES, NEVER_SCRAPED]
    }
    assert measured == expected


@pytest.mark.slow
@REQUIRES_PROMETHEUS
def test_without_the_guard_a_canary_without_traffic_would_abort(
    prometheus: str, analysis_template: dict[str, Any]
) -> None:
    """The `or on() vector(0)` is what keeps "no request yet" from an Error (consecutive errors abort), and
    only then: the healthy canary passes on its own measurements."""
    guard = re.compile(r"\s*or on\(\) vector\(0\)\s*$")
    for metric in analysis_template["spec"]["metrics"]:
        for pod_hash, phase in (("idle", "Error"), (NEVER_SCRAPED, "Error"), ("healthy", "Successful")):
            query = canary_query(metric, pod_hash)
            assert guard.search(query), f"{metric['name']} has no guard"
            assert measure(prometheus, metric, guard.sub("", query)) == phase, (metric["name"], pod_hash)
