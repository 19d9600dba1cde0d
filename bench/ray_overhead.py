"""What the embedded Ray costs before any merge work: start the same local Ray as ``modelstock
merge`` does, run one task per worker that imports what a shard task imports (torch and the
worker module), and shut down. ``modelstock merge`` wall time minus this is the merge itself.

    python bench/ray_overhead.py [--workers N]
"""

from __future__ import annotations

import argparse
import os

import ray

from cluster.session import ray_session


@ray.remote(num_cpus=1)
def warm_worker() -> int:
    import torch  # noqa: F401

    import pipeline.worker  # noqa: F401

    return os.getpid()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    with ray_session(num_cpus=args.workers, quiet=True) as session:
        count = args.workers or int(session.cpus) or 1
        ray.get([warm_worker.remote() for _ in range(count)])


if __name__ == "__main__":
    main()
