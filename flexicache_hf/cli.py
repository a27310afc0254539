"""`flexicache` command line: demo, profile, eval.

Also the argument checks the subcommands share: every bad argument is refused while parsing (argparse's
usage error, exit 2), never after a model has loaded.
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "demo": ("flexicache_hf.demo", "pass-key retrieval on a real model: dense vs FlexiCache"),
    "profile": ("flexicache_hf.profile_cli", "record head stability and write a profile JSON"),
    "eval": ("flexicache_hf.eval_cli", "accuracy retention: FlexiCache vs dense and peer methods"),
}


# ---------------------------------------------------------------------------------------------------
# shared argument checks (argparse `type=` functions raise ArgumentTypeError: argparse names the flag)
# ---------------------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None  # not a number at all: the same message
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def csv_of(item):
    """`type=` for a comma-separated list whose every item is checked by `item` (a `type=` function)."""

    def parse(text: str) -> list:
        values = [item(x.strip()) for x in text.split(",") if x.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} lists nothing: give comma-separated values")
        return values

    return parse


def available_device(text: str) -> str:
    """`type=` for --device: a torch device that exists on this machine."""
    import torch

    try:
        kind = torch.device(text).type
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine: use --device cpu")
    return text


def check_knobs(parser: argparse.ArgumentParser, **knobs) -> None:
    """Refuse FlexiCache knobs that FlexiCacheConfig would refuse later, with its rule (written once there)."""
    from flexicache_hf.config import FlexiCacheConfig

    try:
        FlexiCacheConfig(**knobs)
    except ValueError as e:
        # the config names its field ("FlexiCacheConfig.page_size=3"); the user typed the flag ("--page-size 3")
        message = str(e)
        for name in knobs:
            message = message.replace(f"FlexiCacheConfig.{name}=", f"--{name.replace('_', '-')} ")
        parser.error(message)


def load_profile(parser: argparse.ArgumentParser, path: str):
    """The HeadProfile in the JSON file `path` (--profile), or a usage error naming the file."""
    from flexicache_hf.profiles import HeadProfile

    try:
        return HeadProfile.load(path)
    except OSError as e:  # missing, unreadable
        parser.error(f"--profile {path}: {e.strerror}: give the path of a head profile JSON "
                     "(`flexicache profile` writes one), or leave --profile out for the shipped one")
    except ValueError as e:  # not a profile: HeadProfile.load names the file and the expected shape
        parser.error(f"--profile: {e}")


# ---------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:10s} {text}" for name, (_, text) in COMMANDS.items())
    return argparse.ArgumentParser(
        prog="flexicache", usage="flexicache {" + ",".join(COMMANDS) + "} [options]",
        description="commands:\n" + listing + "\n\nflexicache <command> -h describes its options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        _parser().print_help()
        return 0
    if not argv:
        _parser().error("a command is needed: " + ", ".join(COMMANDS))
    if argv[0] not in COMMANDS:
        _parser().error(f"unknown command {argv[0]!r}: use one of " + ", ".join(COMMANDS))
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
