"""Command-line mistakes: one line on stderr and exit status 2, never a traceback.

Every command (`mdkv <subcommand>`, `python -m mdkv_compile.assets`) parses with `ArgumentParser`
(argparse's, with its errors on one line) and checks its cheap arguments before it loads a model,
raising `UsageError` for what the user must fix; its `run` is decorated with `command`, which turns
that into the line and the status. The argparse `type=` helpers here say what was wrong with which value.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

T = TypeVar("T")

USAGE_STATUS = 2


class UsageError(Exception):
    """A mistake in a command's arguments or inputs, reported as one line (no traceback)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser; a bad argument is one line naming it (and --help), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_STATUS, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def command(prog: str) -> Callable[[Callable[[argparse.Namespace], int | None]], Callable[[argparse.Namespace], int]]:
    """Decorator of a command's `run(args)`: its exit status, and a UsageError it raises becomes
    `prog: error: ...` on stderr and status 2."""

    def wrap(run: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def checked(args: argparse.Namespace) -> int:
            try:
                return int(run(args) or 0)
            except UsageError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return USAGE_STATUS

        return checked

    return wrap


# --- argparse types ------------------------------------------------------------------------------


def _number(kind: Callable[[str], T], text: str) -> T:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an int' if kind is int else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive int")
    return value


def non_negative_int(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def fraction(text: str) -> float:
    """A float in (0, 1] (a budget)."""
    value = _number(float, text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


def unit_interval(text: str) -> float:
    """A float in [0, 1] (a depth, an F1 threshold)."""
    value = _number(float, text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1]")
    return value


def device(text: str) -> str:
    """A torch device that exists here ("cpu", "cuda", "cuda:1")."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: there is no CUDA GPU here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA GPUs here")
    return text


def csv(item: Callable[[str], T]) -> Callable[[str], list[T]]:
    """A comma list, each item checked by `item` (one of the types above, or int/float/str); empty
    items are skipped, an empty list is an error."""

    def parse(text: str) -> list[T]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list")
        if item in (int, float):
            return [_number(item, p) for p in parts]
        return [item(p) for p in parts]

    return parse


# --- checks after parsing --------------------------------------------------------------------------


def existing_file(path: str | Path, flag: str) -> Path:
    """`path` as a Path, or UsageError naming the flag when it is not a file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"{flag} {path}: {'is a folder' if p.is_dir() else 'no such file'}")
    return p


def writable_file(path: str | Path, flag: str) -> Path:
    """An output file path: not a folder, and its parent, if it exists, is a folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file path")
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
    return p


def output_folder(path: str | Path, flag: str) -> Path:
    """An output folder path: not an existing file, nor below one."""
    p = Path(path).expanduser()
    for a in (p.absolute(), *p.absolute().parents):
        if a.exists():
            if not a.is_dir():
                raise UsageError(f"{flag} {path}: {a} is a file, not a folder")
            break
    return p


def check(condition: bool, message: str) -> None:
    """UsageError(message) unless `condition`."""
    if not condition:
        raise UsageError(message)


def as_usage_error(exc: BaseException) -> UsageError:
    """A library's own error (a bad config value, a missing file) as this command's one line."""
    return UsageError(str(exc.args[0]) if len(exc.args) == 1 else str(exc))


__all__ = [
    "ArgumentParser", "UsageError", "as_usage_error", "check", "csv", "existing_file", "fraction",
    "command", "device", "non_negative_int", "output_folder", "positive_int", "unit_interval",
    "writable_file",
]
