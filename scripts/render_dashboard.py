"""Render the Grafana dashboard's panels from a live stack into a PNG (docs/img/dashboard.png).

Registers the demo champion in a temporary BentoML home, starts `bentoml serve` with its drift spool
on, a Pushgateway, and a Prometheus that scrapes the service every second like the ServiceMonitor and
the Pushgateway like its chart's ServiceMonitor (devtools/monitoring_stack.py), and sends a bounded
load in three phases: normal traffic (slides the size of the demo model's training slides), a slide
feed that stops (requests without WSI), and a client on a wrong schema sending partial omics and
larger slides. Twice per phase, the second time at its end, the CronJob's command
(k8s/components/drift/cronjob.yaml), `healnet drift --tag champion --current SPOOL --pushgateway URL`,
compares the spool's windows with the champion's training reference and pushes the drift gauges; the
spool keeps about the windows answered between two checks, so each check reports the traffic since the
one before. Each panel's PromQL from
k8s/components/monitoring/dashboards/healnet.json is then queried over the run
(/api/v1/query_range; stat and table panels: /api/v1/query) and drawn with matplotlib at its place
in the dashboard's 24-column grid.

    .venv/bin/python scripts/render_dashboard.py [--seconds 90] [--rate 4] [--output docs/img/dashboard.png]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_OUTPUT = REPO_ROOT / "docs" / "img" / "dashboard.png"
# Grafana derives $__rate_interval from the scrape interval; 15 s smooths a 1 s scrape over a short run.
RATE_INTERVAL = "15s"
MAX_REQUESTS = 2000
STEP_S = 1.0  # the range queries' resolution
# request kinds that the service answers with 422: they reach neither the model nor the drift spool
INVALID_KINDS = ("no_modality", "wrong_dimensions", "missing_features")
# the demo model's training slides hold 4 to 11 patches (devtools.demo.DemoSpec.patches): normal traffic
# sends the same, so that only the wrong-schema client's slides differ from training
TRAINING_PATCHES = (4, 12)
DRIFT_CHECKS_PER_PHASE = 2
DRIFT_CHECK_TIMEOUT_S = 120.0
# Grafana's dark theme and classic palette.
BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
PALETTE = ("#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#b877d9", "#6ed0e0", "#ff9eb5")
UNITS = {"s": (1000.0, "ms"), "reqps": (1.0, "req/s"), "percentunit": (100.0, "%")}  # scale, axis label


class RenderError(RuntimeError):
    """A panel that this script cannot draw."""


@dataclass(frozen=True)
class Phase:
    name: str
    kinds: dict[str, float]  # request kind -> share of the phase's requests
    partial_omics: float  # share of requests with omics that leave out some features (imputed)
    patches: tuple[int, int]  # patch rows per slide, drawn uniformly in [low, high)


PHASES = (
    Phase(
        "normal traffic",
        {"omic+wsi": 0.72, "omic": 0.13, "wsi": 0.12, "no_modality": 0.03},
        0.1,
        TRAINING_PATCHES,
    ),
    Phase(
        "slide feed down",
        {"omic+wsi": 0.08, "omic": 0.87, "wsi": 0.02, "no_modality": 0.03},
        0.1,
        TRAINING_PATCHES,
    ),
    Phase(
        "client on a wrong schema",
        {"omic+wsi": 0.55, "omic": 0.1, "wsi": 0.1, "wrong_dimensions": 0.15, "missing_features": 0.1},
        0.6,
        (256, 1024),
    ),
)


@dataclass(frozen=True)
class Series:
    name: str
    times: np.ndarray  # seconds from the start of the load, every STEP_S
    values: np.ndarray  # NaN where the series has no sample: drawn as a gap, as Grafana does


def request_body(kind: str, phase: Phase, rng: np.random.Generator) -> dict:
    """A /predict body of one kind: a modality pattern, or an invalid request named by its reason."""
    from devtools.demo import DemoSpec, demo_payload

    patches = int(rng.integers(*phase.patches))
    if kind == "no_modality":
        return {}
    if kind == "wrong_dimensions":
        return {"wsi_features": rng.normal(size=(patches, 5)).round(3).tolist()}
    if kind == "missing_features":  # a table under the model's name whose features have other names
        return {"omics": {"mut": {f"UNKNOWN{i}": 1.0 for i in range(4)}}}
    body = demo_payload(DemoSpec(), tuple(kind.split("+")), patches=patches, seed=int(rng.integers(1 << 31)))
    # most of each table's features: the service refuses a table lacking more than half of the model's
    if "omics" in body and rng.random() < phase.partial_omics:
        body["omics"] = {
            table: {
                name: value
                for i, (name, value) in enumerate(features.items())
                if i % 4 != 1 or rng.random() < 0.5
            }
            for table, features in body["omics"].items()
        }
    return body


def planned_requests(seconds: float, rate: float, seed: int = 0) -> list[tuple[float, str, dict]]:
    """(send time in seconds from the start, kind, body) of each request; the phases take equal thirds."""
    rng = np.random.default_rng(seed)
    plan = []
    for i in range(min(int(seconds * rate), MAX_REQUESTS)):
        at = i / rate
        phase = PHASES[min(int(at / seconds * len(PHASES)), len(PHASES) - 1)]
        shares = np.array(list(phase.kinds.values()))
        kind = str(rng.choice(list(phase.kinds), p=shares / shares.sum()))
        plan.append((at, kind, request_body(kind, phase, rng)))
    return plan


def send_paced(service_url: str, plan: list[tuple[float, str, dict]]) -> Counter:
    """Send each request at its planned time (4 at most in flight); counts of (kind, status)."""
    import httpx

    from devtools.monitoring_stack import REQUEST_TIMEOUT_S

    start = time.monotonic()
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client, ThreadPoolExecutor(4) as pool:
        futures = []
        for at, kind, body in plan:
            time.sleep(max(0.0, start + at - time.monotonic()))
            futures.append((kind, pool.submit(client.post, f"{service_url}/predict", json=body)))
        return Counter((kind, future.result().status_code) for kind, future in futures)


def spool_windows_between_checks(seconds: float, rate: float) -> int:
    """About how many spool files the requests answered between two drift checks fill, at least 1: the
    spool keeps this many, so that a check sees the traffic since the one before."""
    from healnet.drift.spool import MIN_WINDOW_CASES

    requests = min(seconds * rate, MAX_REQUESTS) / (len(PHASES) * DRIFT_CHECKS_PER_PHASE)
    answered = min(1.0 - sum(phase.kinds.get(kind, 0.0) for kind in INVALID_KINDS) for phase in PHASES)
    return max(1, int(requests * answered) // MIN_WINDOW_CASES)


def drift_check(spool: Path, pushgateway_url: str, namespace: str, env: dict[str, str]) -> str:
    """The drift CronJob's command on `spool`, pushing to `pushgateway_url` as the service's `namespace`: its
    verdict line, or its exit code and error (exit 2 when the spool holds no full window yet)."""
    command = [sys.executable, "-m", "healnet", "drift", "--tag", "champion", "--current", str(spool)]
    command += ["--pushgateway", pushgateway_url, "--namespace", namespace]
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=DRIFT_CHECK_TIMEOUT_S
    )
    if done.returncode != 0:
        return f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
    return done.stdout.strip().splitlines()[-1]


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: `{{label}}` replaced by the series' label value."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda match: labels.get(match.group(1), ""), template) or "value"


def panel_data(prometheus_url: str, panel: dict, values: dict[str, str], start: float, end: float) -> Any:
    """Stat and table panels: their instant results at `end`; others: their series over the run."""
    from devtools.k8s_queries import substitute_grafana_variables
    from devtools.monitoring_stack import query, query_range

    exprs = [(target, substitute_grafana_variables(target["expr"], values)) for target in panel["targets"]]
    if panel["type"] in {"stat", "table"}:
        return [series for _, expr in exprs for series in query(prometheus_url, expr)]
    times = np.arange(0.0, end - start + STEP_S / 2, STEP_S)
    drawn = []
    for target, expr in exprs:
        for series in query_range(prometheus_url, expr, start, end, STEP_S):
            # a step without a sample stays NaN: drawn as a gap, as Grafana does
            samples = np.full(len(times), np.nan)
            for t, value in series["values"]:
                samples[round((float(t) - start) / STEP_S)] = float(value)
            drawn.append(Series(legend(target.get("legendFormat", ""), series["metric"]), times, samples))
    return drawn


def panel_frame(figure, cell, title: str):
    """A Grafana-like panel: a dark box with its title in the top-left corner."""
    frame = figure.add_subplot(cell)
    frame.set_facecolor(PANEL)
    frame.set_xticks([])
    frame.set_yticks([])
    for spine in frame.spines.values():
        spine.set_color(GRID)
    frame.text(
        0.012, 0.96, title, color=TEXT, fontsize=9, fontweight="bold", va="top", transform=frame.transAxes
    )
    return frame


def plot_area(frame, left: float = 0.075, right: float = 0.985):
    ax = frame.inset_axes([left, 0.31, right - left, 0.55])
    ax.set_facecolor(PANEL)
    ax.tick_params(colors=TEXT, labelsize=7, length=2)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.grid(color=GRID, linewidth=0.6)
    return ax


def draw_timeseries(frame, panel: dict, series: list[Series], phase_ends: list[float]) -> None:
    ax = plot_area(frame, left=0.075 if panel["gridPos"]["w"] >= 12 else 0.11)
    scale, unit = UNITS.get(panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "none"), (1.0, ""))
    bounds = [0.0, *phase_ends]
    for odd in range(1, len(phase_ends), 2):  # shade every other phase
        ax.axvspan(bounds[odd], bounds[odd + 1], color="#ffffff", alpha=0.05, linewidth=0)
    for index, line in enumerate(series):
        ax.plot(
            line.times,
            line.values * scale,
            color=PALETTE[index % len(PALETTE)],
            linewidth=1.3,
            label=line.name,
        )
    ax.set_ylabel(unit, color=TEXT, fontsize=7, labelpad=2)
    ax.set_xlim(0, phase_ends[-1])
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    columns = 4 if panel["gridPos"]["w"] >= 12 else 3
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(0, -0.17),
        fontsize=6.5,
        frameon=False,
        labelcolor=TEXT,
        ncols=columns,
        handlelength=1.2,
        columnspacing=1.0,
        borderaxespad=0,
    )


def draw_heatmap(frame, buckets: list[Series], duration: float) -> None:
    """Cumulative `le` buckets -> cases per bucket over time, as Grafana's heatmap shows them."""
    ax = plot_area(frame, right=0.9)
    ordered = sorted(buckets, key=lambda bucket: float(bucket.name))
    bounds = [float(bucket.name) for bucket in ordered]
    counts = np.diff(np.nan_to_num(np.stack([bucket.values for bucket in ordered])), axis=0, prepend=0.0)
    filled = np.flatnonzero(counts.sum(axis=1) > 0)
    low, high = max(filled.min() - 1, 1), min(filled.max() + 2, len(bounds))
    image = ax.imshow(
        counts[low:high],
        aspect="auto",
        origin="lower",
        cmap="magma",
        extent=(0, duration, low, high),
        interpolation="nearest",
    )
    ax.set_yticks(range(low, high + 1), [f"{bound:g}" for bound in bounds[low - 1 : high]])
    ax.set_ylabel("risk bucket", color=TEXT, fontsize=7, labelpad=2)
    ax.grid(False)
    bar = frame.inset_axes([0.915, 0.31, 0.015, 0.55])
    frame.figure.colorbar(image, cax=bar)
    bar.tick_params(colors=TEXT, labelsize=6, length=2)
    frame.text(
        0.075,
        0.06,
        f"cases per bucket in {RATE_INTERVAL}",
        color=TEXT,
        fontsize=6.5,
        transform=frame.transAxes,
    )


def draw_stat(frame, results: list[dict]) -> None:
    value = f"{float(results[0]['value'][1]):g}" if results else "no data"
    frame.text(
        0.5, 0.42, value, color=PALETTE[0], fontsize=40, ha="center", va="center", transform=frame.transAxes
    )


def draw_table(frame, results: list[dict]) -> None:
    names = [name for name in results[0]["metric"] if name != "__name__"] if results else []
    lines = [f"{name:<10} {series['metric'][name]}" for series in results for name in names]
    frame.text(
        0.04,
        0.75,
        "\n".join(lines) or "no data",
        color=TEXT,
        fontsize=9,
        family="monospace",
        va="top",
        linespacing=1.8,
        transform=frame.transAxes,
    )


def render(prometheus_url: str, start: float, phase_ends: list[float], output: Path) -> None:
    """Query every panel over [start, start + phase_ends[-1]] and draw the dashboard into `output`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    from devtools.k8s_queries import dashboard_panels, load_dashboard, variable_values

    dashboard = load_dashboard()
    values = variable_values(dashboard) | {"__rate_interval": RATE_INTERVAL}
    panels = dashboard_panels(dashboard)
    height = max(panel["gridPos"]["y"] + panel["gridPos"]["h"] for panel in panels)
    end = start + phase_ends[-1]

    figure = plt.figure(figsize=(16, 10), dpi=100, facecolor=BACKGROUND)
    grid = GridSpec(
        height, 24, figure=figure, left=0.01, right=0.99, top=0.925, bottom=0.01, hspace=0.5, wspace=0.4
    )
    figure.text(0.01, 0.975, dashboard["title"], color=TEXT, fontsize=14, fontweight="bold", va="center")
    phases = " · ".join(
        f"{begin:.0f}–{stop:.0f} s {phase.name}"
        for phase, begin, stop in zip(PHASES, [0.0, *phase_ends], phase_ends, strict=False)
    )
    figure.text(
        0.01,
        0.945,
        f"Demo model under a live load (x axes: seconds; 1 s scrape; $__rate_interval = {RATE_INTERVAL}; "
        f"`healnet drift` {DRIFT_CHECKS_PER_PHASE} times per phase): {phases}",
        color=TEXT,
        fontsize=8.5,
        va="center",
    )
    for panel in panels:
        pos = panel["gridPos"]
        cell = grid[pos["y"] : pos["y"] + pos["h"], pos["x"] : pos["x"] + pos["w"]]
        if panel["type"] == "row":
            header = figure.add_subplot(cell)
            header.axis("off")
            header.text(
                0, 0.5, f"▾ {panel['title']}", color=TEXT, fontsize=10, fontweight="bold", va="center"
            )
            continue
        data = panel_data(prometheus_url, panel, values, start, end)
        frame = panel_frame(figure, cell, panel["title"])
        if panel["type"] == "timeseries":
            draw_timeseries(frame, panel, data, phase_ends)
        elif panel["type"] == "heatmap":
            draw_heatmap(frame, data, phase_ends[-1])
        elif panel["type"] == "stat":
            draw_stat(frame, data)
        elif panel["type"] == "table":
            draw_table(frame, data)
        else:
            raise RenderError(
                f"panel {panel['title']!r} has type {panel['type']!r}, which this script cannot draw"
            )
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, facecolor=BACKGROUND, dpi=100)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=90.0, help="length of the load, 20 to 300 s")
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second, at most 50")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="PNG to write")
    args = parser.parse_args()
    if not 20 <= args.seconds <= 300 or not 0 < args.rate <= 50:
        parser.error("--seconds must be within 20..300 and --rate within (0, 50]")

    from devtools.demo import DemoSpec, register_demo_champion
    from devtools.live_server import DemoRegistry, bentoml_home, live_server
    from devtools.monitoring_stack import NAMESPACE, mixed_load, run_prometheus, run_pushgateway, send_load
    from healnet.drift.spool import MIN_WINDOW_CASES
    from healnet.registry import checkpoint_path

    plan = planned_requests(args.seconds, args.rate)
    phase_ends = [args.seconds * (i + 1) / len(PHASES) for i in range(len(PHASES))]
    with tempfile.TemporaryDirectory(prefix="render-dashboard-") as tmp:
        home, spool = Path(tmp) / "bentoml", Path(tmp) / "drift-spool"
        prometheus_dir, pushgateway_dir = Path(tmp) / "prometheus", Path(tmp) / "pushgateway"
        prometheus_dir.mkdir()
        pushgateway_dir.mkdir()
        with bentoml_home(home):
            tag = register_demo_champion()
            registry = DemoRegistry(home, tag, checkpoint_path(tag))
        server_env = registry.server_env(
            HEALNET_DRIFT_SPOOL_DIR=str(spool),
            HEALNET_DRIFT_WINDOW_CASES=str(MIN_WINDOW_CASES),
            HEALNET_DRIFT_SPOOL_MAX_FILES=str(spool_windows_between_checks(args.seconds, args.rate)),
        )
        with (
            live_server(server_env, Path(tmp) / "serve.log") as service,
            run_pushgateway(pushgateway_dir) as pushgateway,
            run_prometheus(service, prometheus_dir, pushgateway_url=pushgateway) as prometheus,
        ):
            # One request of each kind first, so that every series exists before the rates start.
            send_load(service, [body for body, _ in mixed_load(DemoSpec(), 1, 1)])
            time.sleep(3.0)
            print(f"sending {len(plan)} requests over {args.seconds:.0f} s to {service} (model {tag})")

            def check_drift() -> None:
                verdict = drift_check(spool, pushgateway, NAMESPACE, server_env)
                print(f"healnet drift at {time.time() - start:.0f} s: {verdict}")

            # the checks during the load run beside it, which keeps its pace; the last one after it
            checks = len(PHASES) * DRIFT_CHECKS_PER_PHASE
            timers = [threading.Timer(args.seconds * i / checks, check_drift) for i in range(1, checks)]
            start = time.time()
            for timer in timers:
                timer.start()
            sent = send_paced(service, plan)
            for timer in timers:
                timer.join()
            check_drift()
            time.sleep(5.0)  # the last check's gauges on a few scrapes
            phase_ends[-1] = time.time() - start - 1.0
            print("sent (kind, status): " + ", ".join(f"{k}={n}" for k, n in sorted(sent.items())))
            render(prometheus, start, phase_ends, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
