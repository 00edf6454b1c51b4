"""HEALNet multimodal survival library."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("healnet-mlops")  # one definition: pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
