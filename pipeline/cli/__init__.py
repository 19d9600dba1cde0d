"""The ``modelstock`` command line.

This is the composition root: each command (one module each) builds validated configs from
flags and YAML, asks ``cluster`` for a Ray session and hands both to the pipeline. Exit codes:
0 success, 2 bad input or config (one line on stderr, no traceback), 1 anything else.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Sequence

from modelstock.errors import InputError, ModelStockError
from pipeline.cli import demo, evaluate, inspect, merge, methods, search, soup
from pipeline.cli.options import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, OneLineErrors

OWN_LOGGERS = ("modelstock", "pipeline", "cluster")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's default must not overwrite a flag given before the subcommand.
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars, warnings only")
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    parser = OneLineErrors(prog="modelstock", description="Merge fine-tuned checkpoints on Ray.", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])  # type: ignore[method-assign,list-item]
    for command in (merge, inspect, methods, evaluate, soup, search, demo):
        command.add_command(sub)
    return parser


def configure_logging(quiet: bool, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if verbose:
        # Our own debug output only: botocore at DEBUG logs signed request headers, session
        # tokens included, and credentials are never printed.
        for name in OWN_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quiet = getattr(args, "quiet", False)
    args.verbose = getattr(args, "verbose", False)
    configure_logging(args.quiet, args.verbose)
    try:
        return int(args.handler(args))
    except InputError as exc:
        print(f"modelstock: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModelStockError as exc:
        print(f"modelstock: failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("modelstock: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
