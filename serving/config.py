"""Serving settings from environment variables (documented in docs/serving.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from healnet.drift.spool import MIN_WINDOW_CASES, SpoolBounds
from healnet.errors import HEALNetError

MISSING_FEATURE_FRACTION_ENV = "HEALNET_MAX_MISSING_FEATURE_FRACTION"
# It bounded the share of a request's features unknown to the model, which no longer refuses a request:
# a deployment that still sets it is told what replaced it rather than silently ignored.
RETIRED_UNKNOWN_FEATURE_FRACTION_ENV = "HEALNET_MAX_UNKNOWN_FEATURE_FRACTION"


class ConfigError(HEALNetError, ValueError):
    """An environment variable of the service holds an invalid value."""


def env_number(name: str, default: float, kind: type = int, low: float = 0.0, high: float | None = None):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if value < low or (high is not None and value > high):
        raise ConfigError(f"{name}={raw!r} must be in [{low}, {high if high is not None else 'inf'}]")
    return value


# A body above this size is a large request (see Limits.max_large_requests); the bodies of ordinary
# omics and feature requests are tens of kilobytes, and a body this size parses into at most about 70 MB.
LARGE_REQUEST_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 1024 * 1024
    max_batch_cases: int = 64
    max_patches: int = 8192
    max_tiles: int = 256
    max_tile_pixels: int = 4096 * 4096
    # Tiles are decoded one at a time, so these two bound a request's decoding time, not its memory.
    max_request_pixels: int = 256 * 1024 * 1024
    # Array items and object members of a JSON body, counted before it is parsed: parsing costs 70 (a patch
    # feature) to 180 (a named omic value) bytes and under 1 µs per value, all of it holding the event loop
    # (docs/serving.md, "Memory budget per request").
    max_json_values: int = 1_000_000
    # Requests whose body exceeds LARGE_REQUEST_BYTES (or does not declare its size) that a worker reads
    # and answers at once; the rest wait, unread, for their turn. Each may grow a worker by up to 600 MB,
    # so this bounds what a pod's memory limit must hold (docs/serving.md, "Memory budget per request").
    max_large_requests: int = 2
    # a given omic table that lacks a larger share of the model's features of that table is refused
    max_missing_feature_fraction: float = 0.5
    adaptive_batch_max_cases: int = 16  # most cases that queued requests share in one model pass; 1: off

    @classmethod
    def from_env(cls) -> Limits:
        if os.environ.get(RETIRED_UNKNOWN_FEATURE_FRACTION_ENV):
            raise ConfigError(
                f"{RETIRED_UNKNOWN_FEATURE_FRACTION_ENV} is no longer read: features unknown to the model are "
                f"ignored; {MISSING_FEATURE_FRACTION_ENV} bounds the share of the model's features that a "
                "given omic table may lack"
            )
        return cls(
            max_body_bytes=env_number("HEALNET_MAX_BODY_BYTES", cls.max_body_bytes, low=1),
            max_batch_cases=env_number("HEALNET_MAX_BATCH_CASES", cls.max_batch_cases, low=1),
            max_patches=env_number("HEALNET_MAX_PATCHES", cls.max_patches, low=1),
            max_tiles=env_number("HEALNET_MAX_TILES", cls.max_tiles, low=1),
            max_tile_pixels=env_number("HEALNET_MAX_TILE_PIXELS", cls.max_tile_pixels, low=1),
            max_request_pixels=env_number("HEALNET_MAX_REQUEST_PIXELS", cls.max_request_pixels, low=1),
            max_json_values=env_number("HEALNET_MAX_JSON_VALUES", cls.max_json_values, low=1),
            max_large_requests=env_number("HEALNET_MAX_LARGE_REQUESTS", cls.max_large_requests, low=1),
            max_missing_feature_fraction=env_number(
                MISSING_FEATURE_FRACTION_ENV, cls.max_missing_feature_fraction, float, 0.0, 1.0
            ),
            adaptive_batch_max_cases=env_number(
                "HEALNET_ADAPTIVE_BATCH_MAX_CASES", cls.adaptive_batch_max_cases, low=1
            ),
        )


DRIFT_SPOOL_DIR_ENV = "HEALNET_DRIFT_SPOOL_DIR"


def drift_spool_settings() -> tuple[Path, SpoolBounds] | None:
    """$HEALNET_DRIFT_SPOOL_DIR: the folder where the service spools per-window input summaries for
    `healnet drift` (docs/drift.md); None (off, the default) when unset. Its bounds:
    $HEALNET_DRIFT_WINDOW_CASES (cases per file, at least MIN_WINDOW_CASES), $HEALNET_DRIFT_SPOOL_MAX_FILES
    and $HEALNET_DRIFT_SPOOL_MAX_BYTES (the oldest files are deleted beyond either)."""
    directory = os.environ.get(DRIFT_SPOOL_DIR_ENV)
    if not directory:
        return None
    defaults = SpoolBounds()
    bounds = SpoolBounds(
        window_cases=env_number("HEALNET_DRIFT_WINDOW_CASES", defaults.window_cases, low=MIN_WINDOW_CASES),
        max_files=env_number("HEALNET_DRIFT_SPOOL_MAX_FILES", defaults.max_files, low=1),
        max_bytes=env_number("HEALNET_DRIFT_SPOOL_MAX_BYTES", defaults.max_bytes, low=1),
    )
    return Path(directory), bounds
