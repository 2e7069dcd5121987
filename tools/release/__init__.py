"""Release chores: one version for every package (``bump_version``)."""
