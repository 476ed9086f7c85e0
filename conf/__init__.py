"""Hydra configs, packaged so a non-editable install finds them (pkg://calibbench.conf)."""
