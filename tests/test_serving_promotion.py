"""A real `bentoml serve` that follows the champion: under steady load, a promotion and a rollback each take
effect within the poll interval (plus the new model's load), no answer is a 5xx, every answer names a version
that was the champion, and a corrupted new champion is refused while the old one keeps answering."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from devtools.demo import DemoSpec, demo_payload, train_demo_checkpoint
from healnet import registry
from healnet.checkpoint import WEIGHTS_FILE
from healnet.registry import checkpoint_path, register_model, rollback, set_champion

pytest_plugins = ("serving_fixtures",)
pytestmark = pytest.mark.slow
POLL_S = 0.5
LOAD_ALLOWANCE_S = 5.0  # loading, verifying and warming up the demo model, on a busy 2-core machine
MAX_REQUESTS = 3000  # the load stops by itself, whatever happens to the test


@dataclass(frozen=True)
class Answer:
    sent: float
    received: float
    status: int
    version: str | None


class SteadyLoad:
    """One client sending /predict back to back (loopback, bounded) and recording every answer."""

    def __init__(self, url: str):
        self.url, self.answers, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._payload = demo_payload(DemoSpec(), ("omic", "wsi"), patches=4, seed=3)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set() and len(self.answers) < MAX_REQUESTS:
                sent = time.monotonic()
                response = client.post(f"{self.url}/predict", json=self._payload)
                version = response.json().get("model_version") if response.status_code == 200 else None
                self.answers.append(Answer(sent, time.monotonic(), response.status_code, version))

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join(60)

    def serving(self, tag: str, since: float) -> bool:
        """The last answer sent after `since` came from `tag`."""
        later = [answer for answer in self.answers if answer.sent > since]
        return bool(later) and later[-1].version == tag


@pytest.fixture(scope="module")
def versions(demo_registry, tmp_path_factory):
    """Two more registered versions: a good one, and one that will be corrupted on the volume."""
    folder = tmp_path_factory.mktemp("versions")
    good = register_model(train_demo_checkpoint(folder / "good", DemoSpec(seed=1)))
    corrupt = register_model(train_demo_checkpoint(folder / "corrupt", DemoSpec(seed=2)))
    return {"champion": demo_registry.tag, "good": good, "corrupt": corrupt}


def promote_damaged(tag: str) -> None:
    """The pointer moves to a version whose weights were damaged on the shared volume (a partial copy, a bad
    disk) after the registry verified them; the damage is done first, so that no worker can load the
    version intact in between."""
    weights = checkpoint_path(tag) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.MonkeyPatch.context() as patch:  # the registry's own check would refuse the promotion now
        patch.setattr(registry, "checkpoint_path", lambda tag: None)
        set_champion(tag, "promoted, then damaged on the volume")


def test_promotion_and_rollback_reach_the_serving_workers(
    demo_registry, versions, serve, metrics_of, tmp_path
):
    first, second, corrupt = versions["champion"], versions["good"], versions["corrupt"]
    env = {"HEALNET_FOLLOW_CHAMPION_S": str(POLL_S)}
    with serve(demo_registry, tmp_path / "serve.log", **env) as url, SteadyLoad(url) as load:
        assert _wait(lambda: load.serving(first, 0.0))
        changes = []
        for action, expected in (
            (lambda: set_champion(second, "promotion under load"), second),
            (lambda: rollback(), first),
        ):
            changed = time.monotonic()
            action()
            changes.append((changed, expected))
            assert _wait(lambda expected=expected, changed=changed: load.serving(expected, changed)), expected
            time.sleep(2 * POLL_S)  # a stretch of steady answers from the new version

        refused = time.monotonic()
        promote_damaged(corrupt)
        failures = ("healnet_model_reload_failures_total", (("reason", "load_failed"), ("tag", corrupt)))
        assert _wait(lambda: metrics_of(url).get(failures, 0) >= 1)
        time.sleep(2 * POLL_S)
        model_info = metrics_of(url)
    answers = load.answers

    assert answers and all(answer.status == 200 for answer in answers), {a.status for a in answers}
    assert {answer.version for answer in answers} <= {first, second}
    # each change took effect within the poll interval plus the load, and every answer sent later than
    # that came from the new champion until the next change
    bounds = [changed + POLL_S + LOAD_ALLOWANCE_S for changed, _ in changes] + [refused]
    for (changed, expected), settled, until in zip(changes, bounds, bounds[1:], strict=False):
        takeover = min(a.received for a in answers if a.sent > changed and a.version == expected) - changed
        assert takeover <= POLL_S + LOAD_ALLOWANCE_S, f"{expected} took {takeover:.1f} s"
        assert all(a.version == expected for a in answers if settled < a.sent < until)
    # the corrupted champion never answered: the rolled-back version kept serving, and says so
    assert all(a.version == first for a in answers if a.sent > refused)
    info = {
        dict(labels)["tag"]: value
        for (name, labels), value in model_info.items()
        if name == "healnet_model_info"
    }
    assert info[first] == 1.0 and info[second] == 0.0  # the version that answers, and only it
    assert corrupt not in info


def _wait(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()
