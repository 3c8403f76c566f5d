r"""Does pre-training help? Lesion segmentation with few labels, from scratch vs pretrained, paired by seed.

COMMAND (writes WORKDIR/paper_table.md, .json and .png; rerunning resumes: finished runs are reused from their
JSON rows, an interrupted one continues from its checkpoints):
  PYTHONPATH=. python experiments/paper_table.py --workdir runs/paper_table [--data_dir demo_out/records] \
      [--size full|smoke]

Design. Each pre-training method (`experiments/fratmae.py:tiny,method=M`, on 64 × 64 crops at the records'
resolution: the geometry the fine-tune sees) is run once in WORKDIR/pretrain/M and reused by every row. Each
cell is a lesion fine-tune (`experiments/finetune.py:tiny,task=lesions` as it is, with the overrides below)
with `label_patients` = 1, 3 or 10 labelled training patients and a seed; the seed draws the labelled patients
(nested subsets), the init and the batch order, so `scratch` (protocol=scratch) and a pretrained method
(protocol=finetune from WORKDIR/pretrain/M) with the same (patients, seed) see the same labels and batches: a
pair. Runs go seed by seed, so an interrupted table holds complete pairs. Per pretrained method the table
gives the mean paired difference to scratch over all (patients, seed) pairs (and per label regime) with a 95 %
Student-t interval (`petfm.eval.metrics.paired_difference`), for lesion Dice and for the Ann Arbor stage given
by rule from the predicted lesion map. The rows that need no training come first: the classical rules of
`petfm.eval.baselines` (staged by the same rule on their masks) and the stage rule on the true lesion maps.
Metrics: test split, whole volumes, autoPET definitions.

Several drivers may share one workdir (on one machine): each claims a run by a lock file, passes over the
runs others hold and waits for them at the end; start the command twice to use two cores.
A run's row is cached in WORKDIR/rows/KEY.json together with its full config; a cached row or pretraining
whose config differs from the current one is an error (use a new workdir), never silently mixed in.
A missing `--data_dir` is generated as `make demo` does (`data_prep.synthetic`, 40 patients, 4 mm).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from petfm import config as config_lib  # noqa: E402
from petfm.errors import UserError  # noqa: E402

METHODS = ("scratch", "mae", "mae_ca", "fratmae_noca", "fratmae")
SIZES = {
    # 1 pretraining of 600 steps (batch 16), 18 fine-tunes of 200 steps (batch 8); time: see the README.
    "full": dict(methods=("scratch", "fratmae"), patients=(1, 3, 10), seeds=(0, 1, 2), pretrain_steps=600,
                 finetune_steps=200, eval_studies=0),
    # The end-to-end check: one pair of tiny runs.
    "smoke": dict(methods=("scratch", "fratmae"), patients=(1,), seeds=(0,), pretrain_steps=10,
                  finetune_steps=10, eval_studies=1, warmup_steps=2),
}
# Columns of a run's row: (key, label); `stage_accuracy` = Ann Arbor stage by rule from the predicted mask.
COLUMNS = (("dice", "Dice"), ("fpv_ml", "FPV mL"), ("fnv_ml", "FNV mL"), ("stage_accuracy", "stage acc."))
PAIRED = ("dice", "stage_accuracy")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size = arg or "full"
  if size not in SIZES:
    raise UserError(f"unknown table size {size!r}; known: {', '.join(SIZES)}")
  s = SIZES[size]
  c = ml_collections.ConfigDict()
  c.size = size
  c.methods = s["methods"]                # "scratch" first; the others are pretraining methods
  c.label_patients = s["patients"]        # labelled training patients per regime
  c.seeds = s["seeds"]
  # Dotted-name overrides of experiments/fratmae.py:tiny (pretraining) and experiments/finetune.py:tiny,
  # task=lesions (every cell; data_dir, seed, label_patients and init_from are set per run).
  # As (name, value) pairs (a ConfigDict takes no dotted keys).
  warmup = (("optim.warmup_steps", s["warmup_steps"]),) if "warmup_steps" in s else ()
  c.pretrain = (("total_steps", s["pretrain_steps"]), ("data.plane_size", (64, 64)), ("data.fit", "crop"),
                ("image_every_steps", 0), *warmup)
  c.finetune = (("total_steps", s["finetune_steps"]), ("checkpoint.every_steps", 50),
                ("eval.max_studies", s["eval_studies"]), *warmup)
  return c


def validate(table: ml_collections.ConfigDict) -> None:
  config_lib.check(bool(table.methods) and table.methods[0] == "scratch", "methods",
                   f"must start with 'scratch' (the paired control), got {list(table.methods)}")
  for method in table.methods:
    config_lib.check(method in METHODS, "methods", f"{method!r} is not one of {list(METHODS)}")
  counts = table.label_patients
  config_lib.check(bool(counts) and all(isinstance(n, int) and n > 0 for n in counts), "label_patients",
                   f"must be positive integers, got {list(counts)}")
  config_lib.check(bool(table.seeds) and len(set(table.seeds)) == len(table.seeds), "seeds",
                   f"must be distinct, got {list(table.seeds)}")


# ------------------------------------------------------------------------------------------------ runs


def _plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A config as JSON values (tuples become lists), for comparison with a stored one."""
  return json.loads(json.dumps(config.to_dict(), default=list))


def _cached(path: str, config: dict[str, Any], what: str) -> dict[str, Any] | None:
  """The stored JSON at `path` if it was made with `config`; None if there is none; an error if it differs."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    stored = json.load(f)
  if stored.get("config") != config:
    changed = sorted(k for k in {*config, *stored.get("config", {})}
                     if config.get(k) != stored.get("config", {}).get(k))
    raise UserError(f"{path}: {what} was made with another config (differs in {', '.join(changed)}); "
                    "use a new --workdir or delete it")
  return stored


def ensure_cohort(data_dir: str) -> None:
  """Generates and converts the `make demo` cohort when `data_dir` holds no dataset."""
  from petfm.data import records
  if os.path.exists(os.path.join(data_dir, records.MANIFEST)):
    return
  nifti = data_dir.rstrip("/") + "_nifti"
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=REPO, check=True)  # noqa: E731
  run("data_prep.synthetic", "--out", nifti, "--n", "40", "--seed", "0")
  run("data_prep.convert", "--input", nifti, "--output", data_dir)


@contextlib.contextmanager
def _claim(folder: str) -> Iterator[bool]:
  """Holds FOLDER.lock (holding this process id) while a run trains in `folder`; yields False when a live
  process on this machine holds it (a lock left by a dead process is taken over). Lets several drivers share
  one workdir."""
  path = folder.rstrip("/") + ".lock"
  os.makedirs(os.path.dirname(path), exist_ok=True)
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      break
    except FileExistsError:
      with open(path) as f:
        pid = int(f.read().strip() or 0)
      try:
        os.kill(pid, 0)
        alive = pid > 0
      except ProcessLookupError:
        alive = False
      except PermissionError:
        alive = True
      if alive:
        yield False
        return
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
  else:
    yield False
    return
  os.write(fd, str(os.getpid()).encode())
  os.close(fd)
  try:
    yield True
  finally:
    os.remove(path)


def pretrain_run(table: ml_collections.ConfigDict, method: str, data_dir: str, workdir: str) -> str | None:
  """WORKDIR/pretrain/METHOD, pretrained once (resumed from its checkpoints if interrupted); None while
  another driver trains it."""
  from petfm.data import records
  from petfm.train import pretrain
  folder = os.path.join(workdir, "pretrain", method)
  config = config_lib.load_config(os.path.join(REPO, "experiments", f"fratmae.py:tiny,method={method}"),
                                  {**dict(table.pretrain), "data_dir": data_dir})
  done = os.path.join(folder, "done.json")
  if _cached(done, _plain(config), f"pretraining {method}") is not None:
    return folder
  with _claim(folder) as mine:
    if not mine:
      return None
    metrics = pretrain.train(config, folder)
    records.write_atomic(done, json.dumps({"config": _plain(config), "metrics": metrics}, default=float))
  return folder


def run_key(method: str, patients: int, seed: int) -> str:
  return f"{method}_n{patients}_s{seed}"


def finetune_run(table: ml_collections.ConfigDict, method: str, patients: int, seed: int, init_from: str,
                 data_dir: str, workdir: str) -> dict[str, float] | None:
  """One cell's row {COLUMNS key: value, "seconds"}, from WORKDIR/rows/KEY.json or by fine-tuning in
  WORKDIR/runs/KEY (resuming its checkpoints); None while another driver trains it."""
  from petfm.data import records
  from petfm.train import finetune
  protocol = "scratch" if method == "scratch" else "finetune"
  config = config_lib.load_config(
      os.path.join(REPO, "experiments", f"finetune.py:tiny,task=lesions,protocol={protocol}"),
      {**dict(table.finetune), "data_dir": data_dir, "seed": seed, "label_patients": patients,
       "init_from": init_from})
  key = run_key(method, patients, seed)
  path = os.path.join(workdir, "rows", f"{key}.json")
  plain = _plain(finetune.resolve(config))
  stored = _cached(path, plain, f"run {key}")
  if stored is not None:
    return stored["row"]
  folder = os.path.join(workdir, "runs", key)
  with _claim(folder) as mine:
    if not mine:
      return None
    start = time.perf_counter()
    results = finetune.train(config, folder)
    rule = results.get("staging_by_rule", {}).get("from_prediction", {})
    row = {k: float(results[k]) for k, _ in COLUMNS if k in results}
    row["stage_accuracy"] = float(rule.get("accuracy", float("nan")))
    row["seconds"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(path), exist_ok=True)
    records.write_atomic(path, json.dumps({"config": plain, "row": row}, indent=1))
  return row


def reference_rows(data_dir: str) -> dict[str, dict[str, float]]:
  """Rows that need no training, on the test split: each classical lesion rule of `petfm.eval.baselines`
  (stage: the Ann Arbor rule of `petfm.eval.staging` on its mask) and the stage rule on the true lesion maps
  (the upper bound of staging by rule)."""
  import numpy as np

  from petfm.data import records
  from petfm.downstream import data as ddata
  from petfm.eval import baselines, staging
  fields = ("study_id", "suv", "organs", "label", "spacing", "stage")
  chosen = list(ddata.read_records(data_dir, "test", fields))
  stations = staging.station_table(records.read_manifest(data_dir).get("organ_labels", {}))
  staged = [r for r in chosen if r["stage"] in (1, 2, 3, 4)]

  def accuracy(masks: list[np.ndarray]) -> float:
    if not stations or not staged:
      return float("nan")
    stages = [staging.stage_from_sites(staging.involved_sites(m, r["organs"]), stations)
              for m, r in zip(masks, staged)]
    return float(np.mean(np.asarray(stages) == np.array([r["stage"] for r in staged])))

  rows = {}
  for name, result in baselines.evaluate(chosen).items():
    rule = baselines.BASELINES[name]
    rows[f"{name} (no learning)"] = {
        **{k: float(result[k]) for k in ("dice", "fpv_ml", "fnv_ml")},
        "stage_accuracy": accuracy([rule(r["suv"], r["organs"]) for r in staged])}
  rows["stage rule on true lesions"] = {"stage_accuracy": accuracy([r["label"] for r in staged])}
  return rows


def paired_rows(table: ml_collections.ConfigDict, runs: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
  """Per pretrained method and metric of PAIRED: the paired difference to scratch over every finished
  (patients, seed) pair ("patients": "all") and per label regime."""
  from petfm.eval import metrics as metrics_lib
  out = []
  for method in table.methods[1:]:
    for regime in ("all", *table.label_patients):
      pairs = [(runs[run_key(method, n, s)], runs[run_key("scratch", n, s)])
               for n in table.label_patients for s in table.seeds if regime in ("all", n)
               if run_key(method, n, s) in runs and run_key("scratch", n, s) in runs]
      if pairs:
        treated, control = zip(*pairs)
        diffs = {m: metrics_lib.paired_difference([r[m] for r in treated], [r[m] for r in control])
                 for m in PAIRED}
        out.append({"method": method, "patients": regime, **diffs})
  return out


def run_table(table: ml_collections.ConfigDict, data_dir: str, workdir: str, poll_s: float = 30.0
              ) -> dict[str, Any]:
  """Runs (or reuses) every pretraining and cell, seed by seed, rewriting the table after each; returns the
  table's JSON: reference rows, per-run rows, paired differences. A pretraining is started when its first cell
  is due; cells (and pretrainings) that another driver is training are passed over and waited for (polled
  every `poll_s` seconds) at the end, so several drivers can share the workdir."""
  validate(table)
  ensure_cohort(data_dir)
  results = {"size": table.size, "data_dir": data_dir, "reference": reference_rows(data_dir), "runs": {},
             "paired": []}
  start = time.perf_counter()
  pending = [(m, n, s) for s in table.seeds for n in table.label_patients for m in table.methods]
  init = {"scratch": ""}
  while pending:
    for method, patients, seed in pending:
      if method not in init and (folder := pretrain_run(table, method, data_dir, workdir)) is not None:
        init[method] = folder
      row = None if method not in init else finetune_run(table, method, patients, seed, init[method],
                                                         data_dir, workdir)
      if row is not None:
        pending.remove((method, patients, seed))
        results["runs"][run_key(method, patients, seed)] = row
        results["paired"] = paired_rows(table, results["runs"])
        results["minutes"] = (time.perf_counter() - start) / 60
        write_table(table, results, workdir)
        break
    else:
      time.sleep(poll_s)
  return results


# ------------------------------------------------------------------------------------------------ output


def _mean_std(values: list[float]) -> str:
  from petfm.eval import metrics as metrics_lib
  stats = metrics_lib.aggregate([{"v": v} for v in values]).get("v")
  if not stats or stats["n"] == 0:
    return "n/a"
  return f"{stats['mean']:.3g}" if stats["n"] < 2 else f"{stats['mean']:.3g} ± {stats['std']:.2g}"


def write_table(table: ml_collections.ConfigDict, results: dict[str, Any], workdir: str) -> str:
  """WORKDIR/paper_table.md (mean ± sample std over seeds; paired differences with 95 % t-intervals), .json
  and .png; returns the Markdown."""
  from petfm.data import records
  runs = results["runs"]
  header = ["Pre-training", "labelled patients", *(label for _, label in COLUMNS), "seeds"]
  lines = [f"Lesion fine-tunes on the test split (size `{table.size}`, {len(runs)} runs, "
           f"{results.get('minutes', 0):.1f} min). Mean ± std over seeds; stage acc. = Ann Arbor stage by "
           "rule from the lesion mask.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, row in results["reference"].items():
    lines.append("| " + " | ".join([name, "0", *(_mean_std([row[k]] if k in row else [])
                                                  for k, _ in COLUMNS), "–"]) + " |")
  for method in table.methods:
    for n in table.label_patients:
      done = [runs[run_key(method, n, s)] for s in table.seeds if run_key(method, n, s) in runs]
      if done:
        cells = [method, str(n), *(_mean_std([r[k] for r in done]) for k, _ in COLUMNS), str(len(done))]
        lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Paired difference to scratch (same labelled patients, seed and batches): mean [95 % "
            "Student-t interval].", "",
            "| Pre-training − scratch | labelled patients | Δ Dice | Δ stage acc. | pairs |",
            "|---|---|---|---|---|"]
  for p in results["paired"]:
    cells = [f"{p[m]['mean']:+.3f} [{p[m]['low']:+.3f}, {p[m]['high']:+.3f}]" for m in PAIRED]
    lines.append(f"| {p['method']} | {p['patients']} | {' | '.join(cells)} | {p['dice']['n']} |")
  markdown = "\n".join(lines) + "\n"
  records.write_atomic(os.path.join(workdir, "paper_table.md"), markdown)
  records.write_atomic(os.path.join(workdir, "paper_table.json"), json.dumps(results, indent=1))
  _plot(table, results, os.path.join(workdir, "paper_table.png"))
  return markdown


def _plot(table: ml_collections.ConfigDict, results: dict[str, Any], path: str) -> None:
  """Lesion Dice against labelled patients per method (mean ± std over seeds); classical rules as lines."""
  import numpy as np
  from matplotlib.figure import Figure

  from petfm import viz
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for method in table.methods:
    points = [(n, [results["runs"][k]["dice"] for s in table.seeds
                   if (k := run_key(method, n, s)) in results["runs"]]) for n in table.label_patients]
    points = [(n, v) for n, v in points if v]
    if points:
      ax.errorbar([n for n, _ in points], [np.mean(v) for _, v in points],
                  yerr=[np.std(v, ddof=1) if len(v) > 1 else 0.0 for _, v in points], marker="o", capsize=3,
                  label=method)
  for name, row in results["reference"].items():
    if "dice" in row:
      ax.axhline(row["dice"], ls="--", lw=0.8, color="grey")
      ax.annotate(name, (table.label_patients[0], row["dice"]), fontsize=6, color="grey")
  ax.set_xscale("log")
  ax.set_xlabel("labelled training patients")
  ax.set_ylabel("lesion Dice (test split)")
  ax.legend(fontsize=8)
  viz.save_figure(fig, path)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="experiments/paper_table.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="folder of all runs and the table")
  parser.add_argument("--data_dir", default="demo_out/records",
                      help="converted cohort (generated when missing)")
  parser.add_argument("--size", default="full", choices=tuple(SIZES))
  args = parser.parse_args(argv)
  import jax
  # Runs of one method share their programs: the persistent compilation cache skips recompiling them.
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(args.workdir, ".jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  try:
    table = get_config(args.size)
    run_table(table, args.data_dir, args.workdir)
  except UserError as e:
    print(f"paper_table: error: {e}", file=sys.stderr)
    return 2
  with open(os.path.join(args.workdir, "paper_table.md")) as f:
    print(f.read())
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
