"""`healnet` command line: one module per sub-command, imported lazily.

Each module exposes `HELP` (one line), `configure(parser)` and `run(args) -> int`. Heavy imports
belong inside `run`, so `healnet --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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
}


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
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.configure(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command; a library error (HEALNetError) is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    return exit_code_of(lambda: args.handler(args), f"healnet {args.command}", args.debug)


if __name__ == "__main__":
    sys.exit(main())
