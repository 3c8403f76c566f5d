"""Runner of the downstream comparison table declared in `experiments/paper_table.py` (see its docstring).

Every run lives in its own folder under the workdir; a run with `results.json` (fine-tuning) or `done.json`
(pretraining) is skipped, any other one is (re)started and resumes from its checkpoints. The table is
rewritten after every run, so a partial table is always on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np

from petfm import config as config_lib
from petfm.data import records
from petfm.errors import UserError
from petfm.eval import baselines, staging
from petfm.eval import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLUMNS = (("lesions", "dice", "Dice"), ("lesions", "fpv_ml", "FPV mL"), ("lesions", "fnv_ml", "FNV mL"),
           ("staging", "accuracy", "stage acc."), ("staging", "macro_auc", "stage AUC"))


def _slug(name: str) -> str:
  return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


def ensure_cohort(data_dir: str, patients: int) -> None:
  """Generates and converts the synthetic cohort when `data_dir` holds no dataset (30 % of the patients in the
  test split, so that staging metrics have a few studies per class)."""
  if os.path.exists(os.path.join(data_dir, records.MANIFEST)):
    return
  nifti = data_dir.rstrip("/") + "_nifti"
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=REPO, check=True)
  run("data_prep.synthetic", "--out", nifti, "--n", str(patients), "--seed", "0")
  run("data_prep.convert", "--input", nifti, "--output", data_dir, "--config.val_fraction=0",
      "--config.test_fraction=0.3")


def pretrain_run(table: Any, method: str, view: str, data_dir: str, workdir: str) -> str:
  from petfm.train import pretrain
  folder = os.path.join(workdir, "pretrain", f"{method}_{view}")
  if not os.path.exists(os.path.join(folder, "done.json")):
    config = config_lib.load_config(
        os.path.join(REPO, "experiments", f"fratmae.py:tiny,method={method},view={view}"),
        {**dict(table.pretrain), "data_dir": data_dir})
    metrics = pretrain.train(config, folder)
    records.write_atomic(os.path.join(folder, "done.json"), json.dumps(metrics))
  return folder


def finetune_run(table: Any, task: str, protocol: str, method: str, view: str, fraction: float, seed: int,
                 init_from: str, data_dir: str, folder: str) -> dict[str, Any]:
  from petfm.train import finetune
  done = os.path.join(folder, "results.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  arg = f"tiny,task={task},protocol={protocol},method={method},view={view},fraction={fraction}"
  config = config_lib.load_config(os.path.join(REPO, "experiments", f"finetune.py:{arg}"),
                                  {**dict(table[task]), "data_dir": data_dir, "seed": seed,
                                   "init_from": init_from})
  return finetune.train(config, folder)


def reference_rows(data_dir: str, fractions: Any) -> dict[str, dict[str, list[float]]]:
  """Rows that need no training, on the test split: each classical lesion rule of `petfm.eval.baselines`
  (staging columns: the Ann Arbor rule of `petfm.eval.staging` on its mask), and the staging rule on the true
  lesion maps (the upper bound). The same values at every label fraction (no labels are used)."""
  from petfm.downstream import data as ddata
  fields = ("study_id", "suv", "organs", "label", "spacing", "stage")
  chosen = list(ddata.read_records(data_dir, "test", fields))
  stations = staging.station_table(records.read_manifest(data_dir).get("organ_labels", {}))
  staged = [r for r in chosen if r["stage"] in (1, 2, 3, 4)]

  def stage_metrics(masks: list[np.ndarray]) -> dict[str, float]:
    if not stations or not staged:
      return {}
    stages = [staging.stage_from_sites(staging.involved_sites(m, r["organs"]), stations)
              for m, r in zip(masks, staged)]
    return metrics_lib.classification_metrics(np.eye(4)[np.asarray(stages) - 1],
                                              np.array([r["stage"] - 1 for r in staged]))

  rows = {}
  for name, result in baselines.evaluate(chosen).items():
    values = {f"lesions/{m}": result[m] for m in ("dice", "fpv_ml", "fnv_ml")}
    rule = baselines.BASELINES[name]
    values.update({f"staging/{k}": v for k, v in stage_metrics([rule(r["suv"], r["organs"])
                                                                 for r in staged]).items()})
    rows[f"{name} (no learning)"] = values
  truth = stage_metrics([r["label"] for r in staged])
  if truth:
    rows["stage rule on true lesions"] = {f"staging/{k}": v for k, v in truth.items()}
  shown = {f"{task}/{metric}" for task, metric, _ in COLUMNS}
  return {name: {f"{key}@{f:g}": [float(v)] for key, v in values.items() if key in shown for f in fractions}
          for name, values in rows.items()}


def run_table(table: Any, data_dir: str, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every run of the table; returns {row: {f"{task}/{metric}@{fraction}": [per seed]}},
  the `reference_rows` first."""
  ensure_cohort(data_dir, table.cohort_patients)
  results: dict[str, dict[str, list[float]]] = reference_rows(data_dir, table.fractions)
  start = time.perf_counter()
  for name, kind, method, view in table.rows:
    init_from = pretrain_run(table, method, view, data_dir, workdir) if kind == "pretrained" else ""
    protocol = "finetune" if kind == "pretrained" else "scratch"
    row = results.setdefault(name, {})
    for fraction in table.fractions:
      for seed in table.seeds:
        for task in ("lesions", "staging"):
          folder = os.path.join(workdir, "finetune", _slug(name), f"{task}_f{fraction:g}_s{seed}")
          out = finetune_run(table, task, protocol, method, view, fraction, seed, init_from, data_dir, folder)
          for t, metric, _ in COLUMNS:
            if t == task:
              row.setdefault(f"{task}/{metric}@{fraction:g}", []).append(float(out[metric]))
          write_table(table, results, workdir, time.perf_counter() - start)
  return results


def write_table(table: Any, results: dict[str, Any], workdir: str, seconds: float) -> str:
  """WORKDIR/paper_table.md (mean ± std over seeds), .json (per-seed values) and .png; returns the
  Markdown."""
  header = ["Pre-training"] + [f"{label} @{int(f * 100)} %"
                               for f in table.fractions for _, _, label in COLUMNS]
  lines = [f"Downstream comparison on the synthetic cohort (tiny models, {len(table.seeds)} seed(s), "
           f"size `{table.size}`, {seconds / 60:.1f} min). Mean ± std over seeds.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, row in results.items():
    cells = [name]
    for fraction in table.fractions:
      for task, metric, _ in COLUMNS:
        values = row.get(f"{task}/{metric}@{fraction:g}", [])
        stats = metrics_lib.aggregate([{"v": v} for v in values]).get("v") if values else None
        if not stats or stats["n"] == 0:
          cells.append("n/a")
        elif np.isnan(stats["std"]):
          cells.append(f"{stats['mean']:.3g}")
        else:
          cells.append(f"{stats['mean']:.3g} ± {stats['std']:.2g}")
    lines.append("| " + " | ".join(cells) + " |")
  markdown = "\n".join(lines) + "\n"
  records.write_atomic(os.path.join(workdir, "paper_table.md"), markdown)
  records.write_atomic(os.path.join(workdir, "paper_table.json"), json.dumps(results, indent=1))
  _plot(table, results, os.path.join(workdir, "paper_table.png"))
  return markdown


def _plot(table: Any, results: dict[str, Any], path: str) -> None:
  from matplotlib.figure import Figure

  from petfm import viz
  panels = (("lesions/dice", "lesion Dice"), ("staging/macro_auc", "staging AUC"))
  fig = Figure(figsize=(11, 3.8))
  axes = fig.subplots(1, len(panels))
  names = list(results)
  width = 0.8 / len(table.fractions)
  for ax, (key, title) in zip(axes, panels):
    for i, fraction in enumerate(table.fractions):
      values = [results[n].get(f"{key}@{fraction:g}", []) for n in names]
      stats = [metrics_lib.aggregate([{"v": x} for x in v]).get("v", {}) for v in values]
      means = [s.get("mean", np.nan) for s in stats]
      stds = [0.0 if np.isnan(s.get("std", np.nan)) else s["std"] for s in stats]
      ax.bar(np.arange(len(names)) + i * width, means, width, yerr=stds,
             label=f"{int(fraction * 100)} % labels")
    ax.set_xticks(np.arange(len(names)) + width * (len(table.fractions) - 1) / 2)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_title(title)
    ax.legend(fontsize=8)
  viz.save_figure(fig, path)


def cli(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="experiments/paper_table.py", description=__doc__)
  parser.add_argument("--workdir", required=True, help="folder of all runs and the table")
  parser.add_argument("--data_dir", default="demo_out/records",
                      help="converted cohort (generated when missing)")
  parser.add_argument("--size", default="full", choices=("full", "reduced"))
  args = parser.parse_args(argv)
  table = config_lib.load_module(os.path.join(REPO, "experiments", "paper_table.py")).get_config(args.size)
  # Runs of one row share their programs: the persistent compilation cache skips recompiling them.
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(args.workdir, ".jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  try:
    run_table(table, args.data_dir, args.workdir)
  except UserError as e:
    print(f"paper_table: error: {e}", file=sys.stderr)
    return 2
  with open(os.path.join(args.workdir, "paper_table.md")) as f:
    print(f.read())
  return 0
