"""The installed version of spade_sc (recorded in every ``uns`` record and model file)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spade_sc")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
