"""The canary's AnalysisTemplates (k8s/overlays/canary) on a real Prometheus.

One synthetic /metrics endpoint exposes several canaries at once, each under its own
rollouts_pod_template_hash (the label the canary overlay's ServiceMonitor adds to every series): a healthy
one, one per failure the background analysis must catch, one whose pods answered no request yet, two that
answered one request fewer than the traffic check asks and just enough, and one that was never scraped.
Each metric, with the Rollout's arguments and the template's defaults filled in, has its query go through
Prometheus's HTTP API, and its conditions are applied to the result as Argo Rollouts does.
"""

from __future__ import annotations

import json
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

CANARY_OVERLAY = Path(__file__).resolve().parents[1] / "k8s" / "overlays" / "canary"
ANALYSIS_TEMPLATE = CANARY_OVERLAY / "analysistemplate.yaml"
TRAFFIC_TEMPLATE = CANARY_OVERLAY / "analysistemplate-traffic.yaml"
MIN_REQUESTS = float(
    next(
        arg["value"]
        for arg in yaml.safe_load(TRAFFIC_TEMPLATE.read_text())["spec"]["args"]
        if arg["name"] == "min-requests"
    )
)
DATA_TIMEOUT_S = 30.0
N_BINS = 4
REFERENCE_RISK = {"0.25": -2.5, "0.5": -2.0, "0.75": -1.5}
# the risk scores of every ten requests, around the reference median (-2.0: five at or below it)
RISK_OFFSETS = (-0.9, -0.6, -0.45, -0.3, -0.1, 0.1, 0.3, 0.45, 0.6, 0.9)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class Canary:
    """What one canary's pods served: mostly per second since the endpoint started."""

    requests_per_s: float = 50.0
    # answered before the endpoint started: a canary that saw this many requests and none since
    requests_before_start: float = 0.0
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
    # Either side of the traffic check's minimum, each passing every background metric. No invalid
    # inputs, so that the request counts stay whole numbers and compare with the minimum exactly.
    "trickle": Canary(requests_per_s=0.0, requests_before_start=MIN_REQUESTS - 1, invalid_share=0.0),
    "just-enough": Canary(requests_per_s=0.0, requests_before_start=MIN_REQUESTS, invalid_share=0.0),
}
NEVER_SCRAPED = "never-scraped"
FAILING_METRIC = {
    "server-errors": "server-error-ratio",
    "invalid-inputs": "validation-error-ratio",
    "slow": "request-latency-p95",
    "shifted-risk": "risk-median-shift",
}
TOO_LITTLE_TRAFFIC = {"idle", "trickle", NEVER_SCRAPED}


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
        requests = canary.requests_before_start + canary.requests_per_s * elapsed_s
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


@pytest.fixture(scope="module")
def traffic_template() -> dict[str, Any]:
    return yaml.safe_load(TRAFFIC_TEMPLATE.read_text())


def with_arguments(text: str, arguments: dict[str, str]) -> str:
    """`{{args.NAME}}` replaced as Argo Rollouts resolves an AnalysisRun's arguments."""
    return re.sub(r"\{\{\s*args\.([\w-]+)\s*\}\}", lambda match: arguments[match.group(1)], text)


def canary_metric(template: dict[str, Any], metric: dict[str, Any], pod_hash: str) -> dict[str, Any]:
    """`metric` as the AnalysisRun of `pod_hash`'s canary runs it: the Rollout's arguments and the template's
    defaults filled in everywhere, conditions included (Argo Rollouts resolves the metric's JSON)."""
    defaults = {arg["name"]: arg["value"] for arg in template["spec"]["args"] if "value" in arg}
    arguments = defaults | {"canary-hash": pod_hash, "namespace": NAMESPACE}
    return json.loads(with_arguments(json.dumps(metric), arguments))


COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}
CONDITION = re.compile(r"result\[0\] (<=|<|>=|>) (-?[0-9.]+)")


def holds(condition: str, result: list[float]) -> bool:
    match = CONDITION.fullmatch(condition)
    assert match, f"{condition!r} is beyond this evaluator: keep the conditions `result[0] <op> number`"
    comparison, threshold = match.groups()
    return COMPARISONS[comparison](result[0], float(threshold))


def argo_phase(success_condition: str | None, failure_condition: str | None, result: list[float]) -> str:
    """The measurement phase Argo Rollouts (utils/evaluate.EvaluateResult) gives a vector result: Error when
    `result[0]` does not exist. A condition left out is the negation of the other; without both a
    measurement is Successful. Failed when the failure condition holds, whatever the success condition
    says; Inconclusive when neither holds (NaN makes every comparison false, in Go as in Python)."""
    if not result:
        return "Error"
    succeeded = success_condition is not None and holds(success_condition, result)
    failed = failure_condition is not None and holds(failure_condition, result)
    if success_condition is None and failure_condition is None:
        return "Successful"
    if failure_condition is None:
        failed = not succeeded
    if success_condition is None:
        succeeded = not failed
    if failed:
        return "Failed"
    return "Successful" if succeeded else "Inconclusive"


def measure(prometheus: str, metric: dict[str, Any], query: str | None = None) -> str:
    """The phase of one measurement of a resolved `metric`, or of `query` in place of its own."""
    query = query or metric["provider"]["prometheus"]["query"]
    result = [float(series["value"][1]) for series in instant_query(prometheus, query)]
    return argo_phase(metric.get("successCondition"), metric.get("failureCondition"), result)


@pytest.fixture(scope="module")
def prometheus(metrics_endpoint: str, analysis_template: dict[str, Any], tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("prometheus")
    with run_prometheus(metrics_endpoint, folder) as url:
        # Every canary still serving requests has served enough scores for a median, over two scrapes or more.
        enough = "sum by (rollouts_pod_template_hash) (increase(healnet_risk_score_count[10m])) >= 50"
        with_traffic = sum(canary.requests_per_s > 0 for canary in CANARIES.values())
        ready = wait_until(lambda: len(instant_query(url, enough)) == with_traffic, DATA_TIMEOUT_S, 0.25)
        assert ready, (folder / "prometheus.log").read_text()[-3000:]
        yield url


def test_the_conditions_are_ones_the_evaluator_reads(
    analysis_template: dict[str, Any], traffic_template: dict[str, Any]
) -> None:
    metrics = analysis_template["spec"]["metrics"]
    assert {metric["name"] for metric in metrics} == set(FAILING_METRIC.values())
    for template in (analysis_template, traffic_template):
        for metric in template["spec"]["metrics"]:
            resolved = canary_metric(template, metric, "healthy")
            for condition in ("successCondition", "failureCondition"):
                if condition in resolved:
                    assert CONDITION.fullmatch(resolved[condition]), (metric["name"], condition)


def test_the_traffic_check_has_both_conditions_so_that_too_little_traffic_is_inconclusive(
    traffic_template: dict[str, Any],
) -> None:
    (metric,) = traffic_template["spec"]["metrics"]
    assert {"successCondition", "failureCondition"} <= set(metric)
    assert "interval" not in metric and "count" not in metric, "one measurement, taken at the step"
    assert MIN_REQUESTS > 0


def test_argo_phase_follows_argo_rollouts() -> None:
    assert argo_phase("result[0] <= 0.05", None, [0.01]) == "Successful"
    assert argo_phase("result[0] <= 0.05", None, [0.2]) == "Failed"
    assert argo_phase("result[0] <= 0.05", None, [float("nan")]) == "Failed"
    assert argo_phase("result[0] <= 0.05", None, []) == "Error"
    assert argo_phase(None, "result[0] > 0.05", [0.01]) == "Successful"
    assert argo_phase(None, "result[0] > 0.05", [0.2]) == "Failed"
    assert argo_phase(None, None, [0.2]) == "Successful"
    both = ("result[0] >= 0.9", "result[0] < 0.5")
    assert argo_phase(*both, [0.95]) == "Successful"
    assert argo_phase(*both, [0.3]) == "Failed"
    assert argo_phase(*both, [0.7]) == "Inconclusive"
    assert argo_phase(*both, [float("nan")]) == "Inconclusive"
    assert argo_phase(*both, []) == "Error"
    assert argo_phase("result[0] >= 0.1", "result[0] < 0.5", [0.3]) == "Failed", "failure wins"


@pytest.mark.slow
@REQUIRES_PROMETHEUS
def test_the_analysis_passes_a_healthy_canary_and_fails_each_broken_one(
    prometheus: str, analysis_template: dict[str, Any]
) -> None:
    metrics = analysis_template["spec"]["metrics"]
    measured = {
        pod_hash: {
            metric["name"]: measure(prometheus, canary_metric(analysis_template, metric, pod_hash))
            for metric in metrics
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
    for metric in analysis_template["spec"]["metrics"]:
        for pod_hash, phase in (("idle", "Error"), (NEVER_SCRAPED, "Error"), ("healthy", "Successful")):
            resolved = canary_metric(analysis_template, metric, pod_hash)
            assert measure(prometheus, resolved, unguarded(resolved)) == phase, (metric["name"], pod_hash)


def unguarded(metric: dict[str, Any]) -> str:
    """The metric's query without its final `or on() vector(0)`."""
    guard = re.compile(r"\s*or on\(\) vector\(0\)\s*$")
    query = metric["provider"]["prometheus"]["query"]
    assert guard.search(query), f"{metric['name']} has no guard"
    return guard.sub("", query)


@pytest.mark.slow
@REQUIRES_PROMETHEUS
def test_the_traffic_check_passes_a_canary_with_enough_requests_and_leaves_the_rest_to_a_person(
    prometheus: str, traffic_template: dict[str, Any]
) -> None:
    """Inconclusive, neither Successful nor Failed, pauses the Rollout before the canary takes every pod.
    The canaries that fail a background metric have served plenty of requests: this check passes them."""
    (metric,) = traffic_template["spec"]["metrics"]
    measured = {
        pod_hash: measure(prometheus, canary_metric(traffic_template, metric, pod_hash))
        for pod_hash in [*CANARIES, NEVER_SCRAPED]
    }
    expected = {
        pod_hash: "Inconclusive" if pod_hash in TOO_LITTLE_TRAFFIC else "Successful"
        for pod_hash in [*CANARIES, NEVER_SCRAPED]
    }
    assert measured == expected


@pytest.mark.slow
@REQUIRES_PROMETHEUS
def test_without_the_guard_a_never_scraped_canary_would_abort_instead_of_pausing(
    prometheus: str, traffic_template: dict[str, Any]
) -> None:
    """No series is an Error (consecutive errors abort), a zero count is not: the guard is for the canary
    Prometheus never scraped, and changes nothing else."""
    (metric,) = traffic_template["spec"]["metrics"]
    for pod_hash, phase in (
        (NEVER_SCRAPED, "Error"),
        ("idle", "Inconclusive"),
        ("trickle", "Inconclusive"),
        ("healthy", "Successful"),
    ):
        resolved = canary_metric(traffic_template, metric, pod_hash)
        assert measure(prometheus, resolved, unguarded(resolved)) == phase, pod_hash
