"""Model registry: versions in the BentoML model store, and an atomically updated champion pointer.

Each version is a BentoML model named `healnet` whose folder holds the checkpoint. The champion
pointer is `champion.json` beside the store (`$HEALNET_REGISTRY_DIR`, default `$BENTOML_HOME`),
rewritten by write-to-temp-then-rename so a reader never sees a half-written file.

Every change of the pointer happens under an exclusive lock on `champion.lock` beside it (POSIX record
locks, `fcntl.lockf`), so concurrent writers in any process never lose a history entry. On a network
volume the lock is only as good as the file system's locking: NFSv4 and most CSI drivers of
ReadWriteMany volumes honour POSIX locks; NFSv3 needs a running lock daemon (lockd); some object-store
FUSE mounts ignore locks entirely and must not hold the registry when several pipelines promote at once.

The pointer only ever holds a concrete `healnet:VERSION`: tags are normalised (`VERSION` or
`healnet:VERSION`, any case, surrounding blanks) and BentoML's moving alias `latest` is refused, since it
would make the champion change whenever a version is registered, without a gate.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from healnet.checkpoint import MANIFEST_FILE, read_manifest, verify_checkpoint
from healnet.errors import HEALNetError

if TYPE_CHECKING:  # imported when used: use_registry must point BentoML at the store first
    import bentoml

MODEL_NAME = "healnet"
POINTER_FILE = "champion.json"
LOCK_FILE = "champion.lock"
POINTER_KEYS = ("tag", "since", "reason", "history")
# the model card (healnet.model_card) beside the checkpoint in a version's folder; none before cards existed
CARD_JSON, CARD_MARKDOWN = "model_card.json", "model_card.md"
PROMOTION, ROLLBACK = "promotion", "rollback"
# BentoML's version syntax (bentoml._internal.tag); "latest" is its alias for the newest version
VERSION_PATTERN = re.compile(r"[a-z0-9]([-._a-z0-9]*[a-z0-9])?")
ALIASES = ("latest",)
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


def version_tag(tag: str) -> str:
    """`tag` as the concrete `healnet:VERSION` it names: `VERSION` or `healnet:VERSION`, in any case (BentoML
    stores tags in lower case), with surrounding blanks. An alias (`latest`, or the bare model name), another
    model's name or a malformed version is a RegistryError; whether the version is stored is not checked."""
    text = tag.strip().lower()
    name, colon, version = text.rpartition(":")
    if not colon:
        name = MODEL_NAME
    if name != MODEL_NAME:
        raise RegistryError(f"{tag!r} is not a {MODEL_NAME} version: give {MODEL_NAME}:VERSION or VERSION")
    if version in (*ALIASES, MODEL_NAME, ""):
        raise RegistryError(
            f"{tag!r} is an alias, not a version: name one with {MODEL_NAME}:VERSION "
            f"(`healnet registry list` shows them)"
        )
    if not VERSION_PATTERN.fullmatch(version):
        raise RegistryError(f"{tag!r} is not a valid version: letters, digits, '-', '_' and '.' only")
    return f"{MODEL_NAME}:{version}"


def register_model(
    checkpoint_dir: Path,
    labels: dict[str, str] | None = None,
    metadata: dict | None = None,
    files: Callable[[str], Mapping[str, str]] | None = None,
) -> str:
    """Copy a verified checkpoint into the BentoML store as a new version; returns its tag. `files(tag)`
    gives text files (name: text) to store beside the checkpoint, made for the new tag (the model card); if
    it raises, nothing is registered."""
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
        for name, text in (files(str(model.tag)) if files else {}).items():
            Path(model.path, name).write_text(text, encoding="utf-8")
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
    tag = version_tag(tag)
    matches = [row for row in list_versions() if row["tag"] == tag]
    if not matches:
        raise RegistryError(f"no model version {tag!r} in the registry")
    return matches[0]


def _stored_model(tag: str) -> bentoml.Model:
    """A registered version (see version_tag) as BentoML stores it, read afresh from its folder."""
    import bentoml
    from bentoml.exceptions import NotFound

    tag = version_tag(tag)
    try:
        return bentoml.models.get(tag)
    except NotFound as error:
        raise RegistryError(f"no model version {tag!r} in the registry") from error


def model_folder(tag: str) -> Path:
    """The folder of a registered version (see version_tag) in the store, unverified."""
    return Path(_stored_model(tag).path)


def model_card(tag: str) -> tuple[dict, str] | None:
    """The model card of a registered version: its JSON and its Markdown; None for a version registered
    before model cards were written. An unknown version is a RegistryError."""
    folder = model_folder(tag)
    try:
        text = (folder / CARD_JSON).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        card = json.loads(text)
        markdown = (folder / CARD_MARKDOWN).read_text(encoding="utf-8")
    except (OSError, ValueError) as error:
        raise RegistryError(f"the model card of {version_tag(tag)} cannot be read: {error}") from None
    return card, markdown


def replace_model_card(tag: str, files: Mapping[str, str]) -> None:
    """Store a registered version's model card anew: `files` are its CARD_JSON and CARD_MARKDOWN texts (the
    card of a gate taken again at promotion). Each file is replaced whole, by write-to-temp-then-rename, so
    a reader of the card never sees a half-written file; the checkpoint beside it is left as it is."""
    if set(files) != {CARD_JSON, CARD_MARKDOWN}:
        raise RegistryError(f"a model card is {CARD_JSON} and {CARD_MARKDOWN}, not {sorted(files)}")
    folder = model_folder(tag)
    for name, text in files.items():
        _replace_file(folder / name, text)


def update_version_metadata(tag: str, fields: Mapping[str, Any]) -> None:
    """Set `fields` in a registered version's metadata, keeping its other fields (the gate taken again at
    promotion, whose rule and reasons replace the first gate's). The version's model.yaml is replaced whole,
    by write-to-temp-then-rename, so a reader (list_versions) never sees a half-written one; a value YAML
    cannot hold fails before anything is written."""
    from bentoml._internal.models.model import MODEL_YAML_FILENAME

    model = _stored_model(tag)
    info = model.info  # this read's own copy: changing it changes nothing stored until written below
    info.metadata.update(fields)
    text = io.StringIO()
    info.dump(text)
    _replace_file(Path(model.path) / MODEL_YAML_FILENAME, text.getvalue())


def _replace_file(path: Path, text: str) -> None:
    """Write `path` by write-to-temp-then-rename, beside it."""
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix, delete=False, encoding="utf-8"
    ) as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def checkpoint_path(tag: str) -> Path:
    """The checkpoint folder of a registered version (see version_tag), with its weights' sha256 verified."""
    tag = version_tag(tag)
    path = model_folder(tag)
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
    """The champion pointer, or None before the first promotion; a corrupt or unreadable one (not a file,
    an I/O error of the volume) is a ChampionPointerError."""
    path = _pointer_path()
    repair = (
        "restore it from a backup, or point it at a version again with `healnet registry rollback --to TAG`"
    )
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ChampionPointerError(f"{path} cannot be read ({error}): {repair}") from None
    try:
        pointer = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ChampionPointerError(f"{path} is corrupt ({error}): {repair}") from None
    except RecursionError:
        raise ChampionPointerError(f"{path} is corrupt (nested too deeply): {repair}") from None
    missing = [key for key in POINTER_KEYS if not isinstance(pointer, dict) or key not in pointer]
    if missing or not isinstance(pointer["history"], list):
        raise ChampionPointerError(
            f"{path} is not a champion pointer (missing {missing or ['history list']}): {repair}"
        )
    if not all(isinstance(entry, dict) and "tag" in entry for entry in pointer["history"]):
        raise ChampionPointerError(
            f"{path} is not a champion pointer (a history entry without a tag): {repair}"
        )
    if not _concrete(pointer["tag"]):
        raise ChampionPointerError(f"{path} holds {pointer['tag']!r}, not a {MODEL_NAME}:VERSION: {repair}")
    return pointer


def _concrete(tag: object) -> bool:
    """Whether `tag` is a concrete version exactly as the pointer must hold it."""
    try:
        return isinstance(tag, str) and version_tag(tag) == tag
    except RegistryError:
        return False


def set_champion(tag: str, reason: str, expected: str | None | object = UNCHECKED) -> dict:
    """Promote `tag` (a stored version, see version_tag) to champion, keeping the history of earlier
    champions.

    With `expected` (a tag, or None for "no champion yet") this is a compare-and-swap: it goes ahead only if
    the champion is still `expected`, else raises ChampionChangedError and changes nothing.
    """
    tag = version_tag(tag)
    checkpoint_path(tag)
    with champion_lock():
        previous = get_champion()
        current = previous["tag"] if previous else None
        if expected is not UNCHECKED and current != expected:
            raise ChampionChangedError(cast(str | None, expected), current)
        return _write_champion(tag, reason, PROMOTION, previous)


def _write_champion(
    tag: str, reason: str, kind: str, previous: dict | None, keep_corrupt: bool = False
) -> dict:
    """Write the pointer; the caller holds the lock and has read `previous` under it. `kind`: PROMOTION or
    ROLLBACK. `keep_corrupt`: move an unreadable pointer aside (champion.json.corrupt-TIME) instead of
    replacing it, so nothing is lost."""
    history = [*previous["history"], _entry(previous)] if previous else []
    pointer = {
        "tag": tag,
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
        "reason": reason,
        "kind": kind,
        "history": history,
    }
    directory = registry_dir()
    if keep_corrupt and _pointer_path().exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        os.replace(_pointer_path(), directory / f"{POINTER_FILE}.corrupt-{stamp}")
    _replace_file(_pointer_path(), json.dumps(pointer, indent=2))
    return pointer


def _entry(pointer: dict) -> dict:
    """The history entry of a pointer that is being replaced."""
    return {
        "tag": pointer["tag"],
        "since": pointer["since"],
        "reason": pointer["reason"],
        "kind": _kind(pointer),
    }


def _kind(entry: dict) -> str:
    # pointers written before `kind` was recorded: the registry's rollbacks were the reasons "rollback ..."
    return entry.get("kind") or (ROLLBACK if str(entry.get("reason")).startswith("rollback ") else PROMOTION)


def champion_lineage(pointer: dict) -> list[str]:
    """The champions that successive rollbacks return through, oldest first, ending with the current one.

    Replays the history: a promotion goes on top; a rollback returns to its version's last place, dropping
    the versions above it (a rollback to a version not in the lineage, an undone rollback or the repair of a
    corrupt pointer, goes on top). So A → B → C rolls back to B, then to A, never back to C.
    """
    lineage: list[str] = []
    for entry in [*pointer["history"], pointer]:
        tag = entry["tag"]
        if not _concrete(tag):  # an alias written before they were refused: nothing to return to
            continue
        if _kind(entry) == ROLLBACK and tag in lineage:
            del lineage[len(lineage) - lineage[::-1].index(tag) :]
        elif not lineage or lineage[-1] != tag:
            lineage.append(tag)
    return lineage


def rollback(to_tag: str | None = None) -> dict:
    """Set the champion back to the one before it in champion_lineage, or to `to_tag`: any earlier champion
    (any stored version when the pointer is corrupt, to repair it)."""
    if to_tag is not None:  # checked before the pointer is read
        to_tag = version_tag(to_tag)
        checkpoint_path(to_tag)
    with champion_lock():
        try:
            champion = get_champion()
        except ChampionPointerError:
            if to_tag is None:
                raise
            return _write_champion(
                to_tag, "rollback over a corrupt pointer", ROLLBACK, None, keep_corrupt=True
            )
        if champion is None:
            raise RegistryError("there is no champion to roll back")
        current = champion["tag"]
        if to_tag is None:
            lineage = champion_lineage(champion)
            if len(lineage) < 2:
                raise RegistryError(f"champion {current} has no earlier version to roll back to")
            to_tag = lineage[-2]
            checkpoint_path(to_tag)
        elif to_tag == current:
            raise RegistryError(f"{to_tag} is already the champion")
        elif to_tag not in {entry["tag"] for entry in champion["history"]}:
            raise RegistryError(
                f"{to_tag} was never the champion: a rollback returns to an earlier champion "
                f"(`healnet registry show {to_tag}`; promote new versions through the pipeline's gate)"
            )
        return _write_champion(to_tag, f"rollback from {current}", ROLLBACK, champion)


def resolve(tag: str | None = None) -> tuple[str, Path]:
    """The tag and checkpoint folder to serve: `tag` if given, else the champion."""
    if tag is None:
        champion = get_champion()
        if champion is None:
            raise RegistryError(
                f"no champion model in {registry_dir()}: promote one (python -m pipelines run-local) or set a tag"
            )
        tag = champion["tag"]
    tag = version_tag(tag)
    return tag, checkpoint_path(tag)
