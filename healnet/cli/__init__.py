"""`healnet` command line: one module per sub-command, imported lazily.

Each module exposes `HELP` (one line), `configure(parser)` and `run(args) -> int`. Heavy imports
belong inside `run`, so `healnet --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "synth": "healnet.cli.synth",
    "ingest": "healnet.cli.ingest",
    "validate": "healnet.cli.validate",
    "preprocess-slides": "healnet.cli.preprocess_slides",
    "train": "healnet.cli.train",
    "evaluate": "healnet.cli.evaluate",
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
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
