"""A real `bentoml serve` following the champion through a hostile registry volume: a pointer that is briefly
a directory or JSON nested 10^5 deep, and versions whose folder is gone from the store. The follower counts
each failure by reason, keeps polling and keeps the worker healthy, and follows the next valid pointer; a
refused version is served once the store has it again."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import httpx
import pytest

from devtools.demo import DemoSpec, demo_payload, train_demo_checkpoint
from healnet import registry
from healnet.registry import register_model, set_champion

pytest_plugins = ("serving_fixtures",)
pytestmark = pytest.mark.slow
POLL_S = 0.5
TIMEOUT_S = 60.0  # loading a version on a busy 2-core machine takes seconds; waits end as soon as they can
PAYLOAD = demo_payload(DemoSpec(), ("omic", "wsi"), patches=4, seed=3)


@pytest.fixture(scope="module")
def versions(demo_registry, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("versions")
    return {
        "first": demo_registry.tag,
        "a": register_model(train_demo_checkpoint(folder / "a", DemoSpec(seed=1))),
        "c": register_model(train_demo_checkpoint(folder / "c", DemoSpec(seed=2))),
    }


def served(url: str) -> str:
    response = httpx.post(f"{url}/predict", json=PAYLOAD, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def healthy(url: str) -> bool:
    return all(httpx.get(f"{url}/{probe}", timeout=5).status_code == 200 for probe in ("livez", "readyz"))


def point_unchecked(tag: str) -> None:
    """The pointer names `tag` although the store cannot give it (the registry's own check would refuse)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "checkpoint_path", lambda tag: None)
        set_champion(tag, "promoted while the store cannot give it")


def test_the_follower_survives_a_hostile_pointer_and_store(
    demo_registry, versions, serve, metrics_of, poll, tmp_path
):
    first, a, c = versions["first"], versions["a"], versions["c"]
    pointer = demo_registry.home / "champion.json"
    folders = {tag: demo_registry.home / "models" / "healnet" / tag.partition(":")[2] for tag in (a, c)}

    def failures(reason: str, tag: str = "") -> float:
        return sum(
            value
            for (name, labels), value in metrics_of(url).items()
            if name == "healnet_model_reload_failures_total"
            and dict(labels) == {"reason": reason, "tag": tag}
        )

    def counts_again(reason: str, tag: str = "", times: int = 3) -> Callable[[], bool]:
        before = failures(reason, tag)
        return lambda: failures(reason, tag) >= before + times

    with serve(demo_registry, tmp_path / "serve.log", HEALNET_FOLLOW_CHAMPION_S=str(POLL_S)) as url:
        assert served(url) == first

        # row 4: the pointer is briefly a directory, then JSON nested 10^5 deep
        saved = pointer.read_bytes()
        for damage, repair in (
            (pointer.mkdir, pointer.rmdir),
            (lambda: pointer.write_text("[" * 100_000 + "]" * 100_000), pointer.unlink),
        ):
            pointer.unlink()
            damage()
            assert poll(counts_again("pointer_unreadable"), TIMEOUT_S)  # every poll counts: it keeps polling
            assert healthy(url) and served(url) == first
            repair()
            pointer.write_bytes(saved)
        set_champion(a, "the first valid pointer after the damage")
        assert poll(lambda: served(url) == a, TIMEOUT_S)

        # row 5: the pointer names C while its folder is gone from the store: refused, retried, counted
        hidden = tmp_path / "hidden"
        os.rename(folders[c], hidden)
        point_unchecked(c)
        assert poll(counts_again("store_unreadable", c, times=2), TIMEOUT_S)
        assert healthy(url) and served(url) == a
        # the store is restored and the pointer returns to C (C → A → C): C is tried again and served
        os.rename(hidden, folders[c])
        set_champion(a, "back")
        set_champion(c, "and forth")
        assert poll(lambda: served(url) == c, TIMEOUT_S)

        # a store restored without a new promotion: the back-off's retry serves the champion
        os.rename(folders[a], hidden)
        point_unchecked(a)
        assert poll(counts_again("store_unreadable", a, times=1), TIMEOUT_S)
        assert served(url) == c
        os.rename(hidden, folders[a])
        assert poll(lambda: served(url) == a, TIMEOUT_S)

        samples = metrics_of(url)
        last_success = samples[("healnet_champion_last_successful_poll_timestamp_seconds", ())]
        assert time.time() - last_success < 10
        assert healthy(url)
    log = (tmp_path / "serve.log").read_text()
    assert "Exception in thread" not in log
    assert "cannot follow the champion (pointer_unreadable), still serving" in log
