"""Recurring runs of the pipeline on a Kubeflow Pipelines API: a cron expression checked before anything is
uploaded, a recurring run pinned to the version `submit` would run, and listing and disabling them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from healnet.errors import HEALNetError
from pipelines.submit import (
    PipelineVersion,
    api_errors,
    connect,
    find_or_create_experiment,
    find_pipeline_id,
    upload_version,
)

# KFP's scheduler parses with robfig/cron: six fields, seconds first, day-of-week optional. A five-field
# crontab line is therefore accepted and silently shifted ("0 3 * * 1" = minute 3 of every hour in
# January), so a schedule must give all six fields.
CRON_FIELDS = (
    ("seconds", 0, 59),
    ("minutes", 0, 59),
    ("hours", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 6),
)
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
CRON_NAMES = {
    "month": {name: number for number, name in enumerate(MONTHS, 1)},
    "day-of-week": {name: number for number, name in enumerate(WEEKDAYS)},
}
BLANK_ALLOWED = ("day-of-month", "day-of-week")  # robfig's "?": no constraint
CRON_ITEM = re.compile(r"(?:(?P<any>[*?])|(?P<low>\w+)(?:-(?P<high>\w+))?)(?:/(?P<step>\d+))?")
CRON_FIELD_NAMES = " ".join(name for name, _, _ in CRON_FIELDS)
CRON_HELP = (
    f'when to run, as KFP\'s cron: 6 space-separated fields, SECONDS first: "{CRON_FIELD_NAMES}", e.g. '
    '"0 0 3 * * 1" (03:00 every Monday in the scheduler\'s time zone: UTC unless its controller sets '
    "CRON_SCHEDULE_TIMEZONE); each field *, N, N-M, */S, N-M/S or a comma list of them, ? for an "
    "unconstrained day-of-month or day-of-week, month and weekday names (JAN, MON) allowed. A 5-field "
    "crontab line is refused"
)


class ScheduleError(HEALNetError, ValueError):
    """A cron expression or schedule request that KFP would reject or misread."""


@dataclass(frozen=True)
class Schedule:
    recurring_run_id: str
    name: str
    cron: str
    status: str  # ENABLED or DISABLED
    version_name: str  # the pinned pipeline version (its id when the version is gone)


def _cron_value(text: str, field: str, expression: str) -> int:
    value = int(text) if text.isdigit() else CRON_NAMES.get(field, {}).get(text.lower())
    if value is None:
        kind = "a number or a name" if field in CRON_NAMES else "a number"
        raise ScheduleError(f'--cron\'s {field} field has "{text}", not {kind}: "{expression}"')
    return value


def check_cron(expression: str) -> str:
    """`expression` with its fields separated by single spaces, when it is a 6-field KFP cron whose fields
    are each within their range; else a `ScheduleError` naming the field."""
    fields = expression.split()
    if len(fields) != len(CRON_FIELDS):
        raise ScheduleError(
            f"--cron needs {len(CRON_FIELDS)} fields ({CRON_FIELD_NAMES}), "
            f'got {len(fields)}: "{expression}"; KFP\'s cron starts with seconds'
        )
    for text, (field, lowest, highest) in zip(fields, CRON_FIELDS, strict=True):
        for item in text.split(","):
            match = CRON_ITEM.fullmatch(item)
            if not match or (match["any"] == "?" and field not in BLANK_ALLOWED):
                raise ScheduleError(
                    f'--cron\'s {field} field "{text}" is not *, N, N-M, */S, N-M/S or a comma list of them: '
                    f'"{expression}"'
                )
            if match["low"]:
                low = _cron_value(match["low"], field, expression)
                high = _cron_value(match["high"], field, expression) if match["high"] else low
                if not (lowest <= low <= highest and lowest <= high <= highest):
                    raise ScheduleError(
                        f'--cron\'s {field} field "{text}" is outside {lowest}-{highest}: "{expression}"'
                    )
                if low > high:
                    raise ScheduleError(f'--cron\'s {field} field "{text}" runs backwards: "{expression}"')
            if match["step"] is not None and int(match["step"]) < 1:
                raise ScheduleError(f'--cron\'s {field} field "{text}" has a step of 0: "{expression}"')
    return " ".join(fields)


def create_schedule(
    package: Path,
    host: str,
    arguments: dict,
    pipeline_name: str,
    experiment: str,
    cron: str,
    name: str | None,
    max_concurrency: int,
    catchup: bool,
    namespace: str | None,
    token: str | None,
) -> tuple[PipelineVersion, Schedule]:
    """Upload `package` as `submit` does and create a recurring run of that version with `arguments`. The
    recurring run stays pinned to the version: a new version needs a new schedule."""
    cron = check_cron(cron)
    if max_concurrency < 1:
        raise ScheduleError(f"--max-concurrency must be at least 1, got {max_concurrency}")
    client = connect(host, token, namespace)
    with api_errors("uploading the pipeline", host, namespace):
        version = upload_version(client, package, pipeline_name, namespace)
    experiment_id = find_or_create_experiment(client, experiment, host, namespace)
    with api_errors("creating the recurring run", host, namespace):
        recurring_run = client.create_recurring_run(
            experiment_id,
            name or f"{pipeline_name}-{version.version_name}",
            cron_expression=cron,
            max_concurrency=max_concurrency,
            no_catchup=not catchup,
            params=arguments,
            pipeline_id=version.pipeline_id,
            version_id=version.version_id,
        )
    schedule = Schedule(
        recurring_run.recurring_run_id,
        recurring_run.display_name,
        cron,
        _status(recurring_run),
        version.version_name,
    )
    return version, schedule


def list_schedules(host: str, pipeline_name: str, namespace: str | None, token: str | None) -> list[Schedule]:
    """The recurring runs of pipeline `pipeline_name` in `namespace`, each with the name of its version."""
    client = connect(host, token, namespace)
    with api_errors("listing the recurring runs", host, namespace):
        pipeline_id = find_pipeline_id(client, pipeline_name, namespace)
        if pipeline_id is None:
            return []
        recurring_runs = _every_page(
            lambda token: client.list_recurring_runs(page_token=token, page_size=100, namespace=namespace),
            "recurring_runs",
        )
        version_names = {
            version.pipeline_version_id: version.display_name
            for version in _every_page(
                lambda token: client.list_pipeline_versions(pipeline_id, page_token=token, page_size=100),
                "pipeline_versions",
            )
        }
    return [
        Schedule(
            run.recurring_run_id,
            run.display_name,
            run.trigger.cron_schedule.cron if run.trigger and run.trigger.cron_schedule else "",
            _status(run),
            version_names.get(run.pipeline_version_reference.pipeline_version_id)
            or run.pipeline_version_reference.pipeline_version_id,
        )
        for run in recurring_runs
        if run.pipeline_version_reference and run.pipeline_version_reference.pipeline_id == pipeline_id
    ]


def _every_page(list_page, attribute: str) -> list:
    """Every item of a paged KFP listing: `list_page(page_token)` answers one page."""
    items: list = []
    page_token = ""
    while True:
        page = list_page(page_token)
        items += getattr(page, attribute) or []
        page_token = page.next_page_token
        if not page_token:
            return items


def _status(recurring_run) -> str:
    return str(recurring_run.status or recurring_run.mode or "UNKNOWN")


def disable_schedule(host: str, recurring_run_id: str, namespace: str | None, token: str | None) -> None:
    """Stop recurring run `recurring_run_id` from starting runs (it stays listed, disabled)."""
    client = connect(host, token, namespace)
    with api_errors(f"disabling recurring run {recurring_run_id}", host, namespace):
        client.disable_recurring_run(recurring_run_id)
