"""Downstream heads on the FratMAE / MAE encoders: lesion segmentation (UNETR-style, linear) and Ann Arbor
staging.

The heads read `FratMAE.encode(pet, ct)`: a dict with one entry per encoder (`pet` and `ct` for the twin
methods, `petct` for the single-encoder MAE baselines), each holding `tokens` (B, N, width) after the final LN
and `layers` (the per-block outputs (B, N, width)); tokens are row-major over the (H/p, W/p) slab grid.

* `UNETRHead`: UNETR adapted to the 2-D slab view. With a square patch p = 2^L it taps L encoder depths
  (default evenly spaced, e.g. blocks 3, 6, 9, 12 of a 12-block ViT with p = 16). At every tap the tokens of
  all encoders are layer-normed, concatenated along channels and projected by a 1×1 (Dense) layer: the PET/CT
  fusion per scale. The deepest tap is the bottleneck at 1/p; the tap for level j (resolution 1/2^j) is
  brought there by L - j transposed-conv upsamplings; a conv stem on the input slab gives the full-resolution
  skip. The decoder upsamples ×2 per level, concatenates the skip and applies two 3×3 conv blocks. Output: one
  logit per voxel of the slab, (B, H, W, D).
* `LinearHead`: the cheap SETR-naive option. Final tokens of all encoders, concatenated → Dense(p·p·D) →
  unpatchify → (B, H, W, D).
* `StagingHead`: patient-level classifier over the slabs of a study. Slab features (B, S, F) with a slab
  validity mask (B, S) → mean or sum over the valid slabs or gated attention-MIL (Ilse et al. 2018) → linear
  or 2-layer MLP → (B, C) logits.

`LesionSegmenter` and `Stager` put a FratMAE backbone (only its encoders are used, so only their params exist)
and a head together; `freeze_backbone` stops gradients at the encoder outputs (linear probe).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from petfm.errors import UserError
from petfm.models import fratmae, vit

SEG_HEADS = ("unetr", "linear")
AGGREGATIONS = ("mean", "sum", "attention")
NORMS = ("layer", "instance")


def encoder_names(encoded: dict[str, Any]) -> list[str]:
  """The encoder entries of a `FratMAE.encode` result, in a fixed order (pet, ct) or (petct,)."""
  return [name for name in ("pet", "ct", "petct") if name in encoded]


def tap_layers(depth: int, levels: int, layers: Sequence[int] | None = None) -> tuple[int, ...]:
  """1-based encoder blocks tapped by the UNETR head, shallow to deep: `layers`, or `levels` evenly spaced
  blocks ending at the last (depth 12, 4 levels → 3, 6, 9, 12)."""
  if layers is None:
    layers = [max(1, round(depth * (i + 1) / levels)) for i in range(levels)]
  layers = tuple(int(i) for i in layers)
  if len(layers) != levels or not all(1 <= i <= depth for i in layers):
    raise UserError(f"head layers {layers}: need {levels} block indices in 1..{depth} (one per upsampling "
                    "level)")
  return layers


def slab_features(encoded: dict[str, Any]) -> jax.Array:
  """Mean-pooled tokens of every encoder, concatenated: (B, F) with F = width × number of encoders."""
  return jnp.concatenate([jnp.mean(encoded[n]["tokens"], axis=1) for n in encoder_names(encoded)], axis=-1)


def prior_bias(prior: float) -> Callable:
  """Initialiser of a final logit bias: logit(prior), so an untrained head predicts p = prior everywhere
  (RetinaNet-style; 0.5 = zero bias)."""
  if not 0.0 < prior < 1.0:
    raise UserError(f"config.head.prior: must be in (0, 1), got {prior}")
  return nn.initializers.constant(math.log(prior / (1.0 - prior)))


def _kernel_init() -> Callable:
  return vit.partitioned(nn.initializers.he_normal(), (None, None, "conv_in", "conv_out"))


def _conv(features: int, kernel: int, dtype, param_dtype, name: str,
          bias_init: Callable = nn.initializers.zeros) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), padding="SAME", dtype=dtype, param_dtype=param_dtype, name=name,
                 kernel_init=_kernel_init(), bias_init=vit.partitioned(bias_init, ("conv_out",)))


class UpConv(nn.Module):
  """2×2 transposed conv with stride 2: (B, H, W, C) → (B, 2H, 2W, features).

  The same map and params ("kernel" (2, 2, C, features), "bias") as `nn.ConvTranspose(features, (2, 2),
  strides=(2, 2))`, computed as one matmul per pixel followed by depth-to-space: the 2×2 output block of a
  pixel depends on that pixel alone. On CPU this is 2-7× faster than XLA's transposed convolution (forward +
  backward at the tiny lesion head's sizes; its whole train step 0.195 → 0.142 s, `benchmarks/throughput.py`)."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", _kernel_init(), (2, 2, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", vit.partitioned(nn.initializers.zeros, ("conv_out",)), (self.features,),
                      self.param_dtype)
    b, h, w, _ = x.shape
    # ConvTranspose (transpose_kernel=False) applies the kernel flipped: output block (i, j) uses [1-i, 1-j]
    y = jnp.einsum("bhwc,ijcd->bhiwjd", x.astype(self.dtype), kernel[::-1, ::-1].astype(self.dtype))
    return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


def _norm(kind: str, name: str, param_dtype) -> nn.Module:
  """`layer`: LayerNorm over the channels of each pixel; `instance`: each channel over the slab's pixels."""
  if kind == "layer":
    return vit.layer_norm(name, param_dtype)
  if kind == "instance":
    return nn.GroupNorm(num_groups=None, group_size=1, dtype=jnp.float32, param_dtype=param_dtype, name=name,
                        scale_init=vit.partitioned(nn.initializers.ones, ("norm",)),
                        bias_init=vit.partitioned(nn.initializers.zeros, ("norm",)))
  raise UserError(f"head norm {kind!r} is not one of {list(NORMS)}")


class ConvBlock(nn.Module):
  """`count` × (3×3 conv → norm (`_norm`) → GELU). (B, H, W, C) → (B, H, W, features)."""
  features: int
  count: int = 2
  norm: str = "layer"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.count):
      x = _conv(self.features, 3, self.dtype, self.param_dtype, f"conv_{i}")(x)
      x = jax.nn.gelu(_norm(self.norm, f"norm_{i}", self.param_dtype)(x)).astype(self.dtype)
    return x


class Upsample(nn.Module):
  """2×2 transposed conv with stride 2, then a conv block. (B, H, W, C) → (B, 2H, 2W, features)."""
  features: int
  blocks: int = 1
  norm: str = "layer"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = UpConv(self.features, self.dtype, self.param_dtype, name="up")(x)
    return ConvBlock(self.features, self.blocks, self.norm, self.dtype, self.param_dtype, name="block")(x)


class Fuse(nn.Module):
  """PET/CT fusion at one scale: LN per encoder → concat → Dense. list of (B, N, W_i) → (B, N, features)."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: Sequence[jax.Array]) -> jax.Array:
    x = jnp.concatenate([vit.layer_norm(f"norm_{i}", self.param_dtype)(t) for i, t in enumerate(tokens)], -1)
    return vit.dense(self.features, ("embed", "conv_out"), self.dtype, self.param_dtype, "proj")(x)


def _levels(patch_size: Sequence[int]) -> int:
  p = tuple(patch_size)
  if len(p) != 2 or p[0] != p[1] or p[0] < 2 or p[0] & (p[0] - 1):
    raise UserError(f"UNETR head: patch_size {p} must be square with a power-of-two side ≥ 2")
  return int(math.log2(p[0]))


class UNETRHead(nn.Module):
  """UNETR-style decoder (module docstring). `__call__(encoded, images)`: encoded = `FratMAE.encode` result,
  images (B, H, W, C) the input slab (PET and CT slices as channels) → logits (B, H, W, out_depth) float32."""
  patch_size: tuple[int, int]
  out_depth: int
  encoder_depth: int
  features: int = 16
  layers: tuple[int, ...] | None = None
  prior: float = 0.5                # lesion probability of the untrained head (final bias = logit(prior))
  norm: str = "layer"               # of the conv blocks (`_norm`)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def channels(self, level: int) -> int:
    """Decoder channels at resolution 1/2^level (doubling per level, at most 8 × features)."""
    return self.features * 2 ** min(level, 3)

  @nn.compact
  def __call__(self, encoded: dict[str, Any], images: jax.Array) -> jax.Array:
    levels = _levels(self.patch_size)
    taps = tap_layers(self.encoder_depth, levels, self.layers)
    names = encoder_names(encoded)
    b, h, w, _ = images.shape
    grid = vit.patch_grid((h, w), self.patch_size)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv_kw = dict(norm=self.norm, **kw)

    def fused(level: int) -> jax.Array:   # tap for `level` (1..L), fused and on the token grid
      tokens = [encoded[n]["layers"][taps[level - 1] - 1] for n in names]
      x = Fuse(self.channels(levels), **kw, name=f"fuse_{level}")(tokens)
      return x.reshape(b, *grid, x.shape[-1])

    skips = {0: ConvBlock(self.channels(0), **conv_kw, name="stem")(images.astype(self.dtype))}
    for level in range(1, levels):
      x = fused(level)
      for k in range(levels - level):
        x = Upsample(self.channels(levels - k - 1), **conv_kw, name=f"skip_{level}_up_{k}")(x)
      skips[level] = x
    x = fused(levels)
    for level in range(levels - 1, -1, -1):
      x = UpConv(self.channels(level), self.dtype, self.param_dtype, name=f"up_{level}")(x)
      x = ConvBlock(self.channels(level), **conv_kw, name=f"decode_{level}")(
          jnp.concatenate([x, skips[level]], -1))
    logits = _conv(self.out_depth, 1, self.dtype, self.param_dtype, "logits",
                   bias_init=prior_bias(self.prior))(x)
    return logits.astype(jnp.float32)


class LinearHead(nn.Module):
  """SETR-naive head: concatenated final tokens → Dense(p·p·D) → unpatchify. → logits (B, H, W, D) float32."""
  patch_size: tuple[int, int]
  out_depth: int
  prior: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, encoded: dict[str, Any], images: jax.Array) -> jax.Array:
    grid = vit.patch_grid(images.shape[1:3], self.patch_size)
    x = jnp.concatenate([encoded[n]["tokens"] for n in encoder_names(encoded)], axis=-1)
    x = nn.Dense(math.prod(self.patch_size) * self.out_depth, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="pred",
                 kernel_init=vit.partitioned(nn.initializers.xavier_uniform(), ("embed", "patch")),
                 bias_init=vit.partitioned(prior_bias(self.prior), ("patch",)))(x)
    return vit.unpatchify(x, self.patch_size, grid).astype(jnp.float32)


class StagingHead(nn.Module):
  """Slab features (B, S, F), slab_valid (B, S) bool → (logits (B, C) float32, slab weights (B, S)).

  `aggregation`: `mean` over the valid slabs, `sum` (Deep Sets: the pooled vector also tells how many slabs
  there are, e.g. how many lesions) or `attention` (gated attention-MIL with `attention_dim` hidden units);
  invalid slabs get weight 0. `hidden` > 0 adds a hidden GELU layer before the classifier."""
  num_classes: int
  aggregation: str = "mean"
  hidden: int = 0
  attention_dim: int = 64
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, slab_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    if self.aggregation not in AGGREGATIONS:
      raise UserError(f"staging aggregation {self.aggregation!r} is not one of {list(AGGREGATIONS)}")
    d = lambda n, names, name: vit.dense(n, names, self.dtype, self.param_dtype, name)
    x = vit.layer_norm("norm", self.param_dtype)(features)
    valid = slab_valid.astype(bool)
    if self.aggregation == "attention":
      v = jnp.tanh(d(self.attention_dim, ("embed", "mlp"), "attn_v")(x))
      u = jax.nn.sigmoid(d(self.attention_dim, ("embed", "mlp"), "attn_u")(x))
      scores = d(1, ("mlp", None), "attn_w")(v * u)[..., 0].astype(jnp.float32)
      weights = jax.nn.softmax(jnp.where(valid, scores, -jnp.inf), axis=-1)
    elif self.aggregation == "sum":
      weights = valid.astype(jnp.float32)
    else:
      weights = valid / jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1)
    weights = jnp.where(valid, weights, 0.0)
    pooled = jnp.einsum("bs,bsf->bf", weights, x.astype(jnp.float32))
    if self.hidden:
      pooled = jax.nn.gelu(d(self.hidden, ("embed", "mlp"), "hidden")(pooled))
    logits = d(self.num_classes, (None, "classes"), "classifier")(pooled)
    return logits.astype(jnp.float32), weights


def _encode(backbone: fratmae.FratMAE, pet: jax.Array, ct: jax.Array, freeze: bool) -> dict[str, Any]:
  encoded = backbone.encode(pet, ct)
  return jax.lax.stop_gradient(encoded) if freeze else encoded


class LesionSegmenter(nn.Module):
  """Backbone encoders + segmentation head. `__call__(pet, ct)` with pet, ct (B, H, W, D) → logits
  (B, H, W, D)."""
  backbone: fratmae.FratMAE
  head: str = "unetr"
  features: int = 16
  layers: tuple[int, ...] | None = None
  freeze_backbone: bool = False
  prior: float = 0.5
  norm: str = "layer"

  @nn.compact
  def __call__(self, pet: jax.Array, ct: jax.Array) -> jax.Array:
    encoded = _encode(self.backbone, pet, ct, self.freeze_backbone)
    kw = dict(dtype=self.backbone.dtype, param_dtype=self.backbone.param_dtype, name="head")
    patch, depth = tuple(self.backbone.patch_size), pet.shape[-1]
    if self.head == "unetr":
      head = UNETRHead(patch, depth, self.backbone.depth, self.features, self.layers, self.prior, self.norm,
                       **kw)
    elif self.head == "linear":
      head = LinearHead(patch, depth, self.prior, **kw)
    else:
      raise UserError(f"segmentation head {self.head!r} is not one of {list(SEG_HEADS)}")
    return head(encoded, jnp.concatenate([pet, ct], axis=-1))


class Stager(nn.Module):
  """Backbone encoders + staging head over the slabs of a study (`petfm.downstream.data.lesion_stack`).

  `__call__(pet, ct, slab_valid, position)`: pet, ct (B, S, H, W, D) = S slabs per study, slab_valid (B, S)
  bool, position (B, S, 3) each slab's centre in the study scaled to [-1, 1] → (logits (B, C), slab weights
  (B, S)). A slab's feature is its pooled tokens plus a learned embedding of Fourier features of its position
  (`position_frequencies` octaves per axis)."""
  backbone: fratmae.FratMAE
  num_classes: int = 4
  aggregation: str = "mean"
  hidden: int = 0
  freeze_backbone: bool = False
  position_frequencies: int = 4

  @nn.compact
  def __call__(self, pet: jax.Array, ct: jax.Array, slab_valid: jax.Array,
               position: jax.Array) -> tuple[jax.Array, jax.Array]:
    b, s = pet.shape[:2]
    flat = lambda x: x.reshape(b * s, *x.shape[2:])
    features = slab_features(_encode(self.backbone, flat(pet), flat(ct), self.freeze_backbone))
    features = features.reshape(b, s, -1)
    angles = position[..., None] * (jnp.pi * 2.0 ** jnp.arange(self.position_frequencies))   # (B, S, 3, K)
    fourier = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1).reshape(b, s, -1)
    features = features + vit.dense(features.shape[-1], (None, "embed"), self.backbone.dtype,
                                    self.backbone.param_dtype, "position")(fourier.astype(features.dtype))
    head = StagingHead(self.num_classes, self.aggregation, self.hidden, dtype=self.backbone.dtype,
                       param_dtype=self.backbone.param_dtype, name="head")
    return head(features, slab_valid)
