"""Shared fixtures of the serving tests: a demo model in a temporary registry, and a live `bentoml serve`.

Test modules load them with `pytest_plugins = ("serving_fixtures",)`. The machinery lives in
`devtools.live_server` (benchmarks and scripts use it too); these fixtures scope it to tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from devtools.demo import DemoSpec, train_demo_checkpoint
from devtools.live_server import (
    DemoRegistry,
    LiveServerError,
    champion_registry,
    live_server,
    scrape,
    wait_until,
)
from serving.service import HEALNetService

CLINICAL_SPEC = DemoSpec(clinical=True)


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small HEALNet (omic + wsi) trained for two epochs on random data; built once per session."""
    return train_demo_checkpoint(tmp_path_factory.mktemp("demo") / "checkpoint", DemoSpec())


@pytest.fixture(scope="module")
def demo_registry(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRegistry]:
    """A temporary BentoML store holding the demo model as champion, active for one test module."""
    with champion_registry(demo_checkpoint, tmp_path_factory.mktemp("bentoml_home"), "tests") as registry:
        yield registry


@pytest.fixture(scope="module")
def clinical_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRegistry]:
    """Like demo_registry, with the clinical variant of the demo model: a two-member ensemble of omic,
    clinical and wsi with the linear clinical path."""
    checkpoint = train_demo_checkpoint(tmp_path_factory.mktemp("clinical") / "checkpoint", CLINICAL_SPEC)
    with champion_registry(checkpoint, tmp_path_factory.mktemp("bentoml_home"), "tests") as registry:
        yield registry


@pytest.fixture(scope="session")
def poll() -> Callable[..., bool]:
    """`poll(predicate, timeout)`: wait until the predicate holds; returns whether it did."""
    return wait_until


@pytest.fixture(scope="session")
def ready_service(poll: Callable[..., bool]) -> Callable[[], HEALNetService]:
    """`ready_service()`: an in-process HEALNetService of the active registry's champion, once it is loaded
    (one torch thread, as a worker has)."""

    def load() -> HEALNetService:
        torch.set_num_threads(1)
        service = HEALNetService()
        assert poll(service.__is_ready__, 60), service.load_error
        return service

    return load


@contextmanager
def _serve(registry: DemoRegistry, log_path: Path, **env: str) -> Iterator[str]:
    try:
        with live_server(registry.server_env(**env), log_path) as url:
            yield url
    except LiveServerError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def serve():
    """`with serve(registry, log_path, **env) as url:` a live `bentoml serve` of the registry's champion."""
    return _serve


@pytest.fixture(scope="session")
def metrics_of() -> Callable[[str], dict]:
    """`metrics_of(url)`: every sample of the server's /metrics."""
    return scrape
