"""Readers for raw TCGA inputs: the PORPOISE/HEALNet table, a cBioPortal study folder, GDC `clinical.tsv`.

Each returns a `RawCohort`. Rows that cannot be used go to its quarantine table with a reason,
never dropped silently, and `rows_in` counts every row read, so rows_in = kept + quarantined. A PORPOISE
row whose slide belongs to another patient is quarantined for its slide alone: its clinical and omics
values still count for its patient. The rows of one patient must agree where they hold a value; a value
that some of them lack is taken from the others, and `RawCohort.filled` names each such patient and column.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from healnet.data.barcodes import PRIMARY_TUMOR, InvalidBarcodeError, parse_barcode, patient_prefix
from healnet.errors import HEALNetError

OMIC_SUFFIXES = ("mut", "cnv", "rnaseq")
QUARANTINE_COLUMNS = ["source", "row", "id", "reason"]
SLIDE_COLUMNS = ["patient_id", "slide_id", "path"]
DAYS_PER_MONTH = 30.44  # mean Gregorian month (365.25 / 12), the usual days → months conversion
DAYS_PER_YEAR = 365.25
GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"  # written first by some Windows tools (Excel's "CSV UTF-8")
MERGE_SHOWN_COLUMNS = 5  # columns a disagreement reason or a fill note names before "and N more"

PORPOISE_REQUIRED = ("case_id", "slide_id", "survival_months", "censorship")
PORPOISE_RENAMES = {"train": "porpoise_train"}  # PORPOISE's own split flag, not ours

CBIO_PATIENTS = "data_clinical_patient.txt"
CBIO_SAMPLES = "data_clinical_sample.txt"
CBIO_MATRICES = {"rnaseq": "data_mrna_seq_v2_rsem.txt", "cnv": "data_cna.txt"}
CBIO_MUTATIONS = "data_mutations.txt"
CBIO_GENE_COLUMNS = ("Hugo_Symbol", "Entrez_Gene_Id", "Cytoband")
CBIO_MISSING = ["[Not Available]", "[Not Applicable]", "[Unknown]", "[Not Evaluated]", "[Not Reported]"]
CBIO_STATUS = {"1": 1, "0": 0, "DECEASED": 1, "DEAD": 1, "LIVING": 0, "ALIVE": 0}
# Variant classes that leave the protein unchanged; they do not count as mutations.
SILENT_CLASSES = frozenset(
    {"Silent", "Intron", "3'UTR", "5'UTR", "3'Flank", "5'Flank", "IGR", "RNA", "lincRNA"}
)

# GDC clinical.tsv: older exports name columns plainly, newer ones prefix the entity (`demographic.`...).
GDC_COLUMNS = {
    "patient": ("cases.submitter_id", "case_submitter_id", "submitter_id"),
    "vital_status": ("demographic.vital_status", "vital_status"),
    "days_to_death": ("demographic.days_to_death", "days_to_death"),
    "days_to_last_follow_up": ("diagnoses.days_to_last_follow_up", "days_to_last_follow_up"),
    "age_at_diagnosis": ("diagnoses.age_at_diagnosis", "age_at_diagnosis"),
    "gender": ("demographic.gender", "gender"),
    "project_id": ("project.project_id", "project_id"),
}
GDC_REQUIRED = ("patient", "vital_status", "days_to_death", "days_to_last_follow_up")
GDC_MISSING = ["'--", "--", "", "not reported", "Not Reported", "unknown", "Unknown", "unspecified"]


class CohortFormatError(HEALNetError, ValueError):
    """An input that cannot be read as a cohort; the message names the file and the problem."""


@dataclass
class RawCohort:
    """What a reader found, before availability and splits are added.

    clinical: index patient_id; survival_months, event (1 = death), age, is_female, extra columns.
    omics: modality -> DataFrame indexed by patient_id, one column per feature (`TP53_mut`).
    slides: patient_id, slide_id, path (None until a file is found).
    quarantine: source, row (0-based in its source), id, reason.
    rows_in: every data row read from the sources that quarantine rows refer to.
    filled: one note per patient whose rows lacked values that its other rows held, taken from those.
    """

    clinical: pd.DataFrame
    omics: dict[str, pd.DataFrame]
    slides: pd.DataFrame
    quarantine: pd.DataFrame
    rows_in: int
    filled: tuple[str, ...] = ()


class _Problems:
    """Reasons to reject rows of one source file, collected per row (several reasons join with '; '), and
    notes on the values taken from a patient's other rows."""

    def __init__(self, source: str, ids: pd.Series) -> None:
        self.source = source
        self.ids = ids
        self.reasons: dict[int, list[str]] = {}
        self.filled: list[str] = []

    def add(self, mask: pd.Series, reason: str | pd.Series) -> None:
        for row in mask.index[mask.fillna(False).to_numpy(dtype=bool)]:
            self.reasons.setdefault(row, []).append(reason if isinstance(reason, str) else str(reason[row]))

    @property
    def rows(self) -> list[int]:
        return sorted(self.reasons)

    def frame(self) -> pd.DataFrame:
        rows = self.rows
        return pd.DataFrame(
            {
                "source": [self.source] * len(rows),
                "row": pd.Series(rows, dtype="int64"),
                "id": [None if pd.isna(self.ids[row]) else str(self.ids[row]) for row in rows],
                "reason": ["; ".join(self.reasons[row]) for row in rows],
            },
            columns=QUARANTINE_COLUMNS,
        )


def empty_quarantine() -> pd.DataFrame:
    return _Problems("", pd.Series(dtype=object)).frame()


def empty_slides() -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series(dtype=object) for column in SLIDE_COLUMNS})


def _decompressed_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise CohortFormatError(f"{path}: no such file")
    data = path.read_bytes()
    if data[:2] != GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as error:
        raise CohortFormatError(f"{path}: the gzip stream is truncated or corrupt ({error})") from error


def _fields(line: bytes, sep: str) -> list[str]:
    return next(csv.reader([line.decode("utf-8", errors="replace").rstrip("\r")], delimiter=sep))


def _check_unique_names(names: list[str], path: Path) -> None:
    """Pandas would rename a repeated column to `name.1`, leaving the second copy as a stray column."""
    counts = Counter(name for name in names if name)  # unnamed index columns get distinct names anyway
    repeated = [name for name, count in counts.items() if count > 1]
    if repeated:
        raise CohortFormatError(
            f"{path}: the header repeats column name(s) {repeated[:10]}"
            + (f" and {len(repeated) - 10} more" if len(repeated) > 10 else "")
            + "; every column needs its own name"
        )


def table_separator(path: Path) -> str:
    """Tab for `.tsv`/`.txt` files (gzipped or not), comma otherwise."""
    return "\t" if {".tsv", ".txt"} & set(Path(path).suffixes) else ","


def read_delimited(path: Path, sep: str, **read_csv_kwargs) -> pd.DataFrame:
    """Read a (gzipped) delimited file whose leading `#` lines are metadata; a UTF-8 BOM is ignored.

    Raises CohortFormatError for a truncated gzip stream, a last row cut short (pandas alone would
    fill the missing fields of a cut last row with NaN) or a header that repeats a column name.
    """
    path = Path(path)
    data = _decompressed_bytes(path)
    start = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    while data.startswith(b"#", start):
        newline = data.find(b"\n", start)
        start = len(data) if newline < 0 else newline + 1
    body = data[start:]
    text = body.rstrip(b"\r\n")
    if not text:
        raise CohortFormatError(f"{path}: the file has no header row")
    header = _fields(text.split(b"\n", 1)[0], sep)
    _check_unique_names(header, path)
    header_fields, last_fields = len(header), len(_fields(text[text.rfind(b"\n") + 1 :], sep))
    if last_fields != header_fields:
        raise CohortFormatError(
            f"{path}: the last row has {last_fields} fields but the header has {header_fields}; "
            "the file is truncated or malformed"
        )
    try:
        # low_memory=False: one pass over the whole file; the default parses in row chunks and joins every
        # column's chunks afterwards (4x slower on a 50,000-column table) and may type a column per chunk
        return pd.read_csv(io.BytesIO(body), sep=sep, engine="c", low_memory=False, **read_csv_kwargs)
    except (pd.errors.ParserError, ValueError) as error:
        raise CohortFormatError(f"{path}: cannot parse the table ({error})") from error


def _require_columns(frame: pd.DataFrame, required: tuple[str, ...], path: Path) -> None:
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise CohortFormatError(f"{path}: missing required column(s) {missing}")


def _parse_patients(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(patient id, NaN where invalid) and (error message, only where invalid)."""
    patients, errors = {}, {}
    for row, value in values.items():
        try:
            patients[row] = parse_barcode(value).patient_id
        except InvalidBarcodeError as error:
            errors[row] = str(error)
    return pd.Series(patients, index=values.index, dtype=object), pd.Series(errors, dtype=object)


def _add_reasons(problems: _Problems, reasons: pd.Series) -> None:
    problems.add(pd.Series(True, index=reasons.index), reasons)


def _coerce_numeric(frame: pd.DataFrame, columns: list[str], problems: _Problems) -> pd.DataFrame:
    """Numeric copies of `columns`; a value present but not a number rejects its row."""
    frame = frame.copy()
    dtypes = frame.dtypes  # read once: looking up 50,000 columns one by one took seconds
    for column in [c for c in columns if not pd.api.types.is_numeric_dtype(dtypes[c])]:
        values = frame[column]
        numbers = pd.to_numeric(values, errors="coerce")
        problems.add(values.notna() & numbers.isna(), f"{column} is not a number: " + values.astype(str))
        frame[column] = numbers
    return frame


def _check_survival_time(time: pd.Series, time_name: str, problems: _Problems) -> None:
    problems.add(time.isna(), f"{time_name} is missing")
    problems.add(time <= 0, f"{time_name} must be positive, got " + time.astype(str))


def _column_list(parts: list[str]) -> str:
    """The first few of a patient's columns (a 50,000-column table may name thousands), then how many more."""
    shown = ", ".join(parts[:MERGE_SHOWN_COLUMNS])
    rest = len(parts) - MERGE_SHOWN_COLUMNS
    return shown + (f" and {rest} more column(s)" if rest > 0 else "")


def _counts_per_patient(flags: pd.DataFrame, patients: pd.Series) -> dict[str, dict[str, int]]:
    """patient -> {column: its flagged rows} for the patients with a flagged row, sorted by patient."""
    counts = flags.groupby(patients, sort=True).sum()
    names = counts.columns.to_numpy(dtype=object)
    return {
        patient: dict(zip(names[row > 0].tolist(), row[row > 0].tolist(), strict=True))
        for patient, row in zip(counts.index, counts.to_numpy(), strict=True)
        if row.any()
    }


def _fill_note(source: str, patient: str, missing_rows: dict[str, int], rows: int) -> str:
    missing = [f"{column} missing on {count} of {rows} rows" for column, count in missing_rows.items()]
    return f"{source}: patient {patient}: {_column_list(missing)}, taken from the others"


def _merge_patient_rows(frame: pd.DataFrame, columns: list[str], problems: _Problems) -> pd.DataFrame:
    """The rows of `frame` whose values count for their patients, each patient's rows merged in `columns`.

    Rows agree when their non-missing values are equal (exactly, as read). A patient whose rows hold
    different values is quarantined, all its rows. A value missing on some rows of an agreeing patient is
    taken from its other rows, so that the row a reader keeps per patient holds it, and a note in
    `problems.filled` names each such patient and column: a gap loses no row and fills nothing silently.
    A column missing on every row of a patient stays missing.

    Whole frames are compared at once: a per-column groupby took 20 s on a 50,000-column table.
    """
    repeated = frame.loc[frame["patient_id"].duplicated(keep=False)]
    if repeated.empty:
        return frame
    patients = repeated["patient_id"]
    values = repeated[columns]
    patient_values = values.groupby(patients, sort=False).transform("first")  # first non-missing value
    missing = values.isna()
    differs = ~(values.eq(patient_values).fillna(False) | missing)  # fillna: nullable dtypes
    reasons = {
        patient: f"rows of patient {patient} disagree on {_column_list(list(names))}"
        for patient, names in _counts_per_patient(differs, patients).items()
    }
    disagreeing = frame["patient_id"].isin(list(reasons))
    problems.add(disagreeing, frame["patient_id"].map(reasons))
    kept = frame.loc[~disagreeing] if reasons else frame

    agreeing = ~patients.isin(list(reasons))
    gaps = (missing & patient_values.notna()).loc[agreeing]
    rows = patients.value_counts()
    notes = [
        _fill_note(problems.source, patient, missing_rows, rows[patient])
        for patient, missing_rows in _counts_per_patient(gaps, patients.loc[agreeing]).items()
    ]
    if not notes:
        return kept
    problems.filled.extend(notes)
    return _with_patient_values(kept, patient_values, gaps.index[gaps.any(axis=1).to_numpy()])


def _with_patient_values(kept: pd.DataFrame, patient_values: pd.DataFrame, rows: pd.Index) -> pd.DataFrame:
    """`kept` with the `rows` of agreeing patients holding their patients' values in every compared column.

    Those rows already hold the same value wherever they hold one, so only their gaps change. Whole rows
    are swapped in: filling column by column took 20 s when a slide row lacked 17,000 omics values, and
    fillna or where would also turn an object column of True and missing into a bool one.
    """
    columns = patient_values.columns
    swapped = pd.concat([kept.loc[rows].drop(columns=columns), patient_values.loc[rows]], axis=1)
    return pd.concat([kept.drop(index=rows), swapped[kept.columns]]).loc[kept.index]


def _clinical(first_rows: pd.DataFrame, extras: Sequence[str] = ()) -> pd.DataFrame:
    """Canonical clinical columns from one row per patient (index patient_id)."""
    clinical = pd.DataFrame(
        {
            "survival_months": first_rows["survival_months"].astype("float64"),
            "event": first_rows["event"].astype("int64"),
            "age": first_rows.get("age", pd.Series(np.nan, index=first_rows.index)).astype("float64"),
            "is_female": first_rows.get("is_female", pd.Series(pd.NA, index=first_rows.index)).astype("Int8"),
        }
    )
    for column in extras:
        clinical[column] = first_rows[column]
    clinical.index = pd.Index(first_rows.index, name="patient_id")
    return clinical


def read_porpoise_table(path: Path) -> RawCohort:
    """The PORPOISE/HEALNet table: one row per slide; clinical and omics repeat per slide of a patient."""
    path = Path(path)
    table = read_delimited(path, table_separator(path))
    table = table.drop(columns=[column for column in table.columns if str(column).startswith("Unnamed:")])
    _require_columns(table, PORPOISE_REQUIRED, path)
    table = table.reset_index(drop=True)
    features = {m: [c for c in table.columns if str(c).endswith(f"_{m}")] for m in OMIC_SUFFIXES}
    feature_columns = [column for names in features.values() for column in names]
    not_extra = {*PORPOISE_REQUIRED, "age", "is_female", *feature_columns}  # built once: 50,000 columns
    extras = [c for c in table.columns if c not in not_extra]

    problems = _Problems(path.name, table["case_id"])
    patients, barcode_errors = _parse_patients(table["case_id"])
    _add_reasons(problems, barcode_errors)
    numeric = [c for c in ("survival_months", "censorship", "age", "is_female") if c in table.columns]
    table = _coerce_numeric(table, numeric + feature_columns, problems)
    table["patient_id"] = patients
    table["event"] = (1 - table["censorship"]).where(table["censorship"].isin([0, 1]))
    problems.add(table["event"].isna(), "censorship must be 0 or 1, got " + table["censorship"].astype(str))
    _check_survival_time(table["survival_months"], "survival_months", problems)
    if "is_female" in table.columns:
        bad_sex = table["is_female"].notna() & ~table["is_female"].isin([0, 1])
        problems.add(bad_sex, "is_female must be 0, 1 or empty, got " + table["is_female"].astype(str))

    valid = table.drop(index=problems.rows)
    repeated_slide = valid["slide_id"].notna() & valid["slide_id"].duplicated()
    problems.add(repeated_slide, "slide_id " + valid["slide_id"].astype(str) + " is listed in an earlier row")
    compared = ["event", *[c for c in numeric if c != "censorship"], *extras, *feature_columns]
    kept = _merge_patient_rows(table.drop(index=problems.rows), compared, problems)
    first = kept.drop_duplicates("patient_id").set_index("patient_id")
    clinical = _clinical(first, extras).rename(columns=PORPOISE_RENAMES)
    omics = {modality: first[names] for modality, names in features.items() if names}
    _reject_foreign_slides(table, problems)
    listed = kept.loc[kept["slide_id"].notna() & ~kept.index.isin(problems.rows)]
    slides = listed[["patient_id", "slide_id"]].reset_index(drop=True)
    slides["path"] = None
    return RawCohort(
        clinical, omics, slides, problems.frame(), rows_in=len(table), filled=tuple(problems.filled)
    )


def _reject_foreign_slides(table: pd.DataFrame, problems: _Problems) -> None:
    """Quarantine the rows whose slide id is the barcode of another patient than their case_id.

    A swapped slide id would put one patient's image on another. Only the slide is rejected: the row's
    clinical and omics values still count for its patient. A slide id without a TCGA barcode is not
    checked.
    """
    slide_patients = table["slide_id"].map(patient_prefix)
    foreign = slide_patients.notna() & table["patient_id"].notna() & (slide_patients != table["patient_id"])
    problems.add(
        foreign,
        "slide_id "
        + table["slide_id"].astype(str)
        + " is a slide of patient "
        + slide_patients.astype(str)
        + ", not "
        + table["patient_id"].astype(str)
        + " (the slide is left out; the patient's other data is kept)",
    )


def _read_cbio_clinical(path: Path) -> pd.DataFrame:
    """A cBioPortal clinical file: `#` metadata lines, then a tab-separated header; all values as text."""
    return read_delimited(path, "\t", dtype=str, na_values=CBIO_MISSING).reset_index(drop=True)


def _cbio_patients(path: Path) -> tuple[pd.DataFrame, _Problems]:
    raw = _read_cbio_clinical(path)
    _require_columns(raw, ("PATIENT_ID", "OS_MONTHS", "OS_STATUS"), path)
    problems = _Problems(path.name, raw["PATIENT_ID"])
    patients, barcode_errors = _parse_patients(raw["PATIENT_ID"])
    _add_reasons(problems, barcode_errors)
    problems.add(patients.notna() & (patients != raw["PATIENT_ID"]), "PATIENT_ID must be TCGA-XX-XXXX")
    frame = pd.DataFrame({"patient_id": patients, "survival_months": raw["OS_MONTHS"]})
    frame["event"] = raw["OS_STATUS"].str.split(":").str[0].str.strip().str.upper().map(CBIO_STATUS)
    frame["age"] = raw.get("AGE")
    frame["is_female"] = (
        raw.get("SEX", pd.Series(index=raw.index, dtype=object)).str.lower().map({"female": 1, "male": 0})
    )
    problems.add(frame["event"].isna(), "OS_STATUS is missing or unknown: " + raw["OS_STATUS"].astype(str))
    frame = _coerce_numeric(frame, ["survival_months", "age"], problems)
    _check_survival_time(frame["survival_months"], "OS_MONTHS", problems)
    kept = _merge_patient_rows(
        frame.drop(index=problems.rows), ["survival_months", "event", "age", "is_female"], problems
    )
    return _clinical(kept.drop_duplicates("patient_id").set_index("patient_id")), problems


def _cbio_samples(path: Path, patients: pd.Index) -> tuple[pd.DataFrame, _Problems]:
    """Usable samples (sample_id, patient_id, sample_type) and the rejected rows."""
    raw = _read_cbio_clinical(path)
    _require_columns(raw, ("PATIENT_ID", "SAMPLE_ID"), path)
    problems = _Problems(path.name, raw["SAMPLE_ID"])
    sample_types, barcode_patients, barcode_errors = {}, {}, {}
    for row, sample in raw["SAMPLE_ID"].items():
        try:
            barcode = parse_barcode(sample)
        except InvalidBarcodeError as error:
            barcode_errors[row] = str(error)
            continue
        sample_types[row], barcode_patients[row] = barcode.sample_type, barcode.patient_id
    _add_reasons(problems, pd.Series(barcode_errors, dtype=object))
    barcode_patient = pd.Series(barcode_patients, index=raw.index, dtype=object)
    problems.add(
        barcode_patient.notna() & (barcode_patient != raw["PATIENT_ID"]),
        "SAMPLE_ID belongs to patient "
        + barcode_patient.astype(str)
        + ", not "
        + raw["PATIENT_ID"].astype(str),
    )
    problems.add(
        ~raw["PATIENT_ID"].isin(patients),
        "patient " + raw["PATIENT_ID"].astype(str) + f" has no usable row in {CBIO_PATIENTS}",
    )
    kept = raw.drop(index=problems.rows)
    samples = pd.DataFrame(
        {
            "sample_id": kept["SAMPLE_ID"],
            "patient_id": kept["PATIENT_ID"],
            "sample_type": pd.Series(sample_types, dtype=object).reindex(kept.index),
        }
    )
    return samples.reset_index(drop=True), problems


def _per_patient(matrix: pd.DataFrame, samples: pd.DataFrame, listed: set[str], path: Path) -> pd.DataFrame:
    """Rows of a samples × features matrix, one sample per patient (primary tumour 01 preferred)."""
    unknown = sorted(set(matrix.index) - listed)
    if unknown:
        raise CohortFormatError(
            f"{path}: {len(unknown)} sample(s) are not in {CBIO_SAMPLES}, e.g. {unknown[:3]}"
        )
    present = samples[samples["sample_id"].isin(matrix.index)].assign(
        not_primary=lambda frame: frame["sample_type"] != PRIMARY_TUMOR
    )
    chosen = present.sort_values(["patient_id", "not_primary", "sample_type", "sample_id"]).drop_duplicates(
        "patient_id"
    )
    frame = matrix.loc[chosen["sample_id"]]
    frame.index = pd.Index(chosen["patient_id"], name="patient_id")
    return frame


def _gene_labels(genes: pd.DataFrame, path: Path) -> list[str]:
    """Hugo symbols; a missing or repeated symbol gets its Entrez id appended (`SYMBOL|1234`)."""
    hugo = genes["Hugo_Symbol"]
    ambiguous = hugo.isna() | hugo.duplicated(keep=False)
    if ambiguous.any() and "Entrez_Gene_Id" in genes.columns:
        entrez = genes["Entrez_Gene_Id"].astype(str).str.replace(r"\.0$", "", regex=True)
        hugo = hugo.where(~ambiguous, hugo.fillna("Entrez") + "|" + entrez)
    repeated = hugo[hugo.isna() | hugo.duplicated()]
    if not repeated.empty:
        raise CohortFormatError(
            f"{path}: gene rows cannot be told apart: {repeated.astype(str).tolist()[:5]}"
        )
    return hugo.tolist()


def _read_gene_matrix(path: Path, modality: str) -> pd.DataFrame:
    """A cBioPortal genes × samples file as a samples × `<gene>_<modality>` matrix."""
    raw = read_delimited(path, "\t", na_values=CBIO_MISSING)
    _require_columns(raw, ("Hugo_Symbol",), path)
    gene_columns = [c for c in CBIO_GENE_COLUMNS if c in raw.columns]
    values = raw.drop(columns=gene_columns)
    not_numeric = [c for c in values.columns if not pd.api.types.is_numeric_dtype(values[c])]
    if not_numeric:
        raise CohortFormatError(f"{path}: non-numeric values in sample column(s) {not_numeric[:3]}")
    values.index = [f"{gene}_{modality}" for gene in _gene_labels(raw[gene_columns], path)]
    return values.T


def _read_mutations(path: Path) -> pd.DataFrame:
    """A MAF as a binary samples × `<gene>_mut` matrix over the samples it lists; silent variants excluded."""
    columns = ("Hugo_Symbol", "Tumor_Sample_Barcode", "Variant_Classification")
    maf = read_delimited(path, "\t", dtype=str, usecols=lambda c: c in columns)
    _require_columns(maf, columns, path)
    altering = maf[~maf["Variant_Classification"].isin(SILENT_CLASSES)]
    counts = pd.crosstab(altering["Tumor_Sample_Barcode"], altering["Hugo_Symbol"])
    samples = maf["Tumor_Sample_Barcode"].drop_duplicates()
    matrix = (counts > 0).astype("float32").reindex(samples, fill_value=0.0)
    matrix.columns = [f"{gene}_mut" for gene in matrix.columns]
    return matrix


def read_cbioportal(folder: Path) -> RawCohort:
    """A cBioPortal study folder; omics files are optional, the two clinical files are required."""
    folder = Path(folder)
    for name in (CBIO_PATIENTS, CBIO_SAMPLES):
        if not (folder / name).is_file():
            raise CohortFormatError(f"{folder}: missing {name}, required for a cBioPortal study")
    clinical, patient_problems = _cbio_patients(folder / CBIO_PATIENTS)
    samples, sample_problems = _cbio_samples(folder / CBIO_SAMPLES, clinical.index)
    listed = set(sample_problems.ids.dropna())

    sources: dict[str, tuple[str, Callable[[Path], pd.DataFrame]]] = {
        m: (name, partial(_read_gene_matrix, modality=m)) for m, name in CBIO_MATRICES.items()
    }
    sources["mut"] = (CBIO_MUTATIONS, _read_mutations)
    omics = {}
    for modality in OMIC_SUFFIXES:
        name, read = sources[modality]
        if (folder / name).is_file():
            omics[modality] = _per_patient(read(folder / name), samples, listed, folder / name)
    quarantine = pd.concat([patient_problems.frame(), sample_problems.frame()], ignore_index=True)
    return RawCohort(
        clinical,
        omics,
        empty_slides(),
        quarantine,
        rows_in=len(patient_problems.ids) + len(sample_problems.ids),
        filled=tuple(patient_problems.filled),
    )


def _gdc_column(raw: pd.DataFrame, field: str) -> str | None:
    return next((name for name in GDC_COLUMNS[field] if name in raw.columns), None)


def read_gdc_clinical(path: Path) -> RawCohort:
    """GDC `clinical.tsv` (either column naming); one row per treatment/diagnosis collapses to one patient.

    Dead: time = days_to_death, event 1; alive: days_to_last_follow_up, event 0; months = days / 30.44.
    """
    path = Path(path)
    raw = read_delimited(path, table_separator(path), dtype=str, keep_default_na=False, na_values=GDC_MISSING)
    raw = raw.reset_index(drop=True)
    names = {field: _gdc_column(raw, field) for field in GDC_COLUMNS}
    missing = [" or ".join(GDC_COLUMNS[field]) for field in GDC_REQUIRED if names[field] is None]
    if missing:
        raise CohortFormatError(f"{path}: missing required GDC column(s): {'; '.join(missing)}")

    problems = _Problems(path.name, raw[names["patient"]])
    patients, barcode_errors = _parse_patients(raw[names["patient"]])
    _add_reasons(problems, barcode_errors)
    status = raw[names["vital_status"]]
    event = status.str.lower().map({"dead": 1, "alive": 0})
    problems.add(event.isna(), f"{names['vital_status']} is missing or unknown: " + status.astype(str))
    death = pd.to_numeric(raw[names["days_to_death"]], errors="coerce")
    follow_up = pd.to_numeric(raw[names["days_to_last_follow_up"]], errors="coerce")
    days = death.where(event == 1, follow_up)
    used = np.where(event == 1, str(names["days_to_death"]), str(names["days_to_last_follow_up"]))
    reported = raw[names["days_to_death"]].where(event == 1, raw[names["days_to_last_follow_up"]])
    problems.add(
        event.notna() & ~(days > 0),
        "no usable survival time: "
        + status.astype(str)
        + " but "
        + pd.Series(used, index=raw.index)
        + " is "
        + reported.fillna("missing").astype(str),
    )
    frame = pd.DataFrame({"patient_id": patients, "event": event, "days": days})
    frame["age_days"] = raw[names["age_at_diagnosis"]] if names["age_at_diagnosis"] else np.nan
    frame["is_female"] = (
        raw[names["gender"]].str.lower().map({"female": 1, "male": 0}) if names["gender"] else np.nan
    )
    frame["project_id"] = raw[names["project_id"]] if names["project_id"] else None
    frame = _coerce_numeric(frame, ["age_days"], problems)
    kept = _merge_patient_rows(frame.drop(index=problems.rows), ["event", "is_female"], problems)
    per_patient = kept.groupby("patient_id", sort=False).agg(
        days=("days", "max"),
        event=("event", "first"),
        age_days=("age_days", "min"),
        is_female=("is_female", "first"),
        project_id=("project_id", "first"),
    )
    per_patient["survival_months"] = per_patient["days"] / DAYS_PER_MONTH
    per_patient["age"] = per_patient["age_days"] / DAYS_PER_YEAR
    clinical = _clinical(per_patient, ["project_id"] if names["project_id"] else [])
    return RawCohort(
        clinical, {}, empty_slides(), problems.frame(), rows_in=len(raw), filled=tuple(problems.filled)
    )
