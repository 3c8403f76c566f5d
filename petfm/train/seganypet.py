"""SegAnyPET click-simulation training: `petfm train-seganypet --config experiments/seganypet.py:tiny
--workdir DIR`.

Trainer order as in `pretrain.py`: set-up → mesh → data → model, abstract init and shardings → train step →
checkpoint (resume or init) → loop. Re-running in the same workdir resumes exactly (params, optimizer state,
step, RNG and the grain iterator state). The workdir also gets `model.json` (`promptable.ModelSpec`: backbone,
sizes, crop spacing, channels, intensities), which `eval-clicks` and `segment` read.

One train step (a single jitted function) per batch of crops around targets (every organ of the organ map and
every lesion component; `crop_dataset`, with `data.balance_kinds` half of them lesions): the image embedding
is computed once, then `clicks.rounds` rounds
(a `lax.scan`) each draw one click per sample from the current error region (`clicks.sample_clicks`: FN →
positive, FP → negative; the first round has an empty prediction, so its click is a positive truth voxel),
add it to the clicks so far (fixed-size point array; future slots are ABSENT, invisible to the decoder, so
round t sees exactly its t clicks plus the official padding point, as in evaluation), and decode with the
previous low-res logits as the mask prompt (zeros in round 1, as the official loop; no stop-gradient
between rounds, as the official loop). Loss = Σ over rounds of Dice + BCE on the logits upsampled to the crop
(MONAI DiceCE(sigmoid, squared_pred): soft Dice with squared predictions, smooth 1e-5, plus mean BCE).
Differences to the official loop: clicks accumulate (its `--multi_click`), and its random "no-point" round is
not simulated.

CPCL (`config.cpcl.enabled`), the variant implemented here. The paper's equations are not available and the
released `train_cpcl.py` does not run (spec §5.3); this follows its evident intent ("variant A", with its
label bug fixed): the predictions of the click rounds act as prompted replicas of one another. Per voxel, the
ensemble is the mean of the rounds' probabilities and the uncertainty their variance; voxels whose
uncertainty exceeds the sample's mean uncertainty are "uncertain". The rectified label keeps the given label
outside the uncertain voxels and takes the ensemble's vote (mean probability > 0.5) inside (the released code
intended GT XOR U, but flipping every uncertain label also flips voxels the rounds agree with the label on).
Each round's loss becomes (2·DiceCE(pred, label) + DiceCE(pred, rectified)) / 3, the rectified label under
stop-gradient, from step `cpcl.start_step` on (before that the plain loss), for every sample (the records
carry no high/low label-quality flag).
"""

from __future__ import annotations

import dataclasses
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
from petfm.errors import UserError
from petfm.models import sam3d, sam3d_twin
from petfm.models.sam3d import ABSENT
from petfm.seganypet import clicks, official_weights, promptable
from petfm.train import common

DICE_SMOOTH = 1e-5


def validate(config: ml_collections.ConfigDict) -> None:
  config_lib.check_choice(config, "backbone", promptable.BACKBONES)
  config_lib.check_choice(config, "pet_norm", promptable.PET_NORMS)
  config_lib.check_run(config)
  config_lib.check(config.clicks.rounds > 0, "clicks.rounds", f"must be > 0, got {config.clicks.rounds}")
  config_lib.check(tuple(config.data.crop_size) == (config.model.img_size,) * 3, "data.crop_size",
                   f"{tuple(config.data.crop_size)} must be model.img_size³ = {(config.model.img_size,) * 3}")
  wanted = ("pet", "ct")[:config.model.in_chans] if config.backbone == "sam3d" else ("pet", "ct")
  config_lib.check(tuple(config.data.channels) == wanted, "data.channels",
                   f"backbone {config.backbone} reads {wanted}, got {tuple(config.data.channels)}")
  config_lib.check(config.pet_norm != "znorm" or config.data.suv_scale == "linear", "pet_norm",
                   "'znorm' needs config.data.suv_scale='linear' (z-normalised SUV, as SAM-Med3D)")
  config_lib.check(config.pet_norm != "znorm" or config.data.augment.intensity_shift == 0, "data.augment",
                   "intensity_shift must be 0 with pet_norm='znorm' (SUV 0 must stay at -1)")


def model_spec(config: ml_collections.ConfigDict) -> promptable.ModelSpec:
  """The promptable model of a config: Sam3D sizes from `model` (or from the `init_from` checkpoint)."""
  if config.backbone == "sam3d" and config.init_from:
    sam, _ = _converted(config.init_from)
    config_lib.check(sam.img_size == config.model.img_size, "init_from",
                     f"checkpoint crop size {sam.img_size} differs from model.img_size "
                     f"{config.model.img_size}")
  else:
    fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.model.items()
              if k not in ("sam", "encoder")}
    sam = sam3d.get_config(config.model.sam, dtype=config.dtype, **fields)
  spacing = promptable.spec_spacing(config.data_dir, config.data.zoom)
  encoder = (tuple((k, int(v)) for k, v in config.model.encoder.items()) if config.backbone == "fratmae_twin"
             else ())
  return promptable.ModelSpec(config.backbone, sam, encoder, spacing, tuple(config.data.channels),
                              config.pet_norm, tuple(config.data.ct_clip), float(config.data.suv_clip),
                              config.data.suv_scale)


def _converted(directory: str) -> tuple[sam3d.Sam3DConfig, Any]:
  if not paths.isdir(directory):
    raise UserError(f"--config.init_from {directory}: no such directory")
  return official_weights.load(directory)


def pretrained_params(config: ml_collections.ConfigDict, spec: promptable.ModelSpec) -> dict[str, Any] | None:
  """Variables to start from (`init_from`): {'params', 'buffers'} of a converted Sam3D, or {'params': the twin
  encoders} of a pretraining run."""
  if not config.init_from:
    return None
  if config.backbone == "sam3d":
    variables = _converted(config.init_from)[1]
    return {"params": variables["params"], "buffers": variables["buffers"]}
  saved = rundir.read_config(config.init_from, "--config.init_from", "pretrain", ("data.view",))
  view = saved["data"]["view"]
  encoders = sam3d_twin.encoders_from_pretraining(rundir.load_encoders(config.init_from), view,
                                                  spec.sam.patch_size)
  return {"params": encoders}


# ------------------------------------------------------------------------------------------------- losses


def dice_ce(logits: jax.Array, target: jax.Array) -> jax.Array:
  """MONAI DiceCE(sigmoid, squared_pred) per sample: logits, target (B, X, Y, Z) → (B,)."""
  axes = (1, 2, 3)
  p = jax.nn.sigmoid(logits)
  dice = 1 - (2 * (p * target).sum(axes) + DICE_SMOOTH) / ((p * p).sum(axes) + (target * target).sum(axes)
                                                             + DICE_SMOOTH)
  bce = optax.sigmoid_binary_cross_entropy(logits, target).mean(axes)
  return dice + bce


def hard_dice(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Dice of sigmoid > 0.5 per sample (1 when both are empty)."""
  pred = (logits > 0).astype(jnp.float32)
  axes = (1, 2, 3)
  denom = pred.sum(axes) + target.sum(axes)
  return jnp.where(denom > 0, 2 * (pred * target).sum(axes) / jnp.maximum(denom, 1), 1.0)


def click_rounds(model: sam3d.Sam3D, variables: Any, spec: promptable.ModelSpec, batch: dict[str, jax.Array],
                 rounds: int, rng: jax.Array) -> jax.Array:
  """Simulated interaction: → upsampled logits of every round (R, B, S, S, S) (see module doc)."""
  embedding = promptable.embed(model, variables, batch["image"], spec)
  truth, valid = batch["mask"] > 0, batch["voxel_valid"]
  b, s, m = truth.shape[0], spec.sam.img_size, spec.sam.mask_size

  def round_(carry, t):
    low, points, labels = carry
    pred = sam3d.upsample_logits(low, s) > 0
    point, label = clicks.sample_clicks(jax.random.fold_in(rng, t), pred, truth, valid)
    points = jax.lax.dynamic_update_slice_in_dim(points, point[:, None], t, axis=1)
    labels = jax.lax.dynamic_update_slice_in_dim(labels, label[:, None], t, axis=1)
    low, _ = promptable.prompt_and_decode(model, variables, embedding, points, labels, low)
    return (low, points, labels), low

  init = (jnp.zeros((b, m, m, m)), jnp.zeros((b, rounds, 3), jnp.int32),
          jnp.full((b, rounds), ABSENT, jnp.int32))
  _, lows = jax.lax.scan(round_, init, jnp.arange(rounds))
  return jax.vmap(lambda low: sam3d.upsample_logits(low, s))(lows)


def click_loss(logits: jax.Array, truth: jax.Array,
               cpcl: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """logits (R, B, S, S, S), truth (B, S, S, S) float, cpcl (bool scalar: use CPCL) → loss, metrics."""
  plain = jax.vmap(dice_ce, (0, None))(logits, truth)                           # (R, B)
  probs = jax.nn.sigmoid(logits)
  ensemble, uncertainty = probs.mean(0), probs.var(0)
  uncertain = uncertainty > uncertainty.mean((1, 2, 3), keepdims=True)
  rectified = jax.lax.stop_gradient(jnp.where(uncertain, (ensemble > 0.5).astype(jnp.float32), truth))
  with_cpcl = (2 * plain + jax.vmap(dice_ce, (0, None))(logits, rectified)) / 3
  per_round = jnp.where(cpcl, with_cpcl, plain)
  metrics = {"loss": per_round.sum(0).mean(), "dice_first": hard_dice(logits[0], truth).mean(),
             "dice_last": hard_dice(logits[-1], truth).mean(),
             "rectified_fraction": (rectified != truth).mean()}
  return metrics["loss"], metrics


# ------------------------------------------------------------------------------------------ setup and step


@dataclasses.dataclass
class Setup:
  spec: promptable.ModelSpec
  model: sam3d.Sam3D
  mesh: Mesh
  rules: tuple
  abstract_state: Any
  state_shardings: Any
  init: Callable               # (rng key, pretrained params or None) → sharded train state
  step: Callable               # (state, global batch) → (state, scalar metrics); donates the state


def build(config: ml_collections.ConfigDict, mesh: Mesh, spec: promptable.ModelSpec,
          pretrained: dict[str, Any] | None = None) -> Setup:
  rules = config_lib.rules_tuple(config.sharding_rules)
  model = promptable.build_model(spec)
  tx, schedule = common.make_optimizer(config.optim, config.total_steps)

  def init_state(rng, pretrained):
    params_rng, state_rng = jax.random.split(rng)
    variables = promptable.init_variables(spec, params_rng)
    params, buffers = variables["params"], variables["buffers"]
    if pretrained is not None:
      loaded = {**nn.unbox(params), **pretrained["params"]}
      if jax.tree.structure(loaded) != jax.tree.structure(nn.unbox(params)):
        raise UserError("--config.init_from: its parameters do not match the model config")
      params = jax.tree.map(lambda box, value: box.replace_boxed(value) if isinstance(box, nn.Partitioned)
                            else value, params, loaded, is_leaf=lambda x: isinstance(x, nn.Partitioned))
      buffers = pretrained.get("buffers", buffers)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "buffers": buffers,
            "opt_state": tx.init(params), "rng": jax.random.key_data(state_rng)}

  def loss_fn(params, batch, rng, buffers, cpcl):
    logits = click_rounds(model, {"params": params, "buffers": buffers}, spec, batch, config.clicks.rounds,
                          rng)
    return click_loss(logits, (batch["mask"] > 0).astype(jnp.float32), cpcl)

  def train_step(state, batch):
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    cpcl = jnp.logical_and(config.cpcl.enabled, state["step"] >= config.cpcl.start_step)
    batch = {k: batch[k] for k in ("image", "mask", "voxel_valid")}
    grads, metrics = common.accumulate_gradients(
        lambda p, b, r: loss_fn(p, b, r, state["buffers"], cpcl), state["params"], batch, step_rng,
        config.optim.accum_steps)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
    return {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  abstract_pretrained = None if pretrained is None else jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), pretrained)
  return Setup(spec, model, mesh, rules,
               *common.jit_training(init_state, train_step, mesh, rules, abstract_pretrained))


# --------------------------------------------------------------------------------------------------- train


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains to `config.total_steps` (resuming if `workdir` has checkpoints); returns the last logged
  metrics."""
  validate(config)

  # ------------------------------------------------------------------ set-up
  common.initialize_distributed(config)
  records.read_manifest(config.data_dir)  # bad data: an error before the workdir gets a file
  paths.makedirs(workdir)
  spec = model_spec(config)
  if jax.process_index() == 0:
    rundir.write_config(workdir, config.to_json_best_effort(indent=2))
    records.write_atomic(paths.join(workdir, "model.json"), spec.to_json())

  # ------------------------------------------------------------------ mesh
  mesh = common.create_mesh(config.mesh)
  common.check_batch_divisible(config.batch_size, mesh, config.optim.accum_steps)

  # ------------------------------------------------------------------ data
  train_iter = iter(pipelines.crop_dataset(config.data_dir, "train", config.data, seed=config.seed,
                                           train=True, batch_size=config.batch_size // jax.process_count()))

  # ------------------------------------------------------------------ model, optimizer, shardings, step
  pretrained = pretrained_params(config, spec)
  setup = build(config, mesh, spec, pretrained)

  # ------------------------------------------------------------------ checkpoint: resume or init
  ckpt = rundir.Checkpointer(paths.join(workdir, rundir.CHECKPOINTS), config.checkpoint.every_steps,
                             config.checkpoint.keep, config.checkpoint.async_save)
  logger = common.MetricsLogger(workdir, config.total_steps)
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    state, start_step = common.restore_or_init(
        ckpt, logger, setup.abstract_state, setup.state_shardings,
        lambda: setup.init(jax.random.key(config.seed), pretrained), train_iter)

  # ------------------------------------------------------------------ loop
  book = common.StepBookkeeper(ckpt, logger, config.total_steps, config.log_every_steps, config.batch_size,
                               start_step)
  compiled = None
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    for step in range(start_step, config.total_steps):
      raw = next(train_iter)
      batch = common.global_batch({k: raw[k] for k in ("image", "mask", "voxel_valid")}, mesh)
      if compiled is None:
        compiled = setup.step.lower(state, batch).compile()
        book.restart_clock()
      state, metrics = compiled(state, batch)
      book.after_step(step + 1, state, metrics, train_iter)
  book.close()
  return book.last_metrics


def main(argv: list[str]) -> int:
  parsed = config_lib.parse_command_line(
      argv, "train-seganypet", workdir="output folder: model.json, checkpoints, TensorBoard events")
  with checks.discarded_on_error(parsed.workdir):
    metrics = train(parsed.config, parsed.workdir)
  print(json.dumps({k: round(v, 6) for k, v in metrics.items()}))
  return 0
