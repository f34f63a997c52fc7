"""Hydra config tree of nstjax (config.yaml, its groups, experiment presets)."""
