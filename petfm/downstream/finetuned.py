"""What every downstream task shares: the backbone of a fine-tune config, its input window, and `Predictor`,
the jitted model a finished (or just trained) fine-tune answers with; `load` reads one back from its workdir.

A task module (`petfm.downstream.lesions`, `petfm.downstream.staging`) provides, for `petfm.train.finetune`:

  validate(config)                    the task's own config fields
  make_model(config) -> nn.Module     the head on `backbone(config)`
  example(config) -> batch            zeros of a batch of one (the input shapes)
  inputs(batch) -> tuple              the model's positional inputs
  loss(out, batch) -> (loss, metrics)
  probabilities(out) -> array         what `Predictor` returns
  labelled(studies, data_dir)         the training studies the task can use
  sample(config, studies, centres, rng, pad) -> batch     one training batch
  evaluate(config, predictor, records) -> results         metrics on whole studies; results["calibrated"]
                                      (optional): {dotted config field: value} chosen on held-out data,
                                      kept in results.json; `read_config` applies them (lesions: eval.threshold)
  summary(results) -> str             the lines `petfm finetune` prints
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from petfm import config as config_lib, rundir
from petfm.data import checks
from petfm.errors import UserError
from petfm.models import fratmae


def window(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """The slab (h, w, D) the model reads."""
  return (*config.data.plane_size, config.data.depth)


def backbone(config: ml_collections.ConfigDict) -> fratmae.FratMAE:
  return fratmae.model_from_config(config.model, config.data, dtype=config.dtype)


class Predictor:
  """A fine-tuned model with its params: `predictor(*inputs)` → probabilities as numpy, computed by one jitted
  call on `mesh` under the logical sharding `rules` (a task's `inputs(batch)` → its `probabilities(out)`)."""

  def __init__(self, model: nn.Module, params: Any, probabilities: Callable, mesh: Mesh, rules: tuple):
    self.params, self.mesh, self.rules = params, mesh, rules
    self._apply = jax.jit(lambda params, *inputs: probabilities(model.apply({"params": params}, *inputs)))

  def __call__(self, *inputs: np.ndarray) -> np.ndarray:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return np.asarray(self._apply(self.params, *inputs))


def read_config(workdir: str, flag: str = "--checkpoint") -> ml_collections.ConfigDict:
  """The config of a `petfm finetune` workdir, ready to rebuild its model (`spacing`: the stored grid's), with
  the fields its last evaluation chose on held-out data (results.json `calibrated`, e.g. `eval.threshold`)."""
  saved = rundir.read_config(workdir, flag, "finetune", ("task", "spacing", "model.patch_size",
                                                          "data.plane_size", "sharding_rules"))
  calibrated = rundir.read_results(workdir, flag).get("calibrated", {})
  try:
    for dotted, value in calibrated.items():
      *parents, name = dotted.split(".")
      functools.reduce(dict.__getitem__, parents, saved)[name] = value
  except (KeyError, AttributeError, TypeError) as e:
    raise UserError(f"{flag} {workdir}: {rundir.RESULTS}: 'calibrated' names no field of config.json "
                    f"({type(e).__name__}: {checks.one_line(e)})") from None
  config = ml_collections.ConfigDict(saved)
  for node, key in ((config.model, "patch_size"), (config.data, "plane_size")):
    node[key] = tuple(node[key])
  config.init_from = ""          # the params come from the fine-tuning checkpoint
  return config


def load(workdir: str, task: types.ModuleType, flag: str = "--checkpoint"
         ) -> tuple[ml_collections.ConfigDict, Predictor]:
  """(config, predictor on the one-device `rundir.eval_mesh()`) of the latest checkpoint of a `petfm finetune`
  workdir of `task` (a task module); `UserError` naming `flag` for another task or an unreadable config."""
  config = read_config(workdir, flag)
  name = task.__name__.rsplit(".", 1)[-1]
  if config.task != name:
    raise UserError(f"{flag} {workdir}: is a {config.task} fine-tune, not a {name} one")
  try:
    model = task.make_model(config)
  except (KeyError, AttributeError, TypeError, ValueError) as e:  # a config.json with missing/odd fields
    raise UserError(f"{flag} {workdir}: config.json does not describe a fine-tuned model "
                    f"({type(e).__name__}: {checks.one_line(e)})") from None
  params = rundir.restore_latest(workdir, flag)["params"]
  return config, Predictor(model, params, task.probabilities, rundir.eval_mesh(),
                           config_lib.rules_tuple(config.sharding_rules))
