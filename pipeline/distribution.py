"""What this installation is: the distribution's name and version, read from package metadata.

The version is written once, in pyproject.toml; ``pipeline --version``, ``pipeline.__version__``
and whatever reports a build (logs, metrics) read it back here instead of repeating it. The
distribution is not called ``pipeline`` (that name is taken on the public package index), so
the look-up must use :data:`DISTRIBUTION`, not the import package's name.
"""

from __future__ import annotations

from functools import cache
from importlib import metadata

DISTRIBUTION = "binance-shm-pipeline"

#: reported when the package is imported from a source tree that was never installed
UNKNOWN_VERSION = "0+unknown"


@cache
def version() -> str:
    """The installed distribution's version, or :data:`UNKNOWN_VERSION` when not installed
    (running from a bare checkout must still start, and must not claim a version)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return UNKNOWN_VERSION
