"""Runs expectation suites with Great Expectations: one ephemeral context per process, no analytics,
no progress bars. Great Expectations is imported on first use only (it takes seconds)."""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import pandas as pd

from healnet.validation.report import ExpectationResult, SuiteResult

DATA_SOURCE = "healnet"


def import_great_expectations() -> ModuleType:
    """The great_expectations module, imported with analytics off and its logging quiet."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    return gx


@functools.cache
def _context():
    """The one ephemeral context of this process (creating it takes a while)."""
    gx = import_great_expectations()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    context.data_sources.add_pandas(DATA_SOURCE)
    return context


@functools.cache
def _batch_definition(suite_name: str):
    """A whole-dataframe batch definition per suite, in the process-wide context."""
    asset = _context().data_sources.get(DATA_SOURCE).add_dataframe_asset(suite_name)
    return asset.add_batch_definition_whole_dataframe("whole table")


def run_suite(
    name: str, table: pd.DataFrame, expectations: Sequence, id_columns: Sequence[str], max_examples: int
) -> SuiteResult:
    """Validate `table` against `expectations`; failed rows are identified by `id_columns`."""
    gx = import_great_expectations()
    suite = gx.ExpectationSuite(name=name, expectations=list(expectations))
    batch = _batch_definition(name).get_batch(batch_parameters={"dataframe": table.reset_index(drop=True)})
    result = batch.validate(
        suite,
        result_format={
            "result_format": "SUMMARY",
            "unexpected_index_column_names": list(id_columns),
            "partial_unexpected_count": max_examples,
        },
    )
    order = {expectation.description: i for i, expectation in enumerate(expectations)}
    ordered = sorted(result.results, key=lambda r: order.get(r.expectation_config.description, len(order)))
    return SuiteResult(name, bool(result.success), len(table), [_expectation_result(r) for r in ordered])


def _expectation_result(result) -> ExpectationResult:
    config = result.expectation_config
    kwargs = {k: plain(v) for k, v in config.kwargs.items() if k != "batch_id"}
    details = result.result or {}
    return ExpectationResult(
        expectation=config.type,
        description=config.description or config.type,
        column=_column_of(kwargs),
        kwargs=kwargs,
        success=bool(result.success),
        observed=plain(details.get("observed_value")),
        element_count=plain(details.get("element_count")),
        unexpected_count=plain(details.get("unexpected_count")),
        examples=plain(details.get("partial_unexpected_index_list") or []),
        error=_exception_message(result.exception_info),
    )


def _column_of(kwargs: dict) -> str | None:
    if "column" in kwargs:
        return kwargs["column"]
    if "column_A" in kwargs:
        return f"{kwargs['column_A']}, {kwargs['column_B']}"
    if "column_list" in kwargs:
        return ", ".join(kwargs["column_list"])
    return None


def _exception_message(info) -> str | None:
    """The first exception message in GE's exception_info (flat, or keyed by metric)."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    nested = [
        v.get("exception_message") for v in info.values() if isinstance(v, dict) and v.get("raised_exception")
    ]
    return str(nested[0]) if nested else None


def plain(value):
    """JSON-ready copy: numpy scalars to Python, tuples to lists, NaN/missing to None, infinities to text."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if value is not None and not isinstance(value, str | int | float | bool) and pd.isna(value):
        return None
    return value
