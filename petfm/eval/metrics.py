"""Segmentation and staging metrics (numpy/scipy).

Masks are arrays of any rank (2-D slices, 3-D volumes) with nonzero = foreground; `spacing` is the voxel size
in mm along each array axis. Conventions for empty masks (`pred` = prediction, `truth` = ground truth):

| metric | both empty | truth empty, pred not | pred empty, truth not |
|---|---|---|---|
| `dice` | NaN | 0 | 0 |
| `false_positive_volume` (mL) | 0 | volume of pred | 0 |
| `false_negative_volume` (mL) | NaN | NaN | volume of truth |
| `hd95`, `hausdorff_distance` (mm) | NaN | inf | inf |
| `surface_dice` | NaN | 0 | 0 |

NaN means "undefined, leave out of the mean" (`aggregate` skips it and counts it); inf means "no surface to
match", which `aggregate` keeps so that a missed study cannot improve a mean. Dice follows SAM-Med3D
(`metric_utils.py`: NaN when both are empty, 0 when only the truth is). FPV/FNV follow the autoPET challenge
evaluation (lab-midas/autoPET `val_script.py`; autoPET III `evaluation_metrics.py`): components found with
18-connectivity (faces and edges; in 2-D, 8-connectivity), a prediction component is false positive when it
shares no voxel with the truth, a truth component is false negative when it shares no voxel with the
prediction, and FNV is NaN for a study without lesions (autoPET III). Note that autoPET III also leaves Dice
NaN for every study without lesions; here such a study scores 0 when anything was predicted (FPV measures it
too).

Surface metrics follow DeepMind's `surface_distance` (which SAM-Med3D uses for NSD): the surface points are
the voxel corners whose 2x2(x2) neighbourhood holds both foreground and background, each weighted by the area
of the marching-squares/cubes surface around it, with exact Euclidean distances in mm to the nearest surface
point of the other mask. HD95 is the larger of the two directed area-weighted 95th percentiles; NSD is the
fraction of both surfaces' area within the tolerance of the other surface. The points and distances are the
same as `surface_distance`'s, and so are the areas in 2-D and for 192 of the 256 3-D neighbourhoods (all 160
with planar surfaces among them); the other 64 have non-planar polygons that are triangulated differently, so
in 3-D NSD agrees to about 1e-3 and HD95 to a small fraction of a voxel (tests/test_metrics.py). medpy's
`hd95` differs by definition: it takes the percentile of both directions pooled, over unweighted boundary
voxels (as MONAI's NSD does), which at 1 mm tolerance on a 1.5 mm grid gives very different NSD.
"""

from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage, stats

from petfm.errors import UserError


def _masks(pred, truth) -> tuple[np.ndarray, np.ndarray]:
  """Boolean masks cropped to the bounding box of their union, which changes none of the metrics here."""
  pred, truth = np.asarray(pred) != 0, np.asarray(truth) != 0
  if pred.shape != truth.shape:
    raise UserError(f"metrics: prediction shape {pred.shape} differs from truth shape {truth.shape}")
  if pred.ndim == 0:
    raise UserError("metrics: masks must be arrays with at least one axis, got scalars")
  box = ndimage.find_objects((pred | truth).view(np.uint8))
  return (pred[box[0]], truth[box[0]]) if box else (pred, truth)


def _spacing(spacing, ndim: int) -> np.ndarray:
  try:
    values = np.asarray(spacing, np.float64).reshape(-1)
  except (TypeError, ValueError):
    values = np.zeros(0)
  if values.size != ndim or not np.all(np.isfinite(values) & (values > 0)):
    raise UserError(f"metrics: spacing {spacing!r} must be {ndim} positive finite sizes in mm, one per axis")
  return values


def _voxel_ml(spacing: np.ndarray) -> float:
  return float(np.prod(spacing)) / 1000.0


def dice(pred, truth) -> float:
  """Dice 2|P∩T| / (|P|+|T|) of two masks of equal shape; NaN when both are empty."""
  pred, truth = _masks(pred, truth)
  total = np.count_nonzero(pred) + np.count_nonzero(truth)
  return float("nan") if total == 0 else 2.0 * np.count_nonzero(pred & truth) / total


def _unmatched_voxels(mask: np.ndarray, other: np.ndarray) -> int:
  """Number of voxels in the connected components of `mask` (18-connectivity in 3-D) that share no voxel with
  `other`."""
  connectivity = ndimage.generate_binary_structure(mask.ndim, min(2, mask.ndim))
  labels, count = ndimage.label(mask, structure=connectivity)
  if count == 0:
    return 0
  matched = np.zeros(count + 1, bool)
  matched[labels[other]] = True
  sizes = np.bincount(labels.ravel(), minlength=count + 1)
  return int(sizes[1:][~matched[1:]].sum())


def false_positive_volume(pred, truth, spacing) -> float:
  """autoPET false-positive volume in mL: total volume of the prediction's components that miss the truth."""
  pred, truth = _masks(pred, truth)
  return _unmatched_voxels(pred, truth) * _voxel_ml(_spacing(spacing, pred.ndim))


def false_negative_volume(pred, truth, spacing) -> float:
  """autoPET false-negative volume in mL: total volume of the truth's components the prediction misses.

  NaN when the truth is empty (no lesion to miss), as in the autoPET III evaluation.
  """
  pred, truth = _masks(pred, truth)
  voxel_ml = _voxel_ml(_spacing(spacing, pred.ndim))
  return float("nan") if not truth.any() else _unmatched_voxels(truth, pred) * voxel_ml


@functools.cache
def _element_normals(ndim: int) -> np.ndarray:
  """Surface elements of a unit cell for every configuration of its corners (marching squares / cubes).

  A cell joins 2**ndim neighbouring voxel centres; bit i of a configuration is set when corner i (C order over
  the (2,)*ndim cell) is foreground. The surface crosses every cell edge between foreground and background at
  its midpoint; on a face whose two foreground corners are diagonal, the corners of the label that is rarer in
  the cell are cut off. The elements are contour segments (2-D) or the triangles of a fan over each polygon
  (3-D), each given by its normal vector whose length is its area in a unit cell.
  Returns (2**2**ndim, max elements, ndim), zero-padded.
  """
  corners = list(itertools.product((0, 1), repeat=ndim))
  square = [(0, 0), (1, 0), (1, 1), (0, 1)]  # cyclic order
  faces = [square] if ndim == 2 else [[tuple(int(x) for x in np.insert(c, axis, side)) for c in square]
                                      for axis in range(3) for side in (0, 1)]
  table = []
  for code in range(2 ** len(corners)):
    inside = {c: bool(code >> i & 1) for i, c in enumerate(corners)}
    cut_off = sum(inside.values()) <= len(corners) // 2
    segments = []
    for face in faces:
      midpoint = [tuple((np.add(face[m], face[(m + 1) % 4])) / 2) for m in range(4)]  # of edge m -> m+1
      crossed = [m for m in range(4) if inside[face[m]] != inside[face[(m + 1) % 4]]]
      if len(crossed) == 2:
        segments.append((midpoint[crossed[0]], midpoint[crossed[1]]))
      elif len(crossed) == 4:
        segments += [(midpoint[m - 1], midpoint[m]) for m in range(4) if inside[face[m]] == cut_off]
    if ndim == 2:
      normals = [(p[1] - q[1], q[0] - p[0]) for p, q in segments]
    else:
      normals = [0.5 * np.cross(np.subtract(b, loop[0]), np.subtract(c, loop[0]))
                 for loop in _loops(segments) for b, c in zip(loop[1:-1], loop[2:])]
    table.append(normals)
  out = np.zeros((len(table), max(map(len, table)), ndim))
  for code, normals in enumerate(table):
    out[code, :len(normals)] = np.reshape(normals, (-1, ndim))
  return out


def _loops(segments: list[tuple[tuple, tuple]]) -> list[list[tuple]]:
  """Closed polygons (vertex lists) from segments where every vertex has two segments."""
  neighbours = collections.defaultdict(list)
  for p, q in segments:
    neighbours[p].append(q)
    neighbours[q].append(p)
  loops, seen = [], set()
  for start in neighbours:
    if start in seen:
      continue
    loop = [start]
    seen.add(start)
    while unseen := [q for q in neighbours[loop[-1]] if q not in seen]:
      loop.append(unseen[0])
      seen.add(unseen[0])
    loops.append(loop)
  return loops


def _surface_areas(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
  """Surface area (mm², or contour length in mm for 2-D masks) in each cell of the voxel-centre grid.

  Cell c joins voxels c-1 and c along every axis (the mask is padded with background), so the result has shape
  mask.shape + 1; the cell is a surface point (at the voxel corner in its centre) when its area is nonzero.
  """
  padded = np.pad(mask, 1).astype(np.uint8)
  codes = np.zeros(tuple(n + 1 for n in mask.shape), np.uint8)
  for bit, corner in enumerate(itertools.product((0, 1), repeat=mask.ndim)):
    codes |= padded[tuple(slice(o, o + n + 1) for o, n in zip(corner, mask.shape))] << bit
  # An element's normal scales with the product of the spacings along the other axes.
  areas = np.linalg.norm(_element_normals(mask.ndim) * (np.prod(spacing) / spacing), axis=-1).sum(-1)
  return areas[codes]


_Surface = tuple[np.ndarray, np.ndarray]  # (distances in mm, areas) of the surface points of one mask


def _surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: np.ndarray) -> tuple[_Surface, _Surface]:
  """((distances, areas) of the pred surface points, (distances, areas) of the truth surface points).

  Distances in mm to the nearest surface point of the other mask; inf when the other mask is empty. An empty
  mask has no surface points (empty arrays). The masks come from `_masks`, so the grid of cells spans both
  surfaces.
  """
  if pred.ndim not in (2, 3):
    raise UserError(f"metrics: surface metrics need 2-D or 3-D masks, got {pred.ndim}-D")
  pred_areas, truth_areas = _surface_areas(pred, spacing), _surface_areas(truth, spacing)
  on_pred, on_truth = pred_areas > 0, truth_areas > 0

  def distances(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    if not target.any():
      return np.full(np.count_nonzero(source), np.inf)
    return ndimage.distance_transform_edt(~target, sampling=spacing)[source]

  return ((distances(on_pred, on_truth), pred_areas[on_pred]),
          (distances(on_truth, on_pred), truth_areas[on_truth]))


def _percentile_distance(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
  """Smallest distance within which at least `percent` % of the surface area lies."""
  order = np.argsort(distances, kind="stable")
  cumulative = np.cumsum(areas[order])
  index = min(int(np.searchsorted(cumulative / cumulative[-1], percent / 100.0)), distances.size - 1)
  return float(distances[order][index])


def _hausdorff(pred_surface: _Surface, truth_surface: _Surface, percent: float) -> float:
  if pred_surface[0].size == 0 and truth_surface[0].size == 0:
    return float("nan")
  if pred_surface[0].size == 0 or truth_surface[0].size == 0:
    return float("inf")
  return max(_percentile_distance(*pred_surface, percent), _percentile_distance(*truth_surface, percent))


def _surface_dice(pred_surface: _Surface, truth_surface: _Surface, tolerance_mm: float) -> float:
  if not (np.isfinite(tolerance_mm) and tolerance_mm >= 0):
    raise UserError(f"metrics: surface Dice tolerance must be a finite distance >= 0 mm, got {tolerance_mm}")
  total = pred_surface[1].sum() + truth_surface[1].sum()
  if total == 0:
    return float("nan")
  within = sum(areas[distances <= tolerance_mm].sum() for distances, areas in (pred_surface, truth_surface))
  return float(within / total)


def hausdorff_distance(pred, truth, spacing, percent: float = 95.0) -> float:
  """Robust symmetric Hausdorff distance in mm between the mask surfaces (percent=100: the plain maximum).

  The larger of the two directed distances within which `percent` % of the surface area lies (pred→truth,
  truth→pred); NaN when both masks are empty, inf when one is.
  """
  if not 0 <= percent <= 100:
    raise UserError(f"metrics: Hausdorff percentile must be in [0, 100], got {percent}")
  pred, truth = _masks(pred, truth)
  return _hausdorff(*_surface_distances(pred, truth, _spacing(spacing, pred.ndim)), percent)


def hd95(pred, truth, spacing) -> float:
  """95th-percentile Hausdorff distance in mm: `hausdorff_distance(pred, truth, spacing, 95)`."""
  return hausdorff_distance(pred, truth, spacing, 95.0)


def surface_dice(pred, truth, spacing, tolerance_mm: float = 1.0) -> float:
  """Normalised surface Dice: fraction of both surfaces' area within `tolerance_mm` of the other surface.

  NaN when both masks are empty, 0 when one is. The default 1 mm is SAM-Med3D's NSD tolerance.
  """
  pred, truth = _masks(pred, truth)
  return _surface_dice(*_surface_distances(pred, truth, _spacing(spacing, pred.ndim)), tolerance_mm)


def segmentation_metrics(pred, truth, spacing, tolerance_mm: float = 1.0) -> dict[str, float]:
  """All segmentation metrics of one study (surface distances computed once).

  Returns {"dice", "fpv_ml", "fnv_ml", "hd95_mm", "surface_dice"}; see the module docstring for empty masks.
  """
  pred, truth = _masks(pred, truth)
  spacing = _spacing(spacing, pred.ndim)
  distances = _surface_distances(pred, truth, spacing)
  return {
      "dice": dice(pred, truth),
      "fpv_ml": false_positive_volume(pred, truth, spacing),
      "fnv_ml": false_negative_volume(pred, truth, spacing),
      "hd95_mm": _hausdorff(*distances, 95.0),
      "surface_dice": _surface_dice(*distances, tolerance_mm),
  }


def aggregate(rows: Sequence[Mapping[str, object]]) -> dict[str, dict[str, float]]:
  """Mean, sample standard deviation and counts of each numeric metric over rows (e.g. studies or seeds).

  Returns {metric: {"mean", "std", "n", "n_nan"}}: NaN values (and metrics missing from a row) are skipped and
  counted in `n_nan`; `n` values enter the mean. inf is kept, so the mean is inf. `std` uses ddof=1 and is NaN
  for n < 2; `mean` is NaN for n = 0. Non-numeric entries (such as notes) are ignored.
  """
  numeric = (int, float, np.number)
  names = list(dict.fromkeys(k for row in rows for k, v in row.items() if isinstance(v, numeric)))
  result = {}
  for name in names:
    values = np.array([float(row.get(name, np.nan)) for row in rows])
    kept = values[~np.isnan(values)]
    with np.errstate(invalid="ignore"):
      result[name] = {
          "mean": float(kept.mean()) if kept.size else float("nan"),
          "std": float(kept.std(ddof=1)) if kept.size > 1 else float("nan"),
          "n": int(kept.size),
          "n_nan": int(values.size - kept.size),
      }
  return result


def paired_difference(treated: Sequence[float], control: Sequence[float],
                      confidence: float = 0.95) -> dict[str, float]:
  """Mean of the paired differences `treated[i] - control[i]` with its Student-t confidence interval
  (mean ± t_{(1+confidence)/2, n-1} · sd / sqrt(n), sd with ddof=1). Pairs with a NaN are left out.

  Returns {"mean", "low", "high", "sd", "n"}; the interval is NaN for n < 2 and the mean for n = 0.
  """
  a, b = np.asarray(treated, np.float64), np.asarray(control, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired values need two 1-D arrays of one length, got {a.shape} and {b.shape}")
  diff = (a - b)[~(np.isnan(a) | np.isnan(b))]
  n = diff.size
  mean = float(diff.mean()) if n else float("nan")
  sd = float(diff.std(ddof=1)) if n > 1 else float("nan")
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
  return {"mean": mean, "low": mean - half, "high": mean + half, "sd": sd, "n": n}


def _one_vs_rest_auc(scores: np.ndarray, positive: np.ndarray) -> float:
  """ROC AUC by the Mann-Whitney rank formula (ties count one half); NaN without positives or negatives."""
  n_pos = int(np.count_nonzero(positive))
  n_neg = positive.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = stats.rankdata(scores)
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(scores, labels) -> dict[str, float | int | str]:
  """Accuracy, macro-F1 and one-vs-rest ROC AUC of a C-class classifier (e.g. Ann Arbor stages I-IV as 0-3).

  Args: scores (N, C) class probabilities or logits (prediction = argmax), labels (N,) ints in [0, C). Returns
  {"accuracy", "macro_f1", "macro_auc", "f1_class_<c>", "auc_class_<c>" for each class, "n", "note"}. F1 of a
  class that is neither a label nor a prediction is NaN and left out of macro_f1 (scikit-learn's default label
  set). AUC of a class without positive or without negative labels is NaN and left out of macro_auc; `note`
  says which classes were left out ("" when none).
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 2 or scores.shape[1] < 2 or scores.shape[0] == 0:
    raise UserError(f"classification_metrics: scores must have shape (N, C) with N >= 1 and C >= 2, got "
                    f"{scores.shape}")
  if labels.shape != scores.shape[:1]:
    raise UserError(f"classification_metrics: labels must have shape ({len(scores)},), got {labels.shape}")
  if not np.all(np.isfinite(scores)):
    raise UserError("classification_metrics: scores contain NaN or inf")
  num_classes = scores.shape[1]
  if not (np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0 and labels.max() < num_classes):
    raise UserError(f"classification_metrics: labels must be integers in [0, {num_classes}), got "
                    f"{sorted(set(labels.tolist()))}")
  predicted = scores.argmax(axis=1)
  f1s, aucs = [], []
  for c in range(num_classes):
    true_c, pred_c = labels == c, predicted == c
    denominator = np.count_nonzero(true_c) + np.count_nonzero(pred_c)
    f1s.append(2.0 * np.count_nonzero(true_c & pred_c) / denominator if denominator else float("nan"))
    aucs.append(_one_vs_rest_auc(scores[:, c], true_c))
  left_out = [c for c, auc in enumerate(aucs) if np.isnan(auc)]
  note = ""
  if left_out:
    note = (f"AUC undefined for class(es) {left_out} (no positive or no negative labels among "
            f"{labels.size}); left out of macro_auc")
  result: dict[str, float | int | str] = {
      "accuracy": float(np.mean(predicted == labels)),
      "macro_f1": float(np.nanmean(f1s)),
      "macro_auc": float(np.mean([a for a in aucs if not np.isnan(a)])) if len(left_out) < num_classes
                   else float("nan"),
  }
  result.update({f"f1_class_{c}": float(f) for c, f in enumerate(f1s)})
  result.update({f"auc_class_{c}": float(a) for c, a in enumerate(aucs)})
  result.update({"n": int(labels.size), "note": note})
  return result
