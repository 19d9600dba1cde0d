"""Where merges run: the embedded local Ray, an existing cluster (``--address``/``RAY_ADDRESS``),
``ray job submit`` entrypoints, and ready cluster configs (``cluster/configs``)."""

from cluster.ray_env import apply_ray_defaults

apply_ray_defaults()
