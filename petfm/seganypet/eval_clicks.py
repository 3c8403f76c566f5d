"""`petfm eval-clicks --checkpoint DIR --data_dir RECORDS --out DIR [--baseline]`: Dice and surface Dice
after 1, 3, 5 and 10 simulated clicks per target, for organs, lymph-node stations and lesions.

Every target of the split (each organ or node station of the organ map and each lesion component) is cropped
once by the evaluation crop pipeline with the model's crop size, spacing, channels and intensities
(`promptable.data_config_for`), centred on the target's centroid, then clicked up to the largest count: each
new click goes to the most interior voxel of the largest error component of the current mask
(`clicks.next_click`, deterministic; the first one is the target's most interior voxel), clicks accumulate,
and the model sees all clicks so far plus its previous low-res logits as the mask prompt. The mask after k
clicks is scored against the crop's truth (Dice, surface Dice at `--tolerance_mm`, crop spacing). Works for
both backbones (SAM-Med3D and the FratMAE twin) and for converted official checkpoints. `--baseline` also
scores the no-learning click baseline (`baseline.SuvThreshold`: SUV ≥ 41 % of the local SUVmax, the
component containing the click) on the same crops with its own simulated clicks.

Writes to OUT: `clicks.json` (one row per method and target), `clicks.md` (mean per category, per method;
then per target name) and `dice_vs_clicks.png`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from petfm import viz
from petfm.data import checks, pipelines, records
from petfm.errors import ArgumentParser, UserError
from petfm.eval import metrics, staging
from petfm.seganypet import baseline, clicks, promptable

CLICK_COUNTS = (1, 3, 5, 10)
CATEGORIES = ("organs", "node stations", "lesions")


def target_name(kind: int, ident: int, organ_labels: Mapping[str, str]) -> str:
  """'lesion', or the organ / node station name from the manifest's `organ_labels` ('organ N' if unnamed)."""
  if kind == records.TARGET_LESION:
    return "lesion"
  return organ_labels.get(str(ident), f"organ {ident}")


def category(kind: int, ident: int, stations: Mapping[int, str]) -> str:
  """One of `CATEGORIES`; `stations` is `staging.station_table(organ_labels)` (node stations: above/below)."""
  if kind == records.TARGET_LESION:
    return "lesions"
  return "node stations" if stations.get(ident) in ("above", "below") else "organs"


def click_scores(model: promptable.Segmenter | baseline.SuvThreshold, image: np.ndarray, truth: np.ndarray,
                 spacing: Sequence[float], counts: Sequence[int] = CLICK_COUNTS, tolerance_mm: float = 1.0
                 ) -> dict[str, float]:
  """One crop (S, S, S, C), truth (S, S, S) → {dice_k, surface_dice_k} for k in counts. `model` is anything
  with `session(image)` → clicks(points, labels) → mask."""
  segment = model.session(image)
  points, labels = [], []
  pred = np.zeros(truth.shape, bool)
  out = {}
  for k in range(1, max(counts) + 1):
    click = clicks.next_click(pred, truth)
    if click is not None:
      points.append(click[0])
      labels.append(click[1])
      pred = segment(points, labels)
    if k in counts:
      out[f"dice_{k}"] = metrics.dice(pred, truth)
      out[f"surface_dice_{k}"] = metrics.surface_dice(pred, truth, spacing, tolerance_mm)
  return out


def evaluate(model: promptable.Segmenter, data_dir: str, split: str = "test",
             counts: Sequence[int] = CLICK_COUNTS, tolerance_mm: float = 1.0,
             baselines: Sequence[baseline.SuvThreshold] = ()) -> list[dict]:
  """One row per method (the model, then `baselines`) and target of `split`: method, study index, kind, id,
  name, category and the scores of `click_scores`. Every method sees the model's crops."""
  if split not in records.read_manifest(data_dir)["splits"]:
    raise UserError(f"{data_dir}: has no split {split!r}")
  organ_labels = records.organ_labels(data_dir)
  stations = staging.station_table(organ_labels)
  methods = [(model.spec.backbone, model)] + [(b.name, b) for b in baselines]
  cfg = promptable.data_config_for(model.spec, data_dir)
  rows = []
  for batch in pipelines.crop_dataset(data_dir, split, cfg, seed=0, train=False, batch_size=1, shard_index=0,
                                      shard_count=1):
    if not batch["valid"][0]:
      continue
    kind, ident = int(batch["target_kind"][0]), int(batch["target_id"][0])
    truth = batch["mask"][0] > 0
    if not truth.any():
      continue
    for name, method in methods:
      row = {"method": name, "study": int(batch["index"][0]), "kind": kind, "id": ident,
             "name": target_name(kind, ident, organ_labels),
             "category": category(kind, ident, stations)}
      row.update(click_scores(method, batch["image"][0], truth, model.spec.spacing, counts, tolerance_mm))
      rows.append(row)
  if not rows:
    raise UserError(f"{data_dir}: split {split!r} has no targets to evaluate")
  return rows


def _means(rows: list[dict], counts: Sequence[int]) -> list[str]:
  stats = metrics.aggregate(rows)
  return [f"{stats[f'{m}_{k}']['mean']:.3f}" for m in ("dice", "surface_dice") for k in counts]


def table(rows: list[dict], counts: Sequence[int] = CLICK_COUNTS) -> str:
  """Markdown: mean Dice / surface Dice after each click count per method and category (and all targets),
  then per method and target name."""
  header = ["method", "targets", "n"] + [f"Dice@{k}" for k in counts] + [f"SD@{k}" for k in counts]
  head = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  methods = list(dict.fromkeys(r["method"] for r in rows))
  summary, detail = list(head), list(head)
  for method in methods:
    mine = [r for r in rows if r["method"] == method]
    for group in [c for c in CATEGORIES if any(r["category"] == c for r in mine)] + ["all"]:
      chosen = [r for r in mine if group in ("all", r["category"])]
      summary.append(f"| {method} | {group} | {len(chosen)} | " + " | ".join(_means(chosen, counts)) + " |")
    for name in sorted({r["name"] for r in mine}, key=lambda n: (n == "lesion", n)):
      chosen = [r for r in mine if r["name"] == name]
      detail.append(f"| {method} | {name} | {len(chosen)} | " + " | ".join(_means(chosen, counts)) + " |")
  return "\n".join(summary) + "\n\nPer target:\n\n" + "\n".join(detail) + "\n"


def write(rows: list[dict], out_dir: str, counts: Sequence[int] = CLICK_COUNTS) -> None:
  os.makedirs(out_dir, exist_ok=True)
  records.write_atomic(os.path.join(out_dir, "clicks.json"), json.dumps(rows, indent=1))
  records.write_atomic(os.path.join(out_dir, "clicks.md"), table(rows, counts))
  series = {}
  for method in dict.fromkeys(r["method"] for r in rows):
    mine = [r for r in rows if r["method"] == method]
    for group in sorted({r["category"] for r in mine}) + ["all"]:
      stats = metrics.aggregate([r for r in mine if group in ("all", r["category"])])
      series[f"{method}: {group}"] = (list(counts), [stats[f"dice_{k}"]["mean"] for k in counts])
  viz.line_plot(series, os.path.join(out_dir, "dice_vs_clicks.png"), "clicks", "Dice", "Dice vs clicks")


def main(argv: Sequence[str]) -> int:
  parser = ArgumentParser(prog="petfm eval-clicks", description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True,
                      help="train-seganypet workdir or convert-sam-med3d directory")
  parser.add_argument("--data_dir", required=True, help="ArrayRecord folder (petfm prepare)")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--split", default="test")
  parser.add_argument("--tolerance_mm", type=float, default=1.0, help="surface Dice tolerance")
  parser.add_argument("--baseline", action="store_true",
                      help="also score the no-learning SUV-threshold click baseline on the same crops")
  args = parser.parse_args(argv)
  checks.output_dir(args.out, "--out")
  records.read_manifest(args.data_dir)
  model = promptable.Segmenter.load(args.checkpoint)
  baselines = [baseline.SuvThreshold(model.spec)] if args.baseline else []
  rows = evaluate(model, args.data_dir, args.split, CLICK_COUNTS, args.tolerance_mm, baselines)
  write(rows, args.out)
  print(table(rows))
  return 0
