"""`healnet` command line: one module per sub-command, imported lazily.

Each module exposes `HELP` (one line), `configure(parser)` and `run(args) -> int`. Heavy imports
belong inside `run`, so `healnet --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from healnet import __version__
from healnet.errors import exit_code_of

COMMANDS = {
    "synth": "healnet.cli.synth",
    "ingest": "healnet.cli.ingest",
    "validate": "healnet.cli.validate",
    "preprocess-slides": "healnet.cli.preprocess_slides",
    "import-features": "healnet.cli.import_features",
    "train": "healnet.cli.train",
    "evaluate": "healnet.cli.evaluate",
    "explain": "healnet.cli.explain",
    "cv": "healnet.cli.cv",
    "ablate": "healnet.cli.ablate",
    "registry": "healnet.cli.registry",
    "drift": "healnet.cli.drift",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and epilogs as written; an option's default is shown unless it is None or False (an
    option that is off unless given) or its help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def recipe_default(describe: Callable) -> str:
    """'(default: the recipe's: demo X, tcga Y)': what an option that overrides a recipe setting is without it.
    `describe(recipe)` gives one recipe's value."""
    from healnet.recipes import RECIPES

    values = ", ".join(f"{name} {describe(recipe)}" for name, recipe in RECIPES.items())
    return f"(default: the recipe's: {values})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="healnet",
        description="HEALNet multimodal survival models: demo data, ingestion, validation, "
        "preprocessing, training, evaluation and the model registry.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error instead of its one-line message"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        sub = subparsers.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            formatter_class=HelpFormatter,
        )
        module.configure(sub)
        sub.set_defaults(handler=module.run)
    return parser


@contextmanager
def one_line_warnings(program: str, enabled: bool) -> Iterator[None]:
    """Show each warning as one line that names the program, without the source line that raised it; the
    previous format comes back afterwards (main may run inside another program, as in the tests)."""
    if not enabled:
        yield
        return
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"{program}: warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = previous


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command; a library error (HEALNetError) is one line on stderr and exit code 2, and so is a
    warning (both in full with --debug)."""
    args = build_parser().parse_args(argv)
    program = f"healnet {args.command}"
    with one_line_warnings(program, enabled=not args.debug):
        return exit_code_of(lambda: args.handler(args), program, args.debug)


if __name__ == "__main__":
    sys.exit(main())
