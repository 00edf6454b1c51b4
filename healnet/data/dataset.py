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


@dataclass
class SlideBags:
    """What a feature folder gives a cohort: each patient's patch bag, the encoder and patch grid the bags
    share (None without features), and the cohort's slides that the folder's quarantine lists name and that
    have no features (slide id -> reason): a missing modality for their patients, not an error."""

    bags: dict[str, np.ndarray]
    provenance: FeatureProvenance | None
    quarantined: dict[str, str]


def load_wsi_bags(cohort, features_dir: Path, *, required: bool = False) -> SlideBags:
    """Concatenate the patch features of every slide of each patient that has slide features.

    Each manifest slide's feature file is looked up by slide id, whether or not the slide file itself is
    known here (a cohort ingested from a table alone can use features computed elsewhere). A slide without
    a feature file that the folder's quarantine lists name (`read_quarantine`: `preprocess-slides`, each of
    its shards, `import-features`) is left out: its patient keeps their other slides, or is predicted
    without slides. A slide listed with a file but with neither features nor a quarantine entry is a
    `SlideFeaturesError`, not a silent gap; a slide with neither a file nor features is absent.
    `required`: finding no features at all is a `SlideFeaturesError` naming the folder.
    Feature files of different encoders or grids are a `SlideFeaturesError`: their features are not
    comparable.
    """
    from healnet.preprocess.feature_files import (
        feature_file_name,
        is_feature_folder,
        read_feature_provenance,
        read_quarantine,
        read_slide_features,
        resolve_feature_dir,
    )

    given = Path(features_dir)
    features_dir = resolve_feature_dir(given)
    # import-features names slides by file stem, a cohort by file name: both give the same feature file
    quarantine = {feature_file_name(slide): reason for slide, reason in read_quarantine(features_dir).items()}
    bags: dict[str, list[np.ndarray]] = {}
    missing = []
    quarantined: dict[str, str] = {}
    found = 0
    provenances: dict[FeatureProvenance, list[str]] = {}
    for row in cohort.slides.itertuples():
        path = features_dir / feature_file_name(row.slide_id)
        if not path.exists():
            if path.name in quarantine:
                quarantined[row.slide_id] = quarantine[path.name]
            elif isinstance(row.path, str) and row.path:
                missing.append(row.slide_id)
            continue
        found += 1
        provenances.setdefault(read_feature_provenance(path), []).append(row.slide_id)
        features, _ = read_slide_features(path)
        if len(features):
            bags.setdefault(row.patient_id, []).append(features)
    if missing:
        # preprocess-slides --out OUT writes OUT/<encoder key>/: name OUT, not the encoder folder
        out = features_dir.parent if is_feature_folder(features_dir) else given
        raise SlideFeaturesError(
            f"{len(missing)} slide(s) have a file but neither features nor a quarantine entry in "
            f"{features_dir} (first: {missing[0]}); run `healnet preprocess-slides "
            f"{cohort.root}/slides.parquet --out {out}` first"
        )
    if required and not bags:
        seen = f"the {found} feature file(s) found hold no patches" if found else "none has a feature file"
        if quarantined:
            seen += f" and {len(quarantined)} are quarantined (first: {next(iter(quarantined))})"
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
    return SlideBags(
        {pid: np.concatenate(parts).astype(np.float32) for pid, parts in bags.items()},
        provenance,
        quarantined,
    )


def require_slide_features(
    cohort,
    wsi_bags: Mapping[str, np.ndarray],
    features_dir: Path | None,
    quarantined: Mapping[str, str] | None = None,
) -> None:
    """Refuse to drop the slides silently: a cohort that lists slides needs their features.

    Raises `SlideFeaturesError` (saying how to compute the features, or to choose the modalities) when the
    manifest lists slides and `wsi_bags` is empty; when `quarantined` (slide id -> reason) names slides,
    the message says how many were quarantined.
    """
    if len(cohort.slides) == 0 or wsi_bags:
        return
    where = f"in {features_dir}" if features_dir is not None else "(no feature folder)"
    root = cohort.root if cohort.root is not None else "COHORT"
    refused = (
        f" ({len(quarantined)} are quarantined, first: {next(iter(quarantined))})" if quarantined else ""
    )
    raise SlideFeaturesError(
        f"the cohort lists {len(cohort.slides)} slide(s) but no slide features were found {where}{refused}; "
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
