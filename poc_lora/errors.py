"""One exception family for mistakes a user can fix.

The CLI turns a :class:`PocLoraError` into ``error: <message>`` and a non-zero exit code,
without a traceback; anything else is a bug and raises normally. Messages name the file,
key, field or record index at fault so the user knows where to look.
"""

from __future__ import annotations


class PocLoraError(Exception):
    """Base class for user-facing errors (bad config, bad data, bad adapter, bad output)."""


class ConfigError(PocLoraError):
    """A YAML config, a command-line override or an argument is invalid."""


class DataError(PocLoraError):
    """A data file is missing, unreadable, empty or has malformed records."""


class AdapterError(PocLoraError):
    """An adapter directory is missing, malformed, unsafe or incompatible with the others."""


class OutputError(PocLoraError):
    """The output location cannot be used (exists without --overwrite, lies inside an input...)."""
