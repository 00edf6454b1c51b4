"""The one base of the library's exceptions: an entry point catches `HEALNetError` once and prints its
message, which names the problem; anything else is a bug and keeps its traceback."""


class HEALNetError(Exception):
    """A problem with the user's input, files or configuration that the message explains."""
