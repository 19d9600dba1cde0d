"""How a merge runs on Ray: the planner, the shard workers, the driver, evaluation dispatch, the CLI."""
