"""Classical (no-learning) lesion segmentation baselines, evaluated like the learned models.

Each rule maps a study's SUV volume (and its organ label map) to a lesion mask on the stored grid:

| name               | rule                                                                              |
|--------------------|-----------------------------------------------------------------------------------|
| `suv>2.5`, `suv>4` | fixed threshold SUV > level                                                       |
| `41% SUVmax`       | components of SUV > 2.5 (18-connected); in each, the voxels ≥ 41 % of its SUVmax   |
| `suv>3 w/o organs` | SUV > 3 outside the organs whose median SUV exceeds 2 (high physiological uptake: |
|                    | brain, heart, kidneys, bladder, liver/spleen/salivary glands in PSMA, …)          |

The organ exclusion needs the record's `organs` map (`petfm.data.records`); a study without one (all zeros, as
for real autoPET data) gets the plain threshold. The 41 % rule is the usual automated form of the clinical
"41 % of SUVmax" delineation: the threshold only trims a component (a component whose SUVmax < 2.5 / 0.41
stays whole). `evaluate` scores every rule on a split with `petfm.eval.metrics.segmentation_metrics`, the
same per-study metrics and means as `petfm finetune`'s `results.json`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from petfm.eval import metrics as metrics_lib

CONNECTIVITY = ndimage.generate_binary_structure(3, 2)   # 18-connectivity, as the autoPET metrics


def threshold(suv: np.ndarray, level: float) -> np.ndarray:
  """SUV > level. suv (X, Y, Z) → bool (X, Y, Z)."""
  return np.asarray(suv) > level


def percent_of_max(suv: np.ndarray, fraction: float = 0.41, seed_level: float = 2.5) -> np.ndarray:
  """Per connected component of SUV > `seed_level`: its voxels with SUV ≥ `fraction` × the component's SUVmax.
  suv (X, Y, Z) → bool (X, Y, Z)."""
  suv = np.asarray(suv, np.float32)
  labels, count = ndimage.label(suv > seed_level, structure=CONNECTIVITY)
  if count == 0:
    return np.zeros(suv.shape, bool)
  peaks = np.zeros(count + 1, np.float32)
  np.maximum.at(peaks, labels.ravel(), suv.ravel())
  return (labels > 0) & (suv >= fraction * peaks[labels])


def organ_exclusion(suv: np.ndarray, organs: np.ndarray, level: float = 3.0,
                    organ_median: float = 2.0) -> np.ndarray:
  """SUV > `level` outside every organ label whose median SUV exceeds `organ_median`. suv, organs (X, Y, Z)
  → bool (X, Y, Z)."""
  suv, organs = np.asarray(suv), np.asarray(organs)
  ids = np.unique(organs)
  ids = ids[ids > 0]
  medians = ndimage.median(suv, organs, ids) if ids.size else []
  hot = [int(i) for i, m in zip(ids, np.atleast_1d(medians)) if m > organ_median]
  return (suv > level) & ~np.isin(organs, hot)


BASELINES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "suv>2.5": lambda suv, organs: threshold(suv, 2.5),
    "suv>4": lambda suv, organs: threshold(suv, 4.0),
    "41% SUVmax": lambda suv, organs: percent_of_max(suv),
    "suv>3 w/o organs": lambda suv, organs: organ_exclusion(suv, organs),
}


def study_rows(suv: np.ndarray, organs: np.ndarray, label: np.ndarray,
               spacing: Sequence[float]) -> dict[str, dict[str, float]]:
  """{baseline name: segmentation metrics of one study} (arrays (X, Y, Z) on the stored grid)."""
  truth = np.asarray(label) > 0
  return {name: metrics_lib.segmentation_metrics(rule(suv, organs), truth, spacing)
          for name, rule in BASELINES.items()}


def evaluate(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Every baseline on decoded records (fields study_id, suv, organs, label, spacing): {name: {metric means,
  "studies": per-study rows}}, the layout of a lesion `results.json`."""
  per_study: dict[str, list[dict[str, Any]]] = {name: [] for name in BASELINES}
  for record in records:
    rows = study_rows(record["suv"], record["organs"], record["label"], record["spacing"])
    for name, row in rows.items():
      per_study[name].append({"study_id": record["study_id"], **row})
  return {name: {**{k: s["mean"] for k, s in metrics_lib.aggregate(rows).items()}, "studies": rows}
          for name, rows in per_study.items()}
