"""``modelstock inspect URL``: a checkpoint's tensors from its headers alone, validated."""

from __future__ import annotations

import argparse
import json
from typing import Any

from modelstock.checkpoint.reader import open_checkpoint
from modelstock.planner import natural_key
from pipeline.cli.options import EXIT_OK, add_storage_option, parse_storage_options


def run(args: argparse.Namespace) -> int:
    checkpoint = open_checkpoint(args.url, parse_storage_options(args.storage_options))
    rows = sorted(checkpoint.tensors.values(), key=lambda loc: natural_key(loc.name))
    if args.json:
        print(json.dumps({
            "url": checkpoint.url,
            "total_bytes": checkpoint.total_bytes,
            "files": [{"url": fp.url, "size": fp.size, "etag": fp.etag, "header_sha256": fp.header_sha256}
                      for fp in checkpoint.files],
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


def add_command(sub: Any) -> None:
    inspect = sub.add_parser("inspect", help="list a checkpoint's tensors from its headers alone")
    inspect.add_argument("url")
    inspect.add_argument("--json", action="store_true")
    add_storage_option(inspect)
    inspect.set_defaults(handler=run)
