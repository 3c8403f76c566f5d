"""A click baseline with no learning: the SUV-threshold component containing each positive click.

For a positive click p: SUVmax = the highest SUV within `radius_mm` of p, threshold t = `fraction` × SUVmax
(41 %, the classical PET rule), and the region is the connected component (faces, 6-connectivity) of
SUV ≥ min(t, SUV(p)) that contains p. A negative click n inside that region raises its threshold just above
SUV(n) (when SUV(n) < SUV(p); else it cannot be excluded and is ignored), repeated until no negative click
lies in the region. The mask is the union of the positive clicks' regions. It answers the question "does a
learned model beat thresholding from the same clicks?" in `petfm eval-clicks --baseline`, on the very same
crops and simulated clicks as the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from petfm.models.sam3d import NEGATIVE, POSITIVE
from petfm.seganypet import promptable

FRACTION = 0.41
RADIUS_MM = 10.0


def suv_of(pet: np.ndarray, spec: promptable.ModelSpec) -> np.ndarray:
  """Pipeline-normalised PET (`pipelines.normalize` with the spec's intensities) → SUV (clipped)."""
  unit = (np.asarray(pet, np.float64) + 1.0) / 2.0
  if spec.suv_scale == "log1p":
    return np.expm1(unit * math.log1p(spec.suv_clip))
  return unit * spec.suv_clip


def segment(suv: np.ndarray, points: Sequence[Sequence[int]], labels: Sequence[int],
            spacing: Sequence[float], fraction: float = FRACTION, radius_mm: float = RADIUS_MM) -> np.ndarray:
  """suv (X, Y, Z), points (N, 3) voxel indices, labels (N,) POSITIVE/NEGATIVE → mask (X, Y, Z) bool."""
  suv = np.asarray(suv, np.float64)
  points = [tuple(int(v) for v in p) for p in points]
  negatives = [p for p, label in zip(points, labels) if label == NEGATIVE]
  reach = np.ceil(radius_mm / np.asarray(spacing, np.float64)).astype(int)
  mask = np.zeros(suv.shape, bool)
  for p, label in zip(points, labels):
    if label != POSITIVE:
      continue
    box = tuple(slice(max(c - r, 0), min(c + r + 1, n)) for c, r, n in zip(p, reach, suv.shape))
    offsets = np.stack(np.meshgrid(*(np.arange(s.start, s.stop) - c for s, c in zip(box, p)), indexing="ij"))
    inside = (((offsets * np.asarray(spacing)[:, None, None, None]) ** 2).sum(0) <= radius_mm ** 2)
    threshold = min(fraction * suv[box][inside].max(), suv[p])
    while True:
      components, _ = ndimage.label(suv >= threshold)
      region = components == components[p]
      inside_neg = [suv[n] for n in negatives if region[n] and suv[n] < suv[p]]
      if not inside_neg:
        break
      threshold = np.nextafter(max(inside_neg), np.inf)
    mask |= region
  return mask


class SuvThreshold:
  """The baseline as `eval_clicks` calls a model: `session(crop)` → clicks(points, labels) → mask. Reads the
  crops of `spec` (a promptable model's spec, so both see the same crops)."""

  name = "SUV 41 % component"

  def __init__(self, spec: promptable.ModelSpec, fraction: float = FRACTION, radius_mm: float = RADIUS_MM):
    self.spec, self.fraction, self.radius_mm = spec, fraction, radius_mm

  def session(self, image: np.ndarray) -> Callable[[Sequence, Sequence], np.ndarray]:
    """image (S, S, S, C) pipeline-normalised crop → function of all clicks so far → mask (S, S, S) bool."""
    suv = suv_of(image[..., 0], self.spec)
    return lambda points, labels: segment(suv, points, labels, self.spec.spacing, self.fraction,
                                          self.radius_mm)
