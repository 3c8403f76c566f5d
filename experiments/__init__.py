"""Experiment configs (ml-collections, `--config experiments/NAME.py:ARG`) and their shared base, `common`."""
