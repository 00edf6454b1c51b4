"""The one base of the library's exceptions: an entry point catches `HEALNetError` once and prints its
message, which names the problem; anything else is a bug and keeps its traceback."""

import sys
from collections.abc import Callable


class HEALNetError(Exception):
    """A problem with the user's input, files or configuration that the message explains."""


def exit_code_of(command: Callable[[], int], prefix: str, debug: bool = False) -> int:
    """Run an entry point's command; a HEALNetError becomes one line on stderr ("PREFIX: message") and exit
    code 2, or keeps its traceback with `debug`."""
    try:
        return command()
    except HEALNetError as error:
        if debug:
            raise
        print(f"{prefix}: {error}", file=sys.stderr)
        return 2
