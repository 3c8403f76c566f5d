"""The lesion segmentation task: per-voxel lesion probability of slabs (UNETR-style or linear head on the
encoders), trained with Dice + BCE on slabs drawn around lesions, hot non-lesion regions and anywhere,
evaluated on whole volumes by sliding windows with the autoPET metrics, next to the classical baselines of
`petfm.eval.baselines` and the Ann Arbor stage by rule from the predicted lesion map. The task interface is in
`petfm.downstream.finetuned`; `petfm predict-lesions` uses `predict_volume`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from petfm import config as config_lib
from petfm.data import pipelines, records as records_lib
from petfm.downstream import data as ddata, finetuned
from petfm.errors import UserError
from petfm.eval import baselines, metrics as metrics_lib, staging as staging_rule
from petfm.models import heads

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


# ------------------------------------------------------------------------------------------------ task


def validate(config: ml_collections.ConfigDict) -> None:
  config_lib.check_choice(config, "head.kind", heads.SEG_HEADS)
  config_lib.check_choice(config, "head.norm", heads.NORMS)
  config_lib.check(0 <= config.eval.overlap < 1, "eval.overlap", "must be in [0, 1)")
  config_lib.check(config.eval.threshold_from != config.eval.split, "eval.threshold_from",
                   f"must differ from eval.split {config.eval.split!r} (a threshold chosen on the studies it is "
                   "scored on overstates Dice); '' keeps eval.threshold")


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
  layers = None if config.head.layers is None else tuple(config.head.layers)
  return heads.LesionSegmenter(finetuned.backbone(config), config.head.kind, config.head.features, layers,
                               config.protocol == "linear", config.head.prior, config.head.get("norm", "layer"))


def example(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """pet, ct (1, h, w, D) float32, label, valid (1, h, w, D) uint8 of zeros."""
  shape = (1, *finetuned.window(config))
  return {"pet": np.zeros(shape, np.float32), "ct": np.zeros(shape, np.float32),
          "label": np.zeros(shape, np.uint8), "valid": np.zeros(shape, np.uint8)}


def inputs(batch: dict[str, Any]) -> tuple:
  return batch["pet"], batch["ct"]


def loss(logits: jax.Array, batch: dict[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
  return dice_bce_loss(logits, batch["label"], batch["valid"])


probabilities = jax.nn.sigmoid


def labelled(studies: list[ddata.Study], data_dir: str) -> list[ddata.Study]:
  del data_dir
  return studies


def sample(config: ml_collections.ConfigDict, studies: Sequence[ddata.Study],
           centres: Sequence[dict[str, ddata.Components]], rng: np.random.Generator,
           pad: tuple[float, float]) -> dict[str, np.ndarray]:
  """A training batch (`ddata.sample_slabs`): slabs at lesions, at hot non-lesion regions and anywhere."""
  return ddata.sample_slabs(studies, centres, finetuned.window(config), config.batch_size, rng, pad,
                            config.foreground_fraction, config.hard_negative_fraction)


def body_box(study: ddata.Study, data: ml_collections.ConfigDict, window: Sequence[int]) -> tuple[slice, ...]:
  """The view-axes box (H, W, S slices) around the voxels with CT > `data.body_hu`, each side grown to at least
  the window (within the volume); the whole volume when no voxel is in the body. Sliding windows need not
  visit the air around the patient (nnU-Net likewise crops to the nonzero region)."""
  body_ct, _ = pipelines.normalize(np.float32(data.body_hu), np.float32(0.0), data)
  inside = study.ct > body_ct
  box = []
  for axis, (n, w) in enumerate(zip(inside.shape, window)):
    hit = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
    lo, hi = (int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, n)
    size = max(hi - lo, min(w, n))                            # at least a window, at most the volume
    start = int(np.clip((lo + hi - size) // 2, 0, n - size))  # centred on the body, within the volume
    box.append(slice(start, start + size))
  return tuple(box)


def predict_volume(config: ml_collections.ConfigDict, predictor: finetuned.Predictor,
                   study: ddata.Study) -> np.ndarray:
  """Lesion probability (X, Y, Z) of a whole study on its stored canonical grid: sliding windows in the view
  over the body's box (`body_box`; 0 outside it); batches filled to `eval.batch_size`, so one compiled shape
  serves every window."""
  size = config.eval.batch_size

  def predict(pet, ct):
    n = len(pet)
    fill = lambda x: np.concatenate([x, np.repeat(x[-1:], size - n, axis=0)]) if n < size else x
    return predictor(fill(pet), fill(ct))[:n]

  window = finetuned.window(config)
  box = body_box(study, config.data, window)
  prob = np.zeros(study.pet.shape, np.float32)
  prob[box] = sliding_window_probabilities(predict, study.pet[box], study.ct[box], window, config.eval.overlap,
                                           size, ddata.pad_values(config.data))
  return np.ascontiguousarray(pipelines.from_view(prob, config.data.view))


THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))   # the candidates of `choose_threshold`


def choose_threshold(config: ml_collections.ConfigDict, predictor: finetuned.Predictor,
                     records: Iterable[dict[str, Any]]) -> dict[str, Any]:
  """The probability threshold among `THRESHOLDS` with the best mean Dice over `records` (held-out studies with
  `ddata.STUDY_FIELDS`; studies without lesions left out, as in autoPET's Dice; ties: the one nearest 0.5).

  Returns {"value", "split" (`eval.threshold_from`), "n" (studies), "dice" (mean Dice per candidate)}; with no
  lesion in `records` the value is `eval.threshold` and "dice" is empty.
  """
  dice = []
  for record in records:
    if record["label"].any():
      prob = predict_volume(config, predictor, ddata.view_study(record, config.data))
      dice.append([metrics_lib.dice(prob >= t, record["label"]) for t in THRESHOLDS])
  chosen = {"value": config.eval.threshold, "split": config.eval.threshold_from, "n": len(dice), "dice": {}}
  if dice:
    mean = np.mean(dice, axis=0)
    best = max(range(len(THRESHOLDS)), key=lambda i: (round(mean[i], 6), -abs(THRESHOLDS[i] - 0.5)))
    chosen.update(value=THRESHOLDS[best], dice=dict(zip(map(str, THRESHOLDS), mean.round(4).tolist())))
  return chosen


def evaluate(config: ml_collections.ConfigDict, predictor: finetuned.Predictor,
             records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Per-study Dice, FPV, FNV, HD95, NSD on the stored grid (and their means), `baselines` (the classical rules
  on the same studies) and, when the manifest names the organ labels, `staging_by_rule` (Ann Arbor stage by
  `petfm.eval.staging` from the true and from the predicted lesion map). `records`: decoded with
  `ddata.STUDY_FIELDS` and `organs`.

  With `eval.threshold_from` (a split, e.g. "val") the threshold is first chosen there (`choose_threshold`,
  in `threshold`) and returned as `calibrated` {"eval.threshold": value}; else `eval.threshold` is used.
  """
  threshold, results = config.eval.threshold, {"task": "lesions", "split": config.eval.split}
  if config.eval.threshold_from:
    held_out = ddata.read_records(config.data_dir, config.eval.threshold_from, ddata.STUDY_FIELDS)
    results["threshold"] = choose_threshold(config, predictor, held_out)
    threshold = results["threshold"]["value"]
    results["calibrated"] = {"eval.threshold": threshold}
  rows, predicted = [], {}
  for record in records:
    study = ddata.view_study(record, config.data)
    pred = predict_volume(config, predictor, study) >= threshold
    rows.append({"study_id": study.study_id, **study_metrics(pred, record["label"], study.spacing)})
    predicted[study.study_id] = pred
  results.update(**summarize(rows), studies=rows, baselines=baselines.evaluate(records))
  organ_labels = records_lib.read_manifest(config.data_dir).get("organ_labels", {})
  staged = [r for r in records if r["stage"] in (1, 2, 3, 4)]
  if staging_rule.station_table(organ_labels) and staged:
    by_rule = lambda mask, r: staging_rule.stage_from_lesions(mask, r["organs"], organ_labels)  # noqa: E731
    results["staging_by_rule"] = staging_rule.rule_accuracy(
        [r["stage"] for r in staged], {"from_truth": [by_rule(r["label"], r) for r in staged],
                                       "from_prediction": [by_rule(predicted[r["study_id"]], r) for r in staged]})
  return results


def summary(results: dict[str, Any]) -> str:
  """The learned model's figures, then each classical baseline's, then the stage by rule."""
  def figures(r: dict[str, Any]) -> str:
    return f"Dice {r['dice']:.3f}, FPV {r['fpv_ml']:.1f} mL, FNV {r['fnv_ml']:.1f} mL"

  chosen = results.get("threshold")
  lines = [f"lesion segmentation on the {results['split']} split ({len(results['studies'])} studies), "
           "whole volumes, autoPET metrics:", f"  {'learned model':18s} {figures(results)}"
           + (f" (threshold {chosen['value']:.2f}: best Dice on the {chosen['n']} {chosen['split']} studies)"
              if chosen and chosen["n"] else "")]
  if chosen and not chosen["n"]:
    lines.append(f"  note: no {chosen['split']} study has a lesion (eval.threshold_from): kept threshold "
                 f"{chosen['value']:.2f}")
  lines += [f"  {name:18s} {figures(row)}" for name, row in results.get("baselines", {}).items()]
  rule = results.get("staging_by_rule")
  if rule:
    lines.append(f"Ann Arbor stage by rule ({rule['n']} studies): accuracy "
                 f"{rule['from_prediction']['accuracy']:.3f} from the predicted lesion map, "
                 f"{rule['from_truth']['accuracy']:.3f} from the true one")
  return "\n".join(lines)
