"""Lesion segmentation pieces shared by fine-tuning, evaluation and `petfm predict-lesions`: the Dice + BCE
loss, whole-volume sliding-window inference in the slab view, and per-study metrics in the original
geometry."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from petfm.errors import UserError
from petfm.eval import metrics as metrics_lib

DICE_SMOOTH = 1.0


def dice_bce_loss(logits: jax.Array, labels: jax.Array, valid: jax.Array | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Soft Dice (over the whole batch, smoothing 1) + mean binary cross-entropy, over the valid voxels.

  logits, labels, valid (B, H, W, D); labels in {0, 1}; valid 1 = real voxel (0 = padding), None = all.
  Returns (loss, {"loss", "dice_loss", "bce"}).
  """
  logits = logits.astype(jnp.float32)
  labels = (labels > 0).astype(jnp.float32)
  weight = jnp.ones_like(logits) if valid is None else valid.astype(jnp.float32)
  bce = (jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels) * weight)
         / jnp.maximum(jnp.sum(weight), 1.0))
  prob = jax.nn.sigmoid(logits) * weight
  intersection = jnp.sum(prob * labels)
  dice_loss = 1.0 - ((2.0 * intersection + DICE_SMOOTH)
                     / (jnp.sum(prob) + jnp.sum(labels * weight) + DICE_SMOOTH))
  loss = dice_loss + bce
  return loss, {"loss": loss, "dice_loss": dice_loss, "bce": bce}


def window_starts(size: int, window: int, overlap: float) -> list[int]:
  """Start offsets of windows of `window` covering [0, size) with the given overlap fraction; the last window
  ends at `size` (a single window at 0 when size ≤ window)."""
  if size <= window:
    return [0]
  stride = max(1, int(round(window * (1.0 - overlap))))
  starts = list(range(0, size - window, stride))
  return starts + [size - window]


def sliding_window_probabilities(predict: Callable[[np.ndarray, np.ndarray], np.ndarray], pet: np.ndarray,
                                 ct: np.ndarray, window: Sequence[int], overlap: float = 0.5,
                                 batch_size: int = 8,
                                 pad_values: tuple[float, float] | None = None) -> np.ndarray:
  """Lesion probability of a whole volume in the view axes by overlapping windows.

  pet, ct (H, W, S): normalised volumes in view axes (S = the stacking axis). `window` (h, w, D): the slab the
  model takes. `predict(pet, ct)` maps (B, h, w, D) batches to probabilities (B, h, w, D). Axes shorter than
  the window are padded (PET and CT with `pad_values`, default each volume's minimum); windows overlap by
  `overlap` along every axis and their probabilities are averaged. Returns (H, W, S) float32.
  """
  if pet.shape != ct.shape or pet.ndim != 3:
    raise UserError(f"sliding window: pet {pet.shape} and ct {ct.shape} must be (H, W, S) of the same shape")
  if not 0.0 <= overlap < 1.0:
    raise UserError(f"sliding window: overlap {overlap} must be in [0, 1)")
  shape = pet.shape
  padded_shape = tuple(max(n, w) for n, w in zip(shape, window))
  pad = [(0, p - n) for n, p in zip(shape, padded_shape)]
  pad_pet, pad_ct = pad_values if pad_values is not None else (float(pet.min()), float(ct.min()))
  pet = np.pad(pet, pad, constant_values=pad_pet)
  ct = np.pad(ct, pad, constant_values=pad_ct)
  total = np.zeros(padded_shape, np.float32)
  count = np.zeros(padded_shape, np.float32)
  corners = list(itertools.product(*[window_starts(n, w, overlap) for n, w in zip(padded_shape, window)]))
  for i in range(0, len(corners), batch_size):
    chunk = corners[i:i + batch_size]
    boxes = [tuple(slice(c, c + w) for c, w in zip(corner, window)) for corner in chunk]
    probs = np.asarray(predict(np.stack([pet[b] for b in boxes]), np.stack([ct[b] for b in boxes])))
    for box, prob in zip(boxes, probs):
      total[box] += prob
      count[box] += 1.0
  return (total / count)[tuple(slice(0, n) for n in shape)]


def study_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
  """Dice, FPV, FNV (mL), HD95 and surface Dice of one study (`petfm.eval.metrics.segmentation_metrics`)."""
  return metrics_lib.segmentation_metrics(pred, truth, spacing)


def summarize(rows: Sequence[dict[str, float]]) -> dict[str, float]:
  """Mean of each per-study metric (NaNs left out), as {"dice": …, "fpv_ml": …, …}."""
  return {name: stats["mean"] for name, stats in metrics_lib.aggregate(rows).items()}
