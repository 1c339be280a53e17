"""The one exception type that the CLI turns into a one-line message (no traceback unless --debug)."""

from __future__ import annotations


class DaaaError(Exception):
    """A user-facing error: bad input, bad option, missing file. The message names the file or option."""


class ConfigError(DaaaError):
    """An invalid configuration key or value."""


class DataError(DaaaError):
    """A missing, empty, corrupt or mismatched data set."""


class NonFiniteLossError(DaaaError):
    """A loss term became NaN or infinite; the last good checkpoint is kept."""


class PeerError(DaaaError):
    """Under torchrun: rank 0 failed at a step the other ranks wait for; rank 0 reports the error, the others
    stop quietly."""
