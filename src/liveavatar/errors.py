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
