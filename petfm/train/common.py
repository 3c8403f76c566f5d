"""What every petfm trainer shares: mesh, shardings, optimizer, checkpoints, metrics, FLOPs and MFU.

The trainers (`pretrain.py`, `finetune.py`, `seganypet.py`) read top to bottom in big_vision's order
(mesh → data → init → shardings → step → checkpoint → loop) and call these helpers for each stage.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from petfm import paths
from petfm.config import check, cluster_config, rules_tuple
from petfm.errors import UserError
from petfm.rundir import Checkpointer, abstract_with_shardings

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; params are split over fsdp (ZeRO-3 style)

# Dense bf16 peak FLOP/s per chip (vendor figures). Matching is by substring of `device.device_kind`, most
# specific first. On CPU the peak is measured (`measure_matmul_peak`).
PEAK_BF16_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
)


# ---------------------------------------------------------------------------------------------- distributed


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Multi-process start-up: `jax.distributed.initialize` when `config.distributed` is set (once per process).

  Peers come from `config.cluster` (`petfm.config.cluster_config`), else JAX_COORDINATOR_ADDRESS /
  JAX_NUM_PROCESSES / JAX_PROCESS_ID, else jax's auto-detection (Cloud TPU, SLURM, Open MPI). CPU processes
  exchange collectives through gloo. When a peer dies, the survivors stop with an error from jax's
  coordination service within `cluster.heartbeat_timeout_s` (plus a few seconds) instead of hanging.
  """
  if not config.get("distributed", False) or jax.distributed.is_initialized():
    return
  cluster = config.get("cluster") or cluster_config()

  def setting(value: int, unset: int, name: str) -> int | None:
    if value != unset:
      return int(value)
    text = os.environ.get(name, "")
    if text and not text.isdigit():
      raise UserError(f"{name}={text!r}: must be a non-negative integer")
    return int(text) if text else None

  num_processes = setting(cluster.num_processes, 0, "JAX_NUM_PROCESSES")
  process_id = setting(cluster.process_id, -1, "JAX_PROCESS_ID")
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise UserError(f"config.cluster.process_id={process_id}: must be in [0, num_processes={num_processes})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
        coordinator_address=cluster.coordinator_address or None, num_processes=num_processes,
        process_id=process_id, initialization_timeout=int(cluster.initialization_timeout_s),
        heartbeat_timeout_seconds=int(cluster.heartbeat_timeout_s))
  except (ValueError, RuntimeError) as e:
    message = " ".join(str(e).split())[:300]
    raise UserError(f"config.distributed: could not join the other processes ({message}); set "
                    "config.cluster.* or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID"
                    ) from None


def sync_processes(name: str, timeout_s: int = 900) -> None:
  """Waits until every process reaches this point (a coordination-service barrier, no device collective).

  Call it before the first step: CPU (gloo) collectives give a late peer only 30 s to join, which unequal
  compile or set-up times of the processes can exceed. `name` must be unique per barrier.
  """
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(name, timeout=timeout_s, processes=set(range(jax.process_count())))


# --------------------------------------------------------------------------------------------------- mesh


def create_mesh(mesh_spec: Sequence[Sequence[Any]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """`[("data", -1), ("fsdp", 2), ("tensor", 1)]` → a Mesh over `devices` (default: all) with Auto axes.

  At most one size may be -1 (all remaining devices). Axes are ordered by increasing communication intensity,
  so `tensor` (the chattiest) lands on the fastest links.
  """
  names = tuple(name for name, _ in mesh_spec)
  check(names == MESH_AXES, "mesh", f"axes must be {MESH_AXES} in this order, got {names}")
  sizes = [int(size) for _, size in mesh_spec]
  devices = list(devices) if devices is not None else jax.devices()
  n = len(devices)
  if sizes.count(-1) > 1:
    raise UserError("config.mesh: at most one axis size may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    check(n % known == 0, "mesh", f"{n} devices cannot be split into {dict(zip(names, sizes))}")
    sizes[sizes.index(-1)] = n // known
  check(math.prod(sizes) == n, "mesh",
        f"{dict(zip(names, sizes))} needs {math.prod(sizes)} devices, have {n}")
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shardings_for(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a (boxed) abstract tree from `jax.eval_shape`: logical names → mesh axes by the rules.

  Leaves without logical annotations (optimizer counters, RNG keys, step) are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules_tuple(rules))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows (B / processes, ...) of every field → global (B, ...) jax.Arrays sharded over the
  batch axes. Process p holds rows block p of the global batch (`check_batch_divisible` checks the mesh puts
  it there), as the training pipelines yield."""
  sharding = batch_sharding(mesh)
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
    out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
  return out


def check_batch_divisible(global_batch_size: int, mesh: Mesh, accum_steps: int = 1,
                          field: str = "batch_size"):
  """Clear errors when the batch does not split over the mesh and processes; checks that this process's
  devices hold rows block `process_index` of the global batch (what `global_batch` feeds them)."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  check(global_batch_size % (shards * accum_steps) == 0, field,
        f"{global_batch_size} is not divisible by data×fsdp = {shards} × accum_steps = {accum_steps}")
  n, p = jax.process_count(), jax.process_index()
  check(global_batch_size % n == 0, field, f"{global_batch_size} is not divisible by the {n} processes")
  rows = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,)).values()
  held = sorted({i for (rows_,) in rows for i in range(*rows_.indices(global_batch_size))})
  block = global_batch_size // n
  if held != list(range(p * block, (p + 1) * block)):
    raise UserError(f"config.mesh: process {p} of {n} holds batch rows {held[:1]}…{held[-1:]}, not block "
                    f"{p}; put the data/fsdp axes over whole processes (order devices by process)")


# ---------------------------------------------------------------------------------------------- optimizer


def decay_mask(params: Any) -> Any:
  """True for weight matrices/kernels; False for biases, norm scales, embeddings of positions and tokens.

  Rule: a leaf decays when it has ≥ 2 dims and its name is not a position embedding or a learned token.
  """
  no_decay_names = ("pos_embed", "posemb", "cls_token", "mask_token", "token", "rel_pos", "logit_scale")

  def decays(path, leaf) -> bool:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return leaf.ndim >= 2 and not any(n in name for n in no_decay_names)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW (no decay on bias/norm/position params) + linear warm-up and cosine decay + global-norm clipping.

  Fields: lr, warmup_steps, min_lr_ratio, weight_decay, b1, b2, grad_clip (0 = off), and optionally
  `frozen` / `lr_multipliers` handled by the caller through `optax.multi_transform`.
  """
  check(optim.lr > 0, "optim.lr", f"must be > 0, got {optim.lr}")
  check(0 <= optim.warmup_steps <= total_steps, "optim.warmup_steps",
        f"must be in [0, total_steps={total_steps}]")
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps,
      decay_steps=max(total_steps, optim.warmup_steps + 1), end_value=optim.lr * optim.min_lr_ratio)
  tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=decay_mask)
  if optim.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  return tx, schedule


def accumulate_gradients(loss_fn: Callable, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
                         accum_steps: int) -> tuple[Any, dict[str, jax.Array]]:
  """Mean gradient and metrics of `loss_fn(params, micro_batch, rng) -> (loss, metrics)` over micro-batches.

  The batch (B, …) is split into `accum_steps` micro-batches of B/accum_steps with a stride, so every device
  keeps working on its own samples (no resharding), and scanned to bound activation memory.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (_, metrics), grads = grad_fn(params, batch, rng)
    return grads, metrics

  def split(x):
    micro = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
    return jnp.swapaxes(micro, 0, 1)

  micro_batches = jax.tree.map(split, dict(batch))

  def body(carry, inputs):
    grads_sum, i = carry
    (_, metrics), grads = grad_fn(params, inputs, jax.random.fold_in(rng, i))
    return (jax.tree.map(jnp.add, grads_sum, grads), i + 1), metrics

  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads_sum, _), metrics = jax.lax.scan(body, (zeros, 0), micro_batches)
  grads = jax.tree.map(lambda g: g / accum_steps, grads_sum)
  return grads, jax.tree.map(jnp.mean, metrics)


# ------------------------------------------------------------------------------------------- checkpoints


# ---------------------------------------------------------------------------------------------- metrics


class MetricsLogger:
  """Terminal progress bar + TensorBoard event files + `metrics.jsonl`, written by process 0 only.

  A remote workdir (URL) gets them from a local staging folder, uploaded by `sync` (at every checkpoint and
  at `close`): object stores cannot append.
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter
    from tqdm import tqdm
    self.local = workdir if paths.is_local(workdir) else tempfile.mkdtemp(prefix="petfm-metrics-")
    jsonl = os.path.join(self.local, "metrics.jsonl")
    if not paths.is_local(workdir) and paths.exists(paths.join(workdir, "metrics.jsonl")):
      shutil.copyfile(paths.local_copy(paths.join(workdir, "metrics.jsonl")), jsonl)   # resume appends
    # events files are named by the second and host: a run resumed within the same second would overwrite them
    self.writer = SummaryWriter(os.path.join(self.local, "tensorboard"),
                                filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
    self.jsonl = open(jsonl, "a")
    self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")

  def write(self, step: int, metrics: Mapping[str, float], advance: int = 0) -> None:
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    for k, v in metrics.items():
      self.writer.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self.jsonl.flush()
    shown = {k: v for k, v in metrics.items() if k in ("loss", "lr", "examples_per_s", "mfu")}
    self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
    self.bar.update(advance)

  def advance(self, steps: int = 1) -> None:
    if self.enabled:
      self.bar.update(steps)

  def image(self, tag: str, png_path: str, step: int) -> None:
    if self.enabled:
      import matplotlib.image
      with paths.open_file(png_path, "rb") as f:
        self.writer.add_image(tag, matplotlib.image.imread(f, format="png")[..., :3], step, dataformats="HWC")

  def message(self, text: str) -> None:
    if self.enabled:
      self.bar.write(text)

  def sync(self) -> None:
    """Uploads metrics.jsonl and the TensorBoard events to a remote workdir (no-op for local ones)."""
    if self.enabled and self.local != self.workdir:
      self.writer.flush()
      paths.upload_tree(self.local, self.workdir)

  def close(self) -> None:
    if self.enabled:
      self.bar.close()
      self.writer.close()
      self.jsonl.close()
      self.sync()
      if self.local != self.workdir:
        shutil.rmtree(self.local, ignore_errors=True)


def check_finite(metrics: Mapping[str, float], step: int, last_good_step: int | None) -> None:
  """Stops training with one clear line when the loss is NaN/inf (the last good checkpoint is kept)."""
  bad = [k for k, v in metrics.items() if not np.isfinite(v)]
  if bad:
    kept = (f"the last good checkpoint is step {last_good_step}" if last_good_step is not None
            else "no checkpoint was written")
    raise UserError(f"training diverged: {', '.join(bad)} became non-finite at step {step}; stopped; {kept} "
                    "(try a lower config.optim.lr or config.optim.grad_clip)")


# ------------------------------------------------------------------------------ set-up and loop of a trainer


def jit_training(init_state: Callable, train_step: Callable, mesh: Mesh, rules,
                 *abstract_init_args: Any) -> tuple[Any, Any, Callable, Callable]:
  """Shardings and jitted functions of a trainer.

  `init_state(rng, *args)` → boxed state pytree (logical axis names); `train_step(state, batch)` → (state,
  scalar metrics); `abstract_init_args`: shapes of the extra init arguments. Returns (abstract state, state
  shardings, init(rng, *args) → state created sharded, step(state, global batch) → (state, replicated
  metrics), donating the state).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init_state, jax.random.key(0), *abstract_init_args)
    shardings = shardings_for(boxed, mesh, rules)
    init = jax.jit(lambda rng, *args: nn.unbox(init_state(rng, *args)), out_shardings=shardings)
    step = jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
  return nn.unbox(boxed), shardings, init, step


def restore_or_init(ckpt: Checkpointer, logger: MetricsLogger, abstract_state: Any, shardings: Any,
                    init: Callable[[], Any], data_iter: Any | None = None) -> tuple[Any, int]:
  """(state, start step): the latest checkpoint of `ckpt` restored onto `shardings` (with the data iterator's
  position), or `init()` at step 0. Call it under the trainer's mesh and axis rules."""
  sync_processes("petfm-restore-or-init")
  start_step = ckpt.latest_step() or 0
  if start_step:
    logger.message(f"resuming from the checkpoint at step {start_step} in {ckpt.directory}")
    state = ckpt.restore(start_step, abstract_with_shardings(abstract_state, shardings), data_iter)
  else:
    state = init()
  logger.advance(start_step)
  return state, start_step


class StepBookkeeper:
  """What a training loop does after each step: log every `log_every` steps and at checkpoints (examples/s,
  s/step, and TFLOP/s and MFU once `flops_per_step` is set), stop with one clear error line on non-finite
  metrics, checkpoint when due and at the last step. `last_metrics`: the metrics logged last."""

  def __init__(self, ckpt: Checkpointer, logger: MetricsLogger, total_steps: int, log_every: int,
               batch_size: int, start_step: int, peak_flops: float = 0.0):
    self.ckpt, self.logger = ckpt, logger
    self.total_steps, self.log_every, self.batch_size = total_steps, log_every, batch_size
    self.peak_flops = peak_flops            # of the whole mesh, FLOP/s
    self.flops_per_step = 0.0               # of the whole mesh; set it once the step is compiled
    self.last_good = start_step or None
    self.last_metrics: dict[str, float] = {}
    self.restart_clock()

  def restart_clock(self) -> None:
    """Throughput counts from now (e.g. after compiling the step)."""
    self.t_last, self.steps_since = time.perf_counter(), 0

  def after_step(self, done: int, state: Any, metrics: Mapping[str, jax.Array],
                 data_iter: Any | None = None) -> None:
    """`done`: steps finished, including this one."""
    self.steps_since += 1
    save_now = self.ckpt.should_save(done) or done == self.total_steps
    if done % self.log_every == 0 or save_now:
      host = {k: float(v) for k, v in jax.device_get(metrics).items()}
      check_finite(host, done, self.last_good)
      elapsed = time.perf_counter() - self.t_last
      host["examples_per_s"] = self.steps_since * self.batch_size / elapsed
      host["s_per_step"] = elapsed / self.steps_since
      if self.flops_per_step:
        host["tflops_per_s"] = self.steps_since * self.flops_per_step / elapsed / 1e12
        host["mfu"] = self.steps_since * self.flops_per_step / elapsed / self.peak_flops
      self.logger.write(done, host, advance=self.steps_since)
      self.last_metrics = host
      self.restart_clock()
    if save_now:
      self.ckpt.save(done, state, data_iter, force=True)
      self.last_good = done
      self.logger.sync()

  def close(self) -> None:
    self.ckpt.close()
    self.logger.close()


# -------------------------------------------------------------------------------------------- FLOPs, MFU


def compiled_flops_per_device(compiled: Any) -> float:
  """FLOPs one device executes per call of a compiled jax function (XLA cost analysis).

  For an SPMD-partitioned program the analysis describes one device's share, so the whole step costs this
  times the number of devices of the mesh.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


_MEASURED_PEAK: dict[str, float] = {}


def measure_matmul_peak(device: jax.Device | None = None, n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a large float32 matmul on `device` (median of `repeats`): the CPU "peak" for MFU."""
  device = device or jax.devices()[0]
  key = f"{device.platform}:{device.id}"
  if key not in _MEASURED_PEAK:
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      f(a).block_until_ready()
      times.append(time.perf_counter() - t0)
    _MEASURED_PEAK[key] = 2 * n**3 / float(np.median(times))
  return _MEASURED_PEAK[key]


def device_peak_flops(device: jax.Device | None = None) -> tuple[float, str]:
  """(peak FLOP/s per device, where the figure comes from): bf16 table for accelerators, measured on CPU."""
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return measure_matmul_peak(device), "measured float32 matmul"
  for pattern, peak in PEAK_BF16_FLOPS:
    if pattern.lower() in device.device_kind.lower():
      return peak, f"{device.device_kind} bf16 dense peak"
  return float("nan"), f"unknown peak for {device.device_kind}"
