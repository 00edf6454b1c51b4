"""A real Prometheus scraping a real `bentoml serve` every second: after a burst of mixed requests,
PromQL through Prometheus's HTTP API returns the counts that were sent."""

from __future__ import annotations

import json
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import REQUIRES_PROMETHEUS

from devtools.demo import DemoSpec, demo_payload
from devtools.monitoring_stack import by_labels, run_prometheus
from devtools.monitoring_stack import query as instant_query

pytest_plugins = ("serving_fixtures",)
pytestmark = [pytest.mark.slow, REQUIRES_PROMETHEUS]
SPEC = DemoSpec()
JOB = "healnet-service"
BURST = (
    [(demo_payload(SPEC, ("omic", "wsi"), 4, seed), 200) for seed in range(10)]
    + [(demo_payload(SPEC, ("omic",), seed=seed), 200) for seed in range(8)]
    + [(demo_payload(SPEC, ("wsi",), 3, seed), 200) for seed in range(7)]
    + [({}, 422)] * 3
    + [({"wsi_features": [[1.0, 2.0]]}, 422)] * 2
)


@pytest.fixture(scope="module")
def server(demo_registry, serve, tmp_path_factory):
    with serve(demo_registry, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory, poll):
    folder = tmp_path_factory.mktemp("prometheus")
    with run_prometheus(server, folder) as url:
        up = poll(lambda: list(query(url, f'up{{job="{JOB}"}}').values()) == [1.0], 30, 0.25)
        assert up, (folder / "prometheus.log").read_text()[-3000:]
        yield url


def query(url: str, promql: str) -> dict[tuple, float]:
    """An instant PromQL query: {label values in key order: value}."""
    return by_labels(instant_query(url, promql))


def test_promql_sees_the_burst(server, prometheus, metrics_of, poll, demo_registry):
    before = metrics_of(server)
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(
            pool.map(lambda item: httpx.post(f"{server}/predict", json=item[0], timeout=30), BURST)
        )
    assert [r.status_code for r in responses] == [status for _, status in BURST]
    after = metrics_of(server)

    def served(name: str) -> dict[tuple, float]:
        """The service's own values of a counter with one label, keyed like `query` results."""
        return {
            (labels[0][1],): value for (metric, labels), value in after.items() if metric == name and labels
        }

    def sent(name: str, label: str) -> dict[tuple, float]:
        return {
            key: value - before.get((name, ((label, key[0]),)), 0.0) for key, value in served(name).items()
        }

    scraped_counters = {
        "sum by (modality) (healnet_missing_modality_total)": served("healnet_missing_modality_total"),
        "sum by (pattern) (healnet_requests_total)": served("healnet_requests_total"),
        "sum by (reason) (healnet_validation_errors_total)": served("healnet_validation_errors_total"),
    }
    # The burst's requests finish in any order: wait for a scrape that saw every one of them.
    assert poll(lambda: all(query(prometheus, q) == v for q, v in scraped_counters.items()), 30, 0.25)

    patterns = Counter("+".join(r.json()["modalities_used"]) for r in responses if r.status_code == 200)
    assert sent("healnet_requests_total", "pattern") == {("omic+wsi",): 10, ("omic",): 8, ("wsi",): 7}
    assert patterns == {"omic+wsi": 10, "omic": 8, "wsi": 7}
    assert sent("healnet_missing_modality_total", "modality") == {("omic",): 7, ("wsi",): 8}
    errors = sent("healnet_validation_errors_total", "reason")
    assert errors[("no_modality",)] == 3 and errors[("wrong_dimensions",)] == 2 and sum(errors.values()) == 5

    metadata = json.loads((demo_registry.checkpoint / "checkpoint.json").read_text())["metadata"]
    reference = {(q,): pytest.approx(v) for q, v in metadata["reference_risk_quantiles"].items()}
    assert query(prometheus, "max by (training_quantile) (healnet_reference_risk_score)") == reference
    (served_median,) = query(
        prometheus, "histogram_quantile(0.5, sum by (le) (healnet_risk_score_bucket))"
    ).values()
    assert math.isfinite(served_median) and -4.0 <= served_median <= 0.0
