"""Model registry: versions in the BentoML model store, and an atomically updated champion pointer.

Each version is a BentoML model named `healnet` whose folder holds the checkpoint. The champion
pointer is `champion.json` beside the store (`$HEALNET_REGISTRY_DIR`, default `$BENTOML_HOME`),
rewritten by write-to-temp-then-rename so a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from healnet.checkpoint import MANIFEST_FILE, read_manifest, verify_checkpoint

MODEL_NAME = "healnet"
POINTER_FILE = "champion.json"


class RegistryError(RuntimeError):
    """A missing version, an empty registry or an invalid rollback."""


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


def get_champion() -> dict | None:
    path = _pointer_path()
    return json.loads(path.read_text()) if path.exists() else None


def set_champion(tag: str, reason: str) -> dict:
    """Point the champion at `tag` (which must exist), keeping the history of earlier champions."""
    checkpoint_path(tag)
    previous = get_champion()
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
    directory.mkdir(parents=True, exist_ok=True)
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
    champion = get_champion()
    if champion is None:
        raise RegistryError("there is no champion to roll back")
    if to_tag is None:
        earlier = [entry["tag"] for entry in champion["history"] if entry["tag"] != champion["tag"]]
        if not earlier:
            raise RegistryError(f"champion {champion['tag']} has no earlier version to roll back to")
        to_tag = earlier[-1]
    to_tag = show_version(to_tag)["tag"]
    if to_tag == champion["tag"]:
        raise RegistryError(f"{to_tag} is already the champion")
    return set_champion(to_tag, f"rollback from {champion['tag']}")


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
