"""`healnet registry`: list, show and roll back model versions."""

from __future__ import annotations

import argparse
import json

HELP = "Manage model versions in the registry (BentoML model store + champion pointer)."


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(
        dest="action", metavar="ACTION", required=True, help="list, show or rollback"
    )
    actions.add_parser("list", help="list every version, newest first; * marks the champion")
    show = actions.add_parser("show", help="print one version's labels and metadata as JSON")
    show.add_argument("tag", help="model tag (healnet:VERSION) or VERSION")
    back = actions.add_parser(
        "rollback",
        help="set the champion back to the one before it; repeated, it walks back through earlier champions",
    )
    back.add_argument(
        "--to",
        default=None,
        metavar="TAG",
        help="an earlier champion to restore, healnet:VERSION or VERSION; not an alias such as latest "
        "(default: the champion before the current one)",
    )


def run(args: argparse.Namespace) -> int:
    from healnet.registry import list_versions, rollback, show_version

    if args.action == "list":
        rows = list_versions()
        if not rows:
            print("no model versions registered")
        for row in rows:
            c_index = row["metadata"].get("c_index")
            shown = f"{c_index:.4f}" if isinstance(c_index, float) else "-"
            print(f"{'*' if row['champion'] else ' '} {row['tag']:<32} {row['created']}  c-index {shown}")
    elif args.action == "show":
        print(json.dumps(show_version(args.tag), indent=2, default=str))
    else:
        pointer = rollback(args.to)
        print(f"champion is now {pointer['tag']} ({pointer['reason']})")
    return 0
