"""FratMAE and the MAE baselines (petfm.models.fratmae): masking, losses, cross-attention, ContextAlign."""

import functools

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from petfm.errors import UserError
from petfm.models import fratmae, vit
from petfm.models.text_encoder import tokenize_words

SMALL = dict(patch_size=(4, 4), width=32, depth=2, num_heads=4, mlp_dim=64, decoder_width=32, decoder_depth=1,
             decoder_heads=4, decoder_mlp_dim=64, ca_proj_dim=32, text_width=32, text_depth=1, text_heads=4,
             text_vocab_size=64, text_length=8)
TEXTS = ("FDG PET/CT", "PSMA PET/CT", "FDG PET/CT", "PSMA PET/CT of a 63-year-old male", "FDG PET/CT",
         "PSMA PET/CT")


def small_config(method="fratmae", **overrides):
  config = fratmae.default_config("tiny", method)
  config.update({**SMALL, **overrides})
  return config


def make_batch(batch=4, size=(16, 8), depth=2, text_dim=6, seed=0):
  rng = np.random.default_rng(seed)
  texts = [TEXTS[i % len(TEXTS)] for i in range(batch)]
  table = {t: rng.normal(size=text_dim).astype(np.float32) for t in set(texts)}
  shape = (batch, *size, depth)
  return {"pet": rng.random(shape, np.float32), "ct": rng.random(shape, np.float32),
          "text_embedding": np.stack([table[t] for t in texts]).reshape(batch, text_dim),
          "text_tokens": tokenize_words(texts, SMALL["text_length"]), "tracer": np.zeros(batch, np.int32)}


@functools.lru_cache(maxsize=None)
def params_for(method):
  """Params shared by every test of a method (mask mode, ratios and norm_pix_loss do not change them)."""
  model = fratmae.model_from_config(small_config(method, mask_mode="both_masked"))
  return model.init({"params": jax.random.key(0), "masking": jax.random.key(0)},
                    make_batch(batch=2))["params"]


def run(model, batch, key=1, params=None):
  """Eager apply (for these tiny models faster than compiling each variant) → (params, loss, host metrics)."""
  params = params_for(model.method) if params is None else params
  loss, metrics = model.apply({"params": params}, batch, train=True, rngs={"masking": jax.random.key(key)})
  return params, loss, jax.device_get(metrics)


# ------------------------------------------------------------------------------------------------- masking


def test_random_masking_keeps_k_and_ids_restore_unshuffles():
  b, n, k = 6, 10, 3
  keep, mask, restore = jax.device_get(fratmae.random_masking(jax.random.key(0), b, n, k))
  assert keep.shape == (b, k) and mask.shape == restore.shape == (b, n)
  np.testing.assert_array_equal(mask.sum(1), n - k)
  for i in range(b):
    assert sorted(restore[i]) == list(range(n)) and len(set(keep[i])) == k
    assert np.all(mask[i, keep[i]] == 0)
    # concat(visible, mask tokens)[restore] puts visible token j back at position keep[j], masked ones after K
    np.testing.assert_array_equal(restore[i, keep[i]], np.arange(k))
    assert np.all(restore[i][mask[i] == 1] >= k)
  assert len({tuple(m) for m in mask}) > 1                                # per-sample masks


def test_num_visible_rounds_and_rejects_extremes():
  assert fratmae.num_visible(196, 0.75) == 49 and fratmae.num_visible(10, 0.9) == 1
  with pytest.raises(UserError, match="config.mask_ratio: 0.99 keeps 0 of 10"):
    fratmae.num_visible(10, 0.99)


# -------------------------------------------------------------------------------------------------- losses


def numpy_targets(patches, norm_pix):
  if not norm_pix:
    return patches
  mean = patches.mean(-1, keepdims=True)
  var = patches.var(-1, ddof=1, keepdims=True)
  return (patches - mean) / np.sqrt(var + 1e-6)


def numpy_masked_mse(pred, target, mask):
  return ((pred - target) ** 2).mean(-1)[mask > 0].mean()


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_only_masked_patches(norm_pix):
  rng = np.random.default_rng(0)
  pred, patches = rng.normal(size=(3, 6, 5)).astype(np.float32), rng.random((3, 6, 5)).astype(np.float32)
  mask = (rng.random((3, 6)) < 0.5).astype(np.float32)
  mask[:, 0] = 1
  loss = lambda p, t: fratmae.masked_mse(p, fratmae.patch_targets(t, norm_pix)[0], mask)
  np.testing.assert_allclose(loss(pred, patches),
                             numpy_masked_mse(pred, numpy_targets(patches, norm_pix), mask), rtol=1e-5)
  grad = jax.grad(loss)(pred, patches)
  assert np.all(grad[mask == 0] == 0) and np.any(grad[mask == 1] != 0)
  changed = np.where(mask[..., None] == 0, patches + 1.0, patches)       # visible-patch targets moved
  np.testing.assert_allclose(loss(pred, changed), loss(pred, patches), rtol=1e-6)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_model_reconstruction_loss_matches_numpy(norm_pix):
  """rec_pet/rec_ct from the model = numpy MSE of its (re-normalised) predictions on the masked patches."""
  model = fratmae.model_from_config(small_config("fratmae_noca", mask_mode="both_masked",
                                                 norm_pix_loss=norm_pix))
  batch = make_batch()
  _, _, metrics = run(model, batch)
  for name in ("pet", "ct"):
    patches = np.asarray(vit.patchify(batch[name], (4, 4)))
    mask = np.asarray(vit.patchify(metrics[f"mask_{name}"][..., None], (4, 4)))[..., 0]
    pred = np.asarray(vit.patchify(metrics[f"pred_{name}"], (4, 4)))
    if norm_pix:   # the image output is de-normalised with the target's patch statistics: undo that
      mean, std = patches.mean(-1, keepdims=True), np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
      pred = (pred - mean) / std
    expected = numpy_masked_mse(pred, numpy_targets(patches, norm_pix), mask)
    np.testing.assert_allclose(metrics[f"rec_{name}"], expected, rtol=1e-4)
  np.testing.assert_allclose(metrics["loss"], metrics["rec_pet"] + metrics["rec_ct"], rtol=1e-6)


# ------------------------------------------------------------------------------------------ mask modes


def test_one_visible_masks_one_modality_per_sample_balanced():
  model = fratmae.model_from_config(small_config("fratmae_noca"))
  batch = make_batch(batch=8)
  params, orders = None, set()
  for key in range(6):
    params, _, m = run(model, batch, key, params)
    pet_masked, ct_masked = m["mask_pet"].sum((1, 2)) > 0, m["mask_ct"].sum((1, 2)) > 0
    np.testing.assert_array_equal(pet_masked, ~ct_masked)                  # exactly one modality per sample
    np.testing.assert_array_equal(pet_masked.reshape(4, 2).sum(1), 1)     # one of each per pair: balanced
    orders.add(tuple(pet_masked))
    np.testing.assert_allclose(m["mask_pet"][pet_masked].mean(), 0.75)
    assert np.all(np.isnan(m["pred_pet"][~pet_masked])) and np.all(np.isfinite(m["pred_pet"][pet_masked]))
    assert np.all(np.isnan(m["pred_ct"][pet_masked])) and np.all(np.isfinite(m["pred_ct"][~pet_masked]))
    np.testing.assert_allclose([m["mask_fraction_pet"], m["mask_fraction_ct"], m["mask_fraction"]], 0.375)
  assert len(orders) > 1                                                   # random swap within pairs


def test_both_masked_independent_masks_and_ratios():
  model = fratmae.model_from_config(small_config("fratmae_noca", mask_mode="both_masked", mask_ratio_pet=0.5))
  _, _, m = run(model, make_batch())
  np.testing.assert_allclose(m["mask_pet"].mean((1, 2)), 0.5)
  np.testing.assert_allclose(m["mask_ct"].mean((1, 2)), 0.75)
  assert not np.array_equal(m["mask_pet"] > 0, m["mask_ct"] > 0)
  assert np.all(np.isfinite(m["pred_pet"])) and np.all(np.isfinite(m["pred_ct"]))


def test_odd_batch_with_one_visible_is_a_clear_error():
  model = fratmae.model_from_config(small_config("fratmae_noca"))
  with pytest.raises(UserError, match="batch size 3 must be even"):
    run(model, make_batch(batch=3))


@pytest.mark.parametrize("mode", fratmae.MASK_MODES)
def test_cross_attention_reads_the_other_modality(mode):
  model = fratmae.model_from_config(small_config("fratmae_noca", mask_mode=mode))
  batch = make_batch()
  params, _, m = run(model, batch)
  perturbed = dict(batch, ct=batch["ct"][::-1].copy())
  _, _, m2 = run(model, perturbed, params=params)
  reconstructed = np.isfinite(m["pred_pet"])
  np.testing.assert_array_equal(m["mask_pet"], m2["mask_pet"])            # same masking RNG
  assert np.abs(m["pred_pet"][reconstructed] - m2["pred_pet"][reconstructed]).max() > 1e-3
  encode = functools.partial(model.apply, method="encode")
  pet_tokens = encode({"params": params}, batch["pet"], batch["ct"])["pet"]["tokens"]
  pet_tokens_perturbed = encode({"params": params}, perturbed["pet"], perturbed["ct"])["pet"]["tokens"]
  np.testing.assert_array_equal(pet_tokens, pet_tokens_perturbed)        # the PET encoder never sees CT


# ------------------------------------------------------------------------------------- all methods, API


@pytest.mark.parametrize("method", fratmae.METHODS)
def test_every_method_runs_with_finite_losses(method):
  model = fratmae.model_from_config(small_config(method))
  batch = make_batch()
  params, loss, m = run(model, batch)
  assert np.isfinite(loss) and m["rec_pet"] > 0 and m["rec_ct"] > 0
  assert ("ca" in m) == (method in ("mae_ca", "fratmae"))
  expected = m["rec_pet"] + m["rec_ct"] + (m["ca"] if "ca" in m else 0.0)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert m["pred_pet"].shape == batch["pet"].shape and m["mask_ct"].shape == batch["ct"].shape[:3]
  encoded = model.apply({"params": params}, batch["pet"], batch["ct"], method="encode")
  keys = ("petct",) if method.startswith("mae") else ("pet", "ct")
  for key in keys:
    assert encoded[key]["tokens"].shape == (4, 8, 32) and len(encoded[key]["layers"]) == 2
  np.testing.assert_allclose(encoded["pooled_pet"], encoded[keys[0]]["tokens"].mean(1), atol=1e-6)
  # every param carries logical axis names
  boxed = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0), "masking": jax.random.key(1)}, batch))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(v, nn.Partitioned) and len(v.names) == len(v.value.shape) for v in leaves)


def test_eval_without_masking_rng_is_deterministic():
  model = fratmae.model_from_config(small_config("fratmae_noca"))
  batch = make_batch()
  params, _, _ = run(model, batch)
  evaluate = lambda p, b: model.apply({"params": p}, b, train=False)[0]
  assert float(evaluate(params, batch)) == float(evaluate(params, batch))


def test_bf16_compute_runs():
  batch = make_batch()
  _, loss32, _ = run(fratmae.model_from_config(small_config()), batch)
  _, loss16, metrics = run(fratmae.model_from_config(small_config(), dtype="bfloat16"), batch)
  assert np.isfinite(loss16) and abs(float(loss16) - float(loss32)) < 0.05 * float(loss32)
  assert metrics["pred_pet"].dtype == np.float32                          # losses and outputs in float32


def test_sharded_forward_equals_single_device():
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  rules = (("act_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
           ("act_len", None), ("act_embed", None), ("act_mlp", "tensor"), ("act_heads", "tensor"),
           ("patch", None), ("norm", None), ("vocab", None))
  model = fratmae.model_from_config(small_config())
  batch = make_batch(batch=8)
  params, loss, _ = run(model, batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "masking": jax.random.key(0)},
                                                 batch)["params"])
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    sharded_params = jax.device_put(params, shardings)
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    sharded_loss = jax.jit(
        lambda p, b: model.apply({"params": p}, b, rngs={"masking": jax.random.key(1)})[0])(
            sharded_params, sharded_batch)
  np.testing.assert_allclose(sharded_loss, loss, rtol=1e-5)


# ----------------------------------------------------------------------------------------- ContextAlign


def numpy_multi_positive(image, text, positives, scale):
  """Loop reference: for each image (text), cross-entropy against the uniform distribution on its
  positives."""
  def log_softmax(row):
    row = row - row.max()
    return row - np.log(np.exp(row).sum())
  logits = scale * image @ text.T
  b = len(image)
  total = 0.0
  for i in range(b):
    pos = [j for j in range(b) if positives[i][j]]
    total -= sum(log_softmax(logits[i])[j] for j in pos) / len(pos) / 2
    total -= sum(log_softmax(logits[:, i])[j] for j in pos) / len(pos) / 2
  return total / b


def test_multi_positive_contrastive_matches_numpy():
  rng = np.random.default_rng(0)
  normalize = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  image, text = normalize(rng.normal(size=(6, 5))), normalize(rng.normal(size=(6, 5)))
  labels = np.array([0, 1, 0, 2, 0, 1])
  positives = labels[:, None] == labels[None]
  loss, accuracy = fratmae.multi_positive_contrastive(image, text, positives, 7.0)
  np.testing.assert_allclose(loss, numpy_multi_positive(image, text, positives, 7.0), rtol=1e-5)
  assert 0.0 <= float(accuracy) <= 1.0


@pytest.mark.parametrize("text_dim", [0, 12])
def test_context_align_treats_same_text_as_positives(text_dim):
  """The module's loss equals the numpy loss with positives = equal prompt strings (not the diagonal)."""
  kw = {k: SMALL[k] for k in ("text_vocab_size", "text_length", "text_width", "text_depth", "text_heads")}
  head = fratmae.ContextAlign(32, 2, 0.07, 100.0, "frozen", **kw, loss="multi_positive", center=False)
  batch = make_batch(batch=6, text_dim=text_dim)
  features = np.random.default_rng(1).normal(size=(6, 32)).astype(np.float32)
  args = (features, batch["text_embedding"], batch["text_tokens"])
  params = head.init(jax.random.key(0), *args)["params"]
  assert ("text_tower" in params) == (text_dim == 0)
  (loss, metrics), state = head.apply({"params": params}, *args, capture_intermediates=True)
  captured = state["intermediates"]
  normalize = lambda x: np.asarray(x) / np.linalg.norm(x, axis=1, keepdims=True)
  image = normalize(captured["image_proj"]["__call__"][0])
  text = normalize(captured["text_proj"]["__call__"][0])
  texts = [TEXTS[i] for i in range(6)]
  positives = [[a == b for b in texts] for a in texts]
  expected = numpy_multi_positive(image, text, positives, 1 / 0.07)
  np.testing.assert_allclose(loss, expected, rtol=1e-4)
  np.testing.assert_allclose(metrics["logit_scale"], 1 / 0.07, rtol=1e-6)


def numpy_prototype(image, text, texts, scale):
  """Cross-entropy of each image over the distinct prompts (one prototype vector per prompt)."""
  names = list(dict.fromkeys(texts))
  prototypes = np.stack([text[texts.index(n)] for n in names])
  logits = scale * image @ prototypes.T
  log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  return -np.mean([log_probs[i, names.index(t)] for i, t in enumerate(texts)])


def test_prototype_loss_matches_numpy_and_reaches_zero():
  rng = np.random.default_rng(0)
  texts = ["FDG", "PSMA", "FDG", "FDG", "PSMA", "other"]
  text_vectors = {t: rng.normal(size=8) for t in set(texts)}
  normalize = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  text = normalize(np.stack([text_vectors[t] for t in texts])).astype(np.float32)
  image = normalize(rng.normal(size=(6, 8))).astype(np.float32)
  positives = np.array([[a == b for b in texts] for a in texts])
  loss, _ = fratmae.prototype_contrastive(image, text, positives, 7.0)
  np.testing.assert_allclose(loss, numpy_prototype(image, text, texts, 7.0), rtol=1e-5)
  # Images equal to their prompt's vector: accuracy 1 and the loss → 0 as the scale grows (the
  # multi-positive loss would stay at log(#positives) > 0, which is what let the embedding collapse).
  loss, accuracy = fratmae.prototype_contrastive(text, text, positives, 100.0)
  assert accuracy == 1.0 and loss < 1e-3


def test_context_align_learns_to_separate_tracers():
  """A few Adam steps on ContextAlign alone (features: a large shared part + a small per-prompt offset, as
  pooled encoder tokens are) drive the prototype loss far below its start — no collapse to uniform logits."""
  rng = np.random.default_rng(0)
  kw = {k: SMALL[k] for k in ("text_vocab_size", "text_length", "text_width", "text_depth", "text_heads")}
  head = fratmae.ContextAlign(16, 2, 0.07, 100.0, "learned", **kw)
  batch = make_batch(batch=8, text_dim=0)
  texts = [TEXTS[i % len(TEXTS)] for i in range(8)]
  offsets = {t: 0.3 * rng.normal(size=32) for t in set(texts)}
  shared = 5.0 + np.stack([offsets[t] for t in texts]).astype(np.float32)
  features = lambda key: shared + 0.05 * jax.random.normal(key, (8, 32))
  params = head.init(jax.random.key(0), features(jax.random.key(1)), None, batch["text_tokens"])["params"]
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    loss_fn = lambda p: head.apply({"params": p}, features(key), None, batch["text_tokens"])[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(150):
    params, opt_state, loss = step(params, opt_state, jax.random.key(100 + i))
    losses.append(float(loss))
  assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:3]), (losses[:3], losses[-10:])


# ---------------------------------------------------------------------------------------------- config


def test_default_config_fields():
  config = fratmae.default_config("B", "mae_ca")
  assert ((config.method, config.width, config.decoder_width, config.patch_size)
          == ("mae_ca", 768, 512, (16, 16)))
  assert config.mask_ratio_pet is None and fratmae.mask_ratios(config) == {"pet": 0.75, "ct": 0.75}
  config.mask_ratio_ct = 0.9
  assert fratmae.mask_ratios(config) == {"pet": 0.75, "ct": 0.9}
  model = fratmae.model_from_config(config, ml_collections.ConfigDict({"plane_size": (448, 224), "depth": 8}))
  assert model.width == 768 and model.mask_ratio_ct == 0.9


@pytest.mark.parametrize("field, value, message", [
    ("method", "simclr", "config.method: 'simclr' is not one of"),
    ("mask_ratio", 1.0, r"config.mask_ratio: must be in \(0, 1\), got 1.0"),
    ("mask_ratio_ct", 0.0, r"config.mask_ratio_ct: must be in \(0, 1\)"),
    ("num_heads", 5, "config.width: 32 is not divisible by num_heads=5"),
    ("mask_mode", "none", "config.mask_mode: 'none' is not one of"),
    ("ca_pooling", "cls", "config.ca_pooling: 'cls' needs cls_token=True"),
    ("decoder_block", "self", "config.decoder_block"),
])
def test_bad_config_values(field, value, message):
  config = small_config()
  config[field] = value
  with pytest.raises(UserError, match=message):
    fratmae.model_from_config(config)


def test_bad_data_config_values():
  data = ml_collections.ConfigDict({"plane_size": (30, 16), "depth": 4})
  with pytest.raises(UserError,
                     match=r"config.data.plane_size: \(30, 16\) is not divisible by model.patch_size"):
    fratmae.validate_config(small_config(), data)
  data.plane_size = (8, 4)
  with pytest.raises(UserError, match="config.model.mask_ratio_pet: 0.75 keeps 0 of 2 tokens"):
    fratmae.validate_config(small_config(), data)
