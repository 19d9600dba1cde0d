"""Where merges run: the embedded local Ray, an existing cluster (``--address``/``RAY_ADDRESS``),
``ray job submit`` entrypoints, and ready cluster configs (``cluster/configs``).

Importing this package changes nothing: Ray's environment is set where a session is made
(``cluster.session``), for that session only.
"""
