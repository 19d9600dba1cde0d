"""The ``modelstock`` command line.

This is the composition root: it builds validated configs from flags and YAML, asks ``cluster``
for a Ray session, and hands both to the pipeline. Exit codes: 0 success, 2 bad input or config
(one line on stderr, no traceback), 1 anything else.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import cluster  # noqa: F401  - sets Ray's environment defaults before ray is imported

from modelstock.errors import InputError, InvalidRecipe, ModelStockError

log = logging.getLogger("modelstock")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
OWN_LOGGERS = ("modelstock", "pipeline", "cluster")
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


def cmd_merge(args: argparse.Namespace) -> int:
    from cluster.session import ray_session
    from modelstock.recipe import load_recipe
    from pipeline.driver import MergeRequest, prepare_merge, run_merge

    request = MergeRequest(
        recipe=load_recipe(args.config),
        out_url=args.out_url,
        storage_options=parse_storage_options(args.storage_options),
        shard_size=args.shard_size,
        memory_budget=args.memory_budget,
        overwrite=args.overwrite,
        workers=args.workers,
        progress=not args.quiet,
        device=args.device,
    )
    prepared = prepare_merge(request)  # headers and plan first: bad input never waits for Ray
    with ray_session(args.address, num_cpus=args.workers, quiet=args.quiet):
        result = run_merge(request, prepared)
        if args.eval:  # evaluation of the merge just written, on the same Ray session
            from pipeline.cli_eval import evaluate_merged

            evaluate_merged(args, result.out_url)
    if result.already_complete:
        print(f"{result.out_url}: already complete (same recipe and inputs); nothing to do")
    else:
        print(
            f"{result.out_url}: merged {len(result.shards)} shards "
            f"({len(result.computed)} computed, {len(result.resumed)} resumed)"
        )
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from modelstock.checkpoint.reader import open_checkpoint
    from modelstock.layers import natural_key

    checkpoint = open_checkpoint(args.url, parse_storage_options(args.storage_options))
    rows = sorted(checkpoint.tensors.values(), key=lambda loc: natural_key(loc.name))
    if args.json:
        print(json.dumps({
            "url": checkpoint.url,
            "total_bytes": checkpoint.total_bytes,
            "files": [fp.__dict__ for fp in checkpoint.files],
            "tensors": [
                {"name": loc.name, "dtype": loc.entry.dtype, "shape": list(loc.entry.shape),
                 "bytes": loc.entry.nbytes, "file": loc.file.url}
                for loc in rows
            ],
        }, indent=1))
        return EXIT_OK
    width = max(len(loc.name) for loc in rows)
    for loc in rows:
        shape = "x".join(str(d) for d in loc.entry.shape) or "scalar"
        print(f"{loc.name:<{width}}  {loc.entry.dtype:<7} {shape:<20} {loc.entry.nbytes:>14,d}")
    print(f"{len(rows)} tensors, {checkpoint.total_bytes:,d} bytes in {len(checkpoint.files)} file(s); headers valid")
    return EXIT_OK


class _OneLineErrors(argparse.ArgumentParser):
    """Usage errors are bad input too: one line on stderr and exit code 2, not usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"modelstock: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's default must not overwrite a flag given before the subcommand.
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars, warnings only")
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    parser = _OneLineErrors(prog="modelstock", description=__doc__.splitlines()[0], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])  # type: ignore[method-assign]

    merge = sub.add_parser("merge", help="merge checkpoints as a recipe says")
    merge.add_argument("config", help="recipe YAML (mergekit schema)")
    merge.add_argument("out_url", help="output folder: local path or fsspec URL")
    merge.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded local Ray)")
    merge.add_argument("--workers", type=int, help="most shards merged at once (default: as many as Ray schedules)")
    merge.add_argument("--shard-size", type=parse_size, default="2GB", help="output shard size (default 2GB)")
    merge.add_argument("--memory-budget", type=parse_size, default="512MiB",
                       help="tensor memory per worker; bigger tensors are processed in chunks (default 512MiB)")
    merge.add_argument("--overwrite", action="store_true", help="replace whatever is at OUT_URL")
    merge.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                       help="where shards are merged: auto = GPUs when the cluster has them now; "
                            "gpu = one GPU per shard even on a cluster still scaling up")
    merge.add_argument("--storage-options", help="JSON of fsspec storage options for every URL")
    merge.add_argument("--eval", metavar="SUITE.yml", help="evaluate the merge on this eval suite (ID + OOD table)")
    merge.set_defaults(handler=cmd_merge)

    inspect = sub.add_parser("inspect", help="list a checkpoint's tensors from its headers alone")
    inspect.add_argument("url")
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--storage-options")
    inspect.set_defaults(handler=cmd_inspect)
    from pipeline import cli_eval

    cli_eval.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.quiet = getattr(args, "quiet", False)
    args.verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.verbose:
        # Our own debug output only: botocore at DEBUG logs signed request headers, session
        # tokens included, and credentials are never printed.
        for name in OWN_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        return args.handler(args)
    except InputError as exc:
        print(f"modelstock: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModelStockError as exc:
        print(f"modelstock: failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("modelstock: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
