"""FratMAE / MAE pretraining: `petfm pretrain --config experiments/fratmae.py:tiny --workdir DIR`.

One readable trainer in big_vision's order: set-up → mesh → data → model and abstract init → shardings →
sharded init → train step → checkpoint (resume) → loop. Running the same command again in the same workdir
resumes from the latest checkpoint (optimizer state, step, RNG and the grain iterator state) and says so;
the checkpoint can be restored onto a different mesh shape.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags

from petfm import config as config_lib
from petfm.data import pipelines, records
from petfm.models import fratmae
from petfm.models.text_encoder import tokenize_words
from petfm.train import common


def validate(config: ml_collections.ConfigDict) -> None:
  """Clear errors for bad values before anything expensive starts."""
  config_lib.check_choice(config, "method", fratmae.METHODS)
  config_lib.check_choice(config, "data.view", ("coronal", "axial"))
  config_lib.check(config.total_steps > 0, "total_steps", f"must be > 0, got {config.total_steps}")
  config_lib.check(config.batch_size > 0, "batch_size", f"must be > 0, got {config.batch_size}")
  config_lib.check(config.optim.accum_steps >= 1, "optim.accum_steps", "must be >= 1")
  config_lib.check(config.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be > 0")
  config_lib.check(config.checkpoint.keep > 0, "checkpoint.keep", "must be > 0")
  config_lib.check_choice(config, "dtype", ("float32", "bfloat16"))
  fratmae.validate_config(config.model, config.data)


def model_batch(batch: dict[str, np.ndarray], prompt_tokens: np.ndarray) -> dict[str, np.ndarray]:
  """The fields the model reads, from a pipeline batch (host side, numpy)."""
  out = {k: batch[k] for k in ("pet", "ct", "tracer", "text_embedding")}
  out["text_tokens"] = prompt_tokens[batch["text_id"]]
  return out


def example_batch(config: ml_collections.ConfigDict, batch_size: int, text_dim: int) -> dict[str, np.ndarray]:
  h, w = config.data.plane_size
  d = config.data.slab_depth
  return {
      "pet": np.zeros((batch_size, h, w, d), np.float32), "ct": np.zeros((batch_size, h, w, d), np.float32),
      "tracer": np.zeros((batch_size,), np.int32), "text_embedding": np.zeros((batch_size, text_dim), np.float32),
      "text_tokens": np.zeros((batch_size, config.model.text_length), np.int32),
  }


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains to `config.total_steps` (resuming if `workdir` has checkpoints); returns the last logged metrics."""
  validate(config)

  # ------------------------------------------------------------------ set-up
  common.initialize_distributed(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    records.write_atomic(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

  # ------------------------------------------------------------------ mesh
  mesh = common.create_mesh(config.mesh)
  rules = common.rules_tuple(config.sharding_rules)
  common.check_batch_divisible(config.batch_size, mesh, config.optim.accum_steps)

  # ------------------------------------------------------------------ data
  manifest = records.read_manifest(config.data_dir)
  prompt_tokens = tokenize_words(manifest["prompts"], config.model.text_length)
  local_batch_size = config.batch_size // jax.process_count()
  train_ds = pipelines.slab_dataset(
      config.data_dir, "train", config.data, seed=config.seed, train=True, batch_size=local_batch_size,
      shard_index=jax.process_index(), shard_count=jax.process_count())
  data_iter = iter(train_ds)
  text_dim = pipelines.text_embedding_dim(config.data_dir)

  # ------------------------------------------------------------------ model and abstract init
  model = fratmae.model_from_config(config.model, config.data, dtype=config.dtype)
  example = example_batch(config, 2, text_dim)

  def init_params(rng):
    params_rng, masking_rng = jax.random.split(rng)
    return model.init({"params": params_rng, "masking": masking_rng}, example, train=True)["params"]

  tx, schedule = common.make_optimizer(config.optim, config.total_steps)

  def init_state(rng):
    params = init_params(rng)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.fold_in(rng, 1))}

  # ------------------------------------------------------------------ shardings
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed_state = jax.eval_shape(init_state, jax.random.key(config.seed))
    state_shardings = common.shardings_for(boxed_state, mesh, rules)
  abstract_state = nn.unbox(boxed_state)
  data_sharding = common.batch_sharding(mesh)

  # ------------------------------------------------------------------ train step
  def loss_fn(params, batch, rng):
    return model.apply({"params": params}, batch, train=True, rngs={"masking": rng})

  def train_step(state, batch):
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    grads, metrics = common.accumulate_gradients(loss_fn, state["params"], batch, step_rng,
                                                 config.optim.accum_steps)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {k: v for k, v in metrics.items() if jnp.ndim(v) == 0}
    metrics.update(grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params),
                   lr=schedule(state["step"]))
    return {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step_fn = jax.jit(train_step, in_shardings=(state_shardings, data_sharding),
                      out_shardings=(state_shardings, common.replicated(mesh)), donate_argnums=0)

  # ------------------------------------------------------------------ checkpoint: resume or sharded init
  ckpt = common.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint.every_steps,
                             config.checkpoint.keep, config.checkpoint.async_save)
  logger = common.MetricsLogger(workdir, config.total_steps)
  start_step = ckpt.latest_step()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if start_step is not None:
      logger.message(f"resuming from the checkpoint at step {start_step} in {ckpt.directory}")
      state = ckpt.restore(start_step, common.abstract_with_shardings(abstract_state, state_shardings), data_iter)
    else:
      start_step = 0
      state = jax.jit(lambda r: nn.unbox(init_state(r)), out_shardings=state_shardings)(jax.random.key(config.seed))
  logger.advance(start_step)

  # ------------------------------------------------------------------ loop
  visual_batch = None
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    first = common.global_batch(model_batch(next(data_iter), prompt_tokens), mesh)
    compiled = step_fn.lower(state, first).compile()
    flops_per_step = common.compiled_flops_per_device(compiled) * mesh.size
    peak, peak_source = common.device_peak_flops()
    logger.message(f"{mesh.size} device(s) {dict(mesh.shape)}; {flops_per_step / 1e9:.2f} GFLOP per step; "
                   f"peak {peak / 1e12:.2f} TFLOP/s per device ({peak_source})")
    last_metrics: dict[str, float] = {}
    last_good = None if start_step == 0 else start_step
    t_last, steps_since = time.perf_counter(), 0
    batch = first
    for step in range(start_step, config.total_steps):
      if step > start_step:
        batch = common.global_batch(model_batch(next(data_iter), prompt_tokens), mesh)
      if visual_batch is None:
        visual_batch = batch
      state, metrics = compiled(state, batch)
      steps_since += 1
      done = step + 1
      log_now = done % config.log_every_steps == 0 or done == config.total_steps
      save_now = ckpt.should_save(done) or done == config.total_steps
      if log_now or save_now:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        common.check_finite(host, done, last_good)
        elapsed = time.perf_counter() - t_last
        host["examples_per_s"] = steps_since * config.batch_size / elapsed
        host["tflops_per_s"] = steps_since * flops_per_step / elapsed / 1e12
        host["mfu"] = steps_since * flops_per_step / elapsed / (peak * mesh.size)
        logger.write(done, host, advance=steps_since)
        last_metrics, t_last, steps_since = host, time.perf_counter(), 0
      if save_now:
        ckpt.save(done, state, data_iter, force=done == config.total_steps)
        last_good = done
      if config.image_every_steps and (done % config.image_every_steps == 0 or done == config.total_steps):
        save_reconstruction_png(model, state["params"], visual_batch, done, workdir, logger)
  ckpt.close()
  logger.close()
  return last_metrics


def save_reconstruction_png(model, params, batch, step: int, workdir: str, logger) -> str:
  """PET/CT input, masked input and reconstruction of the first samples of `batch` → PNG (+ TensorBoard)."""
  from petfm import viz
  _, aux = jax.jit(lambda p, b: model.apply({"params": p}, b, train=True,
                                            rngs={"masking": jax.random.key(step)}))(params, batch)
  path = os.path.join(workdir, "images", f"reconstruction_{step:07d}.png")
  viz.reconstruction_figure(jax.device_get(batch), jax.device_get(aux), path)
  logger.image("reconstruction", path, step)
  return path


def main(argv: list[str]) -> int:
  def define(fv):
    flags.DEFINE_string("workdir", None, "output folder: checkpoints, TensorBoard events, images", flag_values=fv)
  parsed = config_lib.parse_command_line(argv, "pretrain", define)
  if not parsed.workdir:
    raise config_lib.UserError("--workdir is required")
  metrics = train(parsed.config, parsed.workdir)
  print(json.dumps({k: round(v, 6) for k, v in metrics.items()}))
  return 0
