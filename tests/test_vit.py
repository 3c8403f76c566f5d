"""ViT building blocks (petfm.models.vit) and timm/MAE checkpoint loading (petfm.models.timm_weights)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from conftest import GOLDEN_DIR
from petfm.errors import UserError
from petfm.models import timm_weights, vit

TIMM_PTH, TIMM_MAE_PTH, TIMM_IO = (GOLDEN_DIR / n for n in ("timm_vit_tiny.pth", "timm_vit_tiny_mae.pth",
                                                            "timm_vit_tiny_io.npz"))


def reference_sincos(grid, sizes):
  """Loop re-derivation of MAE's sin-cos table: part p (of width sizes[p]) encodes the grid axis counted
  from the last one; within a part, [sin(pos·ω_i) for i] + [cos(pos·ω_i) for i], ω_i = 10000^(-i /
  (size/2))."""
  table = []
  for coords in np.ndindex(*grid):
    row = []
    for p, size in enumerate(sizes):
      pos = coords[len(grid) - 1 - p]
      half = size // 2
      omegas = [10000.0 ** (-i / half) for i in range(half)]
      row += [math.sin(pos * w) for w in omegas] + [math.cos(pos * w) for w in omegas]
    table.append(row)
  return np.array(table)


@pytest.mark.parametrize("grid, width, sizes", [((4, 6), 32, [16, 16]), ((3, 2, 5), 64, [22, 22, 20]),
                                                ((2, 3, 4), 48, [16, 16, 16])])
def test_sincos_matches_reference(grid, width, sizes):
  table = vit.posemb_sincos(grid, width)
  assert table.shape == (math.prod(grid), width) and table.dtype == np.float32
  np.testing.assert_allclose(table, reference_sincos(grid, sizes), atol=1e-6)


def test_sincos_rejects_odd_width():
  with pytest.raises(UserError, match="even width"):
    vit.posemb_sincos((2, 2), 7)


@pytest.mark.parametrize("shape, patch", [((2, 16, 8, 5), (4, 2)), ((2, 8, 12, 4, 3), (4, 3, 2))])
def test_patch_embed_is_linear_map_of_patchified_input(shape, patch):
  """The strided conv equals patchify → flattened kernel, so tokens and reconstruction targets share one
  order."""
  x = jax.random.normal(jax.random.key(0), shape)
  embed = vit.PatchEmbed(16, patch)
  params = nn.unbox(embed.init(jax.random.key(1), x))["params"]
  kernel, bias = params["proj"]["kernel"], params["proj"]["bias"]
  expected = vit.patchify(x, patch) @ kernel.reshape(-1, 16) + bias
  np.testing.assert_allclose(embed.apply({"params": params}, x), expected, atol=1e-5)
  grid = tuple(s // p for s, p in zip(shape[1:-1], patch))
  np.testing.assert_array_equal(vit.unpatchify(vit.patchify(x, patch), patch, grid), x)
  # xavier-uniform on the flattened (prod(patch)·C, width) kernel, as MAE: bound sqrt(6 / (fan_in + fan_out))
  bound = math.sqrt(6 / (math.prod(patch) * shape[-1] + 16))
  assert 0.9 * bound < float(jnp.abs(kernel).max()) <= bound


def test_patchify_rejects_indivisible_size():
  with pytest.raises(UserError, match="not divisible by the patch size"):
    vit.patchify(jnp.zeros((1, 10, 8, 2)), (4, 4))


def test_upsample_token_mask():
  mask = jnp.array([[1.0, 0.0, 0.0, 1.0]])           # grid (2, 2), patch (2, 3)
  pixels = vit.upsample_token_mask(mask, (2, 3), (2, 2))
  np.testing.assert_array_equal(pixels[0], np.kron(np.array([[1, 0], [0, 1]]), np.ones((2, 3))))


@pytest.mark.parametrize("mode", vit.GELU_MODES)
def test_mlp_gelu_modes(mode):
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  mlp = vit.Mlp(16, gelu=mode)
  params = nn.unbox(mlp.init(jax.random.key(1), x))["params"]
  h = np.asarray(x) @ params["fc1"]["kernel"] + params["fc1"]["bias"]
  if mode == "exact":
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  else:
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
  expected = h @ params["fc2"]["kernel"] + params["fc2"]["bias"]
  np.testing.assert_allclose(mlp.apply({"params": params}, x), expected, atol=1e-5)


def numpy_attention(params, x, context, heads, mask=None):
  proj = lambda name, inputs: np.asarray(inputs) @ params[name]["kernel"] + params[name]["bias"]
  q, k, v = proj("query", x), proj("key", context), proj("value", context)
  b, lq, width = q.shape
  split = lambda y: y.reshape(b, y.shape[1], heads, width // heads).transpose(0, 2, 1, 3)
  logits = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(width // heads)
  if mask is not None:
    logits = np.where(mask[:, None], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = (weights @ split(v)).transpose(0, 2, 1, 3).reshape(b, lq, width)
  return out @ params["out"]["kernel"] + params["out"]["bias"]


def test_attention_self_cross_and_mask_match_numpy():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  context = jax.random.normal(jax.random.key(1), (2, 7, 16))
  attention = vit.Attention(num_heads=4)
  params = nn.unbox(attention.init(jax.random.key(2), x, context))["params"]
  apply = lambda *a, **k: attention.apply({"params": params}, *a, **k)
  np.testing.assert_allclose(apply(x), numpy_attention(params, x, x, 4), atol=1e-5)
  np.testing.assert_allclose(apply(x, context), numpy_attention(params, x, context, 4), atol=1e-5)
  mask = np.arange(7)[None, None, :] < np.array([3, 6])[:, None, None]          # (2, 1, 7) key padding
  mask = np.broadcast_to(mask, (2, 5, 7))
  np.testing.assert_allclose(apply(x, context, mask), numpy_attention(params, x, context, 4, mask), atol=1e-5)


def tiny_vit(**kw):
  fields = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=(4, 4))
  return vit.ViT(**{**fields, **kw})


def test_vit_keep_ids_layers_and_cls():
  x = jax.random.normal(jax.random.key(0), (2, 16, 8, 3))
  model = tiny_vit(cls_token=True)
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  apply = jax.jit(model.apply)
  full = apply({"params": params}, x)
  assert full["tokens"].shape == (2, 8, 32) and full["cls"].shape == (2, 32) and len(full["layers"]) == 2
  # tokens = final LayerNorm of the last block output
  last = np.asarray(full["layers"][-1])
  norm = nn.unbox(params)["encoder"]["norm"]
  normed = (last - last.mean(-1, keepdims=True)) / np.sqrt(last.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(full["tokens"], normed * norm["scale"] + norm["bias"], atol=1e-4)
  keep = jnp.array([[5, 0, 2], [7, 6, 1]])
  assert apply({"params": params}, x, keep_ids=keep)["tokens"].shape == (2, 3, 32)
  # posembs are added before the gather, so a permutation of all tokens just permutes the outputs
  perm = jnp.stack([jax.random.permutation(jax.random.key(i), 8) for i in range(2)])
  shuffled = apply({"params": params}, x, keep_ids=perm)
  expected = jnp.take_along_axis(full["tokens"], perm[..., None], 1)
  np.testing.assert_allclose(shuffled["tokens"], expected, atol=1e-5)
  np.testing.assert_allclose(shuffled["cls"], full["cls"], atol=1e-5)


def test_every_param_has_logical_axis_names():
  x = jnp.zeros((2, 16, 8, 2))
  for model in (tiny_vit(posemb="learn", cls_token=True), tiny_vit()):
    boxed = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert leaves and all(isinstance(v, nn.Partitioned) and len(v.names) == len(v.value.shape)
                          for v in leaves)
    names = {n for v in leaves for n in v.names}
    assert {"embed", "mlp", "heads", "patch", "norm"} <= names


def test_remat_and_bf16():
  x = jax.random.normal(jax.random.key(0), (2, 16, 8, 2))
  params = tiny_vit().init(jax.random.key(1), x)["params"]
  loss = lambda model: lambda p: jnp.sum(model.apply({"params": p}, x)["tokens"] ** 2)
  value, grads = jax.jit(jax.value_and_grad(loss(tiny_vit())))(params)
  value_remat, grads_remat = jax.jit(jax.value_and_grad(loss(tiny_vit(remat=True))))(params)
  np.testing.assert_allclose(value, value_remat, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, grads_remat)
  out32 = jax.jit(tiny_vit().apply)({"params": params}, x)["tokens"]
  out16 = jax.jit(tiny_vit(dtype=jnp.bfloat16).apply)({"params": params}, x)["tokens"]
  assert out16.dtype == jnp.float32 and np.all(np.isfinite(out16))        # final LayerNorm runs in float32
  assert float(jnp.abs(out16 - out32).mean()) < 0.05


def test_decode_variant():
  assert vit.decode_variant("B") == dict(width=768, depth=12, num_heads=12, mlp_dim=3072, decoder_width=512,
                                         decoder_depth=8, decoder_heads=16, decoder_mlp_dim=2048)
  assert vit.decode_variant("S")["width"] == 384 and vit.decode_variant("L")["depth"] == 24
  with pytest.raises(UserError, match="unknown ViT variant 'H'"):
    vit.decode_variant("H")


# ------------------------------------------------------------------------------ timm / MAE checkpoints


def timm_like_vit(channels=3, **kw):
  """The golden timm model's architecture: img 32, patch 8, width 48, depth 2, 4 heads, CLS, learned
  posemb."""
  fields = dict(width=48, depth=2, num_heads=4, mlp_dim=192, patch_size=(8, 8), posemb="learn",
                cls_token=True)
  model = vit.ViT(**{**fields, **kw})
  return model, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, channels)))["params"]


def features(model, params, image):
  out = jax.jit(model.apply)({"params": params}, image)
  return np.concatenate([out["cls"][:, None], out["tokens"]], axis=1)


@pytest.mark.parametrize("path", [TIMM_PTH, TIMM_MAE_PTH])
def test_timm_parity_from_golden(path):
  io = np.load(TIMM_IO)
  model, target = timm_like_vit()
  params, ignored = timm_weights.load_vit_checkpoint(str(path), target)
  assert isinstance(jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nn.Partitioned))[0],
                    nn.Partitioned)
  if path == TIMM_MAE_PTH:
    assert "mask_token" in ignored and all(k == "mask_token" or k.startswith("decoder_") for k in ignored)
  np.testing.assert_allclose(features(model, params, io["image"]), io["features"], atol=1e-5)


def test_checkpoint_mismatches_are_one_error():
  _, shallow = timm_like_vit(depth=1)
  with pytest.raises(UserError, match=r"unexpected blocks\.1\.attn\.proj\.bias, .*blocks\.1\.norm2\.weight"):
    timm_weights.load_vit_checkpoint(str(TIMM_PTH), shallow)
  _, deep = timm_like_vit(depth=3)
  with pytest.raises(UserError, match=r"missing encoder/block_2/attn/key/bias"):
    timm_weights.load_vit_checkpoint(str(TIMM_PTH), deep)
  _, wide = timm_like_vit(mlp_dim=96)
  with pytest.raises(UserError,
                     match=r"blocks\.0\.mlp\.fc1\.weight has shape \(48, 192\), expected \(48, 96\)"):
    timm_weights.load_vit_checkpoint(str(TIMM_PTH), wide)
  _, patch4 = timm_like_vit(patch_size=(4, 4))
  with pytest.raises(UserError, match="patch sizes must match"):
    timm_weights.load_vit_checkpoint(str(TIMM_PTH), patch4)


def test_slab_channels_posemb_resampling_and_sincos():
  io = np.load(TIMM_IO)
  rgb_model, rgb_target = timm_like_vit()
  rgb_params, _ = timm_weights.load_vit_checkpoint(str(TIMM_PTH), rgb_target)
  grey = io["image"].mean(-1, keepdims=True)
  # D = 5 slices as channels: a slab whose slices all equal a grey image gives the RGB model's grey output
  slab_model, slab_target = timm_like_vit(channels=5)
  slab_params, _ = timm_weights.load_vit_checkpoint(str(TIMM_PTH), slab_target)
  np.testing.assert_allclose(features(slab_model, slab_params, np.repeat(grey, 5, -1)),
                             features(rgb_model, rgb_params, np.repeat(grey, 3, -1)), atol=1e-5)
  # learned posemb on another grid: resampled, CLS slot kept
  rect_model = vit.ViT(48, 2, 4, 192, (8, 8), posemb="learn", cls_token=True)
  rect_target = jax.eval_shape(rect_model.init, jax.random.key(0), jnp.zeros((1, 64, 32, 3)))["params"]
  with pytest.raises(UserError, match=r"pass grid=\(h, w\)"):
    timm_weights.load_vit_checkpoint(str(TIMM_PTH), rect_target)
  rect, _ = timm_weights.load_vit_checkpoint(str(TIMM_PTH), rect_target, grid=(8, 4))
  source = nn.unbox(rgb_params)["pos_embed"]
  np.testing.assert_allclose(nn.unbox(rect)["pos_embed"][:, 0], source[:, 0])
  assert nn.unbox(rect)["pos_embed"].shape == (1, 33, 48)
  # fixed sin-cos, no CLS: pos_embed and cls_token are ignored, everything else loads
  sincos_model = vit.ViT(48, 2, 4, 192, (8, 8))
  sincos_target = jax.eval_shape(sincos_model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  _, ignored = timm_weights.load_vit_checkpoint(str(TIMM_PTH), sincos_target)
  assert ignored == ["cls_token", "pos_embed"]


@pytest.mark.torch
def test_timm_live():
  torch = pytest.importorskip("torch")
  timm_vit = pytest.importorskip("timm.models.vision_transformer")
  torch.manual_seed(3)
  model = timm_vit.VisionTransformer(img_size=32, patch_size=8, num_classes=0, embed_dim=48, depth=2,
                                     num_heads=4, qkv_bias=True).eval()
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  image = np.random.default_rng(0).random((2, 32, 32, 3), np.float32)
  with torch.no_grad():
    expected = model.forward_features(torch.from_numpy(image).permute(0, 3, 1, 2)).numpy()
  ours, target = timm_like_vit()
  params, _ = timm_weights.vit_params_from_state_dict(state, target)
  np.testing.assert_allclose(features(ours, params, image), expected, atol=1e-5)
