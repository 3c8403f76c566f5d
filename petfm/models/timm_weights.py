"""Initialise a petfm `vit.ViT` from a timm or official-MAE ViT checkpoint (`.pth`, read without torch).

timm names (`patch_embed.proj.*`, `cls_token`, `pos_embed`, `blocks.N.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}.*`, `norm.*`) map onto the ViT's params; MAE checkpoints are `{'model': state_dict}` with
the same encoder names. Entries a pretraining or classification checkpoint carries beside the encoder
(`decoder_*`, `mask_token`, `head.*`, `fc_norm.*`) are ignored. Missing, unexpected and mis-shaped entries
are collected into one `UserError`.

Adaptations, applied only when the target differs from the checkpoint:
* Input channels (slabs use the D slices as channels, the MAE baseline 2·D): the RGB kernel is summed over
  its 3 channels, repeated over the C target channels and divided by C, so an input whose channels are all
  equal to a grey image gives the token the RGB model gives that grey image (timm's `adapt_input_conv` rule).
  Input intensity normalisation (ImageNet mean/std) is not adapted.
* Position embeddings: a target with fixed sin-cos keeps its table and ignores `pos_embed`; a learned target
  gets the checkpoint table, bicubically resampled to its grid when the grids differ (the CLS slot is kept).
* A target without a CLS token ignores `cls_token`.
Example, a FratMAE PET encoder from MAE ImageNet weights (slab 448×224, patch 16 → grid (28, 14)):
  params["pet_encoder"], ignored = load_vit_checkpoint("mae_pretrain_vit_base.pth", params["pet_encoder"])
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from petfm.errors import UserError
from petfm.io import torch_pickle

IGNORED_PREFIXES = ("decoder_", "mask_token", "head.", "fc_norm.")

_BLOCK = re.compile(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
_OURS = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attn/out", "mlp.fc1": "mlp/fc1",
         "mlp.fc2": "mlp/fc2"}


def load_vit_checkpoint(path: str, target: Any, *,
                        grid: tuple[int, ...] | None = None) -> tuple[Any, list[str]]:
  """Reads a timm / MAE `.pth` and returns (params shaped like `target`, ignored checkpoint keys).

  `target`: the params of one `vit.ViT` (e.g. `params["pet_encoder"]`), boxed (`nn.Partitioned`, as from
  `init`) or plain, concrete or abstract (`jax.eval_shape(model.init, ...)`); the result has the same boxing,
  numpy leaves in the target dtypes. `grid`: the target's
  token grid, needed only to resample a learned position embedding to a non-square grid.
  """
  state = torch_pickle.state_dict(torch_pickle.load(path), path)
  return vit_params_from_state_dict(state, target, grid=grid, source=path)


def vit_params_from_state_dict(state: Mapping[str, np.ndarray], target: Any, *,
                               grid: tuple[int, ...] | None = None, source: str = "checkpoint"
                               ) -> tuple[Any, list[str]]:
  """`load_vit_checkpoint` for a state dict already in memory (name → numpy array, torch layouts)."""
  flat_target = traverse_util.flatten_dict(nn.unbox(target), sep="/")
  shapes = {k: tuple(v.shape) for k, v in flat_target.items()}
  converted: dict[str, tuple[str, np.ndarray]] = {}      # our path → (checkpoint key, array)
  ignored, unexpected, problems = [], [], []
  for key, value in state.items():
    value = np.asarray(value, np.float32)
    if key.startswith(IGNORED_PREFIXES):
      ignored.append(key)
    elif key in ("cls_token", "pos_embed") and key not in shapes:
      ignored.append(key)
    elif key == "pos_embed":
      converted["pos_embed"] = (key, _position_embedding(value, "cls_token" in state, shapes, grid, problems))
    elif key == "cls_token":
      converted["cls_token"] = (key, value)
    elif key == "patch_embed.proj.weight":
      converted["patch_embed/proj/kernel"] = (key, _patch_kernel(value, shapes.get("patch_embed/proj/kernel"),
                                                                 problems))
    elif key == "patch_embed.proj.bias":
      converted["patch_embed/proj/bias"] = (key, value)
    elif key in ("norm.weight", "norm.bias"):
      converted[f"encoder/norm/{_param(key.split('.')[-1], norm=True)}"] = (key, value)
    elif match := _BLOCK.fullmatch(key):
      index, layer, kind = match.groups()
      prefix = f"encoder/block_{index}"
      norm = layer.startswith("norm")
      value = value.T if kind == "weight" and not norm else value       # torch Linear (out, in) → (in, out)
      if layer == "attn.qkv":
        for name, part in zip(("query", "key", "value"), np.split(value, 3, axis=-1)):
          converted[f"{prefix}/attn/{name}/{_param(kind)}"] = (key, part)
      else:
        converted[f"{prefix}/{_OURS[layer]}/{_param(kind, norm)}"] = (key, value)
    else:
      unexpected.append(key)
  for path, (key, value) in converted.items():
    if path not in shapes:
      unexpected.append(key)
    elif value is not None and value.shape != shapes[path]:
      problems.append(f"{key} has shape {value.shape}, expected {shapes[path]} for {path}")
  missing = sorted(set(shapes) - set(converted))
  unexpected = sorted(set(unexpected))
  if missing or unexpected or problems:
    parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
        [f"unexpected {', '.join(unexpected)}"] if unexpected else []) + problems
    raise UserError(f"{source}: does not fit the ViT: " + "; ".join(parts))
  flat = {path: converted[path][1].astype(flat_target[path].dtype) for path in shapes}
  params = traverse_util.unflatten_dict(flat, sep="/")
  rebox = lambda box, new: box.replace_boxed(new) if isinstance(box, nn.Partitioned) else new
  return jax.tree.map(rebox, target, params, is_leaf=lambda x: isinstance(x, nn.Partitioned)), sorted(ignored)


def _param(kind: str, norm: bool = False) -> str:
  """torch `weight` / `bias` → flax `kernel` (`scale` for LayerNorm) / `bias`."""
  if kind == "bias":
    return "bias"
  return "scale" if norm else "kernel"


def _patch_kernel(weight: np.ndarray, target_shape: tuple[int, ...] | None, problems: list[str]
                  ) -> np.ndarray | None:
  """torch (width, C_src, ph, pw) → ours (ph, pw, C, width), adapting the channel count (see module doc)."""
  if target_shape is None:
    return weight
  if len(target_shape) != 4 or weight.ndim != 4 or tuple(target_shape[:2]) != weight.shape[2:]:
    problems.append(f"patch_embed.proj.weight {weight.shape} (width, channels, ph, pw) does not fit the "
                    f"target patch kernel {target_shape}: patch sizes must match and the patch must be 2-D")
    return None
  channels = target_shape[2]
  if weight.shape[1] != channels:
    weight = np.repeat(weight.sum(axis=1, keepdims=True), channels, axis=1) / channels
  return weight.transpose(2, 3, 1, 0)


def _position_embedding(pos: np.ndarray, has_cls: bool, shapes: Mapping[str, tuple[int, ...]],
                        grid: tuple[int, ...] | None, problems: list[str]) -> np.ndarray | None:
  """Checkpoint (1, [1+]S, width) → target (1, [1+]N, width): CLS slot kept, tokens resampled if grids
  differ."""
  target_extra = int("cls_token" in shapes)
  _, total, width = shapes["pos_embed"]
  source_extra = int(has_cls and _is_square(pos.shape[1] - 1))
  source_cls, tokens = pos[:, :source_extra], pos[0, source_extra:]
  side = math.isqrt(tokens.shape[0])
  n = total - target_extra
  if grid is None and n == tokens.shape[0]:
    grid = (side, side)
  elif grid is None and _is_square(n):
    grid = (math.isqrt(n),) * 2
  if grid is None or math.prod(grid) != n or side * side != tokens.shape[0] or pos.shape[-1] != width:
    problems.append(f"pos_embed {pos.shape} cannot be resampled to {shapes['pos_embed']} "
                    f"(pass grid=(h, w) for a non-square target grid)")
    return None
  if tuple(grid) != (side, side):
    resized = jax.image.resize(tokens.reshape(side, side, width), (*grid, width), "bicubic")
    tokens = np.asarray(resized, np.float32).reshape(n, width)
  cls = source_cls if source_extra else np.zeros((1, 1, width), np.float32)
  return np.concatenate([cls[:, :target_extra], tokens[None]], axis=1)


def _is_square(n: int) -> bool:
  return n > 0 and math.isqrt(n) ** 2 == n
