"""The entry points: one line and exit code 2 for a library error, the traceback only with --debug."""

import argparse
import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

import healnet
import healnet.cli as healnet_cli
from healnet.errors import HEALNetError
from healnet.recipes import RECIPES


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


def test_a_missing_cohort_is_one_clear_line_and_exit_2():
    result = run_cli("healnet", "train", "--cohort", "/nonexistent", "--out", "/tmp/never-written")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "healnet train: /nonexistent is not a cohort folder: missing cohort.json"
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_debug_shows_the_traceback():
    result = run_cli("healnet", "--debug", "train", "--cohort", "/nonexistent", "--out", "/tmp/never-written")
    assert result.returncode != 0 and "Traceback" in result.stderr and "CohortFormatError" in result.stderr


def test_the_pipeline_entry_point_catches_library_errors_once(tmp_path):
    result = run_cli(
        "pipelines", "compile", "--output", str(tmp_path / "p.yaml"), "--param", "gpu_count=many"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def library_exceptions() -> list[type]:
    classes = []
    for module in pkgutil.walk_packages(healnet.__path__, "healnet."):
        if module.name.startswith("healnet.cli") or module.name == "healnet.__main__":  # runs the CLI
            continue
        for _, obj in inspect.getmembers(importlib.import_module(module.name), inspect.isclass):
            if issubclass(obj, Exception) and obj.__module__.startswith("healnet."):
                classes.append(obj)
    return sorted(set(classes), key=lambda cls: f"{cls.__module__}.{cls.__name__}")


@pytest.mark.parametrize("error", library_exceptions(), ids=lambda cls: cls.__name__)
def test_every_library_exception_derives_from_the_one_base(error):
    assert issubclass(error, HEALNetError)


def subcommand_parser(command: str) -> argparse.ArgumentParser:
    parser = healnet_cli.build_parser()
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices[command]


@pytest.mark.parametrize("command", sorted(healnet_cli.COMMANDS))
def test_every_option_help_says_what_it_does_and_no_default_reads_none(command):
    subparser = subcommand_parser(command)
    for action in subparser._actions:
        assert action.help, f"healnet {command} {action.option_strings or action.dest} has no help"
    printed = subparser.format_help()
    assert "(default: None)" not in printed and "(default: False)" not in printed


def test_an_option_that_overrides_the_recipe_shows_each_recipe_value():
    subparser = subcommand_parser("train")
    epochs = next(action for action in subparser._actions if "--epochs" in action.option_strings)
    expected = ", ".join(f"{name} {recipe.train.epochs}" for name, recipe in RECIPES.items())
    assert epochs.help.endswith(f"(default: the recipe's: {expected})")
    assert subparser.parse_args(["--cohort", "c", "--out", "o"]).epochs is None  # the recipe decides
