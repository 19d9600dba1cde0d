"""What every command shares: exit codes, option types and the options declared once here."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from typing import Any, NoReturn

from modelstock.errors import InvalidRecipe

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '512MiB' -> 512 * 2**20, '1000' -> 1000."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 512MiB)")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    binary = "I" in unit
    letter = unit[:1] if unit[:1] in "KMGT" else ""
    scale = 1024 ** "KMGT".index(letter) * 1024 if binary and letter else _UNITS[letter]
    value = int(number * scale)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def parse_storage_options(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRecipe(f"--storage-options: not valid JSON ({exc.msg})") from None
    if not isinstance(options, dict):
        raise InvalidRecipe("--storage-options: must be a JSON object")
    return options


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


@dataclass(frozen=True)
class RunOptions:
    """Where and how a command runs: Ray address, workers, storage options, progress output."""

    address: str | None
    workers: int | None
    storage_options: dict[str, Any]
    quiet: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        return cls(
            address=getattr(args, "address", None),
            workers=getattr(args, "workers", None),
            storage_options=parse_storage_options(getattr(args, "storage_options", None)),
            quiet=bool(getattr(args, "quiet", False)),
        )

    @property
    def progress(self) -> bool:
        return not self.quiet


def add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-options", help="JSON of fsspec storage options for every URL")


def add_ray_options(parser: argparse.ArgumentParser, workers_help: str) -> None:
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray); "
                                          "a cluster with token auth needs RAY_AUTH_MODE=token and the token "
                                          "(RAY_AUTH_TOKEN_PATH, RAY_AUTH_TOKEN or ~/.ray/auth_token)")
    parser.add_argument("--workers", type=positive_int, help=workers_help)
    add_storage_option(parser)


class OneLineErrors(argparse.ArgumentParser):
    """Usage errors are bad input too: one line on stderr and exit code 2, not usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"modelstock: error: {message} (see: {self.prog} --help)\n")
