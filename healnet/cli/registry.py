"""`healnet registry`: list, show and roll back model versions, and print their model cards."""

from __future__ import annotations

import argparse
import json

HELP = "Manage model versions in the registry (BentoML model store + champion pointer)."


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(
        dest="action", metavar="ACTION", required=True, help="list, show, card or rollback"
    )
    actions.add_parser("list", help="list every version, newest first; * marks the champion")
    show = actions.add_parser("show", help="print one version's labels and metadata as JSON")
    show.add_argument("tag", help="model tag (healnet:VERSION) or VERSION")
    card = actions.add_parser(
        "card", help="print one version's model card (Markdown, or its JSON with --json); docs/model_card.md"
    )
    card.add_argument("tag", help="model tag (healnet:VERSION) or VERSION")
    card.add_argument("--json", action="store_true", help="print the card's JSON instead of its Markdown")
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
    from healnet.registry import RegistryError, list_versions, model_card, rollback, show_version, version_tag

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
    elif args.action == "card":
        card = model_card(args.tag)
        if card is None:
            raise RegistryError(
                f"{version_tag(args.tag)} has no model card: it was registered before model cards were written"
            )
        print(json.dumps(card[0], indent=2) if args.json else card[1], end="\n" if args.json else "")
    else:
        pointer = rollback(args.to)
        print(f"champion is now {pointer['tag']} ({pointer['reason']})")
    return 0
