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


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's pre-emption): the step loop wrote a checkpoint at the current step.
    A BaseException, like KeyboardInterrupt, so no ``except Exception`` swallows it; the CLI prints ``message`` and
    exits with 128 + ``signum`` (130, 143)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.message, self.signum = message, signum
