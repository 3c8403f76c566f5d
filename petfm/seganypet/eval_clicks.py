"""`petfm eval-clicks --checkpoint DIR --data_dir RECORDS --out DIR`: Dice and surface Dice after 1, 3, 5 and
10 simulated clicks per target.

Every target of the split (each organ of the organ map and each lesion component) is cropped once by the
evaluation crop pipeline with the model's crop size, spacing, channels and intensities
(`promptable.data_config_for`), embedded once, then clicked up to the largest count: each new click goes to
the most interior voxel of the largest error component of the current mask (`clicks.next_click`,
deterministic), clicks accumulate, and the previous low-res logits are the mask prompt. The mask after k
clicks is scored against the crop's truth (Dice, surface Dice at `--tolerance_mm`, crop spacing). Works for
both backbones (SAM-Med3D and the FratMAE twin) and for converted official checkpoints.

Writes to OUT: `clicks.json` (one row per target), `clicks.md` (mean per organ / lesion and overall) and
`dice_vs_clicks.png`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from data_prep.anatomy import ORGAN_LABELS
from petfm import viz
from petfm.data import checks, pipelines, records
from petfm.errors import ArgumentParser, UserError
from petfm.eval import metrics
from petfm.seganypet import clicks, promptable

CLICK_COUNTS = (1, 3, 5, 10)


def target_name(kind: int, ident: int) -> str:
  if kind == records.TARGET_LESION:
    return "lesion"
  return ORGAN_LABELS.get(ident, f"organ {ident}")


def click_scores(model: promptable.ClickModel, image: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                 counts: Sequence[int] = CLICK_COUNTS, tolerance_mm: float = 1.0) -> dict[str, float]:
  """One crop (S, S, S, C), truth (S, S, S) → {dice_k, surface_dice_k} for k in counts."""
  embedding = model.embed(image)
  points, labels, low = [], [], None
  pred = np.zeros(truth.shape, bool)
  out = {}
  for k in range(1, max(counts) + 1):
    click = clicks.next_click(pred, truth)
    if click is not None:
      points.append(click[0])
      labels.append(click[1])
      low = model.predict(embedding, points, labels, low)
      pred = model.upsample(low) > 0
    if k in counts:
      out[f"dice_{k}"] = metrics.dice(pred, truth)
      out[f"surface_dice_{k}"] = metrics.surface_dice(pred, truth, spacing, tolerance_mm)
  return out


def evaluate(model: promptable.ClickModel, data_dir: str, split: str = "test",
             counts: Sequence[int] = CLICK_COUNTS, tolerance_mm: float = 1.0) -> list[dict]:
  """One row per target of `split`: study index, kind, id, name and the scores of `click_scores`."""
  if split not in records.read_manifest(data_dir)["splits"]:
    raise UserError(f"{data_dir}: has no split {split!r}")
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
    row = {"study": int(batch["index"][0]), "kind": kind, "id": ident, "name": target_name(kind, ident)}
    row.update(click_scores(model, batch["image"][0], truth, model.spec.spacing, counts, tolerance_mm))
    rows.append(row)
  if not rows:
    raise UserError(f"{data_dir}: split {split!r} has no targets to evaluate")
  return rows


def table(rows: list[dict], counts: Sequence[int] = CLICK_COUNTS) -> str:
  """Markdown: mean Dice / surface Dice after each click count, per target name and overall."""
  names = sorted({r["name"] for r in rows}, key=lambda n: (n == "lesion", n))
  header = ["target", "n"] + [f"Dice@{k}" for k in counts] + [f"SD@{k}" for k in counts]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name in names + ["all"]:
    group = [r for r in rows if name in ("all", r["name"])]
    stats = metrics.aggregate(group)
    cells = [f"{stats[f'{m}_{k}']['mean']:.3f}" for m in ("dice", "surface_dice") for k in counts]
    lines.append(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write(rows: list[dict], out_dir: str, label: str, counts: Sequence[int] = CLICK_COUNTS) -> None:
  os.makedirs(out_dir, exist_ok=True)
  records.write_atomic(os.path.join(out_dir, "clicks.json"), json.dumps(rows, indent=1))
  records.write_atomic(os.path.join(out_dir, "clicks.md"), table(rows, counts))
  series = {}
  for name in sorted({r["name"] for r in rows}) + ["all"]:
    group = metrics.aggregate([r for r in rows if name in ("all", r["name"])])
    series[f"{label}: {name}"] = (list(counts), [group[f"dice_{k}"]["mean"] for k in counts])
  viz.line_plot(series, os.path.join(out_dir, "dice_vs_clicks.png"), "clicks", "Dice", "Dice vs clicks")


def main(argv: Sequence[str]) -> int:
  parser = ArgumentParser(prog="petfm eval-clicks", description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True,
                      help="train-seganypet workdir or convert-sam-med3d directory")
  parser.add_argument("--data_dir", required=True, help="ArrayRecord folder (petfm prepare)")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--split", default="test")
  parser.add_argument("--tolerance_mm", type=float, default=1.0, help="surface Dice tolerance")
  args = parser.parse_args(argv)
  checks.output_dir(args.out, "--out")
  records.read_manifest(args.data_dir)
  model = promptable.ClickModel.load(args.checkpoint)
  rows = evaluate(model, args.data_dir, args.split, CLICK_COUNTS, args.tolerance_mm)
  write(rows, args.out, model.spec.backbone)
  print(table(rows))
  return 0
