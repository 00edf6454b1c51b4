"""Hostile inputs: data files run no code, declared sizes cannot exhaust memory, names from data cannot
escape their folder, slides outside the slide root are never opened, and reports written from data cannot
carry formulas or markup."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from healnet.checkpoint import CheckpointError, load_checkpoint
from healnet.cli import main
from healnet.data.synth_slides import write_synthetic_slide
from healnet.files import (
    UnsafeNameError,
    check_file_name,
    from_spreadsheet_cell,
    markdown_code_block,
    markdown_text,
    sha256_file,
    spreadsheet_cell,
)
from healnet.preprocess.encoders import (
    EncoderError,
    EncoderProvenance,
    find_encoder,
    make_encoder,
)
from healnet.preprocess.feature_files import SlideInputError, read_quarantine
from healnet.preprocess.feature_import import ImportConfig, import_features
from healnet.preprocess.wsi import preprocess_slides

FORMULA = "=cmd|' /C calc'!A0"
MARKUP = "<img src=x onerror=alert(1)>"


class CreatesMarker:
    """Unpickling it creates the folder `path`: the stand-in for code a data file would run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def pickled(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------- encoders


@pytest.fixture(scope="module")
def plain_export(tmp_path_factory) -> Path:
    """A small torch.export encoder, as scripts/export_encoders.py writes one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.AdaptiveAvgPool2d(2)).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.zeros(2, 3, 224, 224),), dynamic_shapes=({0: batch},))
    path = tmp_path_factory.mktemp("encoders") / "tiny.pt2"
    torch.export.save(program, str(path))
    return path


def tampered(source: Path, out: Path, change: Callable[[dict[str, bytes]], None]) -> Path:
    """A copy of the archive `source` with `change` applied to its entries (names without the root)."""
    with zipfile.ZipFile(source) as archive:
        root = archive.namelist()[0].split("/", 1)[0] + "/"
        entries = {name.removeprefix(root): archive.read(name) for name in archive.namelist()}
    change(entries)
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in entries.items():
            archive.writestr(root + name, data)
    return out


def pickled_weight(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(entries: dict[str, bytes]) -> None:
        config = json.loads(entries["data/weights/model_weights_config.json"])
        name = next(iter(config["config"]))
        config["config"][name]["use_pickle"] = True
        entries["data/weights/model_weights_config.json"] = json.dumps(config).encode()
        entries["data/weights/" + config["config"][name]["path_name"]] = pickled(CreatesMarker(marker))

    return change


def pickled_sample_inputs(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(entries: dict[str, bytes]) -> None:  # torch retries these with weights_only=False
        entries["data/sample_inputs/model.pt"] = pickled((CreatesMarker(marker),))

    return change


def code_in_shape_expression(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(entries: dict[str, bytes]) -> None:  # sympify evaluates it
        graph = entries["models/model.json"].decode()
        start = graph.index('"expr_str": "') + len('"expr_str": "')
        end = graph.index('"', start)
        entries["models/model.json"] = (
            graph[:start] + f"__import__('os').mkdir('{marker}')" + graph[end:]
        ).encode()

    return change


def guard_code(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(entries: dict[str, bytes]) -> None:  # .module() execs guards
        program = json.loads(entries["models/model.json"])
        program["guards_code"] = [f"__import__('os').mkdir('{marker}')"]
        entries["models/model.json"] = json.dumps(program).encode()

    return change


def foreign_operator(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(entries: dict[str, bytes]) -> None:
        graph = entries["models/model.json"].decode()
        entries["models/model.json"] = graph.replace(
            "torch.ops.aten.conv2d.default", "torch.ops.load_library"
        ).encode()

    return change


def compiled_library(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(entries: dict[str, bytes]) -> None:  # load_pt2 dlopens AOTInductor packages
        entries["data/aotinductor/model/model.so"] = b"\x7fELF"

    return change


TAMPERINGS = {
    "pickled weight": (pickled_weight, "stored with pickle"),
    "pickled sample inputs": (pickled_sample_inputs, "needs pickle beyond tensors"),
    "code in a shape expression": (code_in_shape_expression, "not plain sympy"),
    "guard code": (guard_code, "guard code"),
    "a torch function as operator": (foreign_operator, "not an aten operator"),
    "a compiled library": (compiled_library, "unexpected entry data/aotinductor"),
}


def test_the_pickle_payloads_are_live_code(plain_export, tmp_path):
    """The fixtures are real attacks: unpickled as torch.export.load does, they create the marker."""
    live = tmp_path / "live"
    torch.load(io.BytesIO(pickled(CreatesMarker(live))), weights_only=False)
    assert live.is_dir()


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_a_pt2_encoder_that_would_run_code_is_refused_before_loading(plain_export, tmp_path, tampering):
    make_change, reason = TAMPERINGS[tampering]
    marker = tmp_path / "marker"
    evil = tampered(plain_export, tmp_path / "evil.pt2", make_change(marker))

    with pytest.raises(EncoderError, match=reason) as refusal:
        make_encoder(str(evil), device="cpu")
    assert "\n" not in str(refusal.value) and str(evil) in str(refusal.value)
    # the service finds encoders by the sha256 its model records: the same refusal
    provenance = EncoderProvenance("evil", sha256_file(evil), 16, 224, "imagenet")
    with pytest.raises(EncoderError, match=reason):
        find_encoder(provenance, [evil.parent], "cpu")
    assert not marker.exists()


def test_a_plain_pt2_encoder_loads_without_being_trusted(plain_export):
    assert make_encoder(str(plain_export), device="cpu").dim == 16


def test_preprocess_slides_refuses_a_pickled_pt2_encoder_in_one_line(plain_export, tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = tampered(plain_export, tmp_path / "evil.pt2", pickled_weight(marker))
    (tmp_path / "slides").mkdir()

    code = main(
        [
            "preprocess-slides",
            str(tmp_path / "slides"),
            "--out",
            str(tmp_path / "out"),
            "--encoder",
            str(evil),
        ]
    )

    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "stored with pickle" in error
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.fixture
def torchscript_encoder(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A TorchScript encoder, and the marker its loading would create: torch.jit.load is replaced by code
    that creates it, so the marker shows whether the loader was reached at all."""
    torch.manual_seed(0)
    path = tmp_path / "scripted.pt"
    torch.jit.script(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 16, stride=16), torch.nn.AdaptiveAvgPool2d(1))
    ).save(str(path))
    marker = tmp_path / "marker"
    real_load = torch.jit.load

    def load_and_mark(*args, **kwargs):
        marker.mkdir(exist_ok=True)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", load_and_mark)
    monkeypatch.delenv("HEALNET_TRUSTED_ENCODERS", raising=False)
    return path, marker


def test_torchscript_loads_only_when_its_sha256_is_trusted(
    torchscript_encoder, tmp_path, monkeypatch, capsys
):
    path, marker = torchscript_encoder
    digest = sha256_file(path)
    with pytest.raises(EncoderError, match="HEALNET_TRUSTED_ENCODERS") as refusal:
        make_encoder(str(path), device="cpu")
    assert "\n" not in str(refusal.value) and f"--trust-encoder {digest}" in str(refusal.value)
    provenance = EncoderProvenance("scripted", digest, 4, 224, "imagenet")
    with pytest.raises(EncoderError, match="not trusted"):
        find_encoder(provenance, [path.parent], "cpu")
    code = main(["preprocess-slides", str(tmp_path), "--out", str(tmp_path / "out"), "--encoder", str(path)])
    assert code == 2 and "not trusted" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()

    # trusted by the operator: the option, or the environment (the service's way)
    assert make_encoder(str(path), device="cpu", trusted=[digest.upper()]).dim == 4
    monkeypatch.setenv("HEALNET_TRUSTED_ENCODERS", f"{'a' * 64},{digest}")
    assert find_encoder(provenance, [path.parent], "cpu").dim == 4
    monkeypatch.setenv("HEALNET_TRUSTED_ENCODERS", "sha256-of-my-encoder")
    with pytest.raises(EncoderError, match="'sha256-of-my-encoder'.* is not 64 hex digits"):
        make_encoder(str(path), device="cpu")


def test_checkpoint_weights_are_read_without_unpickling_code(tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "model.pt").write_bytes(pickled({"format_version": 2, "state_dict": CreatesMarker(marker)}))
    (folder / "checkpoint.json").write_text(json.dumps({"sha256": sha256_file(folder / "model.pt")}))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(folder)
    assert not marker.exists()


# ------------------------------------------------------------------------------ feature import


def write_declared_huge_h5(path: Path, patches: int, dim: int) -> Path:
    """An .h5 of a few KB that declares (patches, dim) float32 features: chunked, no chunk written."""
    with h5py.File(path, "w") as handle:
        handle.create_dataset(
            "features", shape=(patches, dim), dtype="f4", chunks=(min(patches, 1024), dim), fillvalue=0.0
        )
        coords = handle.create_dataset(
            "coords", shape=(patches, 2), dtype="i8", chunks=(min(patches, 1024), 2), fillvalue=0
        )
        coords.attrs["patch_size"] = 256
        coords.attrs["target_magnification"] = 20.0
    return path


def test_a_declared_huge_feature_file_is_quarantined_before_it_is_read(tmp_path):
    source = tmp_path / "features"
    source.mkdir()
    huge = write_declared_huge_h5(source / "huge-slide.h5", 1_500_000, 256)
    assert huge.stat().st_size < 64_000
    out = tmp_path / "out"
    # a fresh interpreter, so that its peak memory is the import's alone
    measure = (
        "import resource, subprocess, sys; "
        "subprocess.run(sys.argv[1:], check=False); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    command = [sys.executable, "-m", "healnet", "import-features", str(source), "--out", str(out)]
    command += ["--encoder-name", "uni_v1", "--no-progress"]
    result = subprocess.run(
        [sys.executable, "-c", measure, *command], capture_output=True, text=True, check=True
    )

    peak_mib = int(result.stdout.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KiB on Linux
    assert peak_mib < 500, f"the import peaked at {peak_mib:.0f} MiB"
    reason = read_quarantine(out / "uni_v1")["huge-slide"]
    assert "(1500000, 256) float32" in reason and "budget of 4.0 GiB" in reason
    assert "--max-slide-gib" in reason


def test_the_memory_budget_is_an_option(tmp_path, capsys):
    source = tmp_path / "features"
    source.mkdir()
    rng = np.random.default_rng(0)
    for slide in ("a", "b"):
        with h5py.File(source / f"{slide}.h5", "w") as handle:
            handle["features"] = rng.normal(size=(50, 8)).astype(np.float32)
            handle["coords"] = np.stack([np.arange(50), np.zeros(50)], axis=1).astype(np.int64) * 256
    torch.save(torch.zeros(50, 8), source / "c.pt")  # memory-mapped, then checked the same way
    arguments = [
        "import-features",
        str(source),
        "--encoder-name",
        "uni_v1",
        "--mpp",
        "0.5",
        "--patch-size",
        "256",
    ]

    assert main([*arguments, "--out", str(tmp_path / "fits"), "--no-progress"]) == 0
    fits = read_quarantine(tmp_path / "fits" / "uni_v1")
    assert list(fits) == ["c"] and fits["c"].startswith("no coordinates")  # not for its size
    code = main([*arguments, "--out", str(tmp_path / "tight"), "--max-slide-gib", "1e-6", "--no-progress"])
    assert code == 1
    reasons = read_quarantine(tmp_path / "tight" / "uni_v1")
    assert set(reasons) == {"a", "b", "c"} and all(
        "over the per-slide memory budget" in r for r in reasons.values()
    )


def test_a_compressed_torch_file_that_cannot_be_mapped_is_quarantined_unread(tmp_path):
    source = tmp_path / "features"
    source.mkdir()
    torch.save(torch.zeros(50, 8), tmp_path / "plain.pt")
    deflated_path = source / "deflated.pt"
    with (
        zipfile.ZipFile(tmp_path / "plain.pt") as plain,
        zipfile.ZipFile(deflated_path, "w", zipfile.ZIP_DEFLATED) as deflated,
    ):
        for name in plain.namelist():  # a few bytes of deflate can expand to any size
            deflated.writestr(name, plain.read(name))
    config = ImportConfig("uni_v1", mpp=0.5, patch_size=256)
    report = import_features(source, tmp_path / "out", config, progress=False)
    assert [slide for slide, _ in report.quarantined] == ["deflated"]
    assert "cannot be memory-mapped" in report.quarantined[0][1]


@pytest.mark.parametrize("name", ["..", ".", "a/b", "..\\evil", ".hidden", "", "tab\tname", "new\nline"])
def test_an_encoder_name_that_is_not_a_file_name_is_refused_and_nothing_written(tmp_path, capsys, name):
    source = tmp_path / "features"
    source.mkdir()
    write_declared_huge_h5(source / "slide.h5", 10, 4)
    out = tmp_path / "nested" / "out"

    code = main(["import-features", str(source), "--out", str(out), "--encoder-name", name, "--mpp", "0.5"])

    error = capsys.readouterr().err
    assert code == 2 and error.startswith("healnet import-features: ") and error.count("\n") == 1
    assert not (tmp_path / "nested").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"]


def test_feature_files_whose_stem_is_not_a_file_name_are_quarantined(tmp_path):
    source = tmp_path / "features"
    source.mkdir()
    rng = np.random.default_rng(0)
    for stem in ("good", ".hidden", "."):
        with h5py.File(source / f"{stem}.h5", "w") as handle:
            handle["features"] = rng.normal(size=(5, 8)).astype(np.float32)
            handle["coords"] = np.stack([np.arange(5), np.zeros(5)], axis=1).astype(np.int64) * 256
    report = import_features(
        source, tmp_path / "out", ImportConfig("uni_v1", mpp=0.5, patch_size=256), progress=False
    )

    assert [slide.slide_id for slide in report.imported] == ["good"]
    assert {slide for slide, _ in report.quarantined} == {".hidden", "."}
    assert all("cannot name a file" in reason for _, reason in report.quarantined)
    assert sorted(p.name for p in report.out_dir.iterdir()) == [
        "good.parquet",
        "quarantine.csv",
        "report.json",
    ]


# ------------------------------------------------------------------------ slides and slide ids


@pytest.fixture(scope="module")
def slide_tree(tmp_path_factory) -> dict[str, Path]:
    """A slide root with one good slide and a link out of it, and a slide outside the root."""
    base = tmp_path_factory.mktemp("tree")
    root = base / "root"
    root.mkdir()
    inside = write_synthetic_slide(root / "inside.tif", 0.5, seed=1, size_px=512)
    outside = write_synthetic_slide(base / "outside.tif", 0.5, seed=2, size_px=512)
    (root / "link.tif").symlink_to(outside)
    return {"base": base, "root": root, "inside": inside, "outside": outside}


def test_manifest_slides_outside_the_slide_root_are_quarantined_unopened(slide_tree, tmp_path, monkeypatch):
    import openslide

    opened: list[str] = []
    real_open = openslide.OpenSlide

    def recording_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(openslide, "OpenSlide", recording_open)
    manifest = slide_tree["root"] / "slides.csv"
    rows = {
        "inside.tif": "inside.tif",
        "passwd.tif": "/etc/passwd",
        "parent.tif": "../outside.tif",
        "link.tif": "link.tif",
    }
    pd.DataFrame({"slide_id": list(rows), "path": list(rows.values())}).to_csv(manifest, index=False)
    out = tmp_path / "out"

    code = main(
        [
            "preprocess-slides",
            str(manifest),
            "--out",
            str(out),
            "--slide-root",
            str(slide_tree["root"]),
            "--no-progress",
        ]
    )

    assert code == 0
    (folder,) = out.iterdir()
    quarantined = read_quarantine(folder)
    assert set(quarantined) == {"passwd.tif", "parent.tif", "link.tif"}
    assert all("outside the slide root" in reason for reason in quarantined.values())
    assert opened == [str(slide_tree["inside"].resolve())]
    assert (folder / "inside.parquet").is_file()


def test_without_a_slide_root_the_manifest_paths_are_taken_as_they_are(slide_tree, tmp_path):
    manifest = slide_tree["root"] / "linked.csv"
    pd.DataFrame({"slide_id": ["link.tif"], "path": ["link.tif"]}).to_csv(manifest, index=False)
    report = preprocess_slides(manifest, tmp_path / "out", progress=False)
    assert [result.slide_id for result in report.processed] == ["link.tif"]
    with pytest.raises(SlideInputError, match="is not a folder"):
        preprocess_slides(manifest, tmp_path / "out", progress=False, slide_root=tmp_path / "missing")


def test_slide_ids_that_are_not_file_names_are_quarantined_and_no_formula_reaches_the_csv(
    slide_tree, tmp_path
):
    manifest = slide_tree["root"] / "ids.csv"
    ids = ["/", "..", ".hidden", FORMULA, "-leading-dash.tif", "inside.tif"]
    paths = ["inside.tif"] * len(ids)
    pd.DataFrame({"slide_id": ids, "path": paths}).to_csv(manifest, index=False)
    out = tmp_path / "out"

    report = preprocess_slides(manifest, out, progress=False, slide_root=slide_tree["root"])

    unsafe = {"/", "..", ".hidden", FORMULA}
    assert {slide for slide, _ in report.quarantined} >= unsafe
    assert all("cannot name a file" in reason for slide, reason in report.quarantined if slide in unsafe)
    assert not any(p.name.startswith(".") for p in out.rglob("*"))
    assert list(out.parent.iterdir()) == [out]
    with (out / "quarantine.csv").open(newline="") as handle:
        cells = [cell for row in csv.reader(handle) for cell in row]
    assert FORMULA in "".join(cells) and not any(cell.startswith(("=", "+", "-", "@")) for cell in cells)
    assert FORMULA in read_quarantine(out)  # read back as it was


# ------------------------------------------------------------------------------------ helpers


@pytest.mark.parametrize("name", ["", ".", "..", ".x", "a/b", "a\\b", "a\x00b", "a\x1bb", "a\x7fb"])
def test_check_file_name_refuses_what_is_not_one_file_name(name):
    with pytest.raises(UnsafeNameError, match="cannot name a file"):
        check_file_name(name, "slide id")


@pytest.mark.parametrize("name", ["TCGA-2F-A9KO-01Z-00-DX1.195576CF.svs", "uni_v1", "a b", "x..y", "-dash"])
def test_check_file_name_keeps_ordinary_names(name):
    assert check_file_name(name, "slide id") == name


@pytest.mark.parametrize("value", [FORMULA, "+1", "-1", "@SUM(A1)", "\tx", "\rx", "'quoted", "plain", ""])
def test_spreadsheet_cells_never_start_a_formula_and_read_back_exactly(value):
    cell = spreadsheet_cell(value)
    assert not str(cell).startswith(("=", "+", "-", "@", "\t", "\r"))
    assert from_spreadsheet_cell(str(cell)) == value
    assert spreadsheet_cell(3.5) == 3.5


def test_markdown_helpers_keep_markup_literal():
    assert "<" not in markdown_text(MARKUP) and "&lt;img" in markdown_text(MARKUP)
    assert markdown_text("a|b`c\nd[e](f) & [0, 1] > 0") == "a\\|b&#96;c d[e]\\(f) &amp; [0, 1] > 0"
    block = markdown_code_block("```\n" + MARKUP + "\n````")
    fence = block.splitlines()[0]
    assert fence == "`````" and block.endswith(fence + "\n") and block.count(fence) == 2
