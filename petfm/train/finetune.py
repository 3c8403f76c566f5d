"""Downstream fine-tuning: `petfm finetune --config experiments/finetune.py:tiny,task=lesions --workdir DIR`.

Tasks: `lesions` (per-voxel lesion segmentation of slabs, Dice + BCE, evaluated on whole volumes by sliding
windows) and `staging` (Ann Arbor I–IV per study from a native-resolution slab at each of its lesions and
where it lies, cross-entropy; trained on the true lesions, evaluated on the true ones or on those a lesion
fine-tune `staging.lesions_from` predicts). Protocols: `linear` (encoders frozen, gradients stop at their
outputs), `finetune` (all params, layer-wise lr decay `optim.layer_decay`), `scratch` (random init, no decay).
`label_patients` (a count) or `label_fraction` (a share) keeps a seeded subset of the training patients.
`init_from` loads the encoders of a pretraining run (its latest checkpoint); the backbone config and the data
view/normalisation then come from that run's config.json.

Trainer order as in `pretrain.py`: set-up → mesh → data → model, init and shardings → step → checkpoint
(resume or init) → loop → evaluation. Rerunning in the same workdir resumes (training batches derive from
(seed, step), so a resumed run sees the batches an uninterrupted one would) and a finished run is only
re-evaluated.
The workdir gets `config.json`, `checkpoints/`, `metrics.jsonl`, TensorBoard events and `results.json`
(aggregate metrics on `eval.split`, plus per-study rows; for lesions also `baselines`: the classical rules of
`petfm.eval.baselines` on the same studies).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from petfm import config as config_lib, paths, rundir
from petfm.data import checks, pipelines, records
from petfm.downstream import data as ddata
from petfm.downstream import lesions
from petfm.errors import UserError
from petfm.eval import baselines
from petfm.eval import metrics as metrics_lib
from petfm.eval import staging as staging_rule
from petfm.models import fratmae, heads
from petfm.train import common

TASKS = ("lesions", "staging")
PROTOCOLS = ("linear", "finetune", "scratch")


# ------------------------------------------------------------------------------------------------ config


def validate(config: ml_collections.ConfigDict) -> None:
  config_lib.check_run(config)
  config_lib.check_choice(config, "task", TASKS)
  config_lib.check_choice(config, "protocol", PROTOCOLS)
  config_lib.check_choice(config, "head.kind", heads.SEG_HEADS)
  config_lib.check_choice(config, "head.norm", heads.NORMS)
  config_lib.check_choice(config, "staging.aggregation", heads.AGGREGATIONS)
  config_lib.check_choice(config, "staging.classes", tuple(ddata.NUM_STAGE_CLASSES))
  config_lib.check(0 < config.label_fraction <= 1, "label_fraction",
                   f"must be in (0, 1], got {config.label_fraction}")
  config_lib.check(isinstance(config.label_patients, int) and config.label_patients >= 0, "label_patients",
                   f"must be an integer >= 0 (0 = use label_fraction), got {config.label_patients!r}")
  config_lib.check(not config.label_patients or config.label_fraction == 1, "label_patients",
                   f"set either label_patients or label_fraction, not both (label_fraction="
                   f"{config.label_fraction})")
  config_lib.check(0 < config.optim.layer_decay <= 1, "optim.layer_decay", "must be in (0, 1]")
  config_lib.check(0 <= config.eval.overlap < 1, "eval.overlap", "must be in [0, 1)")
  config_lib.check(config.protocol != "linear" or bool(config.init_from), "init_from",
                   "protocol=linear probes a pretrained encoder; set --config.init_from=PRETRAIN_WORKDIR")
  config_lib.check(config.protocol != "scratch" or not config.init_from, "init_from",
                   "protocol=scratch trains from a random init; leave init_from empty")
  pipelines.check_config(config.data, "slab")


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with backbone and data settings taken from the pretraining run (when `init_from` is set)."""
  if not config.init_from:
    return config
  pretrained = rundir.read_config(config.init_from, "--config.init_from", "pretrain",
                                  ("model.method", "data.view", "data.depth", "data.ct_clip", "data.suv_clip",
                                   "data.suv_scale"))
  out = ml_collections.ConfigDict(config.to_dict())
  model = fratmae.default_config("tiny", pretrained["model"]["method"])
  model.update({k: tuple(v) if isinstance(v, list) else v
                for k, v in pretrained["model"].items() if k in model})
  out.model = model
  for key in ("view", "depth", "ct_clip", "suv_clip", "suv_scale"):
    value = pretrained["data"][key]
    out.data[key] = tuple(value) if isinstance(value, list) else value
  return out


# ------------------------------------------------------------------------------------------------ model


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
  backbone = fratmae.model_from_config(config.model, config.data, dtype=config.dtype)
  frozen = config.protocol == "linear"
  if config.task == "lesions":
    layers = None if config.head.layers is None else tuple(config.head.layers)
    return heads.LesionSegmenter(backbone, config.head.kind, config.head.features, layers, frozen,
                                 config.head.prior, config.head.get("norm", "layer"))
  return heads.Stager(backbone, ddata.NUM_STAGE_CLASSES[config.staging.classes], config.staging.aggregation,
                      config.staging.hidden, frozen)


def layer_id(path: tuple, depth: int) -> int:
  """Layer index for layer-wise lr decay: patch embedding 0, encoder block i → i + 1, everything after the
  last block (final norm, head) depth + 1."""
  names = [str(getattr(k, "key", k)) for k in path]
  if "backbone" not in names:
    return depth + 1
  if "patch_embed" in names:
    return 0
  blocks = [n for n in names if n.startswith("block_")]
  return int(blocks[0].split("_")[1]) + 1 if blocks else depth + 1


def scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update leaf by its constant multiplier."""
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (jax.tree.map(lambda u, m: u * m, updates, multipliers), state))


def make_optimizer(config: ml_collections.ConfigDict,
                   params: Any) -> tuple[optax.GradientTransformation, Callable]:
  """`common.make_optimizer` + the protocol: linear → backbone updates are zero (no optimizer state for it);
  finetune → lr × layer_decay^(depth + 1 - layer id); scratch → plain."""
  tx, schedule = common.make_optimizer(config.optim, config.total_steps)
  depth = config.model.depth
  if config.protocol == "finetune" and config.optim.layer_decay < 1:
    decay = config.optim.layer_decay
    multipliers = jax.tree_util.tree_map_with_path(
        lambda path, _: decay ** (depth + 1 - layer_id(path, depth)), params)
    tx = optax.chain(tx, scale_by_tree(multipliers))
  if config.protocol == "linear":
    labels = {k: "frozen" if k == "backbone" else "train" for k in params}
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


@dataclasses.dataclass
class Setup:
  model: nn.Module
  mesh: Mesh
  rules: tuple
  schedule: Callable
  abstract_state: Any
  state_shardings: Any
  init: Callable       # (rng key, pretrained encoder params or None) → train state
  step: Callable       # (state, batch) → (state, metrics)
  predict: Callable    # (params, *inputs) → lesion probabilities (B, H, W, D) or stage probabilities (B, C)


def _inputs(config, batch) -> tuple:
  if config.task == "lesions":
    return batch["pet"], batch["ct"]
  return batch["pet"], batch["ct"], batch["slab_valid"], batch["position"]


def build(config: ml_collections.ConfigDict, mesh: Mesh, example: dict[str, np.ndarray],
          pretrained: dict[str, Any] | None = None) -> Setup:
  """Model, optimizer, shardings and jitted init/step/predict; `example` (a batch) fixes the input shapes."""
  rules = common.rules_tuple(config.sharding_rules)
  model = make_model(config)
  example = {k: v[:1] for k, v in example.items()}

  def init_params(rng):
    return model.init({"params": rng}, *_inputs(config, example))["params"]

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed_params = jax.eval_shape(init_params, jax.random.key(0))
  if pretrained is not None:
    expected = nn.unbox(boxed_params)["backbone"]
    for name, tree in pretrained.items():
      got = jax.tree.map(np.shape, tree)
      want = jax.tree.map(lambda x: x.shape, expected.get(name))
      if name not in expected or got != want:
        raise UserError(f"--config.init_from: the pretrained {name} does not match the backbone config")
  tx, schedule = make_optimizer(config, nn.unbox(boxed_params))

  def init_state(rng, encoders):
    params = init_params(rng)
    if encoders is not None:
      backbone = dict(params["backbone"])
      for name, tree in encoders.items():
        backbone[name] = jax.tree.map(
            lambda box, value: box.replace_boxed(value) if isinstance(box, nn.Partitioned) else value,
            backbone[name], tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
      params = {**params, "backbone": backbone}
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(nn.unbox(params))}

  def loss_fn(params, batch, rng):
    del rng
    out = model.apply({"params": params}, *_inputs(config, batch))
    if config.task == "lesions":
      return lesions.dice_bce_loss(out, batch["label"], batch["valid"])
    logits = out[0]
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["stage"]))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["stage"])
    return loss, {"loss": loss, "accuracy": accuracy}

  def train_step(state, batch):
    grads, metrics = common.accumulate_gradients(loss_fn, state["params"], batch, jax.random.key(0),
                                                 config.optim.accum_steps)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  def predict(params, *inputs):
    out = model.apply({"params": params}, *inputs)
    return jax.nn.sigmoid(out) if config.task == "lesions" else jax.nn.softmax(out[0], axis=-1)

  return Setup(model, mesh, rules, schedule, *common.jit_training(init_state, train_step, mesh, rules, None),
               jax.jit(predict))


# ------------------------------------------------------------------------------------------------ data


def window(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  return (*config.data.plane_size, config.data.depth)


def train_studies(config: ml_collections.ConfigDict) -> list[ddata.Study]:
  """The labelled training studies: every study of the seeded subset of training patients (`label_patients`
  of them, or the `label_fraction` share)."""
  patients = ddata.split_patients(config.data_dir, "train")
  if not patients:
    raise UserError(f"{config.data_dir}: the train split has no studies")
  try:
    chosen = ddata.labelled_subset(patients, config.label_fraction, config.seed, config.label_patients)
  except UserError as e:
    raise UserError(f"{config.data_dir}: {e}") from None
  studies = ddata.read_studies(config.data_dir, "train", config.data, chosen)
  if config.task == "staging":
    studies = [s for s in studies if s.stage in (1, 2, 3, 4)]
    if not studies:
      raise UserError(f"{config.data_dir}: no training study of the chosen patients has a known Ann Arbor "
                      "stage")
  return studies


class Batches:
  """Training batches as a function of the step (deterministic, so resuming needs no iterator state)."""

  def __init__(self, config: ml_collections.ConfigDict, studies: list[ddata.Study]):
    self.config, self.studies = config, studies
    self.pad = ddata.pad_values(config.data)
    _, hot = pipelines.normalize(np.float32(0), np.float32(config.hard_negative_suv), config.data)
    self.centres = [ddata.slab_centres(s, float(hot)) for s in studies]
    if config.task == "staging":
      self.stages = np.array([ddata.stage_index(s.stage, config.staging.classes) for s in studies], np.int32)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    config = self.config
    rng = np.random.default_rng([config.seed, step])
    if config.task == "lesions":
      return ddata.sample_slabs(self.studies, self.centres, window(config), config.batch_size, rng, self.pad,
                                config.foreground_fraction, config.hard_negative_fraction)
    picks = rng.integers(len(self.studies), size=config.batch_size)
    slabs = config.staging.max_slabs
    stacks = [ddata.lesion_stack(self.studies[i], ddata.staging_regions(
        self.centres[i]["lesion"], slabs, rng, self.centres[i]["hot"], config.staging.distractors),
        window(config), slabs, self.pad, rng) for i in picks]
    batch = {k: np.stack([stack[k] for stack in stacks]) for k in stacks[0]}
    batch["stage"] = self.stages[picks]
    return batch


# ------------------------------------------------------------------------------------------------ train


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming if `workdir` has checkpoints), evaluates on `eval.split`; returns the results dict."""
  config = resolve(config)
  validate(config)

  # ------------------------------------------------------------------ set-up
  common.initialize_distributed(config)
  spacing = records.read_manifest(config.data_dir)["spacing"]  # before the workdir gets a file
  paths.makedirs(workdir)
  if jax.process_index() == 0:
    saved = config.to_dict()
    saved["spacing"] = spacing
    rundir.write_config(workdir, json.dumps(saved, indent=2, default=list))

  # ------------------------------------------------------------------ mesh
  mesh = common.create_mesh(config.mesh)
  common.check_batch_divisible(config.batch_size, mesh, config.optim.accum_steps)

  # ------------------------------------------------------------------ data
  batches = Batches(config, train_studies(config))
  example = batches(0)

  # ------------------------------------------------------------------ model, optimizer, shardings, step
  pretrained = rundir.load_encoders(config.init_from) if config.init_from else None
  setup = build(config, mesh, example, pretrained)

  # ------------------------------------------------------------------ checkpoint: resume or init
  ckpt = rundir.Checkpointer(paths.join(workdir, rundir.CHECKPOINTS), config.checkpoint.every_steps,
                             config.checkpoint.keep, config.checkpoint.async_save)
  logger = common.MetricsLogger(workdir, config.total_steps)
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    state, start_step = common.restore_or_init(
        ckpt, logger, setup.abstract_state, setup.state_shardings,
        lambda: setup.init(jax.random.key(config.seed), pretrained))

  # ------------------------------------------------------------------ loop
  book = common.StepBookkeeper(ckpt, logger, config.total_steps, config.log_every_steps, config.batch_size,
                               start_step)
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    for step in range(start_step, config.total_steps):
      state, metrics = setup.step(state, common.global_batch(batches(step), mesh))
      book.after_step(step + 1, state, metrics)
  book.close()

  # ------------------------------------------------------------------ evaluation
  results = evaluate(config, setup, state["params"])
  if jax.process_index() == 0:
    records.write_atomic(paths.join(workdir, "results.json"), json.dumps(results, indent=1, default=float))
  return results


# ------------------------------------------------------------------------------------------------ evaluation


def predict_volume(config: ml_collections.ConfigDict, setup: Setup, params: Any,
                   study: ddata.Study) -> np.ndarray:
  """Lesion probability (X, Y, Z) of a whole study on its stored canonical grid (sliding window in the
  view)."""
  size = config.eval.batch_size

  def predict(pet, ct):
    n = len(pet)
    fill = lambda x: np.concatenate([x, np.repeat(x[-1:], size - n, axis=0)]) if n < size else x
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      return np.asarray(setup.predict(params, fill(pet), fill(ct)))[:n]

  prob = lesions.sliding_window_probabilities(predict, study.pet, study.ct, window(config),
                                              config.eval.overlap, size, ddata.pad_values(config.data))
  return np.ascontiguousarray(pipelines.from_view(prob, config.data.view))


def load_lesion_model(config: ml_collections.ConfigDict) -> tuple | None:
  """(config, setup, params) of the lesion fine-tune `staging.lesions_from` (None when unset), checked to read
  studies in the staging run's view and normalisation."""
  if not config.staging.lesions_from:
    return None
  loaded = load_finetuned(config.staging.lesions_from)
  if loaded[0].task != "lesions":
    raise UserError(f"--config.staging.lesions_from {config.staging.lesions_from}: is a {loaded[0].task} "
                    "run, not a lesion fine-tune")
  for key in ("view", "ct_clip", "suv_clip", "suv_scale"):
    if np.ndim(loaded[0].data[key]) != np.ndim(config.data[key]) or np.any(
        np.asarray(loaded[0].data[key]) != np.asarray(config.data[key])):
      raise UserError(f"--config.staging.lesions_from {config.staging.lesions_from}: data.{key} "
                      f"{loaded[0].data[key]} differs from this run's {config.data[key]}")
  return loaded


def lesion_mask(config: ml_collections.ConfigDict, setup: Setup, params: Any,
                study: ddata.Study) -> np.ndarray:
  """A lesion model's binary lesion map of a study, in view axes (H, W, S)."""
  prob = predict_volume(config, setup, params, study) >= config.eval.threshold
  return pipelines.to_view(prob, config.data.view)


def stage_rows(truth_stages: list[int], predicted: dict[str, list[int]]) -> dict[str, Any]:
  """Classification metrics of stages 1–4 given by rule, per source ({"from_truth": [...], …})."""
  labels = np.asarray(truth_stages) - 1
  return {"n": len(labels), **{name: metrics_lib.classification_metrics(np.eye(4)[np.asarray(stages) - 1],
                                                                          labels)
                               for name, stages in predicted.items()}}


def evaluate(config: ml_collections.ConfigDict, setup: Setup, params: Any) -> dict[str, Any]:
  """Metrics on `eval.split`.

  lesions → per-study Dice, FPV, FNV, HD95, NSD on the stored grid (and means), `baselines` (the classical
  rules of `petfm.eval.baselines` on the same studies) and, when the manifest names the organ labels,
  `staging_by_rule` (Ann Arbor stage by `petfm.eval.staging` from the true and from the predicted lesion map);
  staging → accuracy, macro-F1, one-vs-rest AUC over studies with a known stage (slabs at the true lesions,
  or at those the lesion run `staging.lesions_from` predicts: `lesions` says which), per-study `studies` and
  `rule_from_truth`."""
  fields = (*ddata.STUDY_FIELDS, "organs")
  found = ddata.read_records(config.data_dir, config.eval.split, fields)
  chosen = list(itertools.islice(found, config.eval.max_studies or None))
  if not chosen:
    raise UserError(f"{config.data_dir}: split {config.eval.split!r} has no studies to evaluate on")
  organ_labels = records.read_manifest(config.data_dir).get("organ_labels", {})
  stations = staging_rule.station_table(organ_labels)
  staged = [r for r in chosen if r["stage"] in (1, 2, 3, 4)]
  by_rule = lambda mask, r: staging_rule.stage_from_sites(staging_rule.involved_sites(mask, r["organs"]),
                                                         stations)  # noqa: E731
  if config.task == "lesions":
    rows, predicted = [], {}
    for record in chosen:
      study = ddata.view_study(record, config.data)
      pred = predict_volume(config, setup, params, study) >= config.eval.threshold
      rows.append({"study_id": study.study_id, **lesions.study_metrics(pred, record["label"], study.spacing)})
      predicted[study.study_id] = pred
    results = {"task": "lesions", "split": config.eval.split, **lesions.summarize(rows), "studies": rows,
               "baselines": baselines.evaluate(chosen)}
    if stations and staged:
      results["staging_by_rule"] = stage_rows(
          [r["stage"] for r in staged], {"from_truth": [by_rule(r["label"], r) for r in staged],
                                         "from_prediction": [by_rule(predicted[r["study_id"]], r)
                                                             for r in staged]})
    return results
  if not staged:
    raise UserError(f"{config.data_dir}: no {config.eval.split} study has a known Ann Arbor stage")
  pad = ddata.pad_values(config.data)
  lesion_model = load_lesion_model(config)
  scores = []
  for record in staged:
    study = ddata.view_study(record, config.data)
    mask = study.label if lesion_model is None else lesion_mask(*lesion_model, study)
    regions = ddata.staging_regions(ddata.components(mask > 0), config.staging.max_slabs)
    stack = ddata.lesion_stack(study, regions, window(config), config.staging.max_slabs, pad)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      scores.append(np.asarray(setup.predict(params, *(stack[k][None] for k in (
          "pet", "ct", "slab_valid", "position"))))[0])
  labels = np.array([ddata.stage_index(r["stage"], config.staging.classes) for r in staged])
  results = {"task": "staging", "split": config.eval.split,
             "lesions": "predicted" if lesion_model is not None else "true",
             **metrics_lib.classification_metrics(np.stack(scores), labels),
             "studies": [{"study_id": r["study_id"], "label": int(label), "predicted": int(np.argmax(score))}
                         for r, label, score in zip(staged, labels, scores)]}
  if stations and config.staging.classes == "ann_arbor":
    results["rule_from_truth"] = stage_rows([r["stage"] for r in staged],
                                            {"from_truth": [by_rule(r["label"], r) for r in staged]})
  return results


def load_finetuned(workdir: str) -> tuple[ml_collections.ConfigDict, Setup, Any]:
  """(config, setup on a one-device mesh, latest params) of a `petfm finetune` workdir."""
  saved = rundir.read_config(workdir, "--checkpoint", "finetune")
  spacing = saved.pop("spacing", None)
  config = ml_collections.ConfigDict(saved)
  for node, key in ((config.model, "patch_size"), (config.data, "plane_size")):
    node[key] = tuple(node[key])
  config.init_from = ""          # the params come from the fine-tuning checkpoint
  config.spacing = spacing
  mesh = rundir.eval_mesh()
  h, w, d = window(config)
  if config.task == "lesions":
    example = {"pet": np.zeros((1, h, w, d), np.float32), "ct": np.zeros((1, h, w, d), np.float32)}
  else:
    s = config.staging.max_slabs
    example = {"pet": np.zeros((1, s, h, w, d), np.float32), "ct": np.zeros((1, s, h, w, d), np.float32),
               "slab_valid": np.ones((1, s), bool), "position": np.zeros((1, s, 3), np.float32)}
  setup = build(config, mesh, example)
  return config, setup, rundir.restore_params(workdir, setup, "--checkpoint")


def summary_line(results: dict[str, Any]) -> str:
  """Human-readable lines of a run's results (lesions: the learned model, then each classical baseline)."""
  if results["task"] == "lesions":
    def figures(r: dict[str, Any]) -> str:
      return f"Dice {r['dice']:.3f}, FPV {r['fpv_ml']:.1f} mL, FNV {r['fnv_ml']:.1f} mL"

    lines = [f"lesion segmentation on the {results['split']} split ({len(results['studies'])} studies), "
             "whole volumes, autoPET metrics:", f"  {'learned model':18s} {figures(results)}"]
    lines += [f"  {name:18s} {figures(row)}" for name, row in results.get("baselines", {}).items()]
    rule = results.get("staging_by_rule")
    if rule:
      lines.append(f"Ann Arbor stage by rule ({rule['n']} studies): accuracy "
                   f"{rule['from_prediction']['accuracy']:.3f} from the predicted lesion map, "
                   f"{rule['from_truth']['accuracy']:.3f} from the true one")
    return "\n".join(lines)
  line = (f"Ann Arbor staging on the {results['split']} split: accuracy {results['accuracy']:.3f}, "
          f"macro-F1 {results['macro_f1']:.3f}, AUC {results['macro_auc']:.3f}")
  if "rule_from_truth" in results:
    truth = results["rule_from_truth"]["from_truth"]["accuracy"]
    line += f" (stage by rule from the true lesion map: {truth:.3f})"
  return line


def main(argv: list[str]) -> int:
  parsed = config_lib.parse_command_line(
      argv, "finetune", workdir="output folder: checkpoints, metrics, results.json")
  with checks.discarded_on_error(parsed.workdir):
    results = train(parsed.config, parsed.workdir)
  print(json.dumps({k: v for k, v in results.items() if k not in ("studies", "baselines", "staging_by_rule",
                                                                 "rule_from_truth")}, default=float))
  print(summary_line(results))
  return 0
