"""Every PromQL expression of the Grafana dashboard and the PrometheusRule, ready to evaluate.

Grafana variables are replaced so that the expressions run against a plain Prometheus:
interval built-ins (`$__rate_interval`, ...) become fixed durations and query variables
(`$namespace`) become the regex `.+` (the dashboard only uses them with `=~`).
"""

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
MONITORING = REPO_ROOT / "k8s" / "components" / "monitoring"
DASHBOARD = MONITORING / "dashboards" / "healnet.json"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"

GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
QUERY_VARIABLE_VALUE = ".+"

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_LABEL_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}
_KEYWORDS |= {"offset", "inf", "nan"}


class UnresolvedVariableError(ValueError):
    """A dashboard query uses a Grafana variable that has no offline value."""


@dataclass(frozen=True)
class PromQuery:
    origin: str  # where it comes from, e.g. "panel 'Request rate by modality pattern' target A"
    expr: str
    panel: str | None = None  # the dashboard panel's title; None for rules


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def load_prometheus_rule(path: Path = PROMETHEUS_RULE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def variable_values(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """Offline values of the dashboard's query/custom variables and Grafana's interval built-ins."""
    values = dict(GRAFANA_BUILTINS)
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] in {"query", "custom", "textbox", "constant"}:
            values[variable["name"]] = QUERY_VARIABLE_VALUE
    return values


def substitute_grafana_variables(expr: str, values: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise UnresolvedVariableError(f"no offline value for Grafana variable ${name} in: {expr}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Panels in order, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel in order (rows and panels nested in collapsed rows included)."""
    return list(_panels(dashboard["panels"]))


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[PromQuery]:
    values = variable_values(dashboard)
    return [
        PromQuery(
            f"panel {panel['title']!r} target {target['refId']}",
            substitute_grafana_variables(target["expr"], values),
            panel["title"],
        )
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


def rule_queries(prometheus_rule: Mapping[str, Any]) -> list[PromQuery]:
    return [
        PromQuery(
            f"{'alert' if 'alert' in rule else 'record'} {rule.get('alert') or rule['record']}", rule["expr"]
        )
        for group in prometheus_rule["spec"]["groups"]
        for rule in group["rules"]
    ]


def all_queries() -> list[PromQuery]:
    return dashboard_queries(load_dashboard()) + rule_queries(load_prometheus_rule())


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (label names, functions and keywords excluded)."""
    stripped = _STRING.sub('""', expr)
    stripped = _LABEL_MATCHERS.sub(" ", stripped)
    stripped = _RANGE.sub(" ", stripped)
    stripped = _GROUPING.sub(" ", stripped)
    names = set()
    for match in _IDENTIFIER.finditer(stripped):
        is_function = stripped[match.end() :].lstrip().startswith("(")
        if not is_function and match.group() not in _KEYWORDS:
            names.add(match.group())
    return names
