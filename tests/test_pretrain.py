"""The pretraining trainer: mesh equivalence, resume, learning, tracer probe, bad configs, CLI."""

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from petfm import config as config_lib, rundir
from petfm.errors import UserError
from petfm.train import common, pretrain

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                      "fratmae.py")

# A very small FratMAE on 32 × 16 × 2 slabs: every code path of the tiny variant, seconds per run.
SMALL = {"data.plane_size": (32, 16), "data.depth": 2, "model.patch_size": (8, 8), "model.width": 32,
         "model.depth": 2, "model.num_heads": 2, "model.mlp_dim": 64, "model.decoder_width": 32,
         "model.decoder_depth": 1, "model.decoder_heads": 2, "model.decoder_mlp_dim": 64,
         "model.ca_proj_dim": 16, "model.text_width": 16, "model.text_heads": 2, "batch_size": 8,
         "data.fit": "resize", "optim.warmup_steps": 2, "log_every_steps": 2, "image_every_steps": 0,
         "checkpoint.async_save": False}


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  """24 synthetic studies (FDG and PSMA) at 8 mm: the real anatomy at a size that trains in seconds."""
  from data_prep import convert, synthetic
  from data_prep.configs import convert as convert_configs
  root = tmp_path_factory.mktemp("synthetic")
  synthetic.generate(str(root / "nifti"), n=24, seed=0, workers=1, scale=0.5, progress=False)
  config = convert_configs.get_config("8.0")
  config.update(val_fraction=0.25, test_fraction=0.25, seed=2)   # seed 2: 6 FDG + 6 PSMA training patients
  summary = convert.convert(str(root / "nifti"), str(root / "records"), config, progress=False)
  assert summary.failed == 0
  return str(root / "records")


def small_config(**overrides):
  return config_lib.load_config(f"{CONFIG}:tiny", {**SMALL, **overrides})


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  shape = (config.batch_size, *config.data.plane_size, config.data.depth)
  return {"pet": rng.random(shape, np.float32), "ct": rng.standard_normal(shape).astype(np.float32),
          "tracer": rng.integers(0, 2, config.batch_size).astype(np.int32),
          "text_tokens": rng.integers(1, 50, (config.batch_size, config.model.text_length)).astype(np.int32)}


def one_step(config, mesh_spec):
  """Loss, updated params and their partition specs after one train step from the same init on `mesh_spec`."""
  mesh = common.create_mesh(mesh_spec, jax.devices()[:int(np.prod([s for _, s in mesh_spec]))])
  batch = random_batch(config)
  setup = pretrain.build(config, mesh, batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    state = setup.init(jax.random.key(0))
    state, metrics = setup.step(state, common.global_batch(batch, mesh))
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(state["params"])}
  return float(metrics["loss"]), jax.device_get(state["params"]), specs


def test_sharded_step_equals_single_device_and_params_are_sharded():
  config = small_config()
  loss_1, params_1, _ = one_step(config, [("data", 1), ("fsdp", 1), ("tensor", 1)])
  for spec in ([("data", 8), ("fsdp", 1), ("tensor", 1)], [("data", 2), ("fsdp", 4), ("tensor", 1)],
               [("data", 2), ("fsdp", 2), ("tensor", 2)]):
    loss_n, params_n, specs = one_step(config, spec)
    assert abs(loss_n - loss_1) <= 1e-5 * max(1.0, abs(loss_1)), spec
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params_1, params_n))
    assert max(diffs) <= 1e-5, (spec, max(diffs))
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)   # created sharded on 2×2×2


@pytest.mark.parametrize("field,value,message", [
    ("method", "bert", "method"), ("mask_ratio", 1.0, "mask_ratio"), ("total_steps", 0, "total_steps"),
    ("data.plane_size", (30, 16), "divisible"), ("batch_size", 6, "batch_size"),
])
def test_bad_config_values_give_clear_errors(records_dir, tmp_path, field, value, message):
  config = small_config(**{field: value, "data_dir": records_dir})
  with pytest.raises(UserError, match=message):
    pretrain.train(config, str(tmp_path / "run"))


def test_unknown_field_is_rejected():
  with pytest.raises(UserError, match="mask_ratoi"):
    config_lib.load_config(f"{CONFIG}:tiny", {"mask_ratoi": 0.5})


def restore_on(config, workdir, mesh_spec):
  """The latest train state of `workdir`, restored straight into the shardings of `mesh_spec`."""
  mesh = common.create_mesh(mesh_spec)
  setup = pretrain.build(config, mesh, random_batch(config))
  ckpt = rundir.Checkpointer(os.path.join(workdir, "checkpoints"), 3, 3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    state = ckpt.restore(ckpt.latest_step(), rundir.abstract_with_shardings(setup.abstract_state,
                                                                            setup.state_shardings))
  ckpt.close()
  shardings = {str(x.sharding.spec) for x in jax.tree.leaves(state["params"])}
  return jax.device_get(state), shardings


def test_resume_equals_uninterrupted_and_restores_onto_another_mesh(records_dir, tmp_path):
  """Stop at step 3, resume to 6: bit-exact the params of 6 straight steps (the data iterator resumes too).
  A checkpoint written on 8×1×1 restores bit-exactly into 2×2×2 shardings (params, optimizer state, step) and
  training continues there."""
  base = dict(data_dir=records_dir, total_steps=6, **{"checkpoint.every_steps": 3})
  pretrain.train(small_config(**base), str(tmp_path / "straight"))
  pretrain.train(small_config(**{**base, "total_steps": 3}), str(tmp_path / "resumed"))
  pretrain.train(small_config(**base), str(tmp_path / "resumed"))
  config = small_config(**base)
  straight, resumed = (pretrain.restore_params(config, str(tmp_path / name), random_batch(config))[1]
                       for name in ("straight", "resumed"))
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, straight, resumed)))

  on_data_mesh, _ = restore_on(config, str(tmp_path / "straight"), [("data", 8), ("fsdp", 1), ("tensor", 1)])
  on_cube, specs = restore_on(config, str(tmp_path / "straight"), [("data", 2), ("fsdp", 2), ("tensor", 2)])
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, on_data_mesh, on_cube)))
  remeshed = small_config(**{**base, "total_steps": 8, "mesh": (("data", 2), ("fsdp", 2), ("tensor", 2))})
  metrics = pretrain.train(remeshed, str(tmp_path / "straight"))
  assert np.isfinite(metrics["loss"])


def test_nan_loss_stops_with_clear_message(records_dir, tmp_path):
  config = small_config(data_dir=records_dir, total_steps=4, **{"optim.lr": 1e30, "optim.grad_clip": 1e30,
                                                                "optim.warmup_steps": 0})
  with pytest.raises(UserError, match="non-finite"):
    pretrain.train(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_training_cuts_loss_aligns_text_and_probe_tells_tracers(records_dir, tmp_path):
  """200 small steps on 32 × 16 whole-body slabs cut the reconstruction loss by at least 1.5×, bring
  ContextAlign below its uniform value ln 2 (two tracers), and the pooled PET embedding separates FDG/PSMA."""
  config = small_config(data_dir=records_dir, total_steps=200, **{
      "optim.lr": 2e-3, "log_every_steps": 10, "checkpoint.every_steps": 200})
  pretrain.train(config, str(tmp_path / "run"))
  lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  first, last = lines[0], lines[-1]
  scores = pretrain.evaluate(config, str(tmp_path / "run"))
  print({k: (first[k], last[k]) for k in ("rec_pet", "rec_ct", "ca")}, scores)
  assert last["rec_pet"] < first["rec_pet"] / 1.5 and last["rec_ct"] < first["rec_ct"] / 1.5, (first, last)
  assert np.mean([line["ca"] for line in lines[-5:]]) < math.log(2), [line["ca"] for line in lines]
  assert scores["probe_tracer_accuracy"] >= max(0.9, scores["probe_chance"] + 0.15), scores


def test_cli_runs_and_resumes(records_dir, tmp_path):
  workdir = str(tmp_path / "cli")
  args = [sys.executable, "-m", "petfm.cli", "pretrain", "--config", f"{CONFIG}:tiny", "--workdir", workdir,
          f"--config.data_dir={records_dir}", "--config.total_steps=2",
          *(f"--config.{k}={v}" for k, v in SMALL.items())]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  first = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
  assert first.returncode == 0, first.stderr[-2000:]
  args[args.index("--config.total_steps=2")] = "--config.total_steps=4"
  second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
  assert second.returncode == 0 and "resuming from the checkpoint at step 2" in second.stdout + second.stderr
  finished = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
  assert finished.returncode == 0 and "already trained for 4 steps; nothing to do" in finished.stdout
  bad = subprocess.run(args + ["--config.mask_mode=sometimes"], capture_output=True, text=True, env=env)
  assert bad.returncode == 2 and "mask_mode" in bad.stderr and "Traceback" not in bad.stderr
