"""Click simulation: where the next click of a simulated user goes, given the current mask and the truth.

Two samplers, both reading the error region of the current prediction, FN = truth ∧ ¬pred (a click there is
positive) and FP = ¬truth ∧ pred (negative):
  `sample_clicks`  training: one voxel per sample drawn uniformly from FN ∪ FP (SAM-Med3D's "random"
                   sampler), written jit-friendly as an argmax of Gumbel noise over the error voxels, so a
                   whole multi-round step compiles into one function; a key gives the same clicks every time.
                   With no error a truth voxel is drawn (positive), with no truth either the click is PADDING
                   (no point).
  `next_click`     evaluation (numpy/scipy, deterministic): the voxel farthest from the border of the largest
                   connected error component (FN and FP components compared by size, ties → FN), the
                   distance transform treating the crop edge as border.
Points are (x, y, z) voxel indices along the crop's array axes 0, 1, 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from petfm.models.sam3d import NEGATIVE, PADDING, POSITIVE


def sample_clicks(key: jax.Array, pred: jax.Array, truth: jax.Array, valid: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """pred, truth (B, X, Y, Z) bool (valid: voxels that may be clicked) → points (B, 3) int32, labels (B,)."""
  pred, truth = pred.astype(bool), truth.astype(bool)
  fn, fp = truth & ~pred, ~truth & pred
  error = fn | fp
  if valid is not None:
    error, truth_ok = error & valid, truth & valid
  else:
    truth_ok = truth
  b, shape = pred.shape[0], pred.shape[1:]
  has_error = error.reshape(b, -1).any(-1)
  candidates = jnp.where(has_error[:, None, None, None], error, truth_ok).reshape(b, -1)
  gumbel = jax.random.gumbel(key, candidates.shape)
  index = jnp.argmax(jnp.where(candidates, gumbel, -jnp.inf), axis=-1)
  positive = jnp.take_along_axis(fn.reshape(b, -1), index[:, None], axis=-1)[:, 0] | ~has_error
  labels = jnp.where(positive, POSITIVE, NEGATIVE)
  labels = jnp.where(candidates.any(-1), labels, PADDING).astype(jnp.int32)
  points = jnp.stack(jnp.unravel_index(index, shape), axis=-1).astype(jnp.int32)
  return points, labels


def next_click(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, int] | None:
  """pred, truth (X, Y, Z) → (point (3,) int, POSITIVE/NEGATIVE) in the largest error component's most
  interior voxel, or None when the prediction is exact."""
  pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
  best = None
  for region, label in ((truth & ~pred, POSITIVE), (~truth & pred, NEGATIVE)):
    components, n = ndimage.label(region)
    if n == 0:
      continue
    sizes = np.bincount(components.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    if best is None or sizes[largest - 1] > best[0]:
      best = (sizes[largest - 1], components == largest, label)
  if best is None:
    return None
  _, component, label = best
  distance = ndimage.distance_transform_edt(np.pad(component, 1))[1:-1, 1:-1, 1:-1]
  return np.array(np.unravel_index(int(np.argmax(distance)), component.shape)), label
