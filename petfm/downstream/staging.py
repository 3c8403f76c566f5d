"""The Ann Arbor staging task: stage I–IV (or limited/advanced) of a study from a native-resolution slab at each
of its lesions and where the slab lies in the body (`heads.Stager`, Deep Sets over the slabs), cross-entropy.
Trained on the true lesions; evaluated on the true ones or on those a lesion fine-tune (`staging.lesions_from`)
predicts, next to the stage by rule from the true lesion map. The task interface is in
`petfm.downstream.finetuned`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from petfm import config as config_lib
from petfm.data import pipelines, records as records_lib
from petfm.downstream import data as ddata, finetuned, lesions
from petfm.errors import UserError
from petfm.eval import metrics as metrics_lib, staging as staging_rule
from petfm.models import heads

INPUTS = ("pet", "ct", "slab_valid", "position")
LESIONS_FROM = "--config.staging.lesions_from"


def validate(config: ml_collections.ConfigDict) -> None:
  """The staging fields; a `staging.lesions_from` run must be a lesion fine-tune reading studies in this run's
  view and normalisation."""
  config_lib.check_choice(config, "staging.aggregation", heads.AGGREGATIONS)
  config_lib.check_choice(config, "staging.classes", tuple(ddata.NUM_STAGE_CLASSES))
  source = config.staging.lesions_from
  if source:
    theirs = finetuned.read_config(source, LESIONS_FROM)
    if theirs.task != "lesions":
      raise UserError(f"{LESIONS_FROM} {source}: is a {theirs.task} fine-tune, not a lesions one")
    for key in ("view", "ct_clip", "suv_clip", "suv_scale"):
      if np.ndim(theirs.data[key]) != np.ndim(config.data[key]) or np.any(
          np.asarray(theirs.data[key]) != np.asarray(config.data[key])):
        raise UserError(f"{LESIONS_FROM} {source}: data.{key} {theirs.data[key]} differs from this run's "
                        f"{config.data[key]}")


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
  return heads.Stager(finetuned.backbone(config), ddata.NUM_STAGE_CLASSES[config.staging.classes],
                      config.staging.aggregation, config.staging.hidden, config.protocol == "linear")


def example(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """pet, ct (1, S, h, w, D) float32, slab_valid (1, S) bool, position (1, S, 3), stage (1,) of zeros; S =
  `staging.max_slabs`."""
  slabs = (1, config.staging.max_slabs)
  return {"pet": np.zeros((*slabs, *finetuned.window(config)), np.float32),
          "ct": np.zeros((*slabs, *finetuned.window(config)), np.float32), "slab_valid": np.ones(slabs, bool),
          "position": np.zeros((*slabs, 3), np.float32), "stage": np.zeros(1, np.int32)}


def inputs(batch: dict[str, Any]) -> tuple:
  return tuple(batch[k] for k in INPUTS)


def loss(out: tuple[jax.Array, jax.Array], batch: dict[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
  logits = out[0]
  value = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["stage"]))
  return value, {"loss": value, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["stage"])}


def probabilities(out: tuple[jax.Array, jax.Array]) -> jax.Array:
  return jax.nn.softmax(out[0], axis=-1)


def labelled(studies: list[ddata.Study], data_dir: str) -> list[ddata.Study]:
  """The studies with a known Ann Arbor stage."""
  staged = [s for s in studies if s.stage in (1, 2, 3, 4)]
  if not staged:
    raise UserError(f"{data_dir}: no training study of the chosen patients has a known Ann Arbor stage")
  return staged


def sample(config: ml_collections.ConfigDict, studies: Sequence[ddata.Study],
           centres: Sequence[dict[str, ddata.Components]], rng: np.random.Generator,
           pad: tuple[float, float]) -> dict[str, np.ndarray]:
  """A training batch of `batch_size` studies: each a stack of slabs at a random subset of its true lesions
  (plus up to `staging.distractors` hot non-lesion regions), and its stage class."""
  picks = rng.integers(len(studies), size=config.batch_size)
  slabs = config.staging.max_slabs
  stacks = [ddata.lesion_stack(studies[i], ddata.staging_regions(
      centres[i]["lesion"], slabs, rng, centres[i]["hot"], config.staging.distractors),
      finetuned.window(config), slabs, pad, rng) for i in picks]
  batch = {k: np.stack([stack[k] for stack in stacks]) for k in stacks[0]}
  batch["stage"] = np.array([ddata.stage_index(studies[i].stage, config.staging.classes) for i in picks],
                            np.int32)
  return batch


def evaluate(config: ml_collections.ConfigDict, predictor: finetuned.Predictor,
             records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Accuracy, macro-F1, one-vs-rest AUC over the studies with a known stage (slabs at the true lesions, or at
  those the lesion run `staging.lesions_from` predicts: `lesions` says which), per-study `studies` and, for
  Ann Arbor classes when the manifest names the organ labels, `rule_from_truth` (the stage by rule from the
  true lesion map: the upper bound)."""
  staged = [r for r in records if r["stage"] in (1, 2, 3, 4)]
  if not staged:
    raise UserError(f"{config.data_dir}: no {config.eval.split} study has a known Ann Arbor stage")
  pad = ddata.pad_values(config.data)
  found = finetuned.load(config.staging.lesions_from, lesions, LESIONS_FROM) if config.staging.lesions_from else None
  scores = []
  for record in staged:
    study = ddata.view_study(record, config.data)
    if found is None:
      mask = study.label
    else:
      lesion_config, lesion_predictor = found
      canonical = lesions.predict_volume(lesion_config, lesion_predictor, study) >= lesion_config.eval.threshold
      mask = pipelines.to_view(canonical, config.data.view)
    regions = ddata.staging_regions(ddata.components(mask > 0), config.staging.max_slabs)
    stack = ddata.lesion_stack(study, regions, finetuned.window(config), config.staging.max_slabs, pad)
    scores.append(predictor(*(stack[k][None] for k in INPUTS))[0])
  labels = np.array([ddata.stage_index(r["stage"], config.staging.classes) for r in staged])
  results = {"task": "staging", "split": config.eval.split, "lesions": "true" if found is None else "predicted",
             **metrics_lib.classification_metrics(np.stack(scores), labels),
             "studies": [{"study_id": r["study_id"], "label": int(label), "predicted": int(np.argmax(score))}
                         for r, label, score in zip(staged, labels, scores)]}
  organ_labels = records_lib.read_manifest(config.data_dir).get("organ_labels", {})
  if staging_rule.station_table(organ_labels) and config.staging.classes == "ann_arbor":
    results["rule_from_truth"] = staging_rule.rule_accuracy(
        [r["stage"] for r in staged],
        {"from_truth": [staging_rule.stage_from_lesions(r["label"], r["organs"], organ_labels) for r in staged]})
  return results


def summary(results: dict[str, Any]) -> str:
  line = (f"Ann Arbor staging on the {results['split']} split ({results['lesions']} lesions): accuracy "
          f"{results['accuracy']:.3f}, macro-F1 {results['macro_f1']:.3f}, AUC {results['macro_auc']:.3f}")
  if "rule_from_truth" in results:
    line += f" (stage by rule from the true lesion map: {results['rule_from_truth']['from_truth']['accuracy']:.3f})"
  return line
