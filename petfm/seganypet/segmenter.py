"""`Segmenter`: promptable 3-D segmentation with SAM-Med3D / SegAnyPET weights (like segment-anything's
predictor).

  seg = Segmenter.from_checkpoint("seganypet_v2/")        # made by `petfm convert-sam-med3d`
  emb = seg.embed(crop)                                   # crop (128, 128, 128), see preprocess.prepare
  logits, iou = seg.predict(emb, [[64, 70, 58]], [1])     # first click
  logits, iou = seg.predict(emb, [[64, 70, 58], [80, 60, 50]], [1, 0], mask_input=logits)   # refine
  mask = seg.upsample(logits) > 0                          # (128, 128, 128), sigmoid > 0.5

The image embedding is computed once per crop; every click runs one jitted prompt-encode + decode step
(`prompt_and_decode`, also usable inside training code). `mask_input=None` feeds zero logits through the mask
path, as the official train and inference loops do on the first click (`no_mask_embed` was never trained).
Points are padded to a capacity (the next power of two: 1, 2, 4, 8, …) with invisible ABSENT slots
(`sam3d.token_mask`), so the step compiles once per capacity, not once per click, with unchanged outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from petfm.errors import UserError
from petfm.models import sam3d
from petfm.models.sam3d import ABSENT, NEGATIVE, POSITIVE
from petfm.seganypet import convert


def embed(model: sam3d.Sam3D, variables: Any, crops: jax.Array) -> jax.Array:
  """(B, S, S, S) → (B, g, g, g, C) image embeddings."""
  return model.apply(variables, crops, method=sam3d.Sam3D.embed)


def prompt_and_decode(model: sam3d.Sam3D, variables: Any, embeddings: jax.Array, points: jax.Array | None,
                      labels: jax.Array | None, mask_logits: jax.Array, image_pe: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  """embeddings (B, g, g, g, C), points (B, N, 3) / labels (B, N) or None, mask_logits (B, 4g, 4g, 4g),
  optional precomputed `Sam3D.dense_pe` (g, g, g, C) → (low-res logits (B, 4g, 4g, 4g), IoU prediction
  (B,)). Points labelled ABSENT (capacity padding, see `pad_points`) change nothing."""
  sparse, dense = model.apply(variables, points, labels, mask_logits, method=sam3d.Sam3D.encode_prompts)
  mask = None if labels is None else sam3d.token_mask(labels)
  return model.apply(variables, embeddings, sparse, dense, image_pe, mask, method=sam3d.Sam3D.decode)


def decode_inputs(model: sam3d.Sam3D, variables: Any) -> tuple[Any, jax.Array]:
  """What every click's `prompt_and_decode` reads besides the prompts, made once per model: the variables
  without the image encoder(s) (at vit_b_ori size 135 leaves instead of 324: ≈ 0.8 ms less dispatch per
  click) and the dense PE of the embedding grid (`Sam3D.dense_pe`). Works for Sam3D and TwinSam3D."""
  params = {k: v for k, v in variables["params"].items() if k in ("prompt_encoder", "mask_decoder")}
  prompt_variables = {**variables, "params": params}
  return prompt_variables, model.apply(prompt_variables, method=sam3d.Sam3D.dense_pe)


def capacity(n: int) -> int:
  """Point capacity for n points: the smallest power of two ≥ n (one compile per capacity)."""
  return 1 << max(n - 1, 0).bit_length()


def pad_points(points: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """points (B, N, 3), labels (B, N) → (B, capacity(N), 3), (B, capacity(N)): the added slots are ABSENT
  points at the origin."""
  b, n = labels.shape
  extra = capacity(n) - n
  points = np.concatenate([np.asarray(points, np.float32), np.zeros((b, extra, 3), np.float32)], axis=1)
  return points, np.concatenate([np.asarray(labels, np.int32), np.full((b, extra), ABSENT, np.int32)], axis=1)


class Segmenter:
  """Holds a model and its variables ({'params', 'buffers'}) with jitted embed and prompt+decode steps."""

  def __init__(self, config: sam3d.Sam3DConfig, variables: Any):
    sam3d.check_config(config)
    self.config, self.variables = config, variables
    self.model = sam3d.Sam3D(config)
    self._embed = jax.jit(lambda v, x: embed(self.model, v, x))
    self._predict = jax.jit(lambda v, e, p, l, m, pe: prompt_and_decode(self.model, v, e, p, l, m, pe))
    self._prompt_variables, self.image_pe = decode_inputs(self.model, variables)

  @classmethod
  def from_checkpoint(cls, directory: str) -> Segmenter:
    """Loads a directory written by `petfm convert-sam-med3d` (config.json + Orbax variables/)."""
    return cls(*convert.load(directory))

  def embed_batch(self, crops: np.ndarray) -> jax.Array:
    """(B, S, S, S) normalised crops → (B, g, g, g, C)."""
    crops = jnp.asarray(crops, jnp.float32)
    s = self.config.img_size
    if crops.ndim != 4 or crops.shape[1:] != (s, s, s):
      raise UserError(f"crops: shape {crops.shape}, expected (B, {s}, {s}, {s})")
    return self._embed(self.variables, crops)

  def embed(self, crop: np.ndarray) -> jax.Array:
    """(S, S, S) normalised crop (e.g. from `preprocess.prepare`) → image embedding (g, g, g, C)."""
    crop = np.asarray(crop)
    s = self.config.img_size
    if crop.shape != (s, s, s):
      raise UserError(f"crop: shape {crop.shape}, expected ({s}, {s}, {s})")
    return self.embed_batch(crop[None])[0]

  def predict_batch(self, embeddings: jax.Array, points: np.ndarray, labels: np.ndarray,
                    mask_input: np.ndarray | None = None) -> tuple[jax.Array, jax.Array]:
    """embeddings (B, g, g, g, C), points (B, N, 3) crop voxel indices, labels (B, N) of POSITIVE/NEGATIVE,
    mask_input (B, 4g, 4g, 4g) previous low-res logits or None → (logits (B, 4g, 4g, 4g), IoU (B,))."""
    c = self.config
    points, labels = np.asarray(points, np.float32), np.asarray(labels)
    b = embeddings.shape[0]
    if points.ndim != 3 or points.shape[0] != b or points.shape[2] != 3 or points.shape[1] < 1:
      raise UserError(f"points: shape {points.shape}, expected ({b}, N ≥ 1, 3)")
    if labels.shape != points.shape[:2]:
      raise UserError(f"labels: shape {labels.shape}, expected {points.shape[:2]}")
    if not np.isin(labels, (POSITIVE, NEGATIVE)).all():
      raise UserError(f"labels: only {POSITIVE} (positive) and {NEGATIVE} (negative) are allowed")
    if (points < 0).any() or (points >= c.img_size).any():
      raise UserError(f"points: coordinates must lie in [0, {c.img_size})")
    shape = (b,) + (c.mask_size,) * 3
    if mask_input is None:
      mask_input = np.zeros(shape, np.float32)
    elif tuple(np.shape(mask_input)) != shape:
      raise UserError(f"mask_input: shape {np.shape(mask_input)}, expected {shape}")
    points, labels = pad_points(points, labels)
    return self._predict(self._prompt_variables, embeddings, jnp.asarray(points), jnp.asarray(labels),
                         jnp.asarray(mask_input, jnp.float32), self.image_pe)

  def predict(self, embedding: jax.Array, points: Sequence[Sequence[float]] | np.ndarray,
              labels: Sequence[int] | np.ndarray, mask_input: np.ndarray | None = None
              ) -> tuple[jax.Array, float]:
    """embedding (g, g, g, C), points (N, 3), labels (N,), mask_input (4g, 4g, 4g) or None →
    (low-res logits (4g, 4g, 4g), IoU prediction)."""
    points, labels = np.asarray(points, np.float32), np.asarray(labels)
    if points.ndim != 2 or labels.ndim != 1:
      raise UserError(f"points/labels: shapes {points.shape} / {labels.shape}, expected (N, 3) / (N,)")
    mask = None if mask_input is None else np.asarray(mask_input)[None]
    logits, iou = self.predict_batch(embedding[None], points[None], labels[None], mask)
    return logits[0], float(iou[0])

  def upsample(self, logits: jax.Array) -> jax.Array:
    """Low-res logits (…, 4g, 4g, 4g) → (…, S, S, S), trilinear (align_corners=False, as the official
    code)."""
    squeeze = logits.ndim == 3
    out = sam3d.upsample_logits(logits[None] if squeeze else logits, self.config.img_size)
    return out[0] if squeeze else out
