"""`petfm convert-sam-med3d IN.pth OUT_DIR`: official SAM-Med3D(-turbo) / SegAnyPET weights → Orbax, no torch.

The `.pth` (torch zip container) is read by `petfm.io.torch_pickle`, which rebuilds tensors as numpy and
admits no other code; training-style checkpoints also pickle an `argparse.Namespace`, `collections.Counter`s
and numpy scalars beside the weights, and only those (`INERT_OBJECTS`) are admitted, as inert placeholders.
The weights are `model_state_dict` or a bare state dict, optionally with the DDP `module.` prefix. Every
tensor of the model (324 for vit_b_ori) is mapped by name, with its shape checked; missing, unexpected or
mis-shaped tensors are listed in one `UserError`. `pixel_mean` / `pixel_std` (unused buffers) are ignored.

Name rule: a flax path `a/blocks_3/attn/qkv/kernel` is the torch key `a.blocks.3.attn.qkv.weight` (`_N` →
`.N`; kernel/scale → weight; the encoder MLP's fc1/fc2 are lin1/lin2; embedding tables `X` are `X.weight`).
Tensor rule: Linear (out, in) → (in, out); Conv3d (O, I, k, k, k) → (k, k, k, I, O); ConvTranspose3d
(I, O, 2, 2, 2) → (I, 2, 2, 2, O) (the layout of `sam3d._ConvTranspose2`, no flip needed); everything else is
copied. OUT_DIR gets `config.json` (the `Sam3DConfig`) and `variables/` (Orbax: {'params', 'buffers'}).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from petfm.data import checks, records
from petfm.errors import ArgumentParser, UserError
from petfm.io import torch_pickle
from petfm.models import sam3d

INERT_OBJECTS = frozenset({
    "argparse.Namespace", "collections.Counter", "collections.defaultdict", "numpy.dtype",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "torch.torch_version.TorchVersion",
})
IGNORED_KEYS = ("pixel_mean", "pixel_std")
MAX_LISTED = 12                    # tensors named per category in an error message
EMBEDDINGS = ("point_embeddings_0", "point_embeddings_1", "not_a_point_embed", "no_mask_embed", "iou_token",
              "mask_tokens")
_RENAME = {"fc1": "lin1", "fc2": "lin2"}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One state-dict tensor: torch key and shape, our variable path ('params/…' or 'buffers/…') and rule."""
  key: str
  torch_shape: tuple[int, ...]
  path: str
  rule: str       # copy | linear | conv | conv_transpose


def _rule(parts: Sequence[str], shape: tuple[int, ...]) -> str:
  if parts[-1] != "kernel":
    return "copy"
  if len(shape) == 2:
    return "linear"
  return "conv_transpose" if parts[-2].startswith("output_upscaling") else "conv"


def _torch_shape(rule: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if rule == "linear":
    return shape[::-1]
  if rule == "conv":
    return (shape[4], shape[3], *shape[:3])
  if rule == "conv_transpose":
    return (shape[0], shape[4], *shape[1:4])
  return shape


def _to_ours(rule: str, value: np.ndarray) -> np.ndarray:
  if rule == "linear":
    return value.T
  if rule == "conv":
    return value.transpose(2, 3, 4, 1, 0)
  if rule == "conv_transpose":
    return value.transpose(0, 2, 3, 4, 1)
  return value


def mapping_table(config: sam3d.Sam3DConfig) -> list[Entry]:
  """The state-dict tensors of a model with `config`, in our variable order (no compute: jax.eval_shape)."""
  flat = traverse_util.flatten_dict(nn.unbox(sam3d.abstract_variables(config)))
  table = []
  for path, leaf in flat.items():
    shape, parts = tuple(leaf.shape), path[1:]
    names = [_RENAME.get(p, p) for p in parts]
    leaf_name = names[-1]
    if leaf_name in ("kernel", "scale"):
      names[-1] = "weight"
    elif leaf_name in EMBEDDINGS:
      names.append("weight")
    key = re.sub(r"_(\d+)(?=\.|$)", r".\1", ".".join(names))
    rule = _rule(parts, shape)
    table.append(Entry(key, _torch_shape(rule, shape), "/".join(path), rule))
  return table


def variables_from_state_dict(state: Mapping[str, np.ndarray], config: sam3d.Sam3DConfig,
                              source: str = "checkpoint") -> dict[str, Any]:
  """torch state dict (name → numpy, torch layouts) → plain {'params', 'buffers'} float32 numpy trees."""
  table = mapping_table(config)
  by_key = {e.key: e for e in table}
  state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
  missing = [k for k in by_key if k not in state]
  unexpected = [k for k in state if k not in by_key]
  misshaped = [f"{k} {tuple(np.shape(v))} (expected {by_key[k].torch_shape})" for k, v in state.items()
               if k in by_key and tuple(np.shape(v)) != by_key[k].torch_shape]
  if missing or unexpected or misshaped:
    shown = lambda items: ", ".join(items[:MAX_LISTED]) + (
        f" … and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")
    parts = [f"{len(items)} {label}: {shown(items)}" for label, items in
             (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if items]
    raise UserError(f"{source}: does not fit SAM-Med3D ({len(table)} tensors expected): " + "; ".join(parts))
  convert = lambda e: np.ascontiguousarray(_to_ours(e.rule, np.asarray(state[e.key], np.float32)))
  flat = {tuple(e.path.split("/")): convert(e) for e in table}
  return traverse_util.unflatten_dict(flat)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Weights of an official `.pth` (see module doc), read without torch and without running pickled code."""
  return torch_pickle.state_dict(torch_pickle.load(path, inert_objects=INERT_OBJECTS), path)


def save(out_dir: str, variables: Mapping[str, Any], config: sam3d.Sam3DConfig) -> None:
  """Writes `config.json` and the Orbax `variables/` into `out_dir` (refuses to overwrite a checkpoint)."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(os.path.join(out_dir, "variables")):
    raise UserError(f"{out_dir}: already holds a checkpoint (variables/); choose a new directory")
  created = not os.path.exists(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(out_dir, "variables"), dict(variables))
    records.write_atomic(os.path.join(out_dir, "config.json"),
                         json.dumps(dataclasses.asdict(config), indent=1))
  except BaseException:  # no half-written checkpoint: what this call created goes
    shutil.rmtree(out_dir if created else os.path.join(out_dir, "variables"), ignore_errors=True)
    raise


def load(checkpoint_dir: str) -> tuple[sam3d.Sam3DConfig, dict[str, Any]]:
  """Reads a directory written by `save` → (config, plain {'params', 'buffers'} of jax arrays)."""
  config_path = os.path.join(checkpoint_dir, "config.json")
  if not os.path.isfile(config_path):
    raise UserError(f"{checkpoint_dir}: no config.json; not a converted SAM-Med3D checkpoint")
  fields = checks.read_json(config_path, "--checkpoint")
  fields["global_attn_indexes"] = tuple(fields.get("global_attn_indexes", ()))
  try:
    config = sam3d.Sam3DConfig(**fields)
  except TypeError as e:
    raise UserError(f"{config_path}: {e}") from None
  sam3d.check_config(config)
  abstract = nn.unbox(sam3d.abstract_variables(config))
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(os.path.abspath(os.path.join(checkpoint_dir, "variables")), abstract)
  return config, variables


def main(argv: Sequence[str]) -> int:
  parser = ArgumentParser(prog="petfm convert-sam-med3d", description=__doc__.split("\n")[0])
  parser.add_argument("checkpoint", help="official .pth (SAM-Med3D, SAM-Med3D-turbo, SegAnyPET)")
  parser.add_argument("out_dir", help="new directory for config.json + Orbax variables/")
  parser.add_argument("--config", default="vit_b_ori", help=f"model config: {', '.join(sam3d.CONFIGS)}")
  args = parser.parse_args(argv)
  checks.output_dir(args.out_dir, "out_dir")
  config = sam3d.get_config(args.config)
  variables = variables_from_state_dict(read_state_dict(args.checkpoint), config, args.checkpoint)
  save(args.out_dir, variables, config)
  print(f"{args.checkpoint}: {len(mapping_table(config))} tensors → {args.out_dir}")
  return 0
