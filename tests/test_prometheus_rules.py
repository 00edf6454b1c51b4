"""Alert rules and dashboard queries: promtool checks and unit tests, plus offline consistency checks.

promtool comes with Debian/Ubuntu's `prometheus` package (`apt-get install prometheus`); the
tests that need it skip when it is absent.
"""

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.k8s_queries import (
    PROMETHEUS_RULE,
    UnresolvedVariableError,
    all_queries,
    dashboard_queries,
    load_dashboard,
    load_prometheus_rule,
    metric_names,
    rule_queries,
    substitute_grafana_variables,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ALERT_TESTS = PROMETHEUS_RULE.parent / "tests" / "healnet-alerts.test.yaml"
ARCHITECTURE = REPO_ROOT / "docs" / "architecture.md"
DEPLOY_DOC = REPO_ROOT / "docs" / "deploy.md"
BENTOML = Path(importlib.util.find_spec("bentoml").origin).parent
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: install the Debian/Ubuntu package `prometheus`"
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def alerts() -> list[dict[str, Any]]:
    return [
        rule
        for group in load_prometheus_rule()["spec"]["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def write_rules_file(directory: Path, groups: list[dict[str, Any]]) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    rules = write_rules_file(tmp_path, load_prometheus_rule()["spec"]["groups"])
    result = promtool("check", "rules", rules)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


@needs_promtool
def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    broken = [{"name": "broken", "rules": [{"alert": "Broken", "expr": "sum by (job) (rate(up[5m])"}]}]
    result = promtool("check", "rules", write_rules_file(tmp_path, broken))
    assert result.returncode != 0
    assert "unclosed left parenthesis" in result.stdout + result.stderr


@needs_promtool
def test_alert_unit_tests_pass(tmp_path: Path) -> None:
    write_rules_file(tmp_path, load_prometheus_rule()["spec"]["groups"])
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    result = promtool("test", "rules", tmp_path / ALERT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    groups = load_prometheus_rule()["spec"]["groups"]
    for rule in groups[0]["rules"]:
        if rule["alert"] == "HealnetServerErrorRateHigh":
            rule["expr"] = rule["expr"].replace("> 0.05", "> 0.5")
    write_rules_file(tmp_path, groups)
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    result = promtool("test", "rules", tmp_path / ALERT_TESTS.name)
    assert result.returncode != 0
    assert "HealnetServerErrorRateHigh" in result.stdout + result.stderr


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    queries = dashboard_queries(load_dashboard())
    records = [{"record": f"dashboard:query_{i}", "expr": query.expr} for i, query in enumerate(queries)]
    result = promtool("check", "rules", write_rules_file(tmp_path, [{"name": "dashboard", "rules": records}]))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases = [
        case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]
    ]
    for alert in alerts():
        own = [case for case in cases if case["alertname"] == alert["alert"]]
        assert any(case["exp_alerts"] for case in own), f"no unit test where {alert['alert']} fires"
        assert any(not case["exp_alerts"] for case in own), f"no unit test where {alert['alert']} stays quiet"


def anchors(markdown: str) -> set[str]:
    """GitHub-style anchors of the markdown headings."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-") for heading in headings}


def test_every_alert_is_documented_and_labelled() -> None:
    documented = anchors(DEPLOY_DOC.read_text())
    for alert in alerts():
        name = alert["alert"]
        assert re.fullmatch(r"\d+[smh]", alert.get("for", "")), f"{name} needs a `for` duration"
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description", "runbook_url"} <= set(alert["annotations"]), name
        page, _, anchor = alert["annotations"]["runbook_url"].partition("#")
        assert page == "docs/deploy.md" and anchor in documented, f"{name}: no runbook heading #{anchor}"


def architecture_metrics() -> dict[str, str]:
    """Metric name -> type from the "Serving metrics" table of docs/architecture.md."""
    rows = re.findall(r"^\| `(healnet_\w+)` \| (\w+)", ARCHITECTURE.read_text(), flags=re.MULTILINE)
    return dict(rows)


def bentoml_http_metrics() -> set[str]:
    """HTTP metrics of the installed BentoML: its configured namespace + the middleware's metric names."""
    config = yaml.safe_load((BENTOML / "_internal/configuration/v2/default_configuration.yaml").read_text())
    namespace = config["services"]["metrics"]["namespace"]
    source = (BENTOML / "_internal/server/http/instruments.py").read_text()
    names = set(re.findall(r'name="(request_(?:total|duration_seconds))"', source))
    return {f"{namespace}_{name}" for name in names}


def exported_series() -> set[str]:
    """Every series name the service exports, histogram suffixes included."""
    # Prometheus's own `up`, and the time of a group's last push that the Pushgateway adds (the drift
    # CronJob's results arrive through it)
    series = {"up", "push_time_seconds"}
    for name, kind in architecture_metrics().items():
        series |= {name + suffix for suffix in HISTOGRAM_SUFFIXES} if kind == "histogram" else {name}
    for name in bentoml_http_metrics():
        series |= {name + suffix for suffix in HISTOGRAM_SUFFIXES} if name.endswith("_seconds") else {name}
    return series


def test_the_exported_metric_names_are_known() -> None:
    assert len(architecture_metrics()) == 15  # 13 of the service, 2 of `healnet drift`
    assert bentoml_http_metrics() == {
        "bentoml_service_request_total",
        "bentoml_service_request_duration_seconds",
    }


def test_queries_are_extracted_from_dashboard_and_rules() -> None:
    assert len(dashboard_queries(load_dashboard())) == 23
    assert [q.origin for q in rule_queries(load_prometheus_rule())] == [
        f"alert {a['alert']}" for a in alerts()
    ]
    assert len(alerts()) == 12


def test_every_query_selects_only_exported_metrics() -> None:
    known = exported_series()
    for query in all_queries():
        names = metric_names(query.expr)
        assert names, f"{query.origin} selects no metric: {query.expr}"
        assert names <= known, f"{query.origin} uses unknown metrics {sorted(names - known)}"


def test_every_service_metric_is_used() -> None:
    used = {name for query in all_queries() for name in metric_names(query.expr)}
    for name, kind in architecture_metrics().items():
        variants = {name + suffix for suffix in HISTOGRAM_SUFFIXES} if kind == "histogram" else {name}
        assert variants & used, f"{name} is neither on the dashboard nor in an alert"


def test_grafana_variables_are_replaced() -> None:
    for query in dashboard_queries(load_dashboard()):
        assert "$" not in query.expr, query
    expr = dashboard_queries(load_dashboard())[0].expr
    assert 'namespace=~".+"' in expr and "[1m]" in expr


def test_unknown_grafana_variable_is_an_error() -> None:
    with pytest.raises(UnresolvedVariableError, match=r"\$cluster"):
        substitute_grafana_variables('up{cluster="$cluster"}[$__rate_interval]', {"__rate_interval": "1m"})
    assert (
        substitute_grafana_variables("rate(x[${__rate_interval}])", {"__rate_interval": "1m"})
        == "rate(x[1m])"
    )


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (
            'sum by (le) (rate(healnet_risk_score_bucket{job="healnet-service"}[5m]))',
            {"healnet_risk_score_bucket"},
        ),
        (
            'a_total / on (namespace) group_left sum by (namespace) (rate(b_total{le="0.5", x=~"a|b"}[1h])) > 0.5',
            {"a_total", "b_total"},
        ),
        ('absent(up{job="healnet-service"})', {"up"}),
        (
            "histogram_quantile(0.95, sum by (stage, le) (rate(x_bucket[1m]))) and on (ns) y > bool 1",
            {"x_bucket", "y"},
        ),
    ],
)
def test_metric_names_skips_labels_functions_and_keywords(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected
