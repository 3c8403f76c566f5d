r"""Training throughput: examples/s, tokens/s, FLOPs per step, TFLOP/s and MFU of the jitted train step.

  python benchmarks/throughput.py --config experiments/fratmae.py:S --config.batch_size=8 --json out.json
  python benchmarks/throughput.py --config experiments/fratmae.py:tiny,method=mae --torch_reference
  python benchmarks/throughput.py --config experiments/finetune.py:tiny,task=lesions --steps 20   # downstream

The step is the trainer's own (`petfm.train.pretrain.build`, or `petfm.train.finetune.build` for a fine-tune
config: random init, the task's batch shapes) on a mesh over all devices (config.mesh), fed random batches of
the configured slab shape, so no data set is needed. Compilation is excluded; the figures
are the median over `--steps` timed steps after `--warmup` untimed ones. FLOPs per step come from XLA's cost
analysis of the lowered (whole-program) step. MFU = achieved FLOP/s / (peak per device × devices): bf16 dense
peak from a table for TPU/GPU, a measured float32 matmul on CPU (see `petfm.train.common.device_peak_flops`).

`--torch_reference` also times the same-sized MAE-style step (one ViT encoder over PET+CT channels, a ViT
decoder, AdamW) written in PyTorch on the CPU, when torch is installed, and prints the ratio.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from petfm import config as config_lib  # noqa: E402
from petfm.errors import UserError  # noqa: E402
from petfm.models import fratmae  # noqa: E402
from petfm.train import common, finetune, pretrain  # noqa: E402


def random_batch(config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch with the trainer's fields and the configured slab shape (B, H, W, D)."""
  rng = np.random.default_rng(seed)
  h, w = config.data.plane_size
  shape = (batch_size, h, w, config.data.depth)
  return {"pet": rng.random(shape, np.float32), "ct": rng.standard_normal(shape, np.float32),
          "tracer": rng.integers(0, 2, batch_size).astype(np.int32),
          "text_embedding": rng.standard_normal((batch_size, 384), np.float32),
          "text_tokens": rng.integers(1, 100, (batch_size, config.model.text_length)).astype(np.int32)}


def lowered_flops(step, state, batch) -> float:
  """Whole-program FLOPs of one step from XLA's cost analysis before partitioning."""
  analysis = step.lower(state, batch).cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def time_calls(fn, steps: int, warmup: int) -> list[float]:
  """Seconds per call of `fn()` (which must block until its work is done), after `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def time_step(setup, state, batch, steps: int, warmup: int) -> tuple[float, float, float]:
  """(compile seconds, median seconds per step, FLOPs per step) of a trainer's jitted step; call it under the
  trainer's mesh and axis rules."""
  flops = lowered_flops(setup.step, state, batch)
  t0 = time.perf_counter()
  compiled = setup.step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  if not flops:
    flops = common.compiled_flops_per_device(compiled) * setup.mesh.size
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics)

  return compile_s, float(np.median(time_calls(one_step, steps, warmup))), flops


def benchmark_finetune(config, steps: int, warmup: int) -> dict[str, float | str]:
  """The downstream trainer's step (`petfm.train.finetune.build`, random init) on random batches of the task's
  shapes (`experiments/finetune.py` configs)."""
  finetune.validate(config)
  mesh = common.create_mesh(config.mesh)
  common.check_batch_divisible(config.batch_size, mesh, config.optim.accum_steps)
  rng = np.random.default_rng(0)
  batch_np = {k: np.repeat(rng.standard_normal(v.shape, np.float32).astype(v.dtype) if v.dtype.kind == "f"
                           else rng.integers(0, 2, v.shape).astype(v.dtype), config.batch_size, axis=0)
              for k, v in finetune.TASKS[config.task].example(config).items()}
  setup = finetune.build(config, mesh)
  import flax.linen as nn
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    state = setup.init(jax.random.key(0), None)
    compile_s, seconds, flops = time_step(setup, state, common.global_batch(batch_np, mesh), steps, warmup)
  peak, peak_source = common.device_peak_flops()
  return {"task": config.task, "variant": config.variant, "head": f"{config.head.kind}, {config.head.features} "
          "features", "batch_size": config.batch_size, "input": "x".join(map(str, batch_np["pet"].shape[1:])),
          "devices": mesh.size, "device_kind": jax.devices()[0].device_kind, "compile_s": compile_s,
          "step_s": seconds, "examples_per_s": config.batch_size / seconds, "gflop_per_step": flops / 1e9,
          "tflop_per_s": flops / seconds / 1e12, "peak_source": peak_source,
          "mfu": flops / seconds / (peak * mesh.size)}


def benchmark_jax(config, steps: int, warmup: int) -> dict[str, float | str]:
  pretrain.validate(config)
  mesh = common.create_mesh(config.mesh)
  common.check_batch_divisible(config.batch_size, mesh, config.optim.accum_steps)
  batch_np = random_batch(config, config.batch_size)
  setup = pretrain.build(config, mesh, batch_np)
  import flax.linen as nn
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    state = setup.init(jax.random.key(0))
    compile_s, seconds, flops = time_step(setup, state, common.global_batch(batch_np, mesh), steps, warmup)
  peak, peak_source = common.device_peak_flops()
  h, w = config.data.plane_size
  p = tuple(config.model.patch_size)
  joint = fratmae.model_from_config(config.model, config.data).joint
  tokens = (h // p[0]) * (w // p[1]) * (1 if joint else 2)
  return {
      "method": config.model.method, "variant": config.variant, "view": config.view, "dtype": config.dtype,
      "batch_size": config.batch_size, "input": f"{h}x{w}x{config.data.depth}", "tokens_per_example": tokens,
      "devices": mesh.size, "device_kind": jax.devices()[0].device_kind, "mesh": str(dict(mesh.shape)),
      "compile_s": compile_s, "step_s": seconds, "examples_per_s": config.batch_size / seconds,
      "tokens_per_s": config.batch_size * tokens / seconds, "gflop_per_step": flops / 1e9,
      "tflop_per_s": flops / seconds / 1e12, "peak_tflop_per_s_per_device": peak / 1e12,
      "peak_source": peak_source,
      "mfu": flops / seconds / (peak * mesh.size),
  }


def benchmark_torch(config, steps: int, warmup: int) -> dict[str, float] | None:
  """The same-sized MAE-style train step in PyTorch on the CPU (None when torch is not installed)."""
  try:
    import torch
  except ImportError:
    return None
  from torch import nn as tnn

  m = config.model
  h, w = config.data.plane_size
  depth, (ph, pw) = config.data.depth, tuple(m.patch_size)
  num_tokens, patch_dim = (h // ph) * (w // pw), ph * pw * depth * 2
  keep = fratmae.num_visible(num_tokens, m.mask_ratio)

  def blocks(width, n, heads, mlp):
    layer = tnn.TransformerEncoderLayer(width, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                        norm_first=True)
    return tnn.TransformerEncoder(layer, n, enable_nested_tensor=False)

  class TorchMAE(tnn.Module):
    def __init__(self):
      super().__init__()
      self.embed = tnn.Linear(patch_dim, m.width)
      self.pos = tnn.Parameter(torch.zeros(1, num_tokens, m.width), requires_grad=False)
      self.encoder, self.norm = blocks(m.width, m.depth, m.num_heads, m.mlp_dim), tnn.LayerNorm(m.width)
      self.to_decoder = tnn.Linear(m.width, m.decoder_width)
      self.mask_token = tnn.Parameter(torch.zeros(1, 1, m.decoder_width))
      self.decoder_pos = tnn.Parameter(torch.zeros(1, num_tokens, m.decoder_width), requires_grad=False)
      self.decoder = blocks(m.decoder_width, m.decoder_depth, m.decoder_heads, m.decoder_mlp_dim)
      self.decoder_norm, self.pred = tnn.LayerNorm(m.decoder_width), tnn.Linear(m.decoder_width, patch_dim)

    def forward(self, patches):
      b = patches.shape[0]
      ids_shuffle = torch.argsort(torch.rand(b, num_tokens), dim=1)
      ids_restore = torch.argsort(ids_shuffle, dim=1)
      ids_keep = ids_shuffle[:, :keep]
      x = self.embed(patches) + self.pos
      x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, m.width))
      x = self.to_decoder(self.norm(self.encoder(x)))
      x = torch.cat([x, self.mask_token.expand(b, num_tokens - keep, -1)], dim=1)
      x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, m.decoder_width)) + self.decoder_pos
      pred = self.pred(self.decoder_norm(self.decoder(x)))
      mask = torch.ones(b, num_tokens)
      mask[:, :keep] = 0
      mask = torch.gather(mask, 1, ids_restore)
      return (((pred - patches) ** 2).mean(-1) * mask).sum() / mask.sum()

  torch.manual_seed(0)
  model = TorchMAE()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
  patches = torch.randn(config.batch_size, num_tokens, patch_dim)

  def one_step():
    opt.zero_grad(set_to_none=True)
    loss = model(patches)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  seconds = float(np.median(time_calls(one_step, steps, warmup)))
  return {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(), "step_s": seconds,
          "examples_per_s": config.batch_size / seconds}


def main(argv: list[str]) -> int:
  def define(fv):
    flags.DEFINE_integer("steps", 5, "timed steps (the median is reported)", flag_values=fv)
    flags.DEFINE_integer("warmup", 2, "untimed steps after compilation", flag_values=fv)
    flags.DEFINE_string("json", "", "also write the figures to this JSON file", flag_values=fv)
    flags.DEFINE_bool("torch_reference", False, "also time a PyTorch MAE-style step on the CPU",
                      flag_values=fv)
  parsed = config_lib.parse_command_line(argv, "throughput", define)
  config = parsed.config
  if parsed.steps < 1:
    raise UserError("--steps: must be >= 1")
  finetuning = "task" in config   # experiments/finetune.py
  result = (benchmark_finetune if finetuning else benchmark_jax)(config, parsed.steps, parsed.warmup)
  if parsed.torch_reference and finetuning:
    print("note: the PyTorch reference is a pretraining step; not run for a fine-tune config", file=sys.stderr)
  elif parsed.torch_reference:
    if config.model.method != "mae":
      print("note: the PyTorch reference is an MAE-style step; compare it with method=mae", file=sys.stderr)
    ref = benchmark_torch(config, parsed.steps, parsed.warmup)
    if ref is None:
      print("note: torch is not installed; no PyTorch reference", file=sys.stderr)
    else:
      result["torch"] = ref
      result["speedup_vs_torch"] = ref["step_s"] / result["step_s"]
  width = max(map(len, result))
  for key, value in result.items():
    if isinstance(value, dict):
      value = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
    elif isinstance(value, float):
      value = f"{value:.4g}" if math.isfinite(value) else str(value)
    print(f"{key:<{width}}  {value}")
  if parsed.json:
    with open(parsed.json, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main(sys.argv[1:]))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
