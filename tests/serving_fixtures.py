"""Shared fixtures of the serving tests: a demo model in a temporary registry, and a live `bentoml serve`.

Test modules load them with `pytest_plugins = ("serving_fixtures",)` and import nothing from here at
module level (a module imported before pytest loads it as a plugin loses assertion rewriting), so the
helpers the tests need are fixtures too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serving.demo import DemoSpec, train_demo_checkpoint

CLINICAL_SPEC = DemoSpec(clinical=True)

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 120.0


@contextmanager
def bentoml_home(home: Path) -> Iterator[None]:
    """Point BentoML's stores and the champion pointer at `home`, for this process and its children.

    BentoML caches its home directory and stores on first use, so environment variables alone are not
    enough in a process that has already used them (BentoML's own pytest plugin sets them the same way).
    """
    from bentoml._internal.bento.bento import BentoStore
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models.model import ModelStore

    names = {"models": home / "models", "bentos": home / "bentos", "tmp": home / "tmp"}
    for path in names.values():
        path.mkdir(parents=True, exist_ok=True)
    overrides = [
        (BentoMLContainer.bentoml_home, str(home)),
        (BentoMLContainer.model_store_dir, str(names["models"])),
        (BentoMLContainer.bento_store_dir, str(names["bentos"])),
        (BentoMLContainer.tmp_bento_store_dir, str(names["tmp"])),
        (BentoMLContainer.model_store, ModelStore(names["models"])),
        (BentoMLContainer.bento_store, BentoStore(names["bentos"])),
    ]
    with pytest.MonkeyPatch.context() as patch, ExitStack() as stack:
        patch.setenv("BENTOML_HOME", str(home))
        patch.setenv("HEALNET_REGISTRY_DIR", str(home))
        for provider, value in overrides:
            stack.enter_context(provider.patch(value))
        yield


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small HEALNet (omic + wsi) trained for two epochs on random data; built once per session."""
    return train_demo_checkpoint(tmp_path_factory.mktemp("demo") / "checkpoint", DemoSpec())


@dataclass(frozen=True)
class DemoRegistry:
    home: Path
    tag: str
    checkpoint: Path

    def server_env(self, **extra: str) -> dict[str, str]:
        """Environment of a `bentoml serve` child: this registry, one torch thread, no usage tracking."""
        env = {
            key: value for key, value in os.environ.items() if not key.startswith(("HEALNET_", "PROMETHEUS_"))
        }
        env.update(
            BENTOML_HOME=str(self.home),
            HEALNET_REGISTRY_DIR=str(self.home),
            BENTOML_DO_NOT_TRACK="True",
            OMP_NUM_THREADS="1",
            **extra,
        )
        return env


@contextmanager
def champion_registry(checkpoint: Path, home: Path) -> Iterator[DemoRegistry]:
    from healnet.registry import register_model, set_champion

    with pytest.MonkeyPatch.context() as patch, bentoml_home(home):
        patch.delenv("HEALNET_MODEL_TAG", raising=False)
        tag = register_model(checkpoint, labels={"source": "tests"}, metadata={})
        set_champion(tag, "serving tests")
        yield DemoRegistry(home, tag, checkpoint)


@pytest.fixture(scope="module")
def demo_registry(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRegistry]:
    """A temporary BentoML store holding the demo model as champion, active for one test module."""
    with champion_registry(demo_checkpoint, tmp_path_factory.mktemp("bentoml_home")) as registry:
        yield registry


@pytest.fixture(scope="module")
def clinical_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRegistry]:
    """Like demo_registry, with the clinical variant of the demo model: a two-member ensemble of omic,
    clinical and wsi with the linear clinical path."""
    checkpoint = train_demo_checkpoint(tmp_path_factory.mktemp("clinical") / "checkpoint", CLINICAL_SPEC)
    with champion_registry(checkpoint, tmp_path_factory.mktemp("bentoml_home")) as registry:
        yield registry


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen:
    """`bentoml serve` of the service from the repository root, in its own process group."""
    command = [sys.executable, "-m", "bentoml", "serve", "serving.service:HEALNetService"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_server(process: subprocess.Popen) -> None:
    """Terminate the server and the workers it started (its process group), then make sure they are gone."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    with suppress(ProcessLookupError):  # workers left behind by an arbiter that died first
        os.killpg(process.pid, signal.SIGKILL)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def live_server(registry: DemoRegistry, log_path: Path, **env: str) -> Iterator[str]:
    """A ready `bentoml serve` on a free loopback port; yields its base URL and always stops it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(registry.server_env(**env), port, log_path)
    try:
        if not wait_until(lambda: process.poll() is not None or _ready(url), SERVER_START_TIMEOUT_S, 0.25):
            pytest.fail(
                f"bentoml serve not ready in {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}"
            )
        if process.poll() is not None:
            pytest.fail(f"bentoml serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        yield url
    finally:
        stop_server(process)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of GET /metrics as {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{url}/metrics", timeout=10)
    response.raise_for_status()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


@pytest.fixture(scope="session")
def poll() -> Callable[..., bool]:
    """`poll(predicate, timeout)`: wait until the predicate holds; returns whether it did."""
    return wait_until


@pytest.fixture(scope="session")
def serve():
    """`with serve(registry, log_path, **env) as url:` a live `bentoml serve` (see live_server)."""
    return live_server


@pytest.fixture(scope="session")
def metrics_of() -> Callable[[str], dict]:
    """`metrics_of(url)`: every sample of the server's /metrics."""
    return scrape
