"""Shared ViT building blocks: patch embedding (2-D slabs and 3-D volumes), sin-cos position embeddings,
pre-LN transformer blocks with self- and cross-attention, an encoder stack and the `ViT` backbone.

Every param initialiser is wrapped in `nn.with_logical_partitioning`; the logical names are
`embed` (model width), `mlp` (MLP hidden), `heads` (flattened heads·head_dim of q/k/v outputs and of the
attention-output input), `patch` (patch-embedding input channels / flattened patch pixels), `norm` (LayerNorm
scale and bias), `vocab`, `classes`. Activations at block boundaries carry `nn.with_logical_constraint` with
`act_batch`, `act_len`, `act_embed`, `act_mlp`, `act_heads`. Outside a mesh + `nn.logical_axis_rules`
context both are no-ops, so plain `init` / `apply` works on one device.

`dtype` is the compute dtype (e.g. bfloat16); params are `param_dtype` (float32); LayerNorm and the
attention softmax always run in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from petfm.errors import UserError

Dtype = Any

ACT = ("act_batch", "act_len", "act_embed")
GELU_MODES = ("exact", "tanh")
POSEMB_MODES = ("sincos", "learn")
ATTENTION_IMPLS = ("xla", "cudnn")

VARIANTS = {
    "tiny": dict(width=64, depth=4, num_heads=4, mlp_dim=256),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}
DECODER_VARIANTS = {
    "tiny": dict(decoder_width=64, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=256),
    "S": dict(decoder_width=256, decoder_depth=4, decoder_heads=8, decoder_mlp_dim=1024),
    "B": dict(decoder_width=512, decoder_depth=8, decoder_heads=16, decoder_mlp_dim=2048),
    "L": dict(decoder_width=512, decoder_depth=8, decoder_heads=16, decoder_mlp_dim=2048),
}


def decode_variant(name: str) -> dict[str, int]:
  """Encoder and MAE-decoder sizes of a variant:
  width, depth, num_heads, mlp_dim, decoder_width, decoder_depth, decoder_heads, decoder_mlp_dim."""
  if name not in VARIANTS:
    raise UserError(f"unknown ViT variant {name!r}; known: {', '.join(VARIANTS)}")
  return {**VARIANTS[name], **DECODER_VARIANTS[name]}


def partitioned(init: Callable, names: Sequence[str | None]) -> Callable:
  return nn.with_logical_partitioning(init, tuple(names))


def gelu_fn(mode: str) -> Callable[[jax.Array], jax.Array]:
  """`exact` = erf GELU (PyTorch/timm default), `tanh` = the tanh approximation."""
  if mode not in GELU_MODES:
    raise UserError(f"gelu={mode!r} is not one of {list(GELU_MODES)}")
  return lambda x: jax.nn.gelu(x, approximate=mode == "tanh")


# ----------------------------------------------------------------------------------- patches and posembs


def patch_grid(spatial: Sequence[int], patch_size: Sequence[int]) -> tuple[int, ...]:
  """Token grid of an image/volume; raises `UserError` when a side is not divisible by the patch."""
  if len(spatial) != len(patch_size) or any(s % p for s, p in zip(spatial, patch_size)):
    raise UserError(f"input size {tuple(spatial)} is not divisible by the patch size {tuple(patch_size)}")
  return tuple(s // p for s, p in zip(spatial, patch_size))


def patchify(x: jax.Array, patch_size: Sequence[int]) -> jax.Array:
  """(B, *spatial, C) → (B, N, prod(patch)·C); tokens row-major over the grid (the patch-embedding order),
  pixels inside a patch ordered (*patch, C)."""
  b, *spatial, c = x.shape
  grid = patch_grid(spatial, patch_size)
  k = len(grid)
  x = x.reshape(b, *[v for g, p in zip(grid, patch_size) for v in (g, p)], c)
  x = x.transpose(0, *range(1, 2 * k, 2), *range(2, 2 * k + 1, 2), 2 * k + 1)
  return x.reshape(b, math.prod(grid), math.prod(patch_size) * c)


def unpatchify(tokens: jax.Array, patch_size: Sequence[int], grid: Sequence[int]) -> jax.Array:
  """Inverse of `patchify`: (B, N, prod(patch)·C) → (B, *(grid·patch), C)."""
  b, n, f = tokens.shape
  k, c = len(grid), f // math.prod(patch_size)
  x = tokens.reshape(b, *grid, *patch_size, c)
  x = x.transpose(0, *[v for i in range(k) for v in (1 + i, 1 + k + i)], 1 + 2 * k)
  return x.reshape(b, *[g * p for g, p in zip(grid, patch_size)], c)


def upsample_token_mask(mask: jax.Array, patch_size: Sequence[int], grid: Sequence[int]) -> jax.Array:
  """(B, N) per-token values → (B, *(grid·patch)) per pixel (each token's value over its patch)."""
  per_pixel = jnp.repeat(mask[..., None], math.prod(patch_size), axis=-1)
  return unpatchify(per_pixel, patch_size, grid)[..., 0]


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = positions.reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def posemb_sincos(grid: Sequence[int], width: int) -> np.ndarray:
  """Fixed sin-cos position embedding (N, width) float32 for a rectangular 2-D or 3-D token grid.

  MAE's formula (`omega = 1/10000^(i/(d/2))`, [sin, cos] per axis) with the width split into one even part
  per axis; the first part encodes the last (fastest) grid axis, as MAE's 2-D table does (its first half is
  the column index). For 2-D grids and width % 4 == 0 this equals MAE's `get_2d_sincos_pos_embed`.
  Parts differ by 2 when width is not divisible by 2·len(grid).
  """
  if width % 2:
    raise UserError(f"sin-cos position embedding needs an even width, got {width}")
  k = len(grid)
  sizes = [2 * (width // (2 * k))] * k
  for i in range((width - sum(sizes)) // 2):
    sizes[i] += 2
  coords = np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid], indexing="ij")
  parts = [_sincos_1d(size, coords[k - 1 - i]) for i, size in enumerate(sizes)]
  return np.concatenate(parts, axis=1).astype(np.float32)


class PatchEmbed(nn.Module):
  """Non-overlapping patches → tokens: a Conv with stride = kernel (2-D or 3-D), then flatten.

  Input (B, *spatial, C): a slab (B, H, W, D) uses the D slices as channels with a 2-D patch; a volume
  (B, X, Y, Z, C) uses a 3-D patch. Output (B, N, width), tokens row-major over the grid. The kernel is
  xavier-uniform initialised on its flattened (prod(patch)·C, width) view, as in MAE.
  """
  width: int
  patch_size: tuple[int, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = len(self.patch_size)
    patch_grid(x.shape[1:-1], self.patch_size)
    kernel_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=tuple(range(k + 1)),
                                                   out_axis=-1)
    x = nn.Conv(self.width, self.patch_size, strides=self.patch_size, padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, name="proj",
                kernel_init=partitioned(kernel_init, (None,) * k + ("patch", "embed")),
                bias_init=partitioned(nn.initializers.zeros, ("embed",)))(x)
    return x.reshape(x.shape[0], -1, self.width)


# ----------------------------------------------------------------------------------------------- blocks


def dense(features: int, names: tuple[str | None, str | None], dtype: Dtype, param_dtype: Dtype,
          name: str | None = None, use_bias: bool = True) -> nn.Dense:
  """`nn.Dense` with xavier-uniform kernel, zero bias and logical names (in, out) on both."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=partitioned(nn.initializers.xavier_uniform(), names),
                  bias_init=partitioned(nn.initializers.zeros, names[1:]))


def layer_norm(name: str, param_dtype: Dtype = jnp.float32, epsilon: float = 1e-6) -> nn.LayerNorm:
  """LayerNorm (default eps 1e-6), computed and returned in float32."""
  return nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, param_dtype=param_dtype, name=name,
                      scale_init=partitioned(nn.initializers.ones, ("norm",)),
                      bias_init=partitioned(nn.initializers.zeros, ("norm",)))


class Mlp(nn.Module):
  """Dense(mlp_dim) → GELU → Dense(width). (B, L, width) → (B, L, width)."""
  mlp_dim: int
  gelu: str = "exact"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, self.param_dtype, "fc1")(x)
    h = nn.with_logical_constraint(gelu_fn(self.gelu)(h), ("act_batch", "act_len", "act_mlp"))
    return dense(width, ("mlp", "embed"), self.dtype, self.param_dtype, "fc2")(h)


class Attention(nn.Module):
  """Multi-head attention: queries from `x` (B, Lq, width), keys/values from `context` (B, Lk, width)
  (default: `x`, i.e. self-attention). `mask` (B, Lq, Lk) bool, True = attend.

  `implementation` of `jax.nn.dot_product_attention`: `xla` (any platform; logits and softmax in float32) or
  `cudnn` (fused flash attention on NVIDIA GPUs; needs bfloat16/float16 compute).
  """
  num_heads: int
  qkv_bias: bool = True
  implementation: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise UserError(f"attention width {width} is not divisible by num_heads={self.num_heads}")
    head_dim = width // self.num_heads
    context = x if context is None else context

    def project(inputs, name):
      y = dense(width, ("embed", "heads"), self.dtype, self.param_dtype, name, self.qkv_bias)(inputs)
      y = nn.with_logical_constraint(y, ("act_batch", "act_len", "act_heads"))
      return y.reshape(*y.shape[:-1], self.num_heads, head_dim)

    if self.implementation not in ATTENTION_IMPLS:
      raise UserError(f"attention implementation {self.implementation!r} is not one of "
                      f"{list(ATTENTION_IMPLS)}")
    q, k, v = project(x, "query"), project(context, "key"), project(context, "value")
    out = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None],
                                       implementation=self.implementation)
    out = out.reshape(*x.shape[:-1], width)
    out = nn.with_logical_constraint(out, ("act_batch", "act_len", "act_heads"))
    return dense(width, ("heads", "embed"), self.dtype, self.param_dtype, "out")(out)


class Block(nn.Module):
  """Pre-LN transformer block. Sub-layers in order, each `x += f(LN(x))`:
  cross-attention to `context` (if `cross_attention`; the context gets its own LN), self-attention
  (if `self_attention`), MLP. (B, L, width) → (B, L, width)."""
  num_heads: int
  mlp_dim: int
  self_attention: bool = True
  cross_attention: bool = False
  gelu: str = "exact"
  qkv_bias: bool = True
  attention: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    attention = lambda name: Attention(self.num_heads, self.qkv_bias, self.attention, self.dtype,
                                       self.param_dtype, name=name)
    x = nn.with_logical_constraint(x, ACT)
    if self.cross_attention:
      context = nn.with_logical_constraint(context, ACT)
      y = layer_norm("norm_context", self.param_dtype)(context)
      x = x + attention("cross_attn")(layer_norm("norm_cross", self.param_dtype)(x), y).astype(x.dtype)
    if self.self_attention:
      x = x + attention("attn")(layer_norm("norm1", self.param_dtype)(x), mask=mask).astype(x.dtype)
    mlp = Mlp(self.mlp_dim, self.gelu, self.dtype, self.param_dtype, name="mlp")
    y = mlp(layer_norm("norm2", self.param_dtype)(x))
    return nn.with_logical_constraint(x + y.astype(x.dtype), ACT)


class Encoder(nn.Module):
  """`depth` self-attention blocks + final LayerNorm.

  (B, L, width) → (normed (B, L, width) float32, layers: tuple of the `depth` block outputs (B, L, width)).
  `mask` (B, L, L) bool restricts attention (e.g. padding). `remat` recomputes blocks in the backward pass.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  gelu: str = "exact"
  qkv_bias: bool = True
  remat: bool = False
  attention: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    block_cls = nn.remat(Block) if self.remat else Block
    layers = []
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_dim, gelu=self.gelu, qkv_bias=self.qkv_bias,
                    attention=self.attention, dtype=self.dtype, param_dtype=self.param_dtype,
                    name=f"block_{i}")(x, None, mask)
      layers.append(x)
    return layer_norm("norm", self.param_dtype)(x), tuple(layers)


class ViT(nn.Module):
  """ViT backbone: patch embedding → position embedding → (optional token subset) → [CLS] → encoder.

  Input (B, *spatial, C) (see `PatchEmbed`). `keep_ids` (B, K) int selects, per sample, the tokens that
  enter the encoder (MAE masking); None keeps all N. Returns a dict:
    tokens (B, K, width) after the final LayerNorm (float32), without the CLS token;
    cls    (B, width) normed CLS output, or None without `cls_token`;
    layers tuple of `depth` block outputs (B, K, width) (CLS removed).
  `posemb`: `sincos` (fixed, the CLS gets none, as MAE) or `learn` (param `pos_embed` (1, [1+]N, width) with
  the CLS slot first when `cls_token`, as timm; its N is fixed by the input size at init).
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: tuple[int, ...]
  posemb: str = "sincos"
  cls_token: bool = False
  gelu: str = "exact"
  qkv_bias: bool = True
  remat: bool = False
  attention: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, keep_ids: jax.Array | None = None) -> dict[str, Any]:
    if self.posemb not in POSEMB_MODES:
      raise UserError(f"posemb={self.posemb!r} is not one of {list(POSEMB_MODES)}")
    grid = patch_grid(x.shape[1:-1], self.patch_size)
    x = PatchEmbed(self.width, self.patch_size, self.dtype, self.param_dtype, name="patch_embed")(x)
    n, extra = x.shape[1], int(self.cls_token)
    if self.posemb == "learn":
      pos = self.param("pos_embed", partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                       (1, extra + n, self.width), self.param_dtype)
      cls_pos, pos = pos[:, :extra], pos[:, extra:]
    else:
      cls_pos, pos = jnp.zeros((1, extra, self.width)), jnp.asarray(posemb_sincos(grid, self.width))[None]
    x = (x + pos).astype(self.dtype)
    if keep_ids is not None:
      x = jnp.take_along_axis(x, keep_ids[..., None], axis=1)
    if self.cls_token:
      cls = self.param("cls_token", partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                       (1, 1, self.width), self.param_dtype)
      cls_tokens = jnp.broadcast_to(cls + cls_pos, (x.shape[0], 1, self.width)).astype(self.dtype)
      x = jnp.concatenate([cls_tokens, x], 1)
    normed, layers = Encoder(self.depth, self.num_heads, self.mlp_dim, self.gelu, self.qkv_bias, self.remat,
                             self.attention, self.dtype, self.param_dtype, name="encoder")(x)
    return {"tokens": normed[:, extra:], "cls": normed[:, 0] if self.cls_token else None,
            "layers": tuple(layer[:, extra:] for layer in layers)}
