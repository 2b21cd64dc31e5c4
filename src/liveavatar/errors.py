"""Errors a user can act on. The CLI prints their message as one ``error: ...`` line, without a traceback."""
from __future__ import annotations


class LiveAvatarError(Exception):
    """Something went wrong that the message fully explains; exit status 1."""

    exit_code = 1


class InputError(LiveAvatarError, ValueError):
    """A bad flag value or input file; the message names the input and what to do; exit status 2."""

    exit_code = 2


class CheckpointError(InputError):
    """A checkpoint piece is missing, truncated or does not match what the engine expects."""


class ArgumentError(InputError):
    """A bad value of a named argument. The Python API and the command line share the names (``num_clip``
    is the keyword and ``--num_clip`` the flag), so one message serves both: `str()` names the keyword,
    `as_flag()` the flag."""

    def __init__(self, argument: str, detail: str):
        self.argument, self.detail = argument, detail
        super().__init__(self._joined(argument))

    def as_flag(self) -> str:
        return self._joined(f"--{self.argument}")

    def _joined(self, name: str) -> str:
        """``name value: reason``, or ``name: reason`` when the detail names no value."""
        return f"{name}{'' if self.detail.startswith(':') else ' '}{self.detail}"
