"""The set-up commands: ``doctor``, ``download`` and ``make-tiny``."""
from __future__ import annotations

import argparse
from pathlib import Path

from liveavatar.cli.flags import add_flag
from liveavatar.cli.generate import SETTING_DEFAULTS


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "ckpt_dir", default=str(SETTING_DEFAULTS["ckpt_dir"]), metavar="DIR", help="the Wan2.2-S2V-14B folder")
    add_flag(parser, "lora_path_dmd", default=SETTING_DEFAULTS["lora"], metavar="PATH_OR_ID", help="the LoRA")


def run_doctor(args: argparse.Namespace) -> int:
    from liveavatar.doctor import report_lines

    lines, healthy = report_lines(Path(args.ckpt_dir), args.lora_path_dmd)
    print("\n".join(lines))
    return 0 if healthy else 1


def add_download_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", default="ckpt", help="target folder (default ./ckpt)")
    add_flag(parser, "quiet", action="store_true", help="no progress bars")
    add_flag(parser, "base-revision", metavar="REV", help="commit, branch or tag of Wan-AI/Wan2.2-S2V-14B "
             "(default: the pinned one, printed)")
    add_flag(parser, "lora-revision", metavar="REV", help="commit, branch or tag of Quark-Vision/Live-Avatar "
             "(default: the pinned one, printed)")


def run_download(args: argparse.Namespace) -> int:
    from liveavatar.checkpoints.download import download_checkpoints
    from liveavatar.checkpoints.layout import BASE_REPO, LORA_REPO

    layout = download_checkpoints(args.dir, progress=not args.quiet,
                                  revisions={BASE_REPO: args.base_revision, LORA_REPO: args.lora_revision})
    print(f"base model: {layout.ckpt_dir}\nLoRA: {layout.lora}")
    print(f"next: liveavatar generate --ckpt_dir {layout.ckpt_dir} --image IMAGE --audio AUDIO")
    return 0


def add_make_tiny_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="target folder; gets Wan2.2-S2V-14B/ and LiveAvatar/liveavatar.safetensors")
    add_flag(parser, "seed", type=int, default=0, help="seed of the random weights (default 0)")


def run_make_tiny(args: argparse.Namespace) -> int:
    from liveavatar.models.tiny import make_tiny_checkpoints

    layout = make_tiny_checkpoints(args.dir, seed=args.seed)
    print(f"base model: {layout.ckpt_dir}\nLoRA: {layout.lora}")
    print(f"try: liveavatar generate --ckpt_dir {layout.ckpt_dir} --lora_path_dmd {layout.lora} "
          f"--image IMAGE --audio AUDIO --dtype float32 --dry-run")
    return 0
