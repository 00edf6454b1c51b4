"""The champion follower (serving/follower.py) on a fake registry and clock: every failure is counted by
reason and never stops it, a refused version is retried, and a follower that stops polling says so.
Also: a pinned $HEALNET_MODEL_TAG must name a version, not an alias."""

from __future__ import annotations

import errno
import subprocess
import threading
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from devtools.live_server import free_port, start_server, stop_server
from healnet.checkpoint import CheckpointError
from healnet.registry import ChampionPointerError, RegistryError
from serving import follower
from serving.follower import LOAD_ALLOWANCE_S, RETRY_MAX_S, STALL_POLLS, ChampionFollower
from serving.runtime import resolve_served_model

pytest_plugins = ("serving_fixtures",)
INTERVAL_S = 2.0


def failures(reason: str, tag: str = "") -> float:
    value = REGISTRY.get_sample_value("healnet_model_reload_failures_total", {"reason": reason, "tag": tag})
    return value or 0.0


class FakeModel:
    def __init__(self, tag: str):
        self.tag = tag


class FakeRegistry:
    """The champion pointer and the store as the follower reads them; `broken` maps a tag to the exception
    that resolving it raises."""

    def __init__(self, tag: str):
        self.pointer: dict | Exception = {"tag": tag, "since": "t0"}
        self.broken: dict[str, Exception] = {}
        self.resolved: list[str] = []

    def point(self, tag: str, since: str) -> None:
        self.pointer = {"tag": tag, "since": since}

    def get_champion(self) -> dict:
        if isinstance(self.pointer, Exception):
            raise self.pointer
        return self.pointer

    def resolve(self, tag: str) -> tuple[str, Path]:
        self.resolved.append(tag)
        if tag in self.broken:
            raise self.broken[tag]
        return tag, Path("/store") / tag


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake(monkeypatch):
    """A follower serving healnet:a, on a fake registry and clock (the thread is not started)."""
    store = FakeRegistry("healnet:a")
    monkeypatch.setattr(follower, "get_champion", store.get_champion)
    monkeypatch.setattr(follower, "resolve", store.resolve)
    monkeypatch.setattr(follower.ServedModel, "load", lambda tag, path: FakeModel(tag))
    served = ["healnet:a"]
    clock = Clock()
    champion_follower = ChampionFollower(
        INTERVAL_S, lambda: served[-1], lambda model: served.append(model.tag), clock
    )
    return store, champion_follower, served, clock


@pytest.mark.parametrize(
    "error",
    [
        ChampionPointerError("champion.json cannot be read ([Errno 21] Is a directory)"),
        ChampionPointerError("champion.json is corrupt (nested too deeply)"),
        OSError(errno.ESTALE, "Stale file handle"),
        OSError(errno.EIO, "Input/output error"),
        RecursionError("maximum recursion depth exceeded"),
        KeyError("tag"),
    ],
    ids=["directory", "deep nesting", "ESTALE", "EIO", "recursion", "unexpected"],
)
def test_an_unreadable_pointer_is_counted_at_every_poll_and_a_valid_one_followed(fake, error):
    store, champion_follower, served, _ = fake
    before = failures("pointer_unreadable")
    store.pointer = error
    for _ in range(3):
        champion_follower.poll()
    assert failures("pointer_unreadable") == before + 3
    store.point("healnet:b", "t1")
    champion_follower.poll()
    assert served == ["healnet:a", "healnet:b"]


def test_a_version_the_store_cannot_give_is_retried_with_a_back_off(fake):
    store, champion_follower, served, clock = fake
    store.broken["healnet:b"] = RegistryError("no model version 'healnet:b' in the registry")
    store.point("healnet:b", "t1")
    before = failures("store_unreadable", "healnet:b")
    tried_at = []
    for poll in range(60):  # two minutes of polls
        tried = len(store.resolved)
        champion_follower.poll()
        if len(store.resolved) > tried:
            tried_at.append(poll)
        clock.now += INTERVAL_S
    # tried at once, then 1, 2, 4, 8 and 16 intervals after each refusal: the back-off doubles
    assert tried_at == [0, 1, 3, 7, 15, 31]
    assert failures("store_unreadable", "healnet:b") == before + 6
    assert champion_follower.refusal.backoff_s == 32 * INTERVAL_S
    assert served == ["healnet:a"]
    for _ in range(300):  # the back-off stops at RETRY_MAX_S: the alert's window sees every refusal
        champion_follower.poll()
        clock.now += INTERVAL_S
    assert champion_follower.refusal.backoff_s == RETRY_MAX_S
    # the store is repaired: the next retry serves the champion without a new promotion
    del store.broken["healnet:b"]
    clock.now += RETRY_MAX_S
    champion_follower.poll()
    assert served == ["healnet:a", "healnet:b"] and champion_follower.refusal is None


def test_a_refused_version_is_tried_again_when_the_pointer_returns_to_it(fake):
    """Row 5: pointer → B while B cannot be read (refused), store restored, pointer → C → B between two
    polls: B is tried again at once and served."""
    store, champion_follower, served, _ = fake
    store.broken["healnet:b"] = OSError(errno.EIO, "Input/output error")
    store.point("healnet:b", "t1")
    champion_follower.poll()
    champion_follower.poll()  # within the back-off: not tried again
    assert store.resolved == ["healnet:b"] and failures("store_unreadable", "healnet:b") >= 1
    del store.broken["healnet:b"]
    store.point("healnet:c", "t2")
    store.point("healnet:b", "t3")
    champion_follower.poll()
    assert served == ["healnet:a", "healnet:b"]


def test_a_corrupt_or_unloadable_version_counts_as_a_failed_load(fake, monkeypatch):
    store, champion_follower, served, _ = fake
    store.broken["healnet:b"] = CheckpointError("checkpoint /store/b/model.pt is corrupted")
    store.point("healnet:b", "t1")
    before = failures("load_failed", "healnet:b")
    champion_follower.poll()
    assert failures("load_failed", "healnet:b") == before + 1

    def unloadable(tag, path):
        raise RuntimeError("unsupported checkpoint format 99")

    monkeypatch.setattr(follower.ServedModel, "load", unloadable)
    store.point("healnet:c", "t2")
    champion_follower.poll()
    assert failures("load_failed", "healnet:c") == 1 and served == ["healnet:a"]


def test_the_last_successful_poll_is_published(fake):
    store, champion_follower, _, _ = fake

    def last_success() -> float | None:
        return REGISTRY.get_sample_value("healnet_champion_last_successful_poll_timestamp_seconds")

    champion_follower.poll()
    polled = last_success()
    assert polled is not None
    store.pointer = ChampionPointerError("unreadable")
    champion_follower.poll()
    assert last_success() == polled
    store.point("healnet:a", "t1")
    champion_follower.poll()
    assert (last_success() or 0) >= polled


def test_a_follower_that_stops_polling_is_stalled(fake):
    _, champion_follower, _, clock = fake
    assert champion_follower.stalled()  # not started: it does not poll
    sleeping = ChampionFollower(3600.0, lambda: "healnet:a", lambda model: None, clock)
    sleeping.start()  # its first poll is an hour away
    assert sleeping.stall_after_s == STALL_POLLS * 3600.0 + LOAD_ALLOWANCE_S
    assert not sleeping.stalled()
    clock.now += sleeping.stall_after_s + 1
    assert sleeping.stalled()


# the thread's end is the point of the test, not a failure of it
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_follower_whose_thread_ended_is_stalled(fake):
    """Its thread ends only on what is no Exception (SystemExit here): the worker must report it."""
    _, _, _, clock = fake
    ended = threading.Event()

    def served_tag() -> str:
        ended.set()
        raise SystemExit

    dying = ChampionFollower(0.01, served_tag, lambda model: None, clock)
    dying.start()
    assert ended.wait(10)
    dying._thread.join(10)
    assert dying.stalled()


def test_a_pinned_alias_is_refused(demo_registry, monkeypatch):
    for alias in ("latest", "healnet:latest"):
        monkeypatch.setenv("HEALNET_MODEL_TAG", alias)
        with pytest.raises(RegistryError, match=r"^\$HEALNET_MODEL_TAG: .* is an alias, not a version"):
            resolve_served_model()
    monkeypatch.setenv("HEALNET_MODEL_TAG", f" {demo_registry.tag.upper()} ")
    assert resolve_served_model()[0] == demo_registry.tag


def test_bentoml_serve_refuses_to_start_on_a_pinned_alias(demo_registry, tmp_path):
    log = tmp_path / "serve.log"
    process = start_server(demo_registry.server_env(HEALNET_MODEL_TAG="latest"), free_port(), log)
    try:
        returncode = process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        stop_server(process)
    text = log.read_text()
    assert returncode not in (None, 0), text
    assert "refusing to start: $HEALNET_MODEL_TAG: 'latest' is an alias, not a version" in text, text
