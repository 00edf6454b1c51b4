"""A demo model in a temporary BentoML registry, and a live `bentoml serve` of it on loopback."""

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

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 120.0


class LiveServerError(RuntimeError):
    """`bentoml serve` did not become ready, or exited; the message carries the end of its log."""


@contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    """Set (or, for None, remove) environment variables for the block, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
    with _environment(BENTOML_HOME=str(home), HEALNET_REGISTRY_DIR=str(home)), ExitStack() as stack:
        for provider, value in overrides:
            stack.enter_context(provider.patch(value))
        yield


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
def champion_registry(checkpoint: Path, home: Path, source: str = "devtools") -> Iterator[DemoRegistry]:
    """A BentoML store at `home` whose champion is `checkpoint`, active (in this process) for the block."""
    from healnet.registry import register_model, set_champion

    with _environment(HEALNET_MODEL_TAG=None), bentoml_home(home):
        tag = register_model(checkpoint, labels={"source": source}, metadata={})
        set_champion(tag, f"{source}: demo champion")
        yield DemoRegistry(home, tag, checkpoint)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; returns whether it held."""
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


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def live_server(
    env: dict[str, str], log_path: Path, timeout: float = SERVER_START_TIMEOUT_S
) -> Iterator[str]:
    """A ready `bentoml serve` with `env` on a free loopback port; yields its base URL and always stops it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(env, port, log_path)
    try:
        if not wait_until(lambda: process.poll() is not None or ready(url), timeout, 0.25):
            raise LiveServerError(f"bentoml serve not ready in {timeout} s:\n{log_path.read_text()[-3000:]}")
        if process.poll() is not None:
            raise LiveServerError(
                f"bentoml serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
            )
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
