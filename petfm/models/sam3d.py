"""SAM-Med3D `vit_b_ori` (the architecture of the SegAnyPET weights) in flax.linen.

Three separable, jit-friendly parts, each a method of `Sam3D` (call with `model.apply(variables, ...,
method=...)`):
  `embed`           crop (B, S, S, S) → image embedding (B, g, g, g, C)          (once per crop)
  `encode_prompts`  points (B, N, 3), labels (B, N), mask logits (B, 4g, 4g, 4g) → sparse (B, N+1, C),
                    dense (B, g, g, g, C)                                          (per click)
  `decode`          embedding, sparse, dense[, token_mask] → low-res logits (B, 4g, 4g, 4g), IoU (B,)
with S = img_size, g = S / patch_size (8 for vit_b_ori) and C = prompt_dim (384). Arrays are channel-last;
spatial axes are the crop's array axes 0, 1, 2, and point coordinates are voxel indices along them.

Two options beyond the official model, off by default (so `vit_b_ori` is exactly the official one), on in the
tiny config of `experiments/seganypet.py`:
* `in_chans` 2: the crop is (B, S, S, S, 2), PET and CT (CT shows the organ boundaries PET cannot).
* `fine_width` F > 0: a crop-resolution path. `embed` also computes per-voxel image features (`FineEncoder`,
  (B, S, S, S, F)) and packs them after the C channels of the embedding (`pack_fine`); after `decode`, the
  fourth method `refine` reads them with the clicks (maps of "looks like a positive/negative click" and "near
  one", `_click_maps`), the previous logits and the decoder's logits, and returns logits at the crop's
  resolution (B, S, S, S) (`FineHead`). The logits and the mask prompt are then S³ (`mask_size`), pooled
  to 4g for the prompt encoder. Cheap coarse patches (8³) then suffice, and the first click already has a
  direct path from "what the clicked voxel looks like" to the mask.

Behaviour of the official PyTorch code (uni-medical/SAM-Med3D @ f3de1fa) that is reproduced on purpose:
* Windowed blocks zero-pad the g³ token grid (after norm1) to window³ and attend over all window³ tokens
  with no padding mask; padded tokens have q, k, v = the qkv bias.
* The decomposed relative-position bias is built from the unscaled q, but broadcast the way the official
  `add_decomposed_rel_pos` does it, which is not the MViTv2 formula the spec describes: for query (i, j, k)
  and key (l, n, m) on the padded grid, with R_a[x, y] = rel_pos_a[x - y + P - 1],
    bias = q[i, j, k]·R_d[i, m] + q[i, j, l]·R_h[j, m] + q[i, j, n]·R_w[n, m],
  (the d and h terms index the key's last axis, and the h and w terms use the q of the query at w-index l
  or n; queries at padded w-indices have q = q-bias). The weights were trained with this.
* Dense image PE: grid cell (i, j, k) encodes ((j+.5)/g, (i+.5)/g, (k+.5)/g) (axes 0/1 swapped w.r.t. points);
  the random-Fourier PE is [sin, cos, sin].
* Points get +0.5 and ÷S; one padding point with label -1 (PE zeroed, `not_a_point_embed` added) is appended.
  That padding point is a real token. Label ABSENT (-2) is a different, invisible kind of padding, for fixed
  point capacities (one compile for several click counts, or a fixed-size click array in training): with
  `token_mask(labels)` passed to `decode`, ABSENT tokens are masked out as keys of the token self-attention
  and of the image→token cross-attention, and their own outputs are never read, so the result equals the one
  without them (not part of the official code).
* LayerNorm eps 1e-6 in the encoder, neck and every channel LayerNorm, 1e-5 in the decoder transformer;
  exact-erf GELU; ReLU in the decoder MLPs.

Work the official code wastes is skipped where the outputs stay identical: padded query tokens of the windowed
blocks are never computed (their outputs are cropped away), and the window³ − g³ padded keys, which share one
key and one value, enter the softmax as one extra logit, the log-sum-exp of their logits, computed in closed
form (the bias above factorises over the key axes). Only mask token 0 is decoded (the official loops use
`multimask_output=False`); hypernetwork MLPs 1-3 exist only for the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from petfm.errors import UserError
from petfm.models import vit

POSITIVE, NEGATIVE, PADDING = 1, 0, -1        # point labels; PADDING marks "not a point" (a real token)
ABSENT = -2                                    # capacity padding: a slot no other token sees (module doc)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Sam3DConfig:
  """Sizes of a SAM-Med3D model. `dtype` is the compute dtype name (params stay float32)."""
  img_size: int = 128
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
  window_size: int = 14
  prompt_dim: int = 384
  mask_in_chans: int = 16
  decoder_depth: int = 2
  decoder_heads: int = 8
  decoder_mlp_dim: int = 2048
  attention_downsample: int = 2
  num_mask_tokens: int = 4
  iou_hidden: int = 256
  iou_depth: int = 3
  in_chans: int = 1             # image channels: 1 = PET (the official model), 2 = PET and CT
  fine_width: int = 0           # width of the crop-resolution path (`FineHead`); 0 = none (the official model)
  dtype: str = "float32"

  @property
  def grid(self) -> int:
    return self.img_size // self.patch_size

  @property
  def mask_size(self) -> int:
    """Side of the logits / mask prompt: 4 × grid, or the crop side with the fine path."""
    return self.img_size if self.fine_width else 4 * self.grid


CONFIGS = {
    "vit_b_ori": Sam3DConfig(),
    "tiny": Sam3DConfig(width=96, depth=4, num_heads=4, mlp_dim=384, global_attn_indexes=(1, 3),
                        prompt_dim=48, decoder_mlp_dim=96, iou_hidden=32),
}


def get_config(name: str, **overrides: Any) -> Sam3DConfig:
  """Named config (`vit_b_ori`, `tiny`) with field overrides (e.g. dtype='bfloat16'); checks the sizes."""
  if name not in CONFIGS:
    raise UserError(f"model: unknown SAM-Med3D config {name!r}; known: {', '.join(CONFIGS)}")
  try:
    config = dataclasses.replace(CONFIGS[name], **overrides)
  except TypeError as e:
    raise UserError(f"model: {e}") from None
  check_config(config)
  return config


def check_config(c: Sam3DConfig) -> None:
  problems = []
  if c.dtype not in DTYPES:
    problems.append(f"dtype {c.dtype!r} is not one of {list(DTYPES)}")
  if c.img_size % c.patch_size:
    problems.append(f"img_size {c.img_size} is not divisible by patch_size {c.patch_size}")
  if c.width % c.num_heads:
    problems.append(f"width {c.width} is not divisible by num_heads {c.num_heads}")
  if 0 < c.window_size < c.grid:
    problems.append(f"window_size {c.window_size} is smaller than the token grid {c.grid} (several windows "
                    "per crop are not supported)")
  if c.prompt_dim % 3 or c.prompt_dim % 8 or (c.prompt_dim // c.attention_downsample) % c.decoder_heads:
    problems.append(f"prompt_dim {c.prompt_dim} must be divisible by 3, 8 and "
                    "decoder_heads·attention_downsample")
  if c.mask_in_chans % 4:
    problems.append(f"mask_in_chans {c.mask_in_chans} is not divisible by 4")
  if c.in_chans < 1:
    problems.append(f"in_chans {c.in_chans} must be ≥ 1")
  if c.fine_width < 0 or (c.fine_width and c.patch_size % 4):
    problems.append(f"fine_width {c.fine_width} must be ≥ 0, and > 0 needs a patch_size divisible by 4 "
                    f"(got {c.patch_size})")
  if problems:
    raise UserError("model: " + "; ".join(problems))


def _gelu(x: jax.Array) -> jax.Array:
  """Exact GELU in PyTorch's form x·(1 + erf(x/√2))/2 (≈ 2× faster on CPU than jax.nn.gelu's erfc form)."""
  return 0.5 * x * (1 + jax.lax.erf(x * np.float32(math.sqrt(0.5))))


def _param(module: nn.Module, name: str, init, names: tuple, shape: tuple) -> jax.Array:
  return module.param(name, vit.partitioned(init, names), shape, jnp.float32)


def _conv(features: int, kernel: int, name: str, dtype, use_bias: bool = True, padding: int = 0) -> nn.Conv:
  return nn.Conv(features, (kernel,) * 3, strides=(kernel,) * 3 if padding == 0 else 1,
                 padding=[(padding, padding)] * 3, use_bias=use_bias, dtype=dtype, name=name,
                 kernel_init=vit.partitioned(nn.initializers.lecun_normal(),
                                             (None,) * 3 + ("conv_in", "conv_out")),
                 bias_init=vit.partitioned(nn.initializers.zeros, ("conv_out",)))


class PatchConv(nn.Module):
  """Conv3d with kernel = stride (no overlap), as patchify + matmul (much faster on CPU than XLA's conv for
  few channels). (B, X, Y, Z, Cin) → (B, X/k, Y/k, Z/k, features); kernel (k, k, k, Cin, features) as
  nn.Conv."""
  features: int
  kernel_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, cin = self.kernel_size, x.shape[-1]
    kernel = _param(self, "kernel", nn.initializers.lecun_normal(), (None,) * 3 + ("conv_in", "conv_out"),
                    (k, k, k, cin, self.features))
    bias = _param(self, "bias", nn.initializers.zeros, ("conv_out",), (self.features,))
    grid = vit.patch_grid(x.shape[1:-1], (k,) * 3)
    y = jnp.dot(vit.patchify(x, (k,) * 3).astype(self.dtype),
                kernel.reshape(-1, self.features).astype(self.dtype), preferred_element_type=jnp.float32)
    return y.reshape(x.shape[0], *grid, self.features) + bias


# ------------------------------------------------------------------------------------------- image encoder


def _relative_table(table: jax.Array, size: int) -> jax.Array:
  """(2·size−1, hd) → (size, size, hd) with R[x, y] = table[x − y + size − 1]."""
  if table.shape[0] != 2 * size - 1:
    raise UserError(f"relative position table of length {table.shape[0]}, expected {2 * size - 1}")
  index = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
  return table[index]


class EncoderAttention(nn.Module):
  """Attention of one encoder block over the g³ token grid, global (`window` 0) or in one zero-padded
  window³ window. (B, g, g, g, width) → (B, g, g, g, width). See the module doc for the bias formula."""
  num_heads: int
  window: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, g, _, _, width = x.shape
    heads, hd = self.num_heads, width // self.num_heads
    size = self.window or g
    zeros = nn.initializers.zeros
    tables = [_param(self, f"rel_pos_{a}", zeros, (None, "kv"), (2 * size - 1, hd)) for a in "dhw"]
    qkv = vit.dense(3 * width, ("embed", "heads"), self.dtype, jnp.float32, "qkv")
    y = qkv(x).reshape(b, g, g, g, 3, heads, hd)
    q, k, v = (y[..., i, :, :].transpose(0, 4, 1, 2, 3, 5) for i in range(3))   # (B, H, g, g, g, hd)
    f32 = lambda t: t.astype(jnp.float32)
    q32 = f32(q)
    rd, rh, rw = (_relative_table(f32(t), size) for t in tables)
    # q along the w axis of the padded grid: real rows, then the q-bias of the padded tokens.
    q_bias, k_bias, v_bias = f32(nn.unbox(qkv.variables["params"]["bias"])).reshape(3, heads, hd)
    pad = size - g
    q_pad = jnp.broadcast_to(q_bias[None, :, None, None, None], (b, heads, g, g, pad, hd))
    q_w = jnp.concatenate([q32, q_pad], axis=4)                                   # (B, H, g, g, P, hd)
    term_d = jnp.einsum("bhijkc,imc->bhijkm", q32, rd[:g])                        # (B, H, g, g, g, P)
    term_h = jnp.einsum("bhijlc,jmc->bhijlm", q_w, rh[:g])                        # (B, H, g, g, P, P)
    term_w = jnp.einsum("bhijnc,nmc->bhijnm", q_w, rw)                            # (B, H, g, g, P, P)
    scale = hd ** -0.5
    n = g ** 3
    logits = jnp.einsum("bhqc,bhkc->bhqk", (q * scale).reshape(b, heads, n, hd), k.reshape(b, heads, n, hd),
                        preferred_element_type=jnp.float32).reshape((b, heads) + (g,) * 6)
    logits = (logits + term_d[:, :, :, :, :, None, None, :g] + term_h[:, :, :, :, None, :g, None, :g]
              + term_w[:, :, :, :, None, None, :g, :g]).reshape(b, heads, n, n)
    values = v.reshape(b, heads, n, hd)
    if pad:
      lse = jax.nn.logsumexp
      h_hi, h_lo = lse(term_h[..., g:, :], axis=-2), lse(term_h[..., :g, :], axis=-2)   # (B, H, g, g, P): m
      w_all, w_hi, w_lo = (lse(term_w[..., s, :], axis=-2)
                           for s in (slice(None), slice(g, None), slice(None, g)))
      per_m = lambda h, w: (h + w)[:, :, :, :, None, :]                            # broadcast over k
      pads = jnp.stack([lse(term_d + per_m(h_hi, w_all), axis=-1),                  # key l ≥ g
                        lse(term_d + per_m(h_lo, w_hi), axis=-1),                   # l < g, n ≥ g
                        lse((term_d + per_m(h_lo, w_lo))[..., g:], axis=-1)], -1)   # l, n < g, m ≥ g
      pad_logit = lse(pads, axis=-1) + jnp.einsum("bhijkc,hc->bhijk", q32 * scale, k_bias)
      pad_logit = pad_logit.reshape(b, heads, n, 1)
    # Softmax over the n real keys (+ the padded keys' one logit), normalised after the value product.
    top = jnp.max(logits, axis=-1, keepdims=True)
    if pad:
      top = jnp.maximum(top, pad_logit)
    top = jax.lax.stop_gradient(top)
    weights = jnp.exp(logits - top)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bhkc->bhqc", weights.astype(self.dtype), values,
                     preferred_element_type=jnp.float32)
    if pad:
      pad_weight = jnp.exp(pad_logit - top)
      out, total = out + pad_weight * v_bias[None, :, None, :], total + pad_weight
    out = out / total
    out = out.astype(self.dtype).reshape(b, heads, g, g, g, hd).transpose(0, 2, 3, 4, 1, 5)
    proj = vit.dense(width, ("heads", "embed"), self.dtype, jnp.float32, "proj")
    return proj(out.reshape(b, g, g, g, width))


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  window: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + EncoderAttention(self.num_heads, self.window, self.dtype, name="attn")(
        vit.layer_norm("norm1")(x).astype(self.dtype)).astype(x.dtype)
    y = vit.Mlp(self.mlp_dim, "exact", self.dtype, name="mlp")(vit.layer_norm("norm2")(x).astype(self.dtype))
    return x + y.astype(x.dtype)


def crop_shape(c: Sam3DConfig) -> tuple[int, ...]:
  """Shape of one crop `embed` reads: (S, S, S), or (S, S, S, in_chans) for several channels."""
  return (c.img_size,) * 3 + ((c.in_chans,) if c.in_chans > 1 else ())


def channel_last(x: jax.Array, c: Sam3DConfig) -> jax.Array:
  """(B, *crop_shape) crops, checked → (B, S, S, S, in_chans)."""
  if x.shape[1:] != crop_shape(c):
    raise UserError(f"crop: shape {x.shape[1:]}, expected {crop_shape(c)}")
  return x if c.in_chans > 1 else x[..., None]


class ImageEncoder3D(nn.Module):
  """(B, *crop_shape) crop → (B, g, g, g, prompt_dim) image embedding (float32)."""
  config: Sam3DConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, dtype = self.config, DTYPES[self.config.dtype]
    g = c.grid
    patch_embed = vit.PatchEmbed(c.width, (c.patch_size,) * 3, dtype, name="patch_embed")
    tokens = patch_embed(channel_last(x, c).astype(dtype))
    pos = _param(self, "pos_embed", nn.initializers.zeros, (None,) * 4 + ("embed",), (1, g, g, g, c.width))
    x = tokens.reshape(-1, g, g, g, c.width).astype(jnp.float32) + pos
    for i in range(c.depth):
      window = 0 if i in c.global_attn_indexes else c.window_size
      x = EncoderBlock(c.num_heads, c.mlp_dim, window, dtype, name=f"blocks_{i}")(x)
    x = _conv(c.prompt_dim, 1, "neck_0", dtype, use_bias=False)(x.astype(dtype))
    x = vit.layer_norm("neck_1")(x)
    x = _conv(c.prompt_dim, 3, "neck_2", dtype, use_bias=False, padding=1)(x.astype(dtype))
    return vit.layer_norm("neck_3")(x)


# ------------------------------------------------------------------------------------------ prompt encoder


class PositionEmbeddingRandom3D(nn.Module):
  """Random-Fourier PE of coordinates in [0, 1]³ → (…, 3·F): [sin, cos, sin] of 2π(2c−1)·G, G (3, F) a
  buffer."""
  num_feats: int

  @nn.compact
  def __call__(self, coords: jax.Array) -> jax.Array:
    matrix = self.variable("buffers", "positional_encoding_gaussian_matrix",
                           lambda: jax.random.normal(self.make_rng("params"), (3, self.num_feats)))
    p = 2 * np.pi * ((2 * coords - 1) @ matrix.value)
    return jnp.concatenate([jnp.sin(p), jnp.cos(p), jnp.sin(p)], axis=-1)


class PromptEncoder3D(nn.Module):
  config: Sam3DConfig

  def setup(self):
    c = self.config
    self.pe_layer = PositionEmbeddingRandom3D(c.prompt_dim // 3)
    init = vit.partitioned(nn.initializers.normal(1.0), (None, "embed"))
    for name in ("point_embeddings_0", "point_embeddings_1", "not_a_point_embed", "no_mask_embed"):
      setattr(self, name, self.param(name, init, (1, c.prompt_dim), jnp.float32))
    dtype = DTYPES[c.dtype]
    self.mask_downscaling_0 = PatchConv(c.mask_in_chans // 4, 2, dtype)
    self.mask_downscaling_1 = vit.layer_norm(None)
    self.mask_downscaling_3 = PatchConv(c.mask_in_chans, 2, dtype)
    self.mask_downscaling_4 = vit.layer_norm(None)
    self.mask_downscaling_6 = PatchConv(c.prompt_dim, 1, dtype)

  def dense_pe(self) -> jax.Array:
    """(g, g, g, C) PE of the embedding grid; cell (i, j, k) encodes ((j+.5)/g, (i+.5)/g, (k+.5)/g)."""
    g = self.config.grid
    centres = (np.arange(g, dtype=np.float32) + 0.5) / g
    i, j, k = np.meshgrid(centres, centres, centres, indexing="ij")
    return self.pe_layer(jnp.asarray(np.stack([j, i, k], axis=-1)))

  def embed_points(self, points: jax.Array, labels: jax.Array) -> jax.Array:
    """points (B, N, 3) voxel indices, labels (B, N) → (B, N+1, C), the official padding point appended."""
    b = points.shape[0]
    points = jnp.concatenate([points.astype(jnp.float32) + 0.5, jnp.zeros((b, 1, 3), jnp.float32)], axis=1)
    labels = jnp.concatenate([labels.astype(jnp.int32), jnp.full((b, 1), PADDING, jnp.int32)], axis=1)
    pe = self.pe_layer(points / self.config.img_size)
    lab = labels[..., None]
    pe = jnp.where(lab == PADDING, self.not_a_point_embed, jnp.where(lab == ABSENT, 0.0, pe))
    pe = pe + jnp.where(lab == NEGATIVE, self.point_embeddings_0, 0.0)
    return pe + jnp.where(lab == POSITIVE, self.point_embeddings_1, 0.0)

  def embed_mask(self, mask_logits: jax.Array) -> jax.Array:
    """(B, m, m, m) logits (m = `mask_size`) → (B, g, g, g, C); crop-resolution logits (fine path) are
    average-pooled to 4g first."""
    dtype, m = DTYPES[self.config.dtype], 4 * self.config.grid
    if mask_logits.shape[1] != m:
      f = mask_logits.shape[1] // m
      mask_logits = mask_logits.reshape(-1, m, f, m, f, m, f).mean((2, 4, 6))
    x = self.mask_downscaling_0(mask_logits[..., None].astype(dtype))
    x = _gelu(self.mask_downscaling_1(x)).astype(dtype)
    x = _gelu(self.mask_downscaling_4(self.mask_downscaling_3(x))).astype(dtype)
    return self.mask_downscaling_6(x).astype(jnp.float32)

  def __call__(self, points: jax.Array | None, labels: jax.Array | None, mask_logits: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    b = mask_logits.shape[0]
    if points is None:
      sparse = jnp.zeros((b, 0, self.config.prompt_dim), jnp.float32)
    else:
      sparse = self.embed_points(points, labels)
    return sparse, self.embed_mask(mask_logits)


# ------------------------------------------------------------------------------------------- mask decoder


def _decoder_norm(name: str) -> nn.LayerNorm:
  return vit.layer_norm(name, epsilon=1e-5)


class _Linear(nn.Module):
  """The (kernel (in, out), bias (out,)) of a Linear layer, for code that applies them in another order."""
  features_in: int
  features_out: int

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    kernel = _param(self, "kernel", nn.initializers.xavier_uniform(), ("embed", "heads"),
                    (self.features_in, self.features_out))
    return kernel, _param(self, "bias", nn.initializers.zeros, ("heads",), (self.features_out,))


class DecoderAttention(nn.Module):
  """SAM attention with q/k/v projected to `internal_dim`. (B, Lq, C), (B, Lk, C), (B, Lk, C) → (B, Lq, C).

  When one side has few tokens (the prompt tokens: H·Lq·Lk < (Lq + Lk)·internal_dim), the projections of the
  long side are folded into the short side's, which is the same algebra in another order: e.g. for few
  queries, q·(X Wk + bk)ᵀ = (q Wkᵀ)·Xᵀ + q·bk and softmax·(X Wv + bv) = (softmax·X) Wv + bv. The 512 image
  tokens then never pass through the 384×192 projections (≈ 3.4× fewer FLOPs in the cross-attentions).
  `key_mask` (B, Lk) bool: keys that may be attended to (the others get exactly zero weight).
  """
  internal_dim: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None
               ) -> jax.Array:
    width, inner, heads = q.shape[-1], self.internal_dim, self.num_heads
    hd = inner // heads
    (wq, bq), (wk, bk), (wv, bv) = (_Linear(width, inner, name=n)() for n in ("q_proj", "k_proj", "v_proj"))
    wo, bo = _Linear(inner, width, name="out_proj")()
    cast = lambda *xs: [x.astype(self.dtype) for x in xs]
    q, k, v, wq, wk, wv, wo = cast(q, k, v, wq, wk, wv, wo)
    split = lambda x: x.reshape(*x.shape[:-1], heads, hd)
    lq, lk = q.shape[1], k.shape[1]
    scale = hd ** -0.5
    f32 = jnp.float32
    masked = lambda x: x if key_mask is None else jnp.where(key_mask[:, None, None], x, -jnp.inf)
    if heads * lq * lk >= (lq + lk) * inner:                 # plain order
      qh, kh, vh = split(q @ wq + bq), split(k @ wk + bk), split(v @ wv + bv)
      mask = None if key_mask is None else key_mask[:, None, None, :]
      out = jax.nn.dot_product_attention(qh.astype(self.dtype), kh.astype(self.dtype), vh.astype(self.dtype),
                                         mask=mask)
      return (out.reshape(*out.shape[:-2], inner).astype(self.dtype) @ wo + bo).astype(f32)
    if lq <= lk:                                             # few queries: fold Wk, Wv into them
      qh = split(jnp.dot(q, wq, preferred_element_type=f32) + bq)                          # (B, Lq, H, hd)
      q_fold = jnp.einsum("bqhd,chd->bqhc", qh, split(wk).astype(f32)) * scale             # (B, Lq, H, C)
      logits = jnp.einsum("bqhc,bkc->bhqk", q_fold.astype(self.dtype), k, preferred_element_type=f32)
      logits = logits + jnp.einsum("bqhd,hd->bhq", qh, split(bk))[..., None] * scale
      pooled = jnp.einsum("bhqk,bkc->bqhc", jax.nn.softmax(masked(logits), -1).astype(self.dtype), v,
                          preferred_element_type=f32)                                    # (B, Lq, H, C)
      out = jnp.einsum("bqhc,chd->bqhd", pooled, split(wv).astype(f32)) + split(bv)
      return (jnp.dot(out.reshape(*out.shape[:-2], inner).astype(self.dtype), wo, preferred_element_type=f32)
              + bo)
    kh = split(jnp.dot(k, wk, preferred_element_type=f32) + bk)                # few keys: fold Wq, Wo
    vh = split(jnp.dot(v, wv, preferred_element_type=f32) + bv)                            # (B, Lk, H, hd)
    k_fold = jnp.einsum("chd,bkhd->bchk", split(wq).astype(f32), kh) * scale               # (B, C, H, Lk)
    logits = jnp.einsum("bqc,bchk->bqhk", q, k_fold.astype(self.dtype), preferred_element_type=f32)
    logits = logits + jnp.einsum("hd,bkhd->bhk", split(bq), kh)[:, None] * scale
    v_fold = jnp.einsum("bkhd,hdc->bhkc", vh, wo.reshape(heads, hd, width).astype(f32))   # (B, H, Lk, C)
    probs = jax.nn.softmax(masked(logits), -1).astype(self.dtype)
    return jnp.einsum("bqhk,bhkc->bqc", probs, v_fold.astype(self.dtype), preferred_element_type=f32) + bo


class ReluMlp(nn.Module):
  """Dense layers `dims` with ReLU between them, named layers_i (or lin1/lin2 for the transformer MLP)."""
  dims: tuple[int, ...]
  names: tuple[str, ...] | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    names = self.names or tuple(f"layers_{i}" for i in range(len(self.dims)))
    for i, (d, name) in enumerate(zip(self.dims, names)):
      x = vit.dense(d, ("embed", "mlp"), self.dtype, jnp.float32, name)(x.astype(self.dtype))
      if i < len(self.dims) - 1:
        x = jax.nn.relu(x)
    return x.astype(jnp.float32)


class TwoWayBlock(nn.Module):
  config: Sam3DConfig
  skip_first_layer_pe: bool

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe, token_mask=None):
    c, dtype = self.config, DTYPES[self.config.dtype]
    cross = c.prompt_dim // c.attention_downsample
    self_attn = DecoderAttention(c.prompt_dim, c.decoder_heads, dtype, name="self_attn")
    if self.skip_first_layer_pe:
      queries = self_attn(queries, queries, queries, token_mask)
    else:
      q = queries + query_pe
      queries = queries + self_attn(q, q, queries, token_mask)
    queries = _decoder_norm("norm1")(queries)
    k = keys + key_pe
    queries = queries + DecoderAttention(cross, c.decoder_heads, dtype, name="cross_attn_token_to_image")(
        queries + query_pe, k, keys)
    queries = _decoder_norm("norm2")(queries)
    queries = _decoder_norm("norm3")(
        queries + ReluMlp((c.decoder_mlp_dim, c.prompt_dim), ("lin1", "lin2"), dtype, name="mlp")(queries))
    keys = keys + DecoderAttention(cross, c.decoder_heads, dtype, name="cross_attn_image_to_token")(
        k, queries + query_pe, queries, token_mask)
    return queries, _decoder_norm("norm4")(keys)


class TwoWayTransformer3D(nn.Module):
  """tokens (B, T, C), image (B, L, C), image PE (L, C), token_mask (B, T) bool or None (tokens other tokens
  and the image may attend to) → tokens (B, T, C), image (B, L, C)."""
  config: Sam3DConfig

  @nn.compact
  def __call__(self, image: jax.Array, image_pe: jax.Array, tokens: jax.Array,
               token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    c = self.config
    queries, keys = tokens, image
    for i in range(c.decoder_depth):
      queries, keys = TwoWayBlock(c, i == 0, name=f"layers_{i}")(queries, keys, tokens, image_pe, token_mask)
    attn = DecoderAttention(c.prompt_dim // c.attention_downsample, c.decoder_heads, DTYPES[c.dtype],
                            name="final_attn_token_to_image")
    queries = queries + attn(queries + tokens, keys + image_pe, keys)
    return _decoder_norm("norm_final_attn")(queries), keys


class MaskDecoder3D(nn.Module):
  """embedding (B, g, g, g, C), image PE (g, g, g, C), sparse (B, N, C), dense (B, g, g, g, C), token_mask
  (B, N) bool or None (all visible) → logits of mask token 0 (B, 4g, 4g, 4g), IoU prediction of mask 0
  (B,)."""
  config: Sam3DConfig

  @nn.compact
  def __call__(self, embedding, image_pe, sparse, dense, token_mask=None):
    c, dtype = self.config, DTYPES[self.config.dtype]
    b, g = embedding.shape[0], c.grid
    init = vit.partitioned(nn.initializers.normal(1.0), (None, "embed"))
    iou_token = self.param("iou_token", init, (1, c.prompt_dim), jnp.float32)
    mask_tokens = self.param("mask_tokens", init, (c.num_mask_tokens, c.prompt_dim), jnp.float32)
    out_tokens = jnp.broadcast_to(jnp.concatenate([iou_token, mask_tokens])[None], (b, 1 + c.num_mask_tokens,
                                                                                   c.prompt_dim))
    tokens = jnp.concatenate([out_tokens, sparse.astype(jnp.float32)], axis=1)
    src = (embedding + dense).reshape(b, g ** 3, c.prompt_dim)
    if token_mask is not None:
      visible = jnp.ones((b, out_tokens.shape[1]), bool)
      token_mask = jnp.concatenate([visible, token_mask.astype(bool)], axis=1)
    transformer = TwoWayTransformer3D(c, name="transformer")
    hs, src = transformer(src, image_pe.reshape(g ** 3, c.prompt_dim)[None], tokens, token_mask)
    # The two stride-2 transposed convs act per voxel, so the features stay in a blocked layout
    # (B, g, g, g, 2, 2, 2, 2, 2, 2, C/8) and only the final logits are interleaved to (B, 4g, 4g, 4g).
    up = _ConvTranspose2(c.prompt_dim // 4, dtype, name="output_upscaling_0")(src.reshape(b, g, g, g, -1))
    up = _gelu(vit.layer_norm("output_upscaling_1")(up))
    up = _gelu(_ConvTranspose2(c.prompt_dim // 8, dtype, name="output_upscaling_3")(up.astype(dtype)))
    hyper = [ReluMlp((c.prompt_dim, c.prompt_dim, c.prompt_dim // 8), dtype=dtype,
                     name=f"output_hypernetworks_mlps_{i}")(hs[:, 1 + i])
             for i in range(c.num_mask_tokens) if i == 0 or self.is_initializing()]
    blocked = jnp.einsum("bnc,bc->bn", up.reshape(b, -1, up.shape[-1]), hyper[0])
    logits = blocked.reshape(b, g, g, g, 2, 2, 2, 2, 2, 2).transpose(0, 1, 4, 7, 2, 5, 8, 3, 6, 9)
    logits = logits.reshape(b, 4 * g, 4 * g, 4 * g)
    iou = ReluMlp((c.iou_hidden,) * (c.iou_depth - 1) + (c.num_mask_tokens,), dtype=dtype,
                  name="iou_prediction_head")(hs[:, 0])
    return logits, iou[:, 0]


class _ConvTranspose2(nn.Module):
  """ConvTranspose3d with kernel = stride = 2, in a blocked layout: (…, Cin) → (…, 2, 2, 2, features), where
  sub-voxel (i, j, k) of input voxel (x, y, z) is output voxel (2x+i, 2y+j, 2z+k) of the torch layer.
  Kernel (Cin, 2, 2, 2, features) = torch's (Cin, features, 2, 2, 2) permuted (no flip: the kernel never
  overlaps itself at stride 2)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    kernel = _param(self, "kernel", nn.initializers.lecun_normal(in_axis=0, out_axis=-1),
                    ("conv_in", None, None, None, "conv_out"), (cin, 2, 2, 2, self.features))
    bias = _param(self, "bias", nn.initializers.zeros, ("conv_out",), (self.features,))
    y = jnp.dot(x.astype(self.dtype), kernel.reshape(cin, -1).astype(self.dtype),
                preferred_element_type=jnp.float32)
    return y.reshape(*x.shape[:-1], 2, 2, 2, self.features) + bias


# -------------------------------------------------------------------------------- crop-resolution path

CLICK_SIGMAS = (2.0, 6.0)      # widths (voxels) of the Gaussian click maps of the fine path


class FineEncoder(nn.Module):
  """(B, *crop_shape) crop → (B, S, S, S, fine_width) per-voxel image features: a 3³ conv (12 mm at 4 mm
  voxels, averages the CT noise), GELU, a per-voxel dense layer. Computed once per crop, in `embed`."""
  config: Sam3DConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, dtype = self.config, DTYPES[self.config.dtype]
    x = _gelu(_conv(c.fine_width, 3, "conv", dtype, padding=1)(channel_last(x, c).astype(dtype)))
    return vit.dense(c.fine_width, ("conv_in", "conv_out"), dtype, jnp.float32, "proj")(x).astype(jnp.float32)


def _click_maps(features: jax.Array, points: jax.Array, labels: jax.Array) -> jax.Array:
  """features (B, S, S, S, F), points (B, N, 3), labels (B, N) → (B, S, S, S, 2 + 2·len(CLICK_SIGMAS)):
  per voxel x and click kind (positive, negative), the largest over the clicks p of that kind of
  exp(−mean_F (f(x) − f(p))²) (looks like a click) and of exp(−|x − p|² / 2σ²) (near a click), 0 without
  such clicks."""
  b, s, f = features.shape[0], features.shape[1], features.shape[-1]
  index = jnp.clip(points.astype(jnp.int32), 0, s - 1)                                    # (B, N, 3)
  flat = features.reshape(b, s ** 3, f)
  at_click = jnp.take_along_axis(flat, ((index[..., 0] * s + index[..., 1]) * s + index[..., 2])[..., None],
                                 axis=1)                                                  # (B, N, F)
  look = ((flat ** 2).sum(-1)[..., None] - 2 * jnp.einsum("bvf,bnf->bvn", flat, at_click)
          + (at_click ** 2).sum(-1)[:, None]) / f                                         # (B, V, N)
  grid = jnp.asarray(np.stack(np.meshgrid(*(np.arange(s, dtype=np.float32),) * 3, indexing="ij"),
                              -1).reshape(-1, 3))                                         # (V, 3)
  p = index.astype(jnp.float32)
  dist2 = ((grid ** 2).sum(-1)[None, :, None] - 2 * jnp.einsum("vd,bnd->bvn", grid, p)
           + (p ** 2).sum(-1)[:, None])                                                   # (B, V, N)
  maps = [jnp.exp(-jnp.maximum(look, 0))] + [jnp.exp(-jnp.maximum(dist2, 0) / (2 * sg ** 2))
                                             for sg in CLICK_SIGMAS]
  out = [jnp.max(m, axis=-1, initial=0.0, where=(labels == kind)[:, None]) for kind in (POSITIVE, NEGATIVE)
         for m in maps]
  return jnp.stack(out, -1).reshape(b, s, s, s, len(out))


class FineHead(nn.Module):
  """The crop-resolution path of one click round: per voxel, a 3-layer MLP of the image features
  (`FineEncoder`), the click maps (`_click_maps`), the previous round's logits and the decoder's logits
  (trilinear to the crop) gives a correction added to the decoder's logits.
  features (B, S, S, S, F), coarse logits (B, 4g, 4g, 4g), points (B, N, 3), labels (B, N), previous logits
  (B, S, S, S) → logits (B, S, S, S)."""
  config: Sam3DConfig

  @nn.compact
  def __call__(self, features, coarse, points, labels, previous):
    c, dtype = self.config, DTYPES[self.config.dtype]
    coarse = upsample_logits(coarse, c.img_size)
    x = jnp.concatenate([features, _click_maps(features, points, labels), jnp.tanh(previous / 2)[..., None],
                         jnp.tanh(coarse / 2)[..., None]], -1)
    for i in range(2):
      x = _gelu(vit.dense(c.fine_width, ("conv_in", "conv_out"), dtype, jnp.float32, f"layers_{i}")(
          x.astype(dtype)))
    out = vit.dense(1, ("conv_in", "conv_out"), dtype, jnp.float32, "layers_2")(x.astype(dtype))
    return coarse + out[..., 0].astype(jnp.float32)


def pack_fine(embedding: jax.Array, fine: jax.Array, c: Sam3DConfig) -> jax.Array:
  """(B, g, g, g, C), (B, S, S, S, F) → (B, g, g, g, C + p³·F): the crop-resolution features ride along in
  the embedding, each grid cell carrying its p³ voxels (p = patch_size) in blocked order."""
  b, g, p = fine.shape[0], c.grid, c.patch_size
  blocked = fine.reshape(b, g, p, g, p, g, p, -1).transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, g, g, g, -1)
  return jnp.concatenate([embedding, blocked], -1)


def unpack_fine(embedding: jax.Array, c: Sam3DConfig) -> jax.Array:
  """The inverse of `pack_fine`: (B, g, g, g, C + p³·F) → (B, S, S, S, F)."""
  b, g, p = embedding.shape[0], c.grid, c.patch_size
  blocked = embedding[..., c.prompt_dim:].reshape(b, g, g, g, p, p, p, -1)
  return blocked.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, g * p, g * p, g * p, -1)


# ------------------------------------------------------------------------------------------------ the model


class Sam3D(nn.Module):
  """SAM-Med3D. `__call__` (used by `init`) = embed → encode_prompts → decode. See the module doc."""
  config: Sam3DConfig

  def setup(self):
    self.image_encoder = ImageEncoder3D(self.config)
    self.prompt_encoder = PromptEncoder3D(self.config)
    self.mask_decoder = MaskDecoder3D(self.config)
    if self.config.fine_width:
      self.fine_encoder = FineEncoder(self.config)
      self.fine_head = FineHead(self.config)

  def embed(self, crops: jax.Array) -> jax.Array:
    """(B, *crop_shape) normalised crops → (B, g, g, g, C) image embeddings (float32); with the fine path
    (B, g, g, g, C + p³·fine_width), its per-voxel features packed after the C channels (`pack_fine`)."""
    embedding = self.image_encoder(crops)
    if not self.config.fine_width:
      return embedding
    return pack_fine(embedding, self.fine_encoder(crops), self.config)

  def encode_prompts(self, points: jax.Array | None, labels: jax.Array | None, mask_logits: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """points (B, N, 3) voxel indices (axes 0, 1, 2 of the crop) or None, labels (B, N) of POSITIVE/NEGATIVE/
    PADDING/ABSENT, mask_logits (B, m, m, m), m = `mask_size` (zeros on the first click, as the official loops) →
    sparse (B, N+1, C) (B, 0, C without points), dense (B, g, g, g, C)."""
    return self.prompt_encoder(points, labels, mask_logits)

  def dense_pe(self) -> jax.Array:
    """(g, g, g, C) positional encoding of the embedding grid (depends only on the buffers: compute once)."""
    return self.prompt_encoder.dense_pe()

  def decode(self, embedding: jax.Array, sparse: jax.Array, dense: jax.Array,
             image_pe: jax.Array | None = None, token_mask: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """→ low-res logits (B, 4g, 4g, 4g) float32, IoU prediction (B,). `image_pe`: `dense_pe()` if given;
    `token_mask` (B, N+1): `token_mask(labels)` when some labels are ABSENT (None: every token visible)."""
    return self.mask_decoder(embedding[..., :self.config.prompt_dim],
                             self.dense_pe() if image_pe is None else image_pe, sparse, dense, token_mask)

  def refine(self, embedding: jax.Array, logits: jax.Array, points: jax.Array, labels: jax.Array,
             mask_logits: jax.Array) -> jax.Array:
    """The fine path (config.fine_width > 0): embedding (with packed features), `decode`'s logits
    (B, 4g, 4g, 4g), points (B, N, 3) / labels (B, N) as given to `encode_prompts` and the mask prompt
    (B, S, S, S) → crop-resolution logits (B, S, S, S)."""
    return self.fine_head(unpack_fine(embedding, self.config), logits, points, labels, mask_logits)

  def __call__(self, crops, points, labels, mask_logits):
    embedding = self.embed(crops)
    logits, iou = self.decode(embedding, *self.encode_prompts(points, labels, mask_logits))
    if self.config.fine_width:
      logits = self.refine(embedding, logits, points, labels, mask_logits)
    return logits, iou


def token_mask(labels: jax.Array) -> jax.Array:
  """labels (B, N) → (B, N+1) bool: the sparse tokens of `encode_prompts` that are visible (not ABSENT; the
  appended official padding point is)."""
  return jnp.concatenate([labels != ABSENT, jnp.ones((labels.shape[0], 1), bool)], axis=1)


def upsample_logits(logits: jax.Array, size: int) -> jax.Array:
  """(B, s, s, s) logits → (B, size, size, size), trilinear, align_corners=False (as F.interpolate)."""
  return jax.image.resize(logits, (logits.shape[0],) + (size,) * 3, "linear")


def init_variables(config: Sam3DConfig, rng: jax.Array, batch: int = 1) -> dict[str, Any]:
  """Random `{'params', 'buffers'}` of the model (boxed, as `init` returns them)."""
  m = config.mask_size
  return Sam3D(config).init(rng, jnp.zeros((batch, *crop_shape(config))), jnp.zeros((batch, 1, 3)),
                            jnp.ones((batch, 1), jnp.int32), jnp.zeros((batch, m, m, m)))


def abstract_variables(config: Sam3DConfig) -> dict[str, Any]:
  """Shapes/dtypes of `init_variables` without computing anything (jax.eval_shape)."""
  return jax.eval_shape(lambda rng: init_variables(config, rng), jax.random.key(0))


def param_count(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree)))
