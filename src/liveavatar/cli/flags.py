"""How every ``liveavatar`` command spells and parses its flags."""
from __future__ import annotations

import argparse

from liveavatar.errors import InputError
from liveavatar.options import parse_bool
from liveavatar.settings import parse_vram_budget


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def bool_arg(text: str) -> bool:
    """argparse type of a boolean flag's value: True/False, 1/0, yes/no."""
    try:
        return parse_bool(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def byte_amount(flag: str, text: str | None) -> int | None:
    """The bytes of an amount flag (``--gpu-memory 24GiB``), or None when it was not given."""
    if text is None:
        return None
    try:
        return parse_vram_budget(text)
    except InputError:
        raise InputError(f"--{flag} {text!r}: expected an amount such as 24GiB, 22.5GiB or 16000MiB") from None


def add_flag(parser, name: str, **kwargs) -> argparse.Action:
    """Register ``--name`` under both spellings (``--sample_steps`` and ``--sample-steps``)."""
    spellings = [f"--{name}"]
    for other in (name.replace("_", "-"), name.replace("-", "_")):
        if f"--{other}" not in spellings:
            spellings.append(f"--{other}")
    return parser.add_argument(*spellings, dest=name.replace("-", "_"), **kwargs)


def add_bool_flag(parser, name: str, help: str) -> argparse.Action:
    """A boolean flag: alone it means True; it also takes True/False, 1/0, yes/no."""
    return add_flag(parser, name, type=bool_arg, nargs="?", const=True, default=None, metavar="BOOL", help=help)


def add_no_compile_flag(parser) -> argparse.Action:
    """``--no-compile``: the DiT runs eagerly (the compiled fast path is the default on CUDA GPUs)."""
    from liveavatar.runtime.compile import COMPILE_ENV

    return add_flag(parser, "no-compile", action="store_true",
                    help=f"run the DiT eagerly instead of compiled (also {COMPILE_ENV}=0); the compiled "
                         f"path's first run compiles for up to about a minute and caches the result on disk")


def add_attention_flag(parser) -> argparse.Action:
    """``--attention``: the blocks' self-attention, bf16 (the reference's) or quantised int8 / fp8."""
    from liveavatar.options import ATTENTION_MODES, DEFAULTS

    return add_flag(parser, "attention", choices=ATTENTION_MODES, default=DEFAULTS.attention,
                    help="the blocks' self-attention: bf16 (default, exact, as the reference), or opt-in int8 / "
                         "fp8 (SageAttention2's quantisation; see the README on its quality); bf16 with a notice "
                         "where the GPU has no FP8 tensor cores")
