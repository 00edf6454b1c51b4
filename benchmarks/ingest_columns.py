"""Ingest time against the number of columns: a synthetic PORPOISE table, read and ingested whole.

The table has the BLCA shape (437 slide rows of 373 patients, some with several slides) and `--columns`
omics features split evenly over `_mut`, `_cnv` and `_rnaseq`. The reader alone (`read_porpoise_table`)
and the whole `ingest` (reader, splits, parquet files) are timed; each keeps its fastest repeat.

    python benchmarks/ingest_columns.py [--columns N ...] [--repeats R] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from healnet.data.cohort import ingest
from healnet.data.readers import OMIC_SUFFIXES, read_porpoise_table

PATIENTS = 373
SLIDE_ROWS = 437  # as in the BLCA table: the rows beyond one per patient are further slides


def write_table(path: Path, columns: int, seed: int = 0) -> Path:
    """A PORPOISE table with `columns` omics features; the rows of one patient repeat its values."""
    rng = np.random.default_rng(seed)
    patients = [f"TCGA-{index // 10000:02d}-{index % 10000:04d}" for index in range(PATIENTS)]
    patient_of_row = np.sort(
        np.concatenate([np.arange(PATIENTS), rng.choice(PATIENTS, SLIDE_ROWS - PATIENTS)])
    )
    slide_numbers = pd.Series(patient_of_row).groupby(patient_of_row).cumcount() + 1
    clinical = pd.DataFrame(
        {
            "case_id": [patients[i] for i in patient_of_row],
            "slide_id": [
                f"{patients[i]}-01Z-00-DX{number}.svs"
                for i, number in zip(patient_of_row, slide_numbers, strict=True)
            ],
            "age": rng.integers(40, 90, PATIENTS)[patient_of_row],
            "survival_months": rng.uniform(1, 120, PATIENTS).round(2)[patient_of_row],
            "censorship": rng.integers(0, 2, PATIENTS)[patient_of_row],
            "is_female": rng.integers(0, 2, PATIENTS)[patient_of_row],
            "oncotree_code": "BLCA",
        }
    )
    names = [f"G{index}_{OMIC_SUFFIXES[index % len(OMIC_SUFFIXES)]}" for index in range(columns)]
    values = rng.normal(size=(PATIENTS, columns)).round(3).astype("float32")[patient_of_row]
    features = pd.DataFrame(values, columns=names)
    pd.concat([clinical, features], axis=1).to_csv(path, index=False)
    return path


def fastest(action: Callable[[], object], repeats: int) -> float:
    """Wall seconds of the fastest of `repeats` calls."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def measure(columns: int, folder: Path, repeats: int) -> dict:
    table = write_table(folder / f"table_{columns}.csv", columns)
    return {
        "columns": columns,
        "rows": SLIDE_ROWS,
        "read_s": round(fastest(lambda: read_porpoise_table(table), repeats), 2),
        "ingest_s": round(fastest(lambda: ingest(table, folder / f"cohort_{columns}"), repeats), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--columns", type=int, nargs="+", default=[5000, 50000], help="omics feature columns of each table"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per table (the fastest counts)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ingest-columns-") as tmp:
        rows = [measure(columns, Path(tmp), args.repeats) for columns in args.columns]
    print("| feature columns | rows | read_porpoise_table (s) | ingest (s) |")
    print("| ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['columns']:,} | {row['rows']} | {row['read_s']:.2f} | {row['ingest_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
