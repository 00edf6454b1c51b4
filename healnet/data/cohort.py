"""The canonical cohort layout (docs/architecture.md): `Cohort` read/write and ingestion of any raw input."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pandas as pd

from healnet.data.readers import (
    CBIO_PATIENTS,
    GDC_COLUMNS,
    GZIP_MAGIC,
    CohortFormatError,
    RawCohort,
    read_cbioportal,
    read_gdc_clinical,
    read_porpoise_table,
    table_separator,
)
from healnet.data.splits import ROLES, SCHEMES, holdout_splits, kfold_splits
from healnet.files import sha256_file

__all__ = ["Cohort", "CohortFormatError", "data_hash", "ingest"]

FORMAT_VERSION = 1
COHORT_JSON = "cohort.json"
OMICS_DIR = "omics"
TABLE_FILES = {
    "clinical": "clinical.parquet",
    "slides": "slides.parquet",
    "availability": "availability.parquet",
    "splits": "splits.parquet",
    "quarantine": "quarantine.parquet",
}
INDEXED_BY_PATIENT = ("clinical", "availability")
META_KEYS = (
    "format_version",
    "name",
    "source",
    "omic_modalities",
    "rows_in",
    "rows_kept",
    "rows_quarantined",
)
UNHASHED_META = ("created",)  # when the folder was written, not what it holds
PORPOISE_COLUMNS = {"case_id", "survival_months", "censorship"}
TABLE_SUFFIXES = {".csv", ".tsv", ".txt"}


def _absolute(path: str | None, root: Path | None) -> Path | None:
    if path is None or pd.isna(path):
        return None
    resolved = Path(path)
    if not resolved.is_absolute() and root is not None:
        resolved = root / resolved
    return Path(os.path.abspath(resolved))


def _stored_path(path: str | None, old_root: Path | None, new_root: Path) -> str | None:
    """A slide path as written under `new_root`: relative when the file is inside it, else absolute."""
    absolute = _absolute(path, old_root)
    if absolute is None:
        return None
    try:
        return absolute.relative_to(os.path.abspath(new_root)).as_posix()
    except ValueError:
        return str(absolute)


def _observed_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Float32 features for the patients with at least one observed value (the others lack the modality)."""
    return frame[frame.notna().any(axis=1)].astype("float32").sort_index()


def _locate_slides(slides: pd.DataFrame, slide_dir: Path | None) -> pd.DataFrame:
    """Fill missing paths with `slide_dir / slide_id` where that file exists; other slides stay listed."""
    slides = slides.reset_index(drop=True).copy()
    if slide_dir is None:
        return slides
    slide_dir = Path(os.path.abspath(slide_dir))
    if not slide_dir.is_dir():
        raise CohortFormatError(f"slide folder {slide_dir} does not exist")
    found = [slide_dir / slide_id for slide_id in slides["slide_id"]]
    slides["path"] = [
        path if isinstance(path, str) else (str(file) if file.is_file() else None)
        for path, file in zip(slides["path"], found, strict=True)
    ]
    return slides


def _check_patients(raw: RawCohort) -> None:
    patients = raw.clinical.index
    if patients.has_duplicates:
        raise CohortFormatError(
            f"clinical rows repeat patients: {patients[patients.duplicated()].tolist()[:5]}"
        )
    strays = {name: frame.index.difference(patients) for name, frame in raw.omics.items()}
    strays["slides"] = pd.Index(raw.slides["patient_id"]).difference(patients)
    for name, extra in strays.items():
        if len(extra):
            raise CohortFormatError(f"{name} lists patients without a clinical row: {extra.tolist()[:5]}")


def _read_parquet(path: Path) -> pd.DataFrame:
    """A cohort table; an unreadable (truncated, not parquet) file is a CohortFormatError naming it."""
    import pyarrow

    try:
        return pd.read_parquet(path)
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise CohortFormatError(f"{path}: not a readable parquet table ({error})") from None


def _by_patient(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    if "patient_id" not in table.columns:
        raise CohortFormatError(f"{path}: no patient_id column")
    return table.set_index("patient_id")


@dataclass
class Cohort:
    root: Path | None
    clinical: pd.DataFrame  # index patient_id
    omics: dict[str, pd.DataFrame]  # index patient_id, float32 feature columns
    slides: pd.DataFrame  # patient_id, slide_id, path (relative to root or absolute; None: no file)
    availability: pd.DataFrame  # index patient_id, one bool column per omic modality and "wsi"
    splits: pd.DataFrame  # patient_id, scheme, repeat, fold, role
    quarantine: pd.DataFrame  # source, row, id, reason
    meta: dict

    @property
    def omic_modalities(self) -> list[str]:
        return list(self.omics)

    @classmethod
    def from_raw(
        cls,
        raw: RawCohort,
        *,
        name: str = "cohort",
        source: str = "",
        slide_dir: Path | None = None,
        seed: int = 0,
        folds: int = 5,
        holdout_repeats: int = 1,
    ) -> Cohort:
        """Add slide paths, availability and both split schemes to what a reader found (root: None)."""
        rows_quarantined = len(raw.quarantine)
        if raw.clinical.empty:
            reasons = raw.quarantine["reason"].head(3).tolist()
            raise CohortFormatError(
                f"{source or name}: no usable patient; {rows_quarantined} of {raw.rows_in} row(s) quarantined {reasons}"
            )
        if rows_quarantined > raw.rows_in:
            raise CohortFormatError(f"{rows_quarantined} quarantined rows but only {raw.rows_in} rows read")
        _check_patients(raw)
        clinical = raw.clinical.sort_index()
        omics = {modality: _observed_rows(frame) for modality, frame in raw.omics.items()}
        slides = _locate_slides(raw.slides, slide_dir)
        patients = clinical.index
        availability = pd.DataFrame(
            {m: patients.isin(frame.index) for m, frame in omics.items()}, index=patients
        )
        availability["wsi"] = patients.isin(slides.loc[slides["path"].notna(), "patient_id"])
        events = clinical["event"].to_numpy()
        splits = pd.concat(
            [
                holdout_splits(patients, events, repeats=holdout_repeats, seed=seed),
                kfold_splits(patients, events, folds=folds, seed=seed),
            ],
            ignore_index=True,
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "source": source,
            "omic_modalities": list(omics),
            "rows_in": raw.rows_in,
            "rows_kept": raw.rows_in - rows_quarantined,
            "rows_quarantined": rows_quarantined,
            # patients whose rows lacked values their other rows held (taken from those), one note each
            "filled": list(raw.filled),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "seed": seed,
            "folds": folds,
            "holdout_repeats": holdout_repeats,
        }
        return cls(
            None, clinical, omics, slides, availability, splits, raw.quarantine.reset_index(drop=True), meta
        )

    @classmethod
    def load(cls, root: Path) -> Cohort:
        root = Path(root)
        meta_path = root / COHORT_JSON
        if not meta_path.is_file():
            raise CohortFormatError(f"{root} is not a cohort folder: missing {COHORT_JSON}")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as error:
            raise CohortFormatError(f"{meta_path}: not valid JSON ({error})") from error
        if not isinstance(meta, dict):
            raise CohortFormatError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
        missing_keys = [key for key in META_KEYS if key not in meta]
        if missing_keys:
            raise CohortFormatError(f"{meta_path}: missing key(s) {missing_keys}")
        if meta["format_version"] != FORMAT_VERSION:
            raise CohortFormatError(
                f"{meta_path}: format_version {meta['format_version']}, expected {FORMAT_VERSION}"
            )
        if meta["rows_in"] != meta["rows_kept"] + meta["rows_quarantined"]:
            raise CohortFormatError(f"{meta_path}: rows_in != rows_kept + rows_quarantined")
        omic_files = {str(m): Path(OMICS_DIR) / f"{m}.parquet" for m in meta["omic_modalities"]}
        expected_files = [Path(name) for name in TABLE_FILES.values()] + list(omic_files.values())
        missing_files = [str(f) for f in expected_files if not (root / f).is_file()]
        if missing_files:
            raise CohortFormatError(f"{root}: missing {', '.join(missing_files)} (see docs/architecture.md)")
        tables = {key: _read_parquet(root / name) for key, name in TABLE_FILES.items()}
        for key in INDEXED_BY_PATIENT:
            tables[key] = _by_patient(tables[key], root / TABLE_FILES[key])
        omics = {m: _by_patient(_read_parquet(root / path), root / path) for m, path in omic_files.items()}
        if len(tables["quarantine"]) != meta["rows_quarantined"]:
            raise CohortFormatError(f"{root}: quarantine.parquet does not hold rows_quarantined rows")
        return cls(root=root, omics=omics, meta=meta, **tables)

    def save(self, root: Path) -> None:
        """Write the canonical folder (cohort.json last) and make it this cohort's root.

        Slide paths inside `root` are stored relative to it, all others absolute.
        """
        root = Path(root)
        (root / OMICS_DIR).mkdir(parents=True, exist_ok=True)
        slides = self.slides.assign(path=[_stored_path(p, self.root, root) for p in self.slides["path"]])
        tables = {
            "clinical": self.clinical.reset_index(),
            "slides": slides,
            "availability": self.availability.reset_index(),
            "splits": self.splits,
            "quarantine": self.quarantine,
        }
        for key, frame in tables.items():
            frame.to_parquet(root / TABLE_FILES[key], engine="pyarrow", index=False)
        for modality, frame in self.omics.items():
            frame.reset_index().to_parquet(
                root / OMICS_DIR / f"{modality}.parquet", engine="pyarrow", index=False
            )
        (root / COHORT_JSON).write_text(json.dumps(self.meta, indent=2) + "\n")
        self.root, self.slides = root, slides

    def slide_path(self, slide_id: str) -> Path:
        paths = self.slides.loc[self.slides["slide_id"] == slide_id, "path"]
        if paths.empty:
            raise KeyError(f"slide {slide_id!r} is not in this cohort's slide manifest")
        path = paths.iloc[0]
        if not isinstance(path, str) or not path:
            raise FileNotFoundError(f"slide {slide_id!r} is listed but has no file (ingest with --slide-dir)")
        if not Path(path).is_absolute() and self.root is None:
            raise CohortFormatError(
                f"slide {slide_id!r} has the relative path {path} but the cohort has no root"
            )
        return cast(Path, _absolute(path, self.root))  # a non-empty path string is never None here

    def patients(
        self, scheme: str = "holdout", repeat: int = 0, fold: int = 0, role: str = "train"
    ) -> list[str]:
        """Patient ids with `role` in one split; raises ValueError for a split the cohort does not have."""
        if scheme not in SCHEMES or role not in ROLES:
            raise ValueError(
                f"scheme must be one of {SCHEMES} and role one of {ROLES}, got {scheme!r}, {role!r}"
            )
        splits = self.splits
        split = splits[(splits["scheme"] == scheme) & (splits["repeat"] == repeat) & (splits["fold"] == fold)]
        if split.empty:
            available = splits.loc[splits["scheme"] == scheme, ["repeat", "fold"]].drop_duplicates()
            raise ValueError(
                f"no {scheme} split with repeat {repeat}, fold {fold}; available (repeat, fold): "
                f"{list(available.itertuples(index=False, name=None))}"
            )
        return split.loc[split["role"] == role, "patient_id"].tolist()


def data_hash(root: Path, code_version: str) -> str:
    """sha256 of everything a step reads from the cohort folder `root`, and of the steps' `code_version`.

    It covers cohort.json (without `created`: writing the same cohort again is no change), every table
    `Cohort.load` reads (splits included: another split seed is other data) and the size and modification
    time of each slide file the manifest lists (hashing whole-slide images would read gigabytes per run).
    Raises CohortFormatError when `root` is not a readable cohort folder.
    """
    root = Path(root)
    cohort = Cohort.load(root)
    files = [Path(name) for name in TABLE_FILES.values()]
    files += [Path(OMICS_DIR) / f"{modality}.parquet" for modality in cohort.meta["omic_modalities"]]
    digest = hashlib.sha256()
    meta = {key: value for key, value in cohort.meta.items() if key not in UNHASHED_META}
    digest.update(json.dumps(meta, sort_keys=True).encode() + b"\0")
    for name in sorted(files):
        digest.update(f"{name.as_posix()}\0{sha256_file(root / name)}\0".encode())
    for slide_id, stamp in _slide_stamps(cohort):
        digest.update(f"{slide_id}\0{stamp}\0".encode())
    digest.update(f"code\0{code_version}".encode())
    return digest.hexdigest()


def _slide_stamps(cohort: Cohort) -> list[tuple[str, str]]:
    """(slide id, "size:mtime_ns" or "absent") of every slide with a file in the manifest, sorted."""
    stamps = []
    for slide_id in cohort.slides.loc[cohort.slides["path"].notna(), "slide_id"]:
        path = cohort.slide_path(slide_id)
        stat = path.stat() if path.is_file() else None
        stamps.append((str(slide_id), f"{stat.st_size}:{stat.st_mtime_ns}" if stat else "absent"))
    return sorted(stamps)


def _first_line(path: Path) -> str:
    """The first line that is not `#` metadata, read without decompressing the whole file.

    utf-8-sig: a byte-order mark before the first column name is not part of that name.
    """
    with path.open("rb") as probe:
        compressed = probe.read(2) == GZIP_MAGIC
    encoding = "utf-8-sig"
    with gzip.open(path, "rt", encoding=encoding) if compressed else path.open(encoding=encoding) as handle:
        for line in handle:
            if not line.startswith("#"):
                return line.rstrip("\r\n")
    return ""


def _read_table(path: Path) -> RawCohort:
    if not TABLE_SUFFIXES & set(path.suffixes):
        raise CohortFormatError(
            f"{path}: expected a .csv/.csv.gz/.tsv table, a cBioPortal folder ({CBIO_PATIENTS}) "
            f"or a cohort folder ({COHORT_JSON})"
        )
    try:
        header = set(next(csv.reader([_first_line(path)], delimiter=table_separator(path))))
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise CohortFormatError(f"{path}: cannot read the header ({error})") from error
    if header >= PORPOISE_COLUMNS:
        return read_porpoise_table(path)
    if {"patient", "vital_status"} <= {field for field, names in GDC_COLUMNS.items() if header & set(names)}:
        return read_gdc_clinical(path)
    raise CohortFormatError(
        f"{path}: unknown table; expected PORPOISE columns {sorted(PORPOISE_COLUMNS)} or GDC clinical.tsv "
        f"columns ({' / '.join(GDC_COLUMNS['patient'])} and a vital_status column); "
        f"found {sorted(header)[:8]}"
    )


def ingest(
    source: Path,
    out_dir: Path | None = None,
    *,
    name: str | None = None,
    seed: int = 0,
    folds: int = 5,
    holdout_repeats: int = 1,
    slide_dir: Path | None = None,
) -> Cohort:
    """Read a PORPOISE table, GDC clinical.tsv, cBioPortal folder or cohort folder; save to `out_dir` if given.

    An existing cohort folder is loaded as it is (name, seed, slide_dir and the split options do not apply).
    """
    source = Path(source)
    if source.is_dir() and (source / COHORT_JSON).is_file():
        cohort = Cohort.load(source)
        if out_dir is not None and os.path.abspath(out_dir) != os.path.abspath(source):
            cohort.save(Path(out_dir))
        return cohort
    if source.is_dir():
        if not (source / CBIO_PATIENTS).is_file():
            raise CohortFormatError(
                f"{source}: expected a cohort folder ({COHORT_JSON}) or a cBioPortal study ({CBIO_PATIENTS})"
            )
        raw = read_cbioportal(source)
    elif source.is_file():
        raw = _read_table(source)
    else:
        raise CohortFormatError(f"{source}: no such file or folder")
    cohort = Cohort.from_raw(
        raw,
        name=name or source.name.split(".")[0],
        source=str(source),
        slide_dir=slide_dir,
        seed=seed,
        folds=folds,
        holdout_repeats=holdout_repeats,
    )
    if out_dir is not None:
        cohort.save(Path(out_dir))
    return cohort
