"""ml-collections configs: `file.py:ARG` specs, dotted overrides, locked configs, validation helpers.

Config files live in `experiments/` and define `get_config(arg: str | None) -> ConfigDict` (big_vision style).
`ARG` is a variant optionally followed by comma-separated settings, e.g. `tiny,method=mae,view=axial`;
`parse_arg` turns it into typed fields. On the command line every leaf can be overridden with
`--config.FIELD=VALUE`; the config is locked, so a typo'd field is an error, not a silent new field.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from petfm.errors import UserError


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """Parses `"tiny,method=mae,view=axial"` against `spec` (name -> default; the type follows the default).

  A bare token is the value of the first spec key (the variant). Booleans parse strictly (`True`/`False`).
  Unknown keys and malformed values raise `UserError` naming the setting.
  """
  names = list(spec)
  out = ml_collections.ConfigDict(dict(spec))
  for position, token in enumerate(t.strip() for t in (arg or "").split(",") if t.strip()):
    if "=" in token:
      key, value = (s.strip() for s in token.split("=", 1))
    elif position == 0 and names:
      key, value = names[0], token
    else:
      raise UserError(f"config arg {arg!r}: {token!r} is not of the form key=value")
    if key not in spec:
      raise UserError(f"config arg {arg!r}: unknown setting {key!r}; known: {', '.join(names)}")
    out[key] = _coerce(key, value, spec[key])
  return out


def _coerce(key: str, value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value not in ("True", "False", "true", "false"):
      raise UserError(f"config arg: {key}={value!r} must be True or False")
    return value in ("True", "true")
  try:
    return type(default)(value) if default is not None else value
  except ValueError:
    raise UserError(f"config arg: {key}={value!r} is not a valid {type(default).__name__}") from None


def parse_command_line(
    argv: Sequence[str], prog: str, define_flags: Callable[[flags.FlagValues], None] | None = None,
    workdir: str | None = None,
) -> flags.FlagValues:
  """Parses `--config FILE.py:ARG [--config.FIELD=VALUE ...]` plus the flags added by `define_flags`.

  Returns the parsed `FlagValues` (`.config` holds the locked ConfigDict). With `workdir` (its help text) a
  required `--workdir` flag is added and checked to be (or become) a writable folder. Bad flags, unknown
  config fields and unparsable values raise `UserError`. `--help` prints the flags and raises SystemExit(0).
  """
  argv = [prog, *argv]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None, "experiment config, FILE.py:ARG", flag_values=fv, lock_config=True, sys_argv=argv)
  if workdir:
    flags.DEFINE_string("workdir", None, workdir, flag_values=fv)
  if define_flags:
    define_flags(fv)
  if any(a in ("-h", "--help") for a in argv[1:]):
    print(f"usage: petfm {prog} --config FILE.py:ARG [--config.FIELD=VALUE ...] [flags]\n")
    print(fv.main_module_help() or fv)
    raise SystemExit(0)
  path = config_path(argv)
  if path and not os.path.exists(path):
    raise UserError(f"--config: file {path!r} does not exist")
  try:
    rest = fv(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    message = message.replace("\\n", "\n").replace("\\'", "'")
    if "Traceback (most recent call last)" in message:  # the config file raised: keep its last line only
      last = message.strip().splitlines()[-1]
      message = f"--config {config_spec(argv)}: {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', last)}"
    elif isinstance(e, AttributeError):
      key = m.group(1) if (m := re.search(r"'([^']+)'", message)) else message.strip("'\" ")
      fields = [a.split("=", 1)[0].split(".", 1)[1] for a in argv if a.startswith(("--config.", "-config."))]
      key = next((f for f in fields if f.rsplit(".", 1)[-1] == key), key)
      message = f"unknown config field {key!r}"
    raise UserError(f"command line: {' '.join(message.split())}") from None
  if len(rest) > 1:
    raise UserError(f"unexpected arguments: {' '.join(rest[1:])}")
  if fv.config is None:
    raise UserError("--config FILE.py:ARG is required")
  if workdir and not fv.workdir:
    raise UserError("--workdir is required")
  if workdir:  # a trainer: its output folder is checked before any work
    from petfm.data import checks
    checks.output_dir(fv.workdir, "--workdir")
  return fv


def config_spec(argv: Sequence[str]) -> str | None:
  """The `FILE.py:ARG` given to `--config` in `argv`, or None."""
  for i, a in enumerate(argv):
    if a in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith(("--config=", "-config=")):
      return a.split("=", 1)[1]
  return None


def config_path(argv: Sequence[str]) -> str | None:
  spec = config_spec(argv)
  return spec.split(":", 1)[0] if spec is not None else None


def check(condition: bool, field: str, message: str) -> None:
  """Config validation: raises `UserError('config.FIELD=...: message')` when `condition` is false."""
  if not condition:
    raise UserError(f"config.{field}: {message}")


def check_choice(config: ml_collections.ConfigDict, field: str, choices: Sequence[Any]) -> None:
  value = config
  for part in field.split("."):
    value = value[part]
  check(value in choices, field, f"{value!r} is not one of {list(choices)}")


def check_run(config: ml_collections.ConfigDict) -> None:
  """The fields every trainer shares (`experiments/common.py`), checked once: steps, batch, logging,
  checkpointing, gradient accumulation and compute dtype."""
  for field in ("total_steps", "batch_size", "log_every_steps", "checkpoint.every_steps", "checkpoint.keep",
                "optim.accum_steps"):
    value = config
    for part in field.split("."):
      value = value[part]
    check(value > 0, field, f"must be > 0, got {value}")
  check_choice(config, "dtype", ("float32", "bfloat16"))


def load_module(path: str):
  """Imports a config file (e.g. `experiments/fratmae.py`) as a module."""
  if not os.path.exists(path):
    raise UserError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(f"_petfm_config_{abs(hash(os.path.abspath(path)))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def override(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-name overrides (`{"model.depth": 2}`); unknown fields raise
  `UserError`."""
  out = copy.deepcopy(config)
  for name, value in overrides.items():
    *parents, leaf = name.split(".")
    node = out
    for part in parents:
      node = node[part] if part in node else None
      if not isinstance(node, ml_collections.ConfigDict):
        raise UserError(f"unknown config field {name!r}")
    if leaf not in node:
      raise UserError(f"unknown config field {name!r}")
    node[leaf] = value
  return out


def load_config(spec: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The locked config of `FILE.py:ARG` with dotted-name overrides, as from the command line (for Python
  use)."""
  path, _, arg = spec.partition(":")
  config = override(load_module(path).get_config(arg or None), overrides or {})
  config.lock()
  return config


def cluster_config() -> ml_collections.ConfigDict:
  """`config.cluster`: how a multi-process run (`config.distributed=True`) finds its peers.

  Empty fields fall back to the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID, then to jax's cluster auto-detection (Cloud TPU, SLURM, Open MPI, Kubernetes).
  """
  return ml_collections.ConfigDict(dict(
      coordinator_address="",       # host:port of process 0, e.g. 10.0.0.2:1234
      num_processes=0,              # 0 = from the environment
      process_id=-1,                # -1 = from the environment
      initialization_timeout_s=300, # how long start-up waits for every process to connect
      heartbeat_timeout_s=100,      # a process silent this long counts as dead: the others stop with an error
  ))


def rules_tuple(rules: Iterable[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
  """Config rules (lists from ml-collections) → the tuple form flax expects."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules)
