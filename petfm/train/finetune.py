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
from petfm.downstream import data as ddata, finetuned, lesions, staging
from petfm.errors import UserError
from petfm.models import fratmae
from petfm.train import common

# Each task is a module with the interface of `petfm.downstream.finetuned`; the trainer dispatches once.
TASKS = {"lesions": lesions, "staging": staging}
PROTOCOLS = ("linear", "finetune", "scratch")


# ------------------------------------------------------------------------------------------------ config


def validate(config: ml_collections.ConfigDict) -> None:
  config_lib.check_run(config)
  config_lib.check_choice(config, "task", tuple(TASKS))
  config_lib.check_choice(config, "protocol", PROTOCOLS)
  TASKS[config.task].validate(config)
  config_lib.check(0 < config.label_fraction <= 1, "label_fraction",
                   f"must be in (0, 1], got {config.label_fraction}")
  config_lib.check(isinstance(config.label_patients, int) and config.label_patients >= 0, "label_patients",
                   f"must be an integer >= 0 (0 = use label_fraction), got {config.label_patients!r}")
  config_lib.check(not config.label_patients or config.label_fraction == 1, "label_patients",
                   f"set either label_patients or label_fraction, not both (label_fraction="
                   f"{config.label_fraction})")
  config_lib.check(0 < config.optim.layer_decay <= 1, "optim.layer_decay", "must be in (0, 1]")
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

  def predictor(self, params: Any, task) -> finetuned.Predictor:
    """The model with `params` (e.g. the trained state's) on this mesh."""
    return finetuned.Predictor(self.model, params, task.probabilities, self.mesh, self.rules)


def build(config: ml_collections.ConfigDict, mesh: Mesh,
          pretrained: dict[str, Any] | None = None) -> Setup:
  """Model, optimizer, shardings and jitted init/step of the task `config.task`."""
  task = TASKS[config.task]
  rules = config_lib.rules_tuple(config.sharding_rules)
  model = task.make_model(config)
  example = task.example(config)

  def init_params(rng):
    return model.init({"params": rng}, *task.inputs(example))["params"]

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
    return task.loss(model.apply({"params": params}, *task.inputs(batch)), batch)

  def train_step(state, batch):
    grads, metrics = common.accumulate_gradients(loss_fn, state["params"], batch, jax.random.key(0),
                                                 config.optim.accum_steps)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return Setup(model, mesh, rules, schedule, *common.jit_training(init_state, train_step, mesh, rules, None))


# ------------------------------------------------------------------------------------------------ data


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
  return TASKS[config.task].labelled(ddata.read_studies(config.data_dir, "train", config.data, chosen),
                                    config.data_dir)


class Batches:
  """Training batches of the task as a function of the step (deterministic, so resuming needs no iterator
  state)."""

  def __init__(self, config: ml_collections.ConfigDict, studies: list[ddata.Study]):
    self.config, self.studies, self.task = config, studies, TASKS[config.task]
    self.pad = ddata.pad_values(config.data)
    _, hot = pipelines.normalize(np.float32(0), np.float32(config.hard_negative_suv), config.data)
    self.centres = [ddata.slab_centres(s, float(hot)) for s in studies]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.config.seed, step])
    return self.task.sample(self.config, self.studies, self.centres, rng, self.pad)


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

  # ------------------------------------------------------------------ model, optimizer, shardings, step
  pretrained = rundir.load_encoders(config.init_from) if config.init_from else None
  setup = build(config, mesh, pretrained)

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
  results = evaluate(config, setup.predictor(state["params"], TASKS[config.task]))
  if jax.process_index() == 0:
    # Its `calibrated` fields (chosen on held-out data) complete config.json for `finetuned.load`; a re-run
    # keeps the previous ones until its own evaluation replaces this file.
    rundir.write_results(workdir, json.dumps(results, indent=1, default=float))
  return results


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate(config: ml_collections.ConfigDict, predictor: finetuned.Predictor) -> dict[str, Any]:
  """The task's metrics (its `evaluate`) on the first `eval.max_studies` studies of `eval.split`."""
  found = ddata.read_records(config.data_dir, config.eval.split, (*ddata.STUDY_FIELDS, "organs"))
  chosen = list(itertools.islice(found, config.eval.max_studies or None))
  if not chosen:
    raise UserError(f"{config.data_dir}: split {config.eval.split!r} has no studies to evaluate on")
  return TASKS[config.task].evaluate(config, predictor, chosen)


def main(argv: list[str]) -> int:
  parsed = config_lib.parse_command_line(
      argv, "finetune", workdir="output folder: checkpoints, metrics, results.json")
  with checks.discarded_on_error(parsed.workdir):
    results = train(parsed.config, parsed.workdir)
  print(json.dumps({k: v for k, v in results.items() if not isinstance(v, (dict, list))}, default=float))
  print(TASKS[results["task"]].summary(results))
  return 0
