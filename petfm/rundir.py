"""The run directory (`--workdir`) of every trainer: what is in it, and the one place that reads it back.

  config.json    the run's config (`write_config`; `read_config` names the flag and the kind of run expected)
  model.json     `petfm train-seganypet` only: the promptable model's spec
  checkpoints/   Orbax `{state, data_iter}` written by `Checkpointer`; the latest step is the one restored
  results.json   the evaluation of a finished run (`write_results`, `read_results`); a fine-tune's `calibrated`
                 {dotted config field: value} (settings chosen on held-out data) complete its config.json
  metrics.jsonl, TensorBoard events, figures

Every restore goes through `Checkpointer.restore`: the trainers resume with `common.restore_or_init` onto
their own mesh; a finished run is read back with `restore_latest`, onto a trainer's shardings (`restore_params`,
on `eval_mesh()` for evaluation and inference) or onto one device whatever mesh wrote it (`load_encoders`:
the encoders of a pretraining run; `petfm.seganypet.promptable`: the variables of a click-trained model).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import AxisType, Mesh

from petfm import paths
from petfm.data import checks, records
from petfm.errors import UserError

CONFIG = "config.json"
RESULTS = "results.json"
CHECKPOINTS = "checkpoints"
# The encoder params of a pretraining run: one shared encoder, or one per modality (FratMAE).
ENCODERS = ("encoder", "pet_encoder", "ct_encoder")


class Checkpointer:
  """Orbax CheckpointManager for `{state, data_iter}`: async saves every N steps, keep the last K, restore
  onto any mesh (the abstract state carries the target shardings).

  `state` is any pytree of jax.Arrays (params, optimizer state, step, RNG key data). The grain iterator state
  (JSON, the same on every process) is saved beside it, so resuming, on any number of processes, replays
  exactly the batches an uninterrupted run would see.
  """

  def __init__(self, directory: str, every_steps: int, keep: int, async_save: bool = True):
    self.directory = paths.absolute(directory)
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every_steps),
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, data_iter: Any | None = None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:  # the same on every process (pipelines docstring), so one JSON for all
      items["data_iter"] = ocp.args.JsonSave(data_iter.get_state())
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data_iter"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None:
      data_iter.set_state(restored["data_iter"])
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying target shardings: what Orbax needs to restore onto a (different) mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def write_config(workdir: str, text: str) -> None:
  """Writes the run's `config.json` (atomically; `workdir` may be a URL)."""
  records.write_atomic(paths.join(workdir, CONFIG), text)


def read_config(workdir: str, flag: str, command: str, fields: tuple[str, ...] = ()) -> dict[str, Any]:
  """The `config.json` of the `petfm COMMAND` workdir given as `flag`, with the dotted `fields` present;
  `UserError` naming the flag when there is none or it is unreadable."""
  path = paths.join(workdir, CONFIG)
  if not paths.isfile(path):
    raise UserError(f"{flag} {workdir}: no {CONFIG}; is it a `petfm {command}` workdir?")
  return checks.read_json(path, flag, fields)


def write_results(workdir: str, text: str) -> None:
  """Writes the run's `results.json` (atomically, replacing the previous evaluation's in one step)."""
  records.write_atomic(paths.join(workdir, RESULTS), text)


def read_results(workdir: str, flag: str) -> dict[str, Any]:
  """The `results.json` of `workdir` given as `flag`; {} before the run's first evaluation finished."""
  path = paths.join(workdir, RESULTS)
  return checks.read_json(path, flag) if paths.isfile(path) else {}


def eval_mesh() -> Mesh:
  """The one-device mesh (first local device) that finished runs are restored onto for evaluation."""
  return jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                       devices=jax.local_devices()[:1])


def restore_latest(workdir: str, flag: str, abstract_state: Any = None) -> Any:
  """The state of the latest checkpoint of `workdir`: onto the shardings that `abstract_state` carries
  (`abstract_with_shardings`), or when it is None the whole saved tree onto the first local device (whatever
  mesh wrote it). `UserError` naming `flag` when there is none."""
  directory = paths.join(workdir, CHECKPOINTS)
  if not paths.isdir(directory):
    raise UserError(f"{flag} {workdir}: no {CHECKPOINTS}/ folder; not the workdir of a petfm training run")
  ckpt = Checkpointer(directory, every_steps=1, keep=1)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise UserError(f"{flag} {workdir}: holds no finished checkpoint ({CHECKPOINTS}/)")
    if abstract_state is None:
      with ocp.StandardCheckpointer() as reader:
        saved = reader.metadata(paths.join(ckpt.directory, str(step), "state")).item_metadata
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), saved)
    return ckpt.restore(step, abstract_state)
  finally:
    ckpt.close()


def restore_params(workdir: str, setup: Any, flag: str) -> Any:
  """The params of the latest checkpoint of `workdir` on the shardings of `setup` (a trainer's Setup: `mesh`,
  `rules`, `abstract_state`, `state_shardings`)."""
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    abstract = abstract_with_shardings(setup.abstract_state, setup.state_shardings)
    return restore_latest(workdir, flag, abstract)["params"]


def load_encoders(workdir: str, flag: str = "--config.init_from") -> dict[str, Any]:
  """The encoder params (`encoder`, or `pet_encoder` and `ct_encoder`) of a pretraining run's latest
  checkpoint, as numpy arrays."""
  params = restore_latest(workdir, flag)["params"]
  return {k: jax.tree.map(np.asarray, params[k]) for k in ENCODERS if k in params}
