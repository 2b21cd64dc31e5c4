"""The ``liveavatar`` command.

Each subcommand is a ``Command``: a function that adds its arguments and a handler that runs it. Handlers
import heavy modules (torch, the models) themselves, so ``liveavatar --help`` stays fast. A new command
is one more entry in ``COMMANDS``.

Errors the user can act on (``LiveAvatarError``, ``ValueError``, ``OSError``) print one ``error: ...``
line and exit 2 (bad input) or 1; anything else prints one line too (under torchrun only the output rank
prints). ``--debug`` or ``LIVEAVATAR_DEBUG=1``
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from liveavatar import __version__
from liveavatar.cli.bench import add_bench_arguments, run_bench
from liveavatar.cli.flags import OneLineParser
from liveavatar.cli.generate import add_generate_arguments, run_generate
from liveavatar.cli.launch import is_quiet_rank
from liveavatar.cli.plan import add_plan_arguments, run_plan
from liveavatar.cli.serve import add_serve_arguments
from liveavatar.cli.serve_cluster import serve_command
from liveavatar.cli.tools import (add_doctor_arguments, add_download_arguments, add_make_tiny_arguments,
                                  run_doctor, run_download, run_make_tiny)
from liveavatar.errors import ArgumentError, LiveAvatarError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = [
    Command("generate", "make a talking-avatar video from an image and speech", add_generate_arguments,
            run_generate),
    Command("doctor", "report the Python/torch/GPU setup and checkpoint completeness", add_doctor_arguments,
            run_doctor),
    Command("download", "download the checkpoints from the Hugging Face Hub", add_download_arguments,
            run_download),
    Command("make-tiny", "write tiny random checkpoints in the release's layout (tests, demos)",
            add_make_tiny_arguments, run_make_tiny),
    Command("plan", "predict the GPU memory of a run and choose the fastest placement that fits", add_plan_arguments,
            run_plan),
    Command("bench", "time the engine at full size with random weights (no checkpoint needed)", add_bench_arguments,
            run_bench),
    Command("serve", "serve a web page, a jobs API and a live WebSocket session on one loaded engine (or many: "
            "--cluster)", add_serve_arguments, serve_command),
]


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks (also LIVEAVATAR_DEBUG=1)")
    parser = OneLineParser(prog="liveavatar", parents=[debug], allow_abbrev=False,
                     description="Streaming inference engine for Live Avatar (Wan2.2-S2V-14B + Live-Avatar LoRA).")
    parser.add_argument("--version", action="version", version=f"liveavatar {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=OneLineParser)
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.help, parents=[debug],
                                  allow_abbrev=False)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so the same cleanup runs (no final-named partial file)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


def _values_may_start_with_a_dash(argv: list[str]) -> list[str]:
    """``--size -704*384`` as ``--size=-704*384``: argparse takes a token starting with '-' (other than a plain
    negative number) for an option and says "expected one argument"; joined, the value gets its own check."""
    joined, index = [], 0
    while index < len(argv):
        token = argv[index]
        following = argv[index + 1] if index + 1 < len(argv) else ""
        if token.startswith("--") and "=" not in token and re.match(r"-\d", following):
            joined.append(f"{token}={following}")
            index += 2
        else:
            joined.append(token)
            index += 1
    return joined


def main(argv: list[str] | None = None) -> int:
    argv = _values_may_start_with_a_dash(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LIVEAVATAR_DEBUG", "").lower() in ("1", "true", "yes")
    previous = {signum: signal.signal(signum, _terminate) for signum in (signal.SIGTERM, signal.SIGHUP)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not hasattr(args, "run"):
            parser.error(f"choose a command: {', '.join(command.name for command in COMMANDS)}")
        return args.run(args)
    except BrokenPipeError:
        # The reader went away (``liveavatar plan | head``): not an error; stay quiet at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as error:
        if debug:
            raise
        if isinstance(error, Terminated):
            print(f"error: terminated ({error})", file=sys.stderr)
            return 128 + error.signum
        if not is_quiet_rank():
            print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        if not is_quiet_rank():  # under torchrun the output rank reports the run's error
            print(f"error: {_one_line(error)}", file=sys.stderr)
        if isinstance(error, LiveAvatarError):
            return error.exit_code
        return 2 if isinstance(error, ValueError) else 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _one_line(error: Exception) -> str:
    text = " ".join((error.as_flag() if isinstance(error, ArgumentError) else str(error)).split())
    if isinstance(error, (LiveAvatarError, ValueError, OSError)):
        return text or type(error).__name__
    return f"unexpected {type(error).__name__}: {text} (run with --debug for the traceback)"
