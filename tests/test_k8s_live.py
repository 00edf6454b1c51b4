"""The dashboard and the alert rules against live data: a real `bentoml serve` scraped every second by a
real Prometheus configured like the ServiceMonitor, with the PrometheusRule loaded. After a short mixed
load, every PromQL expression of the dashboard and the rules must evaluate through the HTTP API."""

from __future__ import annotations

import pytest
from conftest import REQUIRES_PROMETHEUS

from devtools.demo import DemoSpec
from devtools.k8s_queries import all_queries, dashboard_queries, load_dashboard, load_prometheus_rule
from devtools.monitoring_stack import (
    all_finite,
    by_labels,
    mixed_load,
    query,
    rule_groups,
    run_prometheus,
    send_load,
)

pytest_plugins = ("serving_fixtures",)
pytestmark = [pytest.mark.slow, REQUIRES_PROMETHEUS]
JOB = "healnet-service"
SPEC = DemoSpec()
# One request of each kind first, so that every series exists before the load that the rates measure.
WARM_UP = mixed_load(SPEC, cases_per_pattern=1, invalid_per_reason=1)
LOAD = mixed_load(SPEC, cases_per_pattern=4, invalid_per_reason=2, seed=10)
# Every panel must show finite numbers after the load, except this one, which must stay at zero.
QUIET_PANEL = "Server errors (5xx)"
# the demo model takes no clinical covariates, so no training range is exported for it (the query is still
# evaluated by test_every_dashboard_and_alert_query_evaluates)
NO_CLINICAL_PANEL = "Clinical values outside the training range"
# pushed by the healnet-drift CronJob, which this stack does not run (tests/test_drift_streams.py pushes them
# to a real Pushgateway that a live Prometheus scrapes)
DRIFT_PANELS = {"Input drift share by modality", "Embedding drift score"}
LATENCY_PANELS = {"Inference latency by stage", "End-to-end request latency"}
MISSING_MODALITY_PANELS = {"Missing-modality rate", "Missing-modality share of requests"}
# Alerts whose condition the load cannot meet (the latency ones depend on this machine's load).
QUIET_ALERTS = {
    "HealnetMissingModalityRateHigh",
    "HealnetServerErrorRateHigh",
    "HealnetRiskScoreDrift",
    "HealnetScrapeDown",
    "HealnetMetricsAbsent",
    "HealnetInputDrift",
}
SCRAPE_WAIT_S = 30.0


def predicted_cases(load: list[tuple[dict, int]]) -> int:
    return sum(status == 200 for _, status in load)


@pytest.fixture(scope="module")
def server(demo_registry, serve, tmp_path_factory):
    with serve(demo_registry, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    with run_prometheus(server, tmp_path_factory.mktemp("prometheus")) as url:
        yield url


def scraped_total(url: str, promql: str) -> float | None:
    values = list(by_labels(query(url, f"sum({promql})")).values())
    return values[0] if values else None


@pytest.fixture(scope="module")
def loaded(server, prometheus, poll):
    """Warm-up and load sent and scraped, and every panel (but QUIET_PANEL) showing finite numbers."""
    assert send_load(server, [body for body, _ in WARM_UP]) == [status for _, status in WARM_UP]
    bentoml_requests = f'bentoml_service_request_total{{job="{JOB}"}}'
    predict_requests = f'bentoml_service_request_total{{job="{JOB}", endpoint="/predict"}}'
    assert poll(lambda: scraped_total(prometheus, predict_requests) == len(WARM_UP), SCRAPE_WAIT_S, 0.25), (
        f"no /predict requests scraped with their route label: {query(prometheus, bentoml_requests)}"
    )

    assert send_load(server, [body for body, _ in LOAD]) == [status for _, status in LOAD]
    panel_queries = [
        q
        for q in dashboard_queries(load_dashboard())
        if q.panel not in {QUIET_PANEL, NO_CLINICAL_PANEL, *DRIFT_PANELS}
    ]
    cases = f'healnet_requests_total{{job="{JOB}"}}'

    def every_panel_has_data() -> bool:
        scraped = scraped_total(prometheus, cases) == predicted_cases(WARM_UP) + predicted_cases(LOAD)
        return scraped and all(all_finite(query(prometheus, q.expr)) for q in panel_queries)

    assert poll(every_panel_has_data, SCRAPE_WAIT_S, 0.5), [
        q.origin for q in panel_queries if not all_finite(query(prometheus, q.expr))
    ]
    return prometheus


def panel_results(results: dict[str, list], titles: set[str]) -> list[list]:
    return [results[q.origin] for q in dashboard_queries(load_dashboard()) if q.panel in titles]


def test_every_dashboard_and_alert_query_evaluates(loaded):
    results = {q.origin: query(loaded, q.expr) for q in all_queries()}  # raises on any PromQL error
    assert len(results) == len(all_queries()) == 35
    for result in panel_results(results, MISSING_MODALITY_PANELS):
        assert {series["metric"]["modality"] for series in result} == {"omic", "wsi"}
    latency = panel_results(results, LATENCY_PANELS)
    assert len(latency) == 6 and all(all_finite(result) for result in latency)
    (server_errors,) = panel_results(results, {QUIET_PANEL})
    assert all(float(series["value"][1]) == 0 for series in server_errors), server_errors
    api_5xx = f'job="{JOB}", endpoint!~"/(livez|readyz|healthz|metrics)|other", http_response_code=~"5.."'
    assert by_labels(query(loaded, f"sum(bentoml_service_request_total{{{api_5xx}}})")) == {(): 0.0}


def test_bentoml_routes_survive_the_operator_target_labels(loaded):
    """The ServiceMonitor's target label endpoint="http" must not replace BentoML's route label."""
    routes = by_labels(query(loaded, f'count by (endpoint) (bentoml_service_request_total{{job="{JOB}"}})'))
    assert ("/predict",) in routes and ("http",) not in routes, routes
    assert query(loaded, 'count({exported_endpoint!=""})') == []
    ours = by_labels(query(loaded, f'count by (endpoint) (healnet_requests_total{{job="{JOB}"}})'))
    assert ours == {("http",): 3.0}, "series without a route keep the operator's endpoint label"


def rule_states(url: str) -> dict[str, tuple[str, str]]:
    """Alert name -> (health, state) from /api/v1/rules."""
    return {
        rule["name"]: (rule["health"], rule["state"]) for group in rule_groups(url) for rule in group["rules"]
    }


def test_prometheus_loads_and_evaluates_every_rule(loaded, poll):
    expected = [
        (group["name"], [rule["alert"] for rule in group["rules"]])
        for group in load_prometheus_rule()["spec"]["groups"]
    ]
    # Prometheus lists the groups of a file by name
    assert sorted((g["name"], [r["name"] for r in g["rules"]]) for g in rule_groups(loaded)) == sorted(
        expected
    )
    # 4 of the 16 requests of the load are invalid (> 10 %; health checks and scrapes do not count).
    assert poll(
        lambda: rule_states(loaded)["HealnetValidationErrorRateHigh"] == ("ok", "pending"), 10, 0.5
    ), rule_states(loaded)
    states = rule_states(loaded)
    assert all(health == "ok" for health, _ in states.values()), states
    assert {name: states[name] for name in QUIET_ALERTS} == dict.fromkeys(QUIET_ALERTS, ("ok", "inactive"))
