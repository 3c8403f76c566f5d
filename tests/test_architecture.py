"""The seams between packages: which package may import which (docs/architecture.md, "Layers")."""

import ast
import functools
import pathlib
from collections.abc import Callable
from unittest import mock

import flax.linen as nn
import jax
from conftest import REPO
from jax.sharding import PartitionSpec
from test_pretrain import random_batch

from experiments import common
from petfm import config as config_lib
from petfm.models import fratmae
from petfm.seganypet import promptable
from petfm.train import finetune, seganypet

# package (folder under the repository root) → the first-party packages it must never import
FORBIDDEN = {
    "petfm": ("data_prep", "experiments", "benchmarks", "tests"),
    "petfm/data": ("petfm.train", "petfm.downstream", "petfm.seganypet"),
    "petfm/models": ("petfm.train", "petfm.downstream", "petfm.seganypet"),
  "petfm/downstream": ("petfm.train",),
  "petfm/seganypet": ("petfm.train",),
}


def imported_modules(path: pathlib.Path) -> set[str]:
  """Every module named by an import statement in `path`, also imports inside functions."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def test_no_import_against_the_layering():
  root = pathlib.Path(REPO)
  wrong = []
  for package, forbidden in FORBIDDEN.items():
    for path in sorted((root / package).rglob("*.py")):
      for name in sorted(imported_modules(path)):
        if any(name == f or name.startswith(f + ".") for f in forbidden):
          wrong.append(f"{path.relative_to(root)} imports {name}")
  assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------------------------- logical axis names
def logical_names(init) -> set[str]:
  """The logical axis names of the params (partitioning metadata) and the activations
  (`nn.with_logical_constraint`) that `init()` creates, traced without computing anything."""
  seen = set()
  constrain = nn.with_logical_constraint

  def recording(x, names, *args, **kwargs):
    seen.update(n for n in names if n)
    return constrain(x, names, *args, **kwargs)

  with mock.patch.object(nn, "with_logical_constraint", recording):
    boxed = jax.eval_shape(init)
  specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, PartitionSpec))
  seen.update(n for spec in specs for n in spec if n)
  return seen


def model_inits() -> dict[str, Callable]:
  """`init()` of every model the experiment configs build (tiny sizes): FratMAE (its other methods drop parts
  of it; `mae` has the joint encoder), the lesion heads, the staging model, SAM-Med3D and the twin model."""
  key = jax.random.key(0)
  inits = {}
  for method in ("mae", "fratmae"):
    config = config_lib.load_config(f"{REPO}/experiments/fratmae.py:tiny,method={method}", {"batch_size": 2})
    batch = random_batch(config)
    model = fratmae.model_from_config(config.model, config.data)
    inits[method] = functools.partial(model.init, {"params": key, "masking": key}, batch)
  for task, head in (("lesions", "unetr"), ("lesions", "linear"), ("staging", "unetr")):
    config = config_lib.load_config(f"{REPO}/experiments/finetune.py:tiny,task={task},head={head}")
    module = finetune.TASKS[task]
    inputs = module.inputs(module.example(config))
    inits[f"{task}/{head}"] = functools.partial(module.make_model(config).init, key, *inputs)
  for backbone in promptable.BACKBONES:
    config = config_lib.load_config(f"{REPO}/experiments/seganypet.py:tiny,backbone={backbone}")
    with mock.patch.object(promptable, "spec_spacing", lambda *_: (4.0,) * 3):
      spec = seganypet.model_spec(config)
    inits[backbone] = functools.partial(promptable.init_variables, spec, key)
  return inits


def test_every_logical_axis_name_of_every_model_has_a_sharding_rule():
  ruled = {name for name, _ in common.SHARDING_RULES}
  for name, init in model_inits().items():
    names = logical_names(init)
    assert names and names <= ruled, f"{name}: no sharding rule for {sorted(names - ruled)}"
  for experiment in ("fratmae", "finetune", "seganypet"):
    config = config_lib.load_config(f"{REPO}/experiments/{experiment}.py:tiny")
    assert [tuple(rule) for rule in config.sharding_rules] == list(common.SHARDING_RULES)
