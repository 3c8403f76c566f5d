"""FratMAE (cross-fraternal twin masked autoencoder) and its baselines as one configurable model.

`method` picks the baseline, all from the same code:
  mae           one ViT over PET and CT stacked as channels (B, H, W, 2D), MAE masking of the joint tokens
                (ratio `mask_ratio`; `mask_mode` and the per-modality ratios do not apply), a self-attention
                decoder that predicts both modalities' patch pixels;
  mae_ca        mae + ContextAlign on the pooled encoder output;
  fratmae_noca  separate PET and CT encoders (independent params), one cross-attention decoder per target
                modality whose keys/values are the other modality's encoder tokens; no ContextAlign;
  fratmae       fratmae_noca + ContextAlign on the pooled PET encoder output.

Masking (MAE's): per-sample uniform noise → argsort; the first `K = round(N·(1 - ratio))` shuffled tokens stay
visible (static K); `ids_restore` = argsort of the shuffle; the binary mask (1 = removed) is in token order.
Mask modes of the twin methods:
  one_visible   per sample one modality is masked and the other is 100 % visible. Samples are paired in batch
                order, (0, 1), (2, 3), …; in each pair one sample has PET masked and the other CT masked, with
                a random swap per pair. So exactly half the batch reconstructs each modality (balanced, static
                shapes, every token count fixed), and a pair never spans two devices when each device holds an
                even number of samples. The batch size must be even.
  both_masked   both modalities masked with independent masks (ratios `mask_ratio_pet`, `mask_ratio_ct`);
                each decoder cross-attends the other modality's visible tokens at their own positions.

Loss: `rec_pet + rec_ct + ca_weight · ca`. Each rec term is the MSE over the masked patches of that modality
(mean over masked patches only; under one_visible that is the mean over the samples where it was masked),
with MAE's `norm_pix_loss` option (per-patch mean and unbiased variance, eps 1e-6).

ContextAlign: pooled PET embedding (mean over the PET tokens the encoder saw, or CLS) → projection → L2-norm;
text side: the stored frozen-encoder `text_embedding` → Dense → L2-norm, or a small learned text tower over
the hashed `text_tokens` when E = 0 or `text_tower="learned"`. Learnable temperature (logit scale clipped).
Multi-positive targets in both directions: samples whose `text_tokens` rows are equal are positives.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from petfm import config as config_lib
from petfm.errors import UserError
from petfm.models import vit

METHODS = ("mae", "mae_ca", "fratmae_noca", "fratmae")
MASK_MODES = ("one_visible", "both_masked")
DECODER_BLOCKS = ("cross_self", "cross")
POOLINGS = ("mean", "cls")
CA_LOSSES = ("prototype", "multi_positive")
TEXT_TOWERS = ("frozen", "learned")
NORM_PIX_EPS = 1e-6

CA_SIZES = {"tiny": dict(ca_proj_dim=64, text_width=64, text_depth=1, text_heads=2),
            "S": dict(ca_proj_dim=256, text_width=128, text_depth=2, text_heads=4),
            "B": dict(ca_proj_dim=512, text_width=256, text_depth=2, text_heads=4),
            "L": dict(ca_proj_dim=512, text_width=256, text_depth=2, text_heads=4)}


# ------------------------------------------------------------------------------------------------ config


def default_config(variant: str = "tiny", method: str = "fratmae") -> ml_collections.ConfigDict:
  """Every model field with its default for a variant (`tiny`, `S`, `B`, `L`) and method."""
  c = ml_collections.ConfigDict()
  c.method = method
  c.patch_size = (8, 8) if variant == "tiny" else (16, 16)
  c.update(vit.decode_variant(variant))      # encoder and decoder sizes: width, depth, num_heads,
                                             # decoder_*, …
  c.decoder_block = "cross_self"             # cross → self → MLP (SiamMAE); "cross" = cross → MLP (CrossMAE)
  c.posemb = "sincos"                        # or "learn" (timm checkpoints)
  c.cls_token = False
  c.gelu = "exact"                           # or "tanh"
  c.qkv_bias = True
  c.remat = False                            # recompute blocks in the backward pass (memory)
  c.attention_impl = "xla"                   # "cudnn": fused flash attention (NVIDIA GPU, bfloat16 compute)
  c.mask_mode = "one_visible"                # or "both_masked"
  c.mask_ratio = 0.75                        # masked modality's ratio (mae: joint tokens)
  c.mask_ratio_pet = ml_collections.config_dict.placeholder(float)   # None = mask_ratio
  c.mask_ratio_ct = ml_collections.config_dict.placeholder(float)    # None = mask_ratio
  c.norm_pix_loss = True
  c.ca_weight = 1.0
  c.ca_pooling = "mean"                      # or "cls" (needs cls_token)
  c.ca_proj_layers = 2                       # image projection: 1 = Dense, 2 = Dense → GELU → Dense
  c.ca_loss = "prototype"                     # image → text cross-entropy over the batch's distinct prompts
                                             # (text prototypes); "multi_positive": symmetric supervised
                                             # InfoNCE
  c.ca_center = True                         # subtract the batch mean of the image and text projections
                                             # before the L2-norm (see ContextAlign)
  c.ca_temperature_init = 0.07
  c.ca_max_logit_scale = 100.0
  c.text_tower = "frozen"                    # or "learned" (used anyway when text_embedding has E = 0)
  c.text_vocab_size = 4096                   # hash buckets of the learned tower (ids are folded into it)
  c.text_length = 32                         # words per prompt for `tokenize_words`
  c.update(CA_SIZES[variant])                # ca_proj_dim, text_width, text_depth, text_heads
  return c


def mask_ratios(model: ml_collections.ConfigDict | FratMAE) -> dict[str, float]:
  """Effective mask ratio per modality (the per-modality field, or `mask_ratio` when it is None)."""
  return {m: getattr(model, f"mask_ratio_{m}") if getattr(model, f"mask_ratio_{m}") is not None
          else model.mask_ratio for m in ("pet", "ct")}


def num_visible(num_tokens: int, ratio: float, field: str = "mask_ratio") -> int:
  """Tokens kept visible: round(N·(1 - ratio)); must leave at least one token visible and one masked."""
  keep = int(round(num_tokens * (1.0 - ratio)))
  config_lib.check(0 < keep < num_tokens, field,
                   f"{ratio} keeps {keep} of {num_tokens} tokens visible; it must keep between 1 and "
                   f"{num_tokens - 1}")
  return keep


def validate_config(model: ml_collections.ConfigDict, data: ml_collections.ConfigDict | None = None) -> None:
  """Clear `UserError`s for bad model values; with the data config (`plane_size`, `depth`) also checks
  the image size against the patch and the mask ratios against the token count."""
  config_lib.check_choice(model, "method", METHODS)
  config_lib.check_choice(model, "mask_mode", MASK_MODES)
  config_lib.check_choice(model, "decoder_block", DECODER_BLOCKS)
  config_lib.check_choice(model, "posemb", vit.POSEMB_MODES)
  config_lib.check_choice(model, "gelu", vit.GELU_MODES)
  config_lib.check_choice(model, "ca_pooling", POOLINGS)
  config_lib.check_choice(model, "text_tower", TEXT_TOWERS)
  config_lib.check_choice(model, "attention_impl", vit.ATTENTION_IMPLS)
  config_lib.check_choice(model, "ca_proj_layers", (1, 2))
  config_lib.check(len(model.patch_size) == 2 and all(p > 0 for p in model.patch_size), "patch_size",
                   f"must be two positive ints, got {model.patch_size}")
  for field in ("width", "depth", "num_heads", "mlp_dim", "decoder_width", "decoder_depth", "decoder_heads",
                "decoder_mlp_dim", "ca_proj_dim", "text_width", "text_depth", "text_heads", "text_length"):
    config_lib.check(model[field] > 0, field, f"must be > 0, got {model[field]}")
  for width, heads in (("width", "num_heads"), ("decoder_width", "decoder_heads"),
                       ("text_width", "text_heads")):
    config_lib.check(model[width] % model[heads] == 0, width,
                     f"{model[width]} is not divisible by {heads}={model[heads]}")
  for field in ("width", "decoder_width"):
    config_lib.check(model[field] % 2 == 0, field,
                     f"must be even (sin-cos position embedding), got {model[field]}")
  for field in ("mask_ratio", "mask_ratio_pet", "mask_ratio_ct"):
    ratio = model[field]
    config_lib.check(ratio is None or 0.0 < ratio < 1.0, field, f"must be in (0, 1), got {ratio}")
  config_lib.check(model.ca_weight >= 0, "ca_weight", f"must be >= 0, got {model.ca_weight}")
  config_lib.check(model.ca_temperature_init > 0, "ca_temperature_init", "must be > 0")
  config_lib.check(model.ca_loss in CA_LOSSES, "ca_loss",
                   f"{model.ca_loss!r} is not one of {list(CA_LOSSES)}")
  config_lib.check(model.ca_max_logit_scale > 0, "ca_max_logit_scale", "must be > 0")
  config_lib.check(model.text_vocab_size >= 2, "text_vocab_size",
                   f"must be >= 2, got {model.text_vocab_size}")
  config_lib.check(model.ca_pooling != "cls" or model.cls_token, "ca_pooling",
                   "'cls' needs cls_token=True")
  if data is not None:
    plane = tuple(data.plane_size)
    config_lib.check(len(plane) == 2 and all(s > 0 and s % p == 0 for s, p in zip(plane, model.patch_size)),
                     "data.plane_size",
                     f"{plane} is not divisible by model.patch_size {tuple(model.patch_size)}")
    config_lib.check(data.depth > 0, "data.depth", f"must be > 0, got {data.depth}")
    n = math.prod(s // p for s, p in zip(plane, model.patch_size))
    if model.method.startswith("mae"):
      num_visible(n, model.mask_ratio, "model.mask_ratio")
    else:
      for modality, ratio in mask_ratios(model).items():
        num_visible(n, ratio, f"model.mask_ratio_{modality}")


def model_from_config(model: ml_collections.ConfigDict, data: ml_collections.ConfigDict | None = None, *,
                      dtype: str | Any = "float32") -> FratMAE:
  """Validates the model config (and the data config when given) and builds the module; `dtype` is the
  compute dtype (`float32` or `bfloat16`), params stay float32."""
  validate_config(model, data)
  fields = model.to_dict()
  fields["patch_size"] = tuple(fields["patch_size"])
  return FratMAE(**fields, dtype=jnp.dtype(dtype))


# ------------------------------------------------------------------------------- masking, losses, pooling


def random_masking(rng: jax.Array, batch: int, num_tokens: int, num_keep: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """MAE per-sample random masking.

  Returns keep_ids (B, K) int32 (visible tokens, in shuffle order), mask (B, N) float32 (1 = removed, token
  order) and ids_restore (B, N) int32 (argsort of the shuffle: `concat(visible, masked)[ids_restore]` is
  token order).
  """
  noise = jax.random.uniform(rng, (batch, num_tokens))
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  mask = (ids_restore >= num_keep).astype(jnp.float32)
  return ids_shuffle[:, :num_keep], mask, ids_restore


def patch_targets(patches: jax.Array, norm_pix: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Reconstruction targets (B, N, P) float32 and the per-patch (mean, std) used to normalise them
  (0 and 1 without `norm_pix`)."""
  patches = patches.astype(jnp.float32)
  if not norm_pix:
    return patches, jnp.zeros_like(patches[..., :1]), jnp.ones_like(patches[..., :1])
  mean = patches.mean(axis=-1, keepdims=True)
  std = jnp.sqrt(patches.var(axis=-1, ddof=1, keepdims=True) + NORM_PIX_EPS)
  return (patches - mean) / std, mean, std


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over masked patches (mask 1) of the per-patch mean squared error. pred/target (B, N, P), mask
  (B, N)."""
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def multi_positive_contrastive(image: jax.Array, text: jax.Array, positives: jax.Array, logit_scale: jax.Array
                               ) -> tuple[jax.Array, jax.Array]:
  """Symmetric contrastive loss with multi-positive targets.

  image, text (B, P) L2-normalised; positives (B, B) bool, symmetric, True on the diagonal (sample j's text
  is a positive for image i). Each direction is the cross-entropy between softmax(logit_scale · image·textᵀ)
  and the uniform distribution over the positives; the loss is their mean. Also returns the fraction of
  images whose highest-scoring text is a positive.
  """
  logits = logit_scale * jnp.einsum("ip,jp->ij", image.astype(jnp.float32), text.astype(jnp.float32))
  targets = positives / jnp.sum(positives, axis=1, keepdims=True)
  image_to_text = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=1), axis=1))
  text_to_image = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits.T, axis=1), axis=1))
  accuracy = jnp.mean(jnp.take_along_axis(positives, jnp.argmax(logits, axis=1)[:, None], axis=1))
  return 0.5 * (image_to_text + text_to_image), accuracy


def prototype_contrastive(image: jax.Array, text: jax.Array, positives: jax.Array, logit_scale: jax.Array
                          ) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy of each image over the batch's distinct prompts (CLIP zero-shot classifier style).

  image, text (B, P) L2-normalised; positives (B, B) bool: sample j has sample i's prompt. Prompt j is a
  prototype when no earlier sample has the same prompt, so duplicates count once and the optimum is 0 (the
  multi-positive InfoNCE bottoms out at log(#positives), where a collapsed embedding sits close to the
  optimum). Also returns the fraction of images whose highest-scoring prototype is their own prompt.
  """
  logits = logit_scale * jnp.einsum("ip,jp->ij", image.astype(jnp.float32), text.astype(jnp.float32))
  earlier = jnp.tril(jnp.ones(positives.shape, bool), k=-1)
  prototype = ~jnp.any(positives & earlier, axis=1)                      # (B,) first sample of each prompt
  logits = jnp.where(prototype[None, :], logits, -jnp.inf)
  own = positives & prototype[None, :]                                   # exactly one True per row
  log_probs = jax.nn.log_softmax(logits, axis=1)
  loss = -jnp.mean(jnp.sum(jnp.where(own, log_probs, 0.0), axis=1))
  accuracy = jnp.mean(jnp.take_along_axis(own, jnp.argmax(logits, axis=1)[:, None], axis=1))
  return loss, accuracy


CA_LOSS_FNS = {"prototype": prototype_contrastive, "multi_positive": multi_positive_contrastive}


def l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


# ----------------------------------------------------------------------------------------------- modules


class Decoder(nn.Module):
  """MAE decoder, optionally cross-attending a context sequence.

  `visible` (B, K, enc_width) encoder tokens of the target modality (after its final LN) → Dense to `width`;
  the learned `mask_token` fills the N - K masked slots; `ids_restore` (B, N) unshuffles; the fixed sin-cos
  posemb of `grid` is added. `context` (B, M, enc_width) (the other modality's encoder output) → Dense to
  `width` + the same posemb at its positions `context_ids` (B, M) (None = all N in order). Blocks: `block` is
  `self` (MAE: self → MLP), `cross_self` (cross → self → MLP) or `cross` (cross → MLP); final LN;
  Dense(`out_dim`). Returns (B, N, out_dim).
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  block: str = "cross_self"
  gelu: str = "exact"
  qkv_bias: bool = True
  remat: bool = False
  attention: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, visible: jax.Array, ids_restore: jax.Array, grid: tuple[int, ...], out_dim: int,
               context: jax.Array | None = None, context_ids: jax.Array | None = None) -> jax.Array:
    b, k, _ = visible.shape
    n = ids_restore.shape[1]
    x = vit.dense(self.width, (None, "embed"), self.dtype, self.param_dtype, "embed")(visible)
    mask_token = self.param("mask_token",
                            vit.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                            (1, 1, self.width), self.param_dtype)
    x = jnp.concatenate([x, jnp.broadcast_to(mask_token, (b, n - k, self.width)).astype(x.dtype)], axis=1)
    x = jnp.take_along_axis(x, ids_restore[..., None], axis=1)
    pos = jnp.asarray(vit.posemb_sincos(grid, self.width))
    x = (x + pos[None]).astype(self.dtype)
    cross = self.block != "self"
    if cross:
      context_pos = pos[None] if context_ids is None else jnp.take(pos, context_ids, axis=0)
      context = vit.dense(self.width, (None, "embed"), self.dtype, self.param_dtype, "context_embed")(context)
      context = (context + context_pos).astype(self.dtype)
    block_cls = nn.remat(vit.Block) if self.remat else vit.Block
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_dim, self_attention=self.block != "cross", cross_attention=cross,
                    gelu=self.gelu, qkv_bias=self.qkv_bias, attention=self.attention, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=f"block_{i}")(x, context if cross else None)
    x = vit.layer_norm("norm", self.param_dtype)(x)
    return vit.dense(out_dim, ("embed", "patch"), self.dtype, self.param_dtype, "pred")(x)


class TextTower(nn.Module):
  """Small learned text encoder over hashed word ids (B, L) int (0 = padding): ids folded into
  `vocab_size` buckets → embedding + learned posemb → `depth` pre-LN blocks (padding masked) → final LN →
  mean over the non-padding words. Returns (B, width)."""
  vocab_size: int
  length: int
  width: int
  depth: int
  num_heads: int
  gelu: str = "exact"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    if tokens.shape[1] != self.length:
      raise UserError(f"text_tokens have {tokens.shape[1]} words per prompt, but config.text_length="
                      f"{self.length}; tokenise with tokenize_words(texts, {self.length})")
    valid = tokens > 0
    ids = jnp.where(valid, 1 + (tokens - 1) % (self.vocab_size - 1), 0)
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="token_embed",
                 embedding_init=vit.partitioned(nn.initializers.normal(0.02), ("vocab", "embed")))(ids)
    pos = self.param("pos_embed", vit.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                     (1, self.length, self.width), self.param_dtype)
    x = (x + pos).astype(self.dtype)
    attend = jnp.broadcast_to(valid[:, None, :], (tokens.shape[0], self.length, self.length))
    x, _ = vit.Encoder(self.depth, self.num_heads, 4 * self.width, self.gelu, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="encoder")(x, attend)
    weights = valid.astype(jnp.float32)[..., None]
    return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


class ContextAlign(nn.Module):
  """Contrastive alignment of pooled image features (B, W) with the text metadata of each sample; samples
  with the same prompt are positives (`prototype_contrastive` or `multi_positive_contrastive`).

  With `center`, the batch mean of the image and of the text projections is subtracted before the L2-norm.
  Pooled encoder tokens share a large common component and the prompts share most words, so without it all
  projections point almost the same way, every cosine is ≈ 1 and the logits stay near uniform (observed: the
  loss sits at its uniform value from the first steps); centred, only the per-sample differences are compared
  (the role batch-norm plays in SimCLR / MoCo v3 projection heads). Returns (loss, metrics): `ca`,
  `ca_accuracy`, `logit_scale`.
  """
  proj_dim: int
  proj_layers: int
  temperature_init: float
  max_logit_scale: float
  text_tower: str
  text_vocab_size: int
  text_length: int
  text_width: int
  text_depth: int
  text_heads: int
  gelu: str = "exact"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  loss: str = "prototype"          # CA_LOSSES
  center: bool = True

  @nn.compact
  def __call__(self, image_features: jax.Array, text_embedding: jax.Array | None,
               text_tokens: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    if text_tokens is None:
      raise UserError("ContextAlign needs batch['text_tokens'] (B, L) int32 from tokenize_words")
    d = lambda features, names, name: vit.dense(features, names, self.dtype, self.param_dtype, name)
    image = image_features
    if self.proj_layers == 2:
      image = vit.gelu_fn(self.gelu)(d(image.shape[-1], ("embed", "mlp"), "image_hidden")(image))
      image = d(self.proj_dim, ("mlp", "embed"), "image_proj")(image)
    else:
      image = d(self.proj_dim, (None, "embed"), "image_proj")(image)
    learned = self.text_tower == "learned" or text_embedding is None or text_embedding.shape[-1] == 0
    if learned:
      text = TextTower(self.text_vocab_size, self.text_length, self.text_width, self.text_depth,
                       self.text_heads, self.gelu, self.dtype, self.param_dtype,
                       name="text_tower")(text_tokens)
    else:
      text = text_embedding
    text = d(self.proj_dim, (None, "embed"), "text_proj")(text)
    logit_scale = self.param("logit_scale", vit.partitioned(
        nn.initializers.constant(np.log(1.0 / self.temperature_init)), ()), (), jnp.float32)
    scale = jnp.minimum(jnp.exp(logit_scale), self.max_logit_scale)
    if self.center:
      image, text = image - jnp.mean(image, axis=0), text - jnp.mean(text, axis=0)
    positives = jnp.all(text_tokens[:, None, :] == text_tokens[None, :, :], axis=-1)
    loss, accuracy = CA_LOSS_FNS[self.loss](l2_normalize(image), l2_normalize(text), positives, scale)
    return loss, {"ca": loss, "ca_accuracy": accuracy, "logit_scale": scale}


def _pair_pick(x: jax.Array, index: jax.Array) -> jax.Array:
  """(B, …) viewed as pairs (B/2, 2, …) → (B/2, …): element `index[p]` ∈ {0, 1} of each pair p."""
  pairs = x.reshape(x.shape[0] // 2, 2, *x.shape[1:])
  index = index.reshape(-1, 1, *([1] * (x.ndim - 1)))
  return jnp.take_along_axis(pairs, index, axis=1)[:, 0]


def _pair_merge(at_index: jax.Array, other: jax.Array, index: jax.Array) -> jax.Array:
  """Inverse of `_pair_pick`: (B/2, …) values at `index` and at `1 - index` of each pair → (B, …)."""
  first = (index == 0).reshape(-1, *([1] * (at_index.ndim - 1)))
  pairs = jnp.stack([jnp.where(first, at_index, other), jnp.where(first, other, at_index)], axis=1)
  return pairs.reshape(-1, *at_index.shape[1:])


class FratMAE(nn.Module):
  """FratMAE / MAE baselines (see the module docstring). Fields = `default_config()` fields + dtypes.

  `__call__(batch, *, train)`: batch holds `pet`, `ct` (B, H, W, D) float32, and for ContextAlign
  `text_tokens` (B, L) int32 and optionally `text_embedding` (B, E). Masking draws from the `masking` RNG
  stream (with `train=False` and no such stream, a fixed key makes evaluation deterministic).
  Returns (loss, metrics): scalars `loss`, `rec_pet`, `rec_ct`, `mask_fraction{,_pet,_ct}`, and with
  ContextAlign `ca`, `ca_accuracy`, `logit_scale`; images `pred_pet`, `pred_ct` (B, H, W, D) (NaN for samples
  where that modality was not reconstructed; de-normalised under norm_pix_loss) and `mask_pet`, `mask_ct`
  (B, H, W) (1 = masked).
  """
  method: str = "fratmae"
  patch_size: tuple[int, int] = (16, 16)
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  decoder_mlp_dim: int = 2048
  decoder_block: str = "cross_self"
  posemb: str = "sincos"
  cls_token: bool = False
  gelu: str = "exact"
  qkv_bias: bool = True
  remat: bool = False
  attention_impl: str = "xla"
  mask_mode: str = "one_visible"
  mask_ratio: float = 0.75
  mask_ratio_pet: float | None = None
  mask_ratio_ct: float | None = None
  norm_pix_loss: bool = True
  ca_weight: float = 1.0
  ca_pooling: str = "mean"
  ca_proj_layers: int = 2
  ca_proj_dim: int = 512
  ca_loss: str = "prototype"
  ca_center: bool = True
  ca_temperature_init: float = 0.07
  ca_max_logit_scale: float = 100.0
  text_tower: str = "frozen"
  text_vocab_size: int = 4096
  text_length: int = 32
  text_width: int = 256
  text_depth: int = 2
  text_heads: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def joint(self) -> bool:
    """True for the single-encoder baselines (PET and CT stacked as channels)."""
    return self.method in ("mae", "mae_ca")

  @property
  def uses_context_align(self) -> bool:
    return self.method in ("mae_ca", "fratmae")

  def setup(self):
    encoder = lambda name: vit.ViT(
        self.width, self.depth, self.num_heads, self.mlp_dim, tuple(self.patch_size), self.posemb,
        self.cls_token, self.gelu, self.qkv_bias, self.remat, self.attention_impl, self.dtype,
        self.param_dtype, name=name)
    decoder = lambda block, name: Decoder(
        self.decoder_width, self.decoder_depth, self.decoder_heads, self.decoder_mlp_dim, block, self.gelu,
        self.qkv_bias, self.remat, self.attention_impl, self.dtype, self.param_dtype, name=name)
    if self.joint:
      self.encoder = encoder("encoder")
      self.decoder = decoder("self", "decoder")
    else:
      self.pet_encoder, self.ct_encoder = encoder("pet_encoder"), encoder("ct_encoder")
      self.pet_decoder = decoder(self.decoder_block, "pet_decoder")
      self.ct_decoder = decoder(self.decoder_block, "ct_decoder")
    if self.uses_context_align:
      self.context_align = ContextAlign(
          self.ca_proj_dim, self.ca_proj_layers, self.ca_temperature_init, self.ca_max_logit_scale,
          self.text_tower, self.text_vocab_size, self.text_length, self.text_width, self.text_depth,
          self.text_heads, self.gelu, self.dtype, self.param_dtype, loss=self.ca_loss,
          center=self.ca_center)

  def _pool(self, encoded: dict[str, Any]) -> jax.Array:
    return encoded["cls"] if self.ca_pooling == "cls" else jnp.mean(encoded["tokens"], axis=1)

  def encode(self, pet: jax.Array, ct: jax.Array) -> dict[str, Any]:
    """No masking (evaluation / downstream). pet, ct (B, H, W, D).

    Returns {modality: {"tokens" (B, N, width) after the final LN, "cls", "layers": per-block outputs
    (B, N, width)}, "pooled_pet": (B, width)} with modality `pet` and `ct` (twin methods) or `petct` (mae).
    """
    if self.joint:
      encoded = self.encoder(jnp.concatenate([pet, ct], axis=-1))
      return {"petct": encoded, "pooled_pet": self._pool(encoded)}
    encoded_pet = self.pet_encoder(pet)
    return {"pet": encoded_pet, "ct": self.ct_encoder(ct), "pooled_pet": self._pool(encoded_pet)}

  def __call__(self, batch: dict[str, jax.Array], *, train: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    pet, ct = batch["pet"], batch["ct"]
    if pet.ndim != 4 or pet.shape != ct.shape:
      raise UserError(f"batch: pet {pet.shape} and ct {ct.shape} must both be (B, H, W, D) of the same shape")
    rng = self.make_rng("masking") if train or self.has_rng("masking") else jax.random.key(0)
    grid = vit.patch_grid(pet.shape[1:3], self.patch_size)
    if self.joint:
      out = self._joint(pet, ct, grid, rng)
    elif self.mask_mode == "one_visible":
      out = self._one_visible(pet, ct, grid, rng)
    else:
      out = self._both_masked(pet, ct, grid, rng)
    pooled = out.pop("pooled_pet")
    metrics = dict(out)
    loss = out["rec_pet"] + out["rec_ct"]
    if self.uses_context_align:
      ca_loss, ca_metrics = self.context_align(pooled, batch.get("text_embedding"), batch.get("text_tokens"))
      loss = loss + self.ca_weight * ca_loss
      metrics.update(ca_metrics)
    metrics["loss"] = loss
    return loss, metrics

  # -- reconstruction paths: each returns rec_pet, rec_ct, mask fractions, images and pooled_pet

  def _reconstruction(self, name: str, pred: jax.Array, target: jax.Array, mask: jax.Array, grid) -> dict:
    """Loss and images of one modality: pred (b, N, P), target image (b, H, W, D), mask (b, N)."""
    patches, mean, std = patch_targets(vit.patchify(target, self.patch_size), self.norm_pix_loss)
    pixels = vit.unpatchify(pred.astype(jnp.float32) * std + mean, self.patch_size, grid)
    return {f"rec_{name}": masked_mse(pred, patches, mask), f"pred_{name}": pixels,
            f"mask_{name}": vit.upsample_token_mask(mask, self.patch_size, grid)}

  def _joint(self, pet, ct, grid, rng) -> dict:
    b, n, p = pet.shape[0], math.prod(grid), math.prod(self.patch_size) * pet.shape[-1]
    keep_ids, mask, ids_restore = random_masking(rng, b, n, num_visible(n, self.mask_ratio))
    encoded = self.encoder(jnp.concatenate([pet, ct], axis=-1), keep_ids)
    pred = self.decoder(encoded["tokens"], ids_restore, grid, 2 * p)
    fraction = jnp.mean(mask)
    return {**self._reconstruction("pet", pred[..., :p], pet, mask, grid),
            **self._reconstruction("ct", pred[..., p:], ct, mask, grid),
            "mask_fraction": fraction, "mask_fraction_pet": fraction, "mask_fraction_ct": fraction,
            "pooled_pet": self._pool(encoded)}

  def _one_visible(self, pet, ct, grid, rng) -> dict:
    b, n, p = pet.shape[0], math.prod(grid), math.prod(self.patch_size) * pet.shape[-1]
    if b % 2:
      raise UserError(f"mask_mode='one_visible' pairs the samples of a batch; the batch size {b} must be "
                      "even")
    swap_rng, pet_rng, ct_rng = jax.random.split(rng, 3)
    ratios = mask_ratios(self)
    pet_masked_at = jax.random.bernoulli(swap_rng, 0.5, (b // 2,)).astype(jnp.int32)   # index within the pair
    ct_masked_at = 1 - pet_masked_at
    keep = {m: num_visible(n, ratios[m], f"mask_ratio_{m}") for m in ratios}
    keep_pet, mask_pet, restore_pet = random_masking(pet_rng, b // 2, n, keep["pet"])
    keep_ct, mask_ct, restore_ct = random_masking(ct_rng, b // 2, n, keep["ct"])
    pet_m, ct_m = _pair_pick(pet, pet_masked_at), _pair_pick(ct, ct_masked_at)
    pet_vis = self.pet_encoder(pet_m, keep_pet)
    pet_all = self.pet_encoder(_pair_pick(pet, ct_masked_at))
    ct_vis = self.ct_encoder(ct_m, keep_ct)
    ct_all = self.ct_encoder(_pair_pick(ct, pet_masked_at))
    pred_pet = self.pet_decoder(pet_vis["tokens"], restore_pet, grid, p, ct_all["tokens"])
    pred_ct = self.ct_decoder(ct_vis["tokens"], restore_ct, grid, p, pet_all["tokens"])
    out = {**self._reconstruction("pet", pred_pet, pet_m, mask_pet, grid),
           **self._reconstruction("ct", pred_ct, ct_m, mask_ct, grid)}
    for name, masked_at in (("pet", pet_masked_at), ("ct", ct_masked_at)):
      image, pixel_mask = out[f"pred_{name}"], out[f"mask_{name}"]
      out[f"pred_{name}"] = _pair_merge(image, jnp.full_like(image, jnp.nan), masked_at)
      out[f"mask_{name}"] = _pair_merge(pixel_mask, jnp.zeros_like(pixel_mask), masked_at)
    out.update(mask_fraction_pet=jnp.mean(mask_pet) / 2, mask_fraction_ct=jnp.mean(mask_ct) / 2,
               mask_fraction=(jnp.mean(mask_pet) + jnp.mean(mask_ct)) / 4,
               pooled_pet=_pair_merge(self._pool(pet_vis), self._pool(pet_all), pet_masked_at))
    return out

  def _both_masked(self, pet, ct, grid, rng) -> dict:
    b, n, p = pet.shape[0], math.prod(grid), math.prod(self.patch_size) * pet.shape[-1]
    pet_rng, ct_rng = jax.random.split(rng)
    ratios = mask_ratios(self)
    keep = {m: num_visible(n, ratios[m], f"mask_ratio_{m}") for m in ratios}
    keep_pet, mask_pet, restore_pet = random_masking(pet_rng, b, n, keep["pet"])
    keep_ct, mask_ct, restore_ct = random_masking(ct_rng, b, n, keep["ct"])
    pet_vis, ct_vis = self.pet_encoder(pet, keep_pet), self.ct_encoder(ct, keep_ct)
    pred_pet = self.pet_decoder(pet_vis["tokens"], restore_pet, grid, p, ct_vis["tokens"], keep_ct)
    pred_ct = self.ct_decoder(ct_vis["tokens"], restore_ct, grid, p, pet_vis["tokens"], keep_pet)
    return {**self._reconstruction("pet", pred_pet, pet, mask_pet, grid),
            **self._reconstruction("ct", pred_ct, ct, mask_ct, grid),
            "mask_fraction_pet": jnp.mean(mask_pet), "mask_fraction_ct": jnp.mean(mask_ct),
            "mask_fraction": (jnp.mean(mask_pet) + jnp.mean(mask_ct)) / 2, "pooled_pet": self._pool(pet_vis)}
