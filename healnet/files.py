"""File helpers shared by checkpoints, encoders, imports and reports (standard library only): hashes, names
that become paths, the memory budget of one slide's data files, and cells of reports written from data."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path

from healnet.errors import HEALNetError

# Memory that importing one slide's feature files may take (~300k patches of 1024 float32 features); the
# files' declared shapes are checked against it before anything is read.
DEFAULT_MAX_SLIDE_BYTES = 4 << 30
# A spreadsheet reads a cell that starts with one of these as a formula (CSV injection); tab and carriage
# return count too, since some spreadsheets strip them before looking.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


class UnsafeNameError(HEALNetError, ValueError):
    """A name from the user's data (a slide id, an encoder name) that cannot safely become a file name."""


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file_name(name: str, what: str) -> str:
    """`name` when it can become one file name inside a folder, else UnsafeNameError saying why: it must not
    be empty, start with '.' (hidden files, '.', '..'), hold '/' or '\\' (other folders) or control
    characters. `what` names it in the error, e.g. "slide id" or "--encoder-name"."""
    problem = ""
    if not name:
        problem = "it is empty"
    elif name.startswith("."):
        problem = "it starts with '.'"
    elif "/" in name or "\\" in name:
        problem = "it holds a path separator"
    elif any(unicodedata.category(character) == "Cc" for character in name):
        problem = "it holds control characters"
    if problem:
        raise UnsafeNameError(f"{what} {name!r} cannot name a file: {problem}")
    return name


def spreadsheet_cell(value: object) -> object:
    """A CSV cell that a spreadsheet shows as text: a string starting with `FORMULA_TRIGGERS` gets a leading
    apostrophe (the spreadsheets' own "this is text" mark), and so does one starting with an apostrophe,
    so that `from_spreadsheet_cell` gives the value back exactly; other values are unchanged."""
    if isinstance(value, str) and value.startswith((*FORMULA_TRIGGERS, "'")):
        return "'" + value
    return value


def from_spreadsheet_cell(cell: str) -> str:
    """The value that `spreadsheet_cell` wrote as `cell`."""
    return cell[1:] if cell.startswith("'") else cell


def markdown_text(value: object) -> str:
    """`value` as literal text inside Markdown (a table cell, a list item, a code span): no HTML tag or
    entity (`&` and `<` are escaped), no link (`](` is broken), and table pipes, backticks and line breaks
    cannot end the cell or the span. Other characters stay as they are, so the text still reads."""
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace("](", "]\\(")
    return text.replace("|", "\\|").replace("`", "&#96;").replace("\r", " ").replace("\n", " ")


def markdown_code_block(text: str) -> str:
    """`text` as a fenced Markdown code block (shown verbatim, HTML included, never rendered), its fence
    longer than any run of backticks in the text, so that the text cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}\n"
