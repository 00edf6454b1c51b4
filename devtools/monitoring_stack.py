"""A real Prometheus on loopback that scrapes a live `bentoml serve` as the k8s manifests configure it,
and a real Pushgateway for the metrics of `healnet drift`.

Used by the live tests and scripts/render_dashboard.py. The scrape job is the one prometheus-operator
generates from k8s/components/monitoring/servicemonitor.yaml (job = the Service's name, the target
labels namespace/service/pod/container/endpoint, the endpoint's metricRelabelings) with a shorter
interval, and the PrometheusRule's groups are loaded as a rule file. A Pushgateway is scraped as the
ServiceMonitor of the prometheus-community/prometheus-pushgateway chart configures it (honor_labels, so
the pushed job="healnet-drift" is kept). Helpers raise MonitoringStackError.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from devtools.demo import DemoSpec, demo_payload
from devtools.k8s_queries import MONITORING, REPO_ROOT, load_prometheus_rule
from devtools.live_server import free_port, stop_server, wait_until

SERVICE_MONITOR = MONITORING / "servicemonitor.yaml"
DEPLOYMENT = REPO_ROOT / "k8s" / "base" / "deployment.yaml"
NAMESPACE = "healnet"
START_TIMEOUT_S = 30.0
# the Service and namespace of the prometheus-community/prometheus-pushgateway release that
# k8s/components/drift expects (PUSHGATEWAY_URL, the NetworkPolicy)
PUSHGATEWAY_SERVICE = "prometheus-pushgateway"
PUSHGATEWAY_NAMESPACE = "monitoring"
REQUEST_TIMEOUT_S = 30.0
QUERY_TIMEOUT_S = 10.0
MODALITY_PATTERNS = (("omic", "wsi"), ("omic",), ("wsi",))


class MonitoringStackError(RuntimeError):
    """Prometheus or the Pushgateway is missing or did not start, or a query answered with an error."""


def prometheus_binary() -> str | None:
    """The `prometheus` server (Debian/Ubuntu package `prometheus`), or None."""
    return shutil.which("prometheus")


def pushgateway_binary() -> str | None:
    """The Pushgateway: `prometheus-pushgateway` (Debian/Ubuntu package of that name) or `pushgateway`
    (the upstream release archive), or None."""
    return shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")


def _snake_case(key: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()


def operator_scrape_config(target: str, interval: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    """The scrape job prometheus-operator derives from the ServiceMonitor, for one static target."""
    monitor = yaml.safe_load(SERVICE_MONITOR.read_text())
    deployment = yaml.safe_load(DEPLOYMENT.read_text())
    (endpoint,) = monitor["spec"]["endpoints"]
    service = monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    labels = {
        "namespace": namespace,
        "service": service,
        "pod": f"{service}-local",
        "container": container["name"],
        "endpoint": endpoint["port"],
    }
    relabelings = [
        {_snake_case(key): value.lower() if key == "action" else value for key, value in rule.items()}
        for rule in endpoint.get("metricRelabelings", [])
    ]
    return {
        "job_name": service,
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "metrics_path": endpoint.get("path", "/metrics"),
        "honor_labels": endpoint.get("honorLabels", False),
        "static_configs": [{"targets": [target], "labels": labels}],
        "metric_relabel_configs": relabelings,
    }


def pushgateway_scrape_config(targets: Mapping[str, Mapping[str, str]], interval: str) -> dict[str, Any]:
    """The scrape job of the Pushgateway chart's ServiceMonitor for `targets` ({host:port: target labels}):
    honor_labels, so a pushed group's job label wins over the scrape job's name."""
    return {
        "job_name": PUSHGATEWAY_SERVICE,
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "honor_labels": True,
        "static_configs": [
            {"targets": [target.removeprefix("http://")], "labels": dict(labels)}
            for target, labels in targets.items()
        ],
    }


def write_rule_file(path: Path, evaluation_interval: str, alert_for: Mapping[str, str] | None = None) -> Path:
    """The PrometheusRule's groups as a Prometheus rule file, each group evaluated every `evaluation_interval`;
    `alert_for` ({alert name: duration}) replaces those alerts' `for`, so that a test sees them fire."""
    groups = [group | {"interval": evaluation_interval} for group in load_prometheus_rule()["spec"]["groups"]]
    overrides = alert_for or {}
    for rule in (rule for group in groups for rule in group["rules"]):
        if rule.get("alert") in overrides:
            rule["for"] = overrides[rule["alert"]]
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def _serve_until_ready(name: str, command: Sequence[str], url: str, log: Path) -> Iterator[str]:
    """Start `command` (listening at `url`, output to `log`) in its own process group, wait for its
    /-/ready, yield `url`; always stops it."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = wait_until(lambda: process.poll() is not None or _ready(url), START_TIMEOUT_S, 0.25)
        if not started or process.poll() is not None:
            raise MonitoringStackError(
                f"{name} not ready in {START_TIMEOUT_S} s (exit code {process.poll()}):\n"
                f"{log.read_text()[-3000:]}"
            )
        yield url
    finally:
        stop_server(process)


@contextmanager
def run_prometheus_config(config: Mapping[str, Any], folder: Path) -> Iterator[str]:
    """A ready Prometheus on a free loopback port with `config` (its prometheus.yml, written to `folder`);
    yields its base URL and always stops it. Its data and its log (`prometheus.log`) are in `folder`."""
    binary = prometheus_binary()
    if binary is None:
        raise MonitoringStackError("prometheus not found: install the Debian/Ubuntu package `prometheus`")
    (folder / "prometheus.yml").write_text(yaml.safe_dump(dict(config), sort_keys=False))
    url = f"http://127.0.0.1:{free_port()}"
    command = [
        binary,
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address={url.removeprefix('http://')}",
    ]
    with _serve_until_ready("prometheus", command, url, folder / "prometheus.log") as ready_url:
        yield ready_url


@contextmanager
def run_prometheus(
    service_url: str, folder: Path, interval: str = "1s", pushgateway_url: str | None = None
) -> Iterator[str]:
    """A ready Prometheus on a free loopback port scraping `service_url` (and `pushgateway_url`, labelled
    like the Pushgateway's Service in the cluster) and evaluating the alert rules every `interval`; yields
    its base URL and always stops it. Its log is `folder/prometheus.log`."""
    scrape_configs = [operator_scrape_config(service_url.removeprefix("http://"), interval)]
    if pushgateway_url is not None:
        labels = {"namespace": PUSHGATEWAY_NAMESPACE, "service": PUSHGATEWAY_SERVICE, "endpoint": "http"}
        scrape_configs.append(pushgateway_scrape_config({pushgateway_url: labels}, interval))
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(write_rule_file(folder / "rules.yaml", interval))],
        "scrape_configs": scrape_configs,
    }
    with run_prometheus_config(config, folder) as url:
        yield url


@contextmanager
def run_pushgateway(folder: Path) -> Iterator[str]:
    """A ready Pushgateway on a free loopback port, keeping the pushed groups in memory only; yields its
    base URL and always stops it. Its log is `folder/pushgateway.log`."""
    binary = pushgateway_binary()
    if binary is None:
        raise MonitoringStackError(
            "the Pushgateway was not found: install the Debian/Ubuntu package `prometheus-pushgateway`"
        )
    url = f"http://127.0.0.1:{free_port()}"
    # an empty persistence file keeps the groups in memory (Debian's default writes to /var/lib/prometheus)
    command = [binary, f"--web.listen-address={url.removeprefix('http://')}", "--persistence.file="]
    with _serve_until_ready("pushgateway", command, url, folder / "pushgateway.log") as ready_url:
        yield ready_url


def _api(url: str, path: str, params: Mapping[str, str | float] | None = None) -> Any:
    """The `data` of a Prometheus HTTP API answer; MonitoringStackError with Prometheus's message otherwise."""
    response = httpx.get(f"{url}/api/v1/{path}", params=params, timeout=QUERY_TIMEOUT_S)
    try:
        body = response.json()
    except ValueError as error:
        raise MonitoringStackError(
            f"/api/v1/{path} answered {response.status_code}: {response.text}"
        ) from error
    if body.get("status") != "success":
        query = (params or {}).get("query", "")
        raise MonitoringStackError(f"/api/v1/{path} {query!r}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """An instant query's result: [{"metric": {...}, "value": [time, "value"]}, ...]."""
    return _api(url, "query", {"query": promql})["result"]


def query_range(url: str, promql: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    """A range query's result: [{"metric": {...}, "values": [[time, "value"], ...]}, ...]."""
    return _api(url, "query_range", {"query": promql, "start": start, "end": end, "step": step})["result"]


def rule_groups(url: str) -> list[dict[str, Any]]:
    """The loaded rule groups with each rule's health, state and last error (/api/v1/rules)."""
    return _api(url, "rules")["groups"]


def by_labels(result: Sequence[Mapping[str, Any]]) -> dict[tuple[str, ...], float]:
    """An instant result as {label values sorted by label name (without __name__): value}."""
    return {
        tuple(value for name, value in sorted(series["metric"].items()) if name != "__name__"): float(
            series["value"][1]
        )
        for series in result
    }


def all_finite(result: Sequence[Mapping[str, Any]]) -> bool:
    """Whether an instant result has series and every value is a finite number."""
    return bool(result) and all(math.isfinite(float(series["value"][1])) for series in result)


def mixed_load(
    spec: DemoSpec, cases_per_pattern: int, invalid_per_reason: int, seed: int = 0
) -> list[tuple[dict, int]]:
    """/predict bodies with their expected status: each modality pattern (omic+wsi, omic, wsi), then
    requests without any modality and with patch rows of the wrong width (422 each)."""
    load = [
        (demo_payload(spec, modalities, patches=4, seed=seed + i), 200)
        for modalities in MODALITY_PATTERNS
        for i in range(cases_per_pattern)
    ]
    load += [({}, 422)] * invalid_per_reason
    load += [({"wsi_features": [[1.0, 2.0]]}, 422)] * invalid_per_reason
    return load


def send_load(service_url: str, bodies: Sequence[dict], workers: int = 4) -> list[int]:
    """POST every body to /predict with `workers` concurrent requests; the status codes, in order."""
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client, ThreadPoolExecutor(workers) as pool:
        return list(
            pool.map(lambda body: client.post(f"{service_url}/predict", json=body).status_code, bodies)
        )
