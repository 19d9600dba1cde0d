"""``modelstock demo``: the main job end to end on data that ships with installed packages."""
