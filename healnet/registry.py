"""Model registry: versions in the BentoML model store, and an atomically updated champion pointer.

Each version is a BentoML model named `healnet` whose folder holds the checkpoint. The champion
pointer is `champion.json` beside the store (`$HEALNET_REGISTRY_DIR`, default `$BENTOML_HOME`),
rewritten by write-to-temp-then-rename so a reader never sees a half-written file.

Every change of the pointer happens under an exclusive lock on `champion.lock` beside it (POSIX record
locks, `fcntl.lockf`), so concurrent writers in any process never lose a history entry. On a network
volume the lock is only as good as the file system's locking: NFSv4 and most CSI drivers of
ReadWriteMany volumes honour POSIX locks; NFSv3 needs a running lock daemon (lockd); some object-store
FUSE mounts ignore locks entirely and must not hold the registry when several pipelines promote at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from healnet.checkpoint import MANIFEST_FILE, read_manifest, verify_checkpoint
from healnet.errors import HEALNetError

MODEL_NAME = "healnet"
POINTER_FILE = "champion.json"
LOCK_FILE = "champion.lock"
POINTER_KEYS = ("tag", "since", "reason", "history")
# `expected` of set_champion when the caller does not compare
UNCHECKED = object()


class RegistryError(HEALNetError, RuntimeError):
    """A missing version, an empty registry or an invalid rollback."""


class ChampionPointerError(RegistryError):
    """champion.json is not a valid champion pointer; the message says where and how to repair it."""


class ChampionChangedError(RegistryError):
    """A compare-and-swap of the champion found another champion than the one expected."""

    def __init__(self, expected: str | None, current: str | None):
        self.expected, self.current = expected, current
        super().__init__(
            f"the champion changed from {expected or 'none'} to {current or 'none'} since it was read"
        )


def registry_dir() -> Path:
    if os.environ.get("HEALNET_REGISTRY_DIR"):
        return Path(os.environ["HEALNET_REGISTRY_DIR"])
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get())


def _pointer_path() -> Path:
    return registry_dir() / POINTER_FILE


def register_model(
    checkpoint_dir: Path, labels: dict[str, str] | None = None, metadata: dict | None = None
) -> str:
    """Copy a verified checkpoint into the BentoML store as a new version; returns its tag."""
    import bentoml

    sha256 = verify_checkpoint(checkpoint_dir)
    manifest = read_manifest(checkpoint_dir)
    with bentoml.models.create(
        MODEL_NAME,
        labels={"framework": "pytorch", **(labels or {})},
        metadata={
            "sha256": sha256,
            "modalities": [m["name"] for m in manifest["modalities"]],
            **(metadata or {}),
        },
    ) as model:
        shutil.copytree(checkpoint_dir, model.path, dirs_exist_ok=True)
    return str(model.tag)


def list_versions() -> list[dict]:
    """Every registered version, newest first, with its labels, metadata and champion flag."""
    import bentoml
    from bentoml.exceptions import NotFound

    champion = get_champion()
    try:
        models = bentoml.models.list(MODEL_NAME)
    except NotFound:  # nothing registered yet
        models = []
    rows = []
    for model in models:
        info = model.info
        rows.append(
            {
                "tag": str(model.tag),
                "created": info.creation_time.isoformat(timespec="seconds"),
                "labels": dict(info.labels),
                "metadata": dict(info.metadata),
                "champion": champion is not None and champion["tag"] == str(model.tag),
            }
        )
    return sorted(rows, key=lambda row: row["created"], reverse=True)


def show_version(tag: str) -> dict:
    matches = [row for row in list_versions() if row["tag"] == tag or row["tag"].split(":")[1] == tag]
    if not matches:
        raise RegistryError(f"no model version {tag!r} in the registry")
    return matches[0]


def checkpoint_path(tag: str) -> Path:
    """The checkpoint folder of a registered version, with its weights' sha256 verified."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        model = bentoml.models.get(tag)
    except NotFound as error:
        raise RegistryError(f"no model version {tag!r} in the registry") from error
    path = Path(model.path)
    if not (path / MANIFEST_FILE).exists():
        raise RegistryError(f"model {tag} holds no healnet checkpoint")
    verify_checkpoint(path)
    return path


@contextmanager
def champion_lock() -> Iterator[None]:
    """Hold the registry's exclusive write lock (blocking until it is free)."""
    directory = registry_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a+") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def get_champion() -> dict | None:
    """The champion pointer, or None before the first promotion; a corrupt one is a ChampionPointerError."""
    path = _pointer_path()
    if not path.exists():
        return None
    repair = (
        "restore it from a backup, or point it at a version again with `healnet registry rollback --to TAG`"
    )
    try:
        pointer = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ChampionPointerError(f"{path} is corrupt ({error}): {repair}") from None
    missing = [key for key in POINTER_KEYS if not isinstance(pointer, dict) or key not in pointer]
    if missing or not isinstance(pointer["history"], list):
        raise ChampionPointerError(
            f"{path} is not a champion pointer (missing {missing or ['history list']}): {repair}"
        )
    return pointer


def set_champion(tag: str, reason: str, expected: str | None | object = UNCHECKED) -> dict:
    """Point the champion at `tag` (which must exist), keeping the history of earlier champions.

    With `expected` (a tag, or None for "no champion yet") this is a compare-and-swap: it goes ahead only if
    the champion is still `expected`, else raises ChampionChangedError and changes nothing.
    """
    checkpoint_path(tag)
    with champion_lock():
        previous = get_champion()
        current = previous["tag"] if previous else None
        if expected is not UNCHECKED and current != expected:
            raise ChampionChangedError(cast(str | None, expected), current)
        return _write_champion(tag, reason, previous)


def _write_champion(tag: str, reason: str, previous: dict | None, keep_corrupt: bool = False) -> dict:
    """Write the pointer; the caller holds the lock and has read `previous` under it. `keep_corrupt`: move
    an unreadable pointer aside (champion.json.corrupt-TIME) instead of replacing it, so nothing is lost."""
    history = (
        ([*previous["history"], {k: previous[k] for k in ("tag", "since", "reason")}]) if previous else []
    )
    pointer = {
        "tag": tag,
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
        "reason": reason,
        "history": history,
    }
    directory = registry_dir()
    if keep_corrupt and _pointer_path().exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        os.replace(_pointer_path(), directory / f"{POINTER_FILE}.corrupt-{stamp}")
    with tempfile.NamedTemporaryFile(
        "w", dir=directory, prefix=".champion-", suffix=".json", delete=False
    ) as tmp:
        json.dump(pointer, tmp, indent=2)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, _pointer_path())
    return pointer


def rollback(to_tag: str | None = None) -> dict:
    """Set the champion back to `to_tag`, or to the previous champion when none is given."""
    if to_tag is not None:  # "healnet:VERSION" or VERSION; checked before the pointer is read
        to_tag = to_tag if ":" in to_tag else f"{MODEL_NAME}:{to_tag}"
        checkpoint_path(to_tag)
    with champion_lock():
        try:
            champion = get_champion()
        except ChampionPointerError:
            if to_tag is None:
                raise
            return _write_champion(to_tag, "rollback over a corrupt pointer", None, keep_corrupt=True)
        if champion is None:
            raise RegistryError("there is no champion to roll back")
        if to_tag is None:
            earlier = [entry["tag"] for entry in champion["history"] if entry["tag"] != champion["tag"]]
            if not earlier:
                raise RegistryError(f"champion {champion['tag']} has no earlier version to roll back to")
            to_tag = earlier[-1]
            checkpoint_path(to_tag)
        if to_tag == champion["tag"]:
            raise RegistryError(f"{to_tag} is already the champion")
        return _write_champion(to_tag, f"rollback from {champion['tag']}", champion)


def resolve(tag: str | None = None) -> tuple[str, Path]:
    """The tag and checkpoint folder to serve: `tag` if given, else the champion."""
    if tag is None:
        champion = get_champion()
        if champion is None:
            raise RegistryError(
                f"no champion model in {registry_dir()}: promote one (python -m pipelines run-local) or set a tag"
            )
        tag = champion["tag"]
    return tag, checkpoint_path(tag)
