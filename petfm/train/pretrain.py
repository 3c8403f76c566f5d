"""FratMAE / MAE pretraining: `petfm pretrain --config experiments/fratmae.py:tiny --workdir DIR`.

One readable trainer in big_vision's order: set-up → mesh → data → model, abstract init and shardings →
train step → checkpoint (resume or sharded init) → loop. Running the same command again in the same workdir
resumes from the latest checkpoint (params, optimizer state, step, RNG and the grain iterator state) and says
so; a checkpoint restores onto any mesh shape. `evaluate` scores a finished run (held-out reconstruction loss
per masked modality and a tracer linear probe on the PET embedding); the masking-ratio sweep uses it.
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
from petfm.eval import probe
from petfm.models import fratmae
from petfm.models.text_encoder import tokenize_words
from petfm.train import common

MODEL_FIELDS = ("pet", "ct", "tracer", "text_embedding", "text_tokens")


def validate(config: ml_collections.ConfigDict) -> None:
  """Clear errors for bad values before anything expensive starts."""
  config_lib.check_run(config)
  pipelines.check_config(config.data, "slab")
  fratmae.validate_config(config.model, config.data)


def model_batch(batch: dict[str, np.ndarray], prompt_tokens: np.ndarray) -> dict[str, np.ndarray]:
  """The fields the model reads, from a pipeline batch (host side, numpy)."""
  out = {k: batch[k] for k in MODEL_FIELDS if k in batch}
  out["text_tokens"] = prompt_tokens[batch["text_id"]]
  return out


@dataclasses.dataclass
class Setup:
  """A model with its optimizer, shardings and jitted functions on one mesh."""
  model: fratmae.FratMAE
  mesh: Mesh
  rules: tuple
  schedule: Callable
  abstract_state: Any          # ShapeDtypeStructs (unboxed)
  state_shardings: Any
  init: Callable               # rng key → sharded train state
  step: Callable               # (state, global batch) → (state, scalar metrics); donates the state


def build(config: ml_collections.ConfigDict, mesh: Mesh, example: dict[str, np.ndarray]) -> Setup:
  """Model, optimizer, shardings and the jitted init/step for `config` on `mesh`; `example` fixes the
  shapes."""
  rules = config_lib.rules_tuple(config.sharding_rules)
  model = fratmae.model_from_config(config.model, config.data, dtype=config.dtype)
  tx, schedule = common.make_optimizer(config.optim, config.total_steps)
  example = {k: v[:2] for k, v in example.items()}

  def init_state(rng):
    params_rng, masking_rng, state_rng = jax.random.split(rng, 3)
    params = model.init({"params": params_rng, "masking": masking_rng}, example, train=True)["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jax.random.key_data(state_rng)}

  def loss_fn(params, batch, rng):
    loss, metrics = model.apply({"params": params}, batch, train=True, rngs={"masking": rng})
    return loss, {k: v for k, v in metrics.items() if jnp.ndim(v) == 0}

  def train_step(state, batch):
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    grads, metrics = common.accumulate_gradients(loss_fn, state["params"], batch, step_rng,
                                                 config.optim.accum_steps)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                   lr=schedule(state["step"]))
    return {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return Setup(model, mesh, rules, schedule, *common.jit_training(init_state, train_step, mesh, rules))


def train_batches(config: ml_collections.ConfigDict) -> Any:
  """This process's training batches (its rows of every global batch; the pipelines docstring)."""
  return iter(pipelines.slab_dataset(config.data_dir, "train", config.data, seed=config.seed, train=True,
                                     batch_size=config.batch_size // jax.process_count()))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains to `config.total_steps` (resuming if `workdir` has checkpoints); returns the last logged
  metrics."""
  validate(config)

  # ------------------------------------------------------------------ set-up
  common.initialize_distributed(config)
  manifest = records.read_manifest(config.data_dir)  # bad data: an error before the workdir gets a file
  paths.makedirs(workdir)
  if jax.process_index() == 0:
    rundir.write_config(workdir, config.to_json_best_effort(indent=2))

  # ------------------------------------------------------------------ mesh
  mesh = common.create_mesh(config.mesh)
  common.check_batch_divisible(config.batch_size, mesh, config.optim.accum_steps)

  # ------------------------------------------------------------------ data
  prompt_tokens = tokenize_words(manifest["prompts"], config.model.text_length)
  train_iter = train_batches(config)
  example = model_batch(next(iter(pipelines.slab_dataset(
      config.data_dir, "train", config.data, seed=config.seed, train=False, batch_size=2))), prompt_tokens)

  # ------------------------------------------------------------------ model, optimizer, shardings, step
  setup = build(config, mesh, example)

  # ------------------------------------------------------------------ checkpoint: resume or sharded init
  ckpt = rundir.Checkpointer(paths.join(workdir, rundir.CHECKPOINTS), config.checkpoint.every_steps,
                             config.checkpoint.keep, config.checkpoint.async_save)
  logger = common.MetricsLogger(workdir, config.total_steps)
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    state, start_step = common.restore_or_init(ckpt, logger, setup.abstract_state, setup.state_shardings,
                                               lambda: setup.init(jax.random.key(config.seed)), train_iter)

  # ------------------------------------------------------------------ loop
  peak, peak_source = common.device_peak_flops()
  book = common.StepBookkeeper(ckpt, logger, config.total_steps, config.log_every_steps, config.batch_size,
                               start_step, peak * mesh.size)
  compiled = visual_batch = None
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    for step in range(start_step, config.total_steps):
      batch = common.global_batch(model_batch(next(train_iter), prompt_tokens), mesh)
      if compiled is None:
        compiled = setup.step.lower(state, batch).compile()
        book.flops_per_step = common.compiled_flops_per_device(compiled) * mesh.size
        logger.message(f"{mesh.size} device(s) {dict(mesh.shape)}; {book.flops_per_step / 1e9:.3g} GFLOP "
                       f"per step; peak {peak / 1e12:.3g} TFLOP/s per device ({peak_source})")
        visual_batch = batch
        common.sync_processes("petfm-pretrain-compiled")
        book.restart_clock()
      state, metrics = compiled(state, batch)
      done = step + 1
      book.after_step(done, state, metrics, train_iter)
      if config.image_every_steps and (done % config.image_every_steps == 0 or done == config.total_steps):
        save_reconstruction_png(setup.model, state["params"], visual_batch, done, workdir, logger)
  book.close()
  return book.last_metrics


def save_reconstruction_png(model, params, batch, step: int, workdir: str, logger) -> str:
  """PET/CT input, masked input and reconstruction of the first samples of `batch` → PNG (+ TensorBoard)."""
  from petfm import viz
  from jax.experimental import multihost_utils
  _, aux = jax.jit(lambda p, b: model.apply({"params": p}, b, train=True,
                                            rngs={"masking": jax.random.key(step)}))(params, batch)
  batch, aux = multihost_utils.process_allgather((batch, aux), tiled=True)   # every process takes part
  path = paths.join(workdir, "images", f"reconstruction_{step:07d}.png")
  if jax.process_index() == 0:
    viz.reconstruction_figure(batch, aux, path)
    logger.image("reconstruction", path, step)
  return path


# --------------------------------------------------------------------------------------------- evaluation


def restore_params(config: ml_collections.ConfigDict, workdir: str,
                   example: dict[str, np.ndarray]) -> tuple[Setup, Any]:
  """The latest params of a run, restored onto a one-device mesh (for evaluation on this host)."""
  setup = build(config, rundir.eval_mesh(), example)
  return setup, rundir.restore_params(workdir, setup, "--workdir")


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Held-out reconstruction loss per masked modality (fixed masks) and tracer linear-probe accuracy."""
  manifest = records.read_manifest(config.data_dir)
  prompt_tokens = tokenize_words(manifest["prompts"], config.model.text_length)

  def batches(split: str):
    ds = pipelines.slab_dataset(config.data_dir, split, config.data, seed=config.seed, train=False,
                                batch_size=config.eval.batch_size, shard_index=0, shard_count=1)
    for i, batch in enumerate(ds):
      if i >= config.eval.max_batches:
        break
      yield batch

  held_out = [b for split in config.eval.splits if split in manifest["splits"] for b in batches(split)]
  if not held_out:
    raise UserError(f"{config.data_dir}: none of the splits {list(config.eval.splits)} has studies to "
                    "evaluate on")
  setup, params = restore_params(config, workdir, model_batch(held_out[0], prompt_tokens))
  model = setup.model

  @jax.jit
  def losses(params, batch, rng):
    return model.apply({"params": params}, batch, train=False, rngs={"masking": rng})[1]

  @jax.jit
  def embed(params, batch):
    return model.apply({"params": params}, batch["pet"], batch["ct"], method=model.encode)["pooled_pet"]

  sums: dict[str, float] = {}
  for i, batch in enumerate(held_out):
    metrics = losses(params, model_batch(batch, prompt_tokens), jax.random.key(i))
    for name in ("rec_pet", "rec_ct"):
      sums[name] = sums.get(name, 0.0) + float(metrics[name])
  result = {name: total / len(held_out) for name, total in sums.items()}

  def features(batch_list):
    feats = [np.asarray(embed(params, b))[b["valid"]] for b in batch_list]
    labels = [b["tracer"][b["valid"]] for b in batch_list]
    return np.concatenate(feats), np.concatenate(labels)

  train_x, train_y = features(list(batches(config.eval.probe_split)))
  test_x, test_y = features(held_out)
  result["probe_tracer_accuracy"] = probe.probe_accuracy(train_x, train_y, test_x, test_y,
                                                         len(records.TRACERS))
  result["probe_chance"] = float(np.mean(test_y == np.bincount(train_y).argmax()))
  return result


def main(argv: list[str]) -> int:
  parsed = config_lib.parse_command_line(
      argv, "pretrain", workdir="output folder: checkpoints, TensorBoard events, images")
  with checks.discarded_on_error(parsed.workdir):
    metrics = train(parsed.config, parsed.workdir)
  if metrics:
    print(json.dumps({k: round(v, 6) for k, v in metrics.items()}))
  else:  # resumed from a checkpoint at total_steps
    print(f"{parsed.workdir}: already trained for {parsed.config.total_steps} steps; nothing to do")
  return 0
