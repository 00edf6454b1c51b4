"""The service's drift spool (on when $HEALNET_DRIFT_SPOOL_DIR is set): per served model version, a
`SpoolWriter` of the answered cases' binned counts (healnet/drift/spool.py, docs/drift.md).

It never touches an answer: `record` hands the cases to one background thread and returns at once, so
binning (about 0.3 ms for a batch of the demo model, 45 ms for 16 cases of 6,000 omic values and 2,000
patches of 1,024 features) never holds the event loop or delays a response. A failure there is logged
and counted (healnet_drift_spool_errors_total), as are batches dropped because MAX_PENDING batches were
already waiting. A model without an input reference (trained before it) is not spooled. The last
OPEN_VERSIONS model versions keep a window each, since requests of the previous champion still finish after
a swap; an older version's window is written when it holds enough cases, else dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from healnet.drift.reference import InputReference
from healnet.drift.spool import SpoolBounds, SpoolWriter
from healnet.inference import Case
from serving import metrics
from serving.config import drift_spool_settings

logger = logging.getLogger("healnet.serving")
# batches waiting for the spool's thread; beyond, a batch is dropped (and counted) rather than queued
MAX_PENDING = 64
# model versions with a window open: during a swap, requests of the previous version still finish
OPEN_VERSIONS = 2


class DriftSpool:
    def __init__(self, directory: Path, bounds: SpoolBounds):
        self.directory = directory
        self.bounds = bounds
        self.writers: dict[str, SpoolWriter | None] = {}  # by model tag, the most recent last
        self.pending = 0
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="healnet-drift-spool")

    @classmethod
    def from_env(cls) -> DriftSpool | None:
        """The spool of $HEALNET_DRIFT_SPOOL_DIR; None when it is unset (a bad bound is a ConfigError)."""
        settings = drift_spool_settings()
        return None if settings is None else cls(*settings)

    def record(self, tag: str, input_reference: dict | None, cases: Sequence[Case]) -> None:
        """Queue answered cases of model `tag` for the spool; never raises, never waits."""
        try:
            with self.lock:
                if self.pending >= MAX_PENDING:
                    raise RuntimeError(f"{MAX_PENDING} batches are already waiting: this one is dropped")
                self.pending += 1
            self.executor.submit(self._record, tag, input_reference, list(cases))
        except Exception:  # a full queue, or a spool already closed
            logger.warning("the drift spool dropped %d case(s)", len(cases), exc_info=True)
            metrics.drift_spool_failed()

    def close(self) -> None:
        """Finish the queued batches and write the current window when it holds enough cases (at
        shutdown); never raises."""
        self.executor.shutdown(wait=True)
        while self.writers:
            self._close_oldest()

    def _record(self, tag: str, input_reference: dict | None, cases: list[Case]) -> None:
        try:
            writer = self._writer(tag, input_reference)
            if writer is not None:
                writer.record(cases)
        except Exception:  # whatever goes wrong here must not reach the service
            logger.warning("the drift spool failed to record %d case(s)", len(cases), exc_info=True)
            metrics.drift_spool_failed()
        finally:
            with self.lock:
                self.pending -= 1

    def _writer(self, tag: str, input_reference: dict | None) -> SpoolWriter | None:
        """The writer of model `tag`; opening one closes the oldest beyond OPEN_VERSIONS (only the spool's
        thread calls this)."""
        if tag in self.writers:
            self.writers[tag] = self.writers.pop(tag)
            return self.writers[tag]
        writer = None
        if input_reference is None:
            logger.warning("model %s has no input reference (retrain it): its inputs are not spooled", tag)
        else:
            writer = SpoolWriter(self.directory, InputReference.from_dict(input_reference), tag, self.bounds)
        self.writers[tag] = writer
        while len(self.writers) > OPEN_VERSIONS:
            self._close_oldest()
        return writer

    def _close_oldest(self) -> None:
        writer = self.writers.pop(next(iter(self.writers)))
        if writer is None:
            return
        try:
            writer.close()
        except Exception:
            logger.warning("the drift spool failed to write its last window", exc_info=True)
            metrics.drift_spool_failed()
