"""Torch dataset over a cohort: omic tokens and padded patch bags with presence masks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from healnet.errors import HEALNetError
from healnet.preprocess.state import WSI, Preprocessor

if TYPE_CHECKING:
    from healnet.preprocess.encoders import FeatureProvenance


class SlideFeaturesError(HEALNetError, ValueError):
    """Slide features were asked for (or the cohort lists slides) but none are available."""


def load_wsi_bags(
    cohort, features_dir: Path, *, required: bool = False
) -> tuple[dict[str, np.ndarray], FeatureProvenance | None]:
    """Concatenate the patch features of every slide of each patient that has slide features.

    Each manifest slide's feature file is looked up by slide id, whether or not the slide file itself is
    known here (a cohort ingested from a table alone can use features computed elsewhere). A slide listed
    with a file but without features is an error, not a silent gap; a slide with neither is absent.
    `required`: finding no features at all is a `SlideFeaturesError` naming the folder.
    Returns the bags and the encoder and patch grid they share (None without features); feature files of
    different encoders or grids are a `SlideFeaturesError`: their features are not comparable.
    """
    from healnet.preprocess.wsi import (
        feature_file_name,
        read_feature_provenance,
        read_slide_features,
        resolve_feature_dir,
    )

    features_dir = resolve_feature_dir(Path(features_dir))
    bags: dict[str, list[np.ndarray]] = {}
    missing = []
    found = 0
    provenances: dict[FeatureProvenance, list[str]] = {}
    for row in cohort.slides.itertuples():
        path = features_dir / feature_file_name(row.slide_id)
        if not path.exists():
            if isinstance(row.path, str) and row.path:
                missing.append(row.slide_id)
            continue
        found += 1
        provenances.setdefault(read_feature_provenance(path), []).append(row.slide_id)
        features, _ = read_slide_features(path)
        if len(features):
            bags.setdefault(row.patient_id, []).append(features)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} slide(s) have no features in {features_dir} (first: {missing[0]}); "
            f"run `healnet preprocess-slides {cohort.root}/slides.parquet --out {features_dir}` first"
        )
    if required and not bags:
        seen = f"the {found} feature file(s) found hold no patches" if found else "none has a feature file"
        raise SlideFeaturesError(
            f"no slide features in {features_dir}: looked for the {len(cohort.slides)} slide(s) of the "
            f"cohort's manifest by slide id (<slide>.parquet); {seen}"
        )
    if len(provenances) > 1:
        kinds = "; ".join(
            f"{provenance.describe()}: {len(slides)} slide(s), e.g. {slides[0]}"
            for provenance, slides in provenances.items()
        )
        raise SlideFeaturesError(
            f"the feature files in {features_dir} come from {len(provenances)} different encoders or patch "
            f"grids, whose features are not comparable ({kinds}); keep one encoder's files per folder"
        )
    provenance = next(iter(provenances), None)
    return {pid: np.concatenate(parts).astype(np.float32) for pid, parts in bags.items()}, provenance


def require_slide_features(cohort, wsi_bags: Mapping[str, np.ndarray], features_dir: Path | None) -> None:
    """Refuse to drop the slides silently: a cohort that lists slides needs their features.

    Raises `SlideFeaturesError` (saying how to compute the features, or to choose the modalities) when the
    manifest lists slides and `wsi_bags` is empty.
    """
    if len(cohort.slides) == 0 or wsi_bags:
        return
    where = f"in {features_dir}" if features_dir is not None else "(no feature folder)"
    root = cohort.root if cohort.root is not None else "COHORT"
    raise SlideFeaturesError(
        f"the cohort lists {len(cohort.slides)} slide(s) but no slide features were found {where}; "
        f"run `healnet preprocess-slides {root}/slides.parquet --out {root}/features` first, "
        "or train without slides by naming the other inputs, e.g. `--modalities omic,clinical`"
    )


@dataclass
class Targets:
    times: np.ndarray
    events: np.ndarray
    labels: np.ndarray


class SurvivalDataset(Dataset):
    """One item per patient: omic and clinical tokens per modality, a patch bag, and survival targets.

    `clinical` is the cohort's clinical table (index patient_id), read by the clinical modality.
    """

    def __init__(
        self,
        patient_ids: Sequence[str],
        preprocessor: Preprocessor,
        omic_frames: Mapping[str, object],
        wsi_bags: Mapping[str, np.ndarray],
        targets: Targets,
        modalities: Sequence[str],
        max_patches: int | None = None,
        seed: int = 0,
        clinical=None,
    ):
        self.patient_ids = list(patient_ids)
        self.modalities = list(modalities)
        self.targets = targets
        self.max_patches = max_patches
        self.rng = np.random.default_rng(seed)
        tabular = [m for m in self.modalities if m != WSI]
        tokens = preprocessor.tabular_tokens(omic_frames, clinical, self.patient_ids) if tabular else {}
        self.omics = {name: tokens[name] for name in tabular}
        self.bags = (
            [preprocessor.scale_wsi(wsi_bags[pid]) if pid in wsi_bags else None for pid in self.patient_ids]
            if WSI in self.modalities
            else None
        )
        self.wsi_dim = preprocessor.wsi_dim if WSI in self.modalities else 0

    def __len__(self) -> int:
        return len(self.patient_ids)

    def __getitem__(self, index: int) -> dict:
        item = {
            "omics": {
                name: (tok.values[index], bool(tok.present[index])) for name, tok in self.omics.items()
            },
            "time": self.targets.times[index],
            "event": self.targets.events[index],
            "label": self.targets.labels[index],
        }
        if self.bags is not None:
            bag = self.bags[index]
            if bag is not None and self.max_patches and len(bag) > self.max_patches:
                bag = bag[np.sort(self.rng.choice(len(bag), self.max_patches, replace=False))]
            item["wsi"] = bag
        return item

    def collate(self, items: list[dict]) -> dict:
        return collate_cases(items, self.wsi_dim)


def collate_cases(items: list[dict], wsi_dim: int) -> dict:
    """Stack omic tokens and pad patch bags; absent modalities are zero-filled and flagged."""
    inputs, present, token_mask = {}, {}, {}
    for name in items[0]["omics"]:
        inputs[name] = torch.from_numpy(np.stack([item["omics"][name][0] for item in items]))
        present[name] = torch.tensor([item["omics"][name][1] for item in items])
    if "wsi" in items[0]:
        bags = [item["wsi"] for item in items]
        longest = max([len(bag) for bag in bags if bag is not None], default=1)
        padded = np.zeros((len(items), longest, wsi_dim), dtype=np.float32)
        mask = np.zeros((len(items), longest), dtype=bool)
        for i, bag in enumerate(bags):
            if bag is not None:
                padded[i, : len(bag)] = bag
                mask[i, : len(bag)] = True
        inputs[WSI] = torch.from_numpy(padded)
        token_mask[WSI] = torch.from_numpy(mask)
        present[WSI] = token_mask[WSI].any(1)
    return {
        "inputs": inputs,
        "present": present,
        "token_mask": token_mask,
        "times": torch.tensor(np.array([item["time"] for item in items]), dtype=torch.float32),
        "events": torch.tensor(np.array([item["event"] for item in items]), dtype=torch.float32),
        "labels": torch.tensor(np.array([item["label"] for item in items]), dtype=torch.long),
    }
