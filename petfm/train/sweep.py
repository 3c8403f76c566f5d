"""Runs the sweep declared in a config file and writes its table.

  petfm sweep --config experiments/fratmae.py:tiny --workdir runs/sweep [--config.FIELD=VALUE ...]
      [--only mask_ratio=0.5,0.9 --only mask_mode=one_visible]

The config file declares `sweep(add)`; every `add(**overrides)` is one run (dotted names allowed, e.g.
`add(**{"model.norm_pix_loss": False})`). `--only KEY=V1,V2,...` (repeatable) keeps the runs whose KEY is one
of the values, for every KEY given (a subset of the sweep, e.g. for a quick look or one run per machine).
Each run trains in `WORKDIR/<name>` (resuming if interrupted), is scored by `pretrain.evaluate`, and the table
is rewritten after each run: `WORKDIR/sweep.md` (Markdown) and `WORKDIR/sweep.json`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import flags

from petfm import config as config_lib
from petfm.data import checks, records
from petfm.errors import UserError
from petfm.train import pretrain

COLUMNS = (("rec_pet", "PET rec. loss"), ("rec_ct", "CT rec. loss"),
           ("probe_tracer_accuracy", "tracer probe acc."), ("probe_chance", "chance"))


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


def select_runs(runs: list[dict[str, Any]], only: Mapping[str, Sequence[Any]] | None) -> list[dict[str, Any]]:
  """The runs whose value of every key in `only` is one of its listed values (all runs when `only` is empty).

  Values match by equality or, for values given as strings (the command line), by their text: `"0.5"` selects
  0.5. A key that no run sets, or a filter that leaves no run, raises `UserError`.
  """
  keys = {k for overrides in runs for k in overrides}
  for key in only or {}:
    if key not in keys:
      raise UserError(f"--only {key}: not a swept field; the sweep sets {', '.join(sorted(keys))}")

  def matches(value: Any, wanted: Sequence[Any]) -> bool:
    return any(value == w or (isinstance(w, str) and _same_text(value, w)) for w in wanted)

  kept = [o for o in runs if all(k in o and matches(o[k], v) for k, v in (only or {}).items())]
  if not kept:
    raise UserError(f"--only {dict(only)}: selects none of the {len(runs)} runs")
  return kept


def _same_text(value: Any, text: str) -> bool:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    try:
      return float(text) == value
    except ValueError:
      return False
  return str(value) == text


def parse_only(specs: Sequence[str]) -> dict[str, list[str]]:
  """`["mask_ratio=0.5,0.9", "mask_mode=one_visible"]` → `{"mask_ratio": ["0.5", "0.9"], ...}`."""
  out: dict[str, list[str]] = {}
  for spec in specs:
    key, sep, values = spec.partition("=")
    if not sep or not key.strip() or not values.strip():
      raise UserError(f"--only {spec!r}: expected KEY=VALUE[,VALUE...]")
    out.setdefault(key.strip(), []).extend(v.strip() for v in values.split(","))
  return out


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


def run_sweep(config: ml_collections.ConfigDict, config_path: str, workdir: str,
              only: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
  """Trains and evaluates the declared runs (those `only` selects, see `select_runs`) on top of `config`;
  returns the table rows `{"overrides": ..., "metrics": ...}`, also written to WORKDIR/sweep.{md,json}."""
  runs = select_runs(declared_runs(config_path), only)
  keys = list(dict.fromkeys(k for overrides in runs for k in overrides))
  rows = []
  for overrides in runs:
    name = run_name(overrides)
    run_config = config_lib.override(config, overrides)
    run_dir = os.path.join(workdir, name)
    print(f"== {name}", flush=True)
    pretrain.train(run_config, run_dir)
    rows.append({"overrides": overrides, "metrics": pretrain.evaluate(run_config, run_dir)})
    if jax.process_index() == 0:   # one writer on multi-host runs
      records.write_atomic(os.path.join(workdir, "sweep.json"), json.dumps(rows, indent=2))
      records.write_atomic(os.path.join(workdir, "sweep.md"), markdown_table(rows, keys))
  print(markdown_table(rows, keys))
  return rows


def main(argv: list[str]) -> int:
  def define(fv):
    flags.DEFINE_multi_string("only", [], "KEY=V1,V2: run only the declared runs with KEY in the values "
                              "(repeatable; all keys must match)", flag_values=fv)
  parsed = config_lib.parse_command_line(argv, "sweep", define, workdir="folder for the runs and the table")
  config_path = config_lib.config_path(argv)
  with checks.discarded_on_error(parsed.workdir):
    run_sweep(parsed.config, config_path, parsed.workdir, parse_only(parsed.only))
  return 0
