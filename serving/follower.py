"""Following the champion: a worker's thread that polls the registry's champion pointer and swaps in each new
champion that loads ($HEALNET_FOLLOW_CHAMPION_S > 0).

Nothing the shared volume does stops the follower. An unreadable pointer (not a file, corrupt JSON, JSON
nested too deeply, an I/O error such as ESTALE or EIO), a version missing or unreadable in the store, or one
that fails its sha256 check or its load is logged, counted in
healnet_model_reload_failures_total{reason,tag}, and the follower polls again while the worker keeps
answering with the model it has. A refused version is tried again as soon as the pointer is written again,
and otherwise after a back-off (one poll interval, doubling up to RETRY_MAX_S): a restored store is picked
up without a new promotion, and the failure keeps being counted (and alerted) for as long as the worker
serves another version than the champion.

Health: healnet_champion_last_successful_poll_timestamp_seconds is when the worker last read the pointer
and found its champion served. `stalled()` (the worker's /livez) says the follower has finished no poll,
failed or not, for STALL_POLLS intervals plus LOAD_ALLOWANCE_S: its thread hangs (a read blocked on the
volume) or has died, and a restart is the way out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from healnet.checkpoint import CheckpointError
from healnet.registry import get_champion, resolve
from serving import metrics
from serving.runtime import ServedModel

logger = logging.getLogger("healnet.serving")
POINTER_UNREADABLE, STORE_UNREADABLE, LOAD_FAILED = metrics.RELOAD_FAILURE_REASONS
RETRY_MAX_S = 300.0  # below the 15-minute window of HealnetModelReloadFailed: the alert holds while refused
STALL_POLLS = 10
LOAD_ALLOWANCE_S = 120.0  # a poll that loads, verifies and warms up a large model from a network volume


@dataclass(frozen=True)
class Refusal:
    """A champion that could not be served: `since` identifies the pointer write that named it."""

    tag: str
    since: str
    backoff_s: float
    retry_at: float


class ChampionFollower:
    """Polls the champion pointer every `interval_s` seconds on its own thread and hands each champion that
    loads to `swap_in`; `served_tag` says which version the worker answers with."""

    def __init__(
        self,
        interval_s: float,
        served_tag: Callable[[], str],
        swap_in: Callable[[ServedModel], None],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.interval_s = interval_s
        self.stall_after_s = STALL_POLLS * interval_s + LOAD_ALLOWANCE_S
        self._served_tag, self._swap_in, self._clock = served_tag, swap_in, clock
        self.refusal: Refusal | None = None
        self.last_progress = clock()
        self._thread = threading.Thread(target=self._run, name="healnet-follow", daemon=True)
        metrics.champion_polled()  # the worker has just loaded the champion

    def start(self) -> None:
        self._thread.start()

    def stalled(self) -> bool:
        """The follower has died or finished no poll for too long: the worker no longer follows."""
        return not self._thread.is_alive() or self._clock() - self.last_progress > self.stall_after_s

    def _run(self) -> None:
        while True:
            time.sleep(self.interval_s)
            self.poll()
            self.last_progress = self._clock()

    def poll(self) -> None:
        """Look at the pointer once and serve the champion it names if it loads; what the registry, the store
        or the model raise is counted and logged, never raised."""
        served = self._served_tag()
        tag, since = None, ""
        stage = POINTER_UNREADABLE
        try:
            pointer = get_champion()
            if pointer is None or pointer["tag"] == served:  # nothing to follow, or already followed
                self.refusal = None
                metrics.champion_polled()
                return
            tag, since = pointer["tag"], pointer["since"]
            if not self._due(tag, since):
                return
            stage = STORE_UNREADABLE
            _, checkpoint_dir = resolve(tag)  # verifies the weights' sha256
            stage = LOAD_FAILED
            self._swap_in(ServedModel.load(tag, checkpoint_dir))
        except Exception as error:  # whatever the volume or the model does, the current model keeps answering
            reason = LOAD_FAILED if isinstance(error, CheckpointError) else stage
            if tag is not None:
                self._refuse(tag, since)
            metrics.model_reload_failed(reason, tag or "")
            logger.error(
                "cannot follow the champion (%s), still serving %s: %s: %s",
                reason,
                served,
                type(error).__name__,
                error,
            )
            return
        self.refusal = None
        metrics.champion_polled()
        logger.info("now serving the champion %s", tag)

    def _due(self, tag: str, since: str) -> bool:
        """Whether to try `tag`: never refused, named by a new pointer write, or its back-off is over."""
        refusal = self.refusal
        return (
            refusal is None
            or (refusal.tag, refusal.since) != (tag, since)
            or self._clock() >= refusal.retry_at
        )

    def _refuse(self, tag: str, since: str) -> None:
        previous = self.refusal
        if previous is not None and (previous.tag, previous.since) == (tag, since):
            backoff_s = min(2 * previous.backoff_s, RETRY_MAX_S)
        else:
            backoff_s = self.interval_s
        self.refusal = Refusal(tag, since, backoff_s, self._clock() + backoff_s)
