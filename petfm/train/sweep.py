"""Runs the sweep declared in a config file and writes its table.

  petfm sweep --config experiments/fratmae.py:tiny --workdir runs/sweep [--config.FIELD=VALUE ...]

The config file declares `sweep(add)`; every `add(**overrides)` is one run (dotted names allowed, e.g.
`add(**{"model.norm_pix_loss": False})`). Each run trains in `WORKDIR/<name>` (resuming if interrupted), is
scored by `pretrain.evaluate`, and the table is rewritten after each run: `WORKDIR/sweep.md` (Markdown) and
`WORKDIR/sweep.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
from absl import flags

from petfm import config as config_lib
from petfm.data import records
from petfm.errors import UserError
from petfm.train import pretrain

COLUMNS = (("rec_pet", "PET rec. loss"), ("rec_ct", "CT rec. loss"), ("probe_tracer_accuracy", "tracer probe acc."),
           ("probe_chance", "chance"))


def declared_runs(config_path: str) -> list[dict[str, Any]]:
  """The override dicts that the config file's `sweep(add)` declares."""
  module = config_lib.load_module(config_path)
  if not hasattr(module, "sweep"):
    raise UserError(f"{config_path}: declares no sweep(add) function")
  runs: list[dict[str, Any]] = []
  module.sweep(lambda **overrides: runs.append(overrides))
  if not runs:
    raise UserError(f"{config_path}: sweep(add) added no runs")
  return runs


def run_name(overrides: dict[str, Any]) -> str:
  return ",".join(f"{k}={v}" for k, v in overrides.items())


def markdown_table(rows: list[dict[str, Any]], keys: list[str]) -> str:
  head = [*keys, *(label for _, label in COLUMNS)]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    cells = [str(row["overrides"][k]) for k in keys]
    cells += [f"{row['metrics'][m]:.4f}" if m in row["metrics"] else "–" for m, _ in COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def run_sweep(config: ml_collections.ConfigDict, config_path: str, workdir: str) -> list[dict[str, Any]]:
  runs = declared_runs(config_path)
  keys = list(dict.fromkeys(k for overrides in runs for k in overrides))
  rows = []
  for overrides in runs:
    name = run_name(overrides)
    run_config = config_lib.override(config, overrides)
    run_dir = os.path.join(workdir, name)
    print(f"== {name}", flush=True)
    pretrain.train(run_config, run_dir)
    rows.append({"overrides": overrides, "metrics": pretrain.evaluate(run_config, run_dir)})
    records.write_atomic(os.path.join(workdir, "sweep.json"), json.dumps(rows, indent=2))
    records.write_atomic(os.path.join(workdir, "sweep.md"), markdown_table(rows, keys))
  print(markdown_table(rows, keys))
  return rows


def main(argv: list[str]) -> int:
  def define(fv):
    flags.DEFINE_string("workdir", None, "folder for the runs and the table", flag_values=fv)
  parsed = config_lib.parse_command_line(argv, "sweep", define)
  if not parsed.workdir:
    raise UserError("--workdir is required")
  config_path = config_lib.config_path(argv)
  run_sweep(parsed.config, config_path, parsed.workdir)
  return 0
