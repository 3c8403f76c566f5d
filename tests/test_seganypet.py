"""The Segmenter API on a converted checkpoint (against the official-code golden outputs), invisible capacity
padding of points, and the official crop preprocessing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN_DIR
from petfm.errors import UserError
from petfm.models import sam3d
from petfm.seganypet import Segmenter, official_weights, preprocess, promptable
from test_sam3d import CLICKS, PTH, SMALL, _rel


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("ckpt") / "small")
  state = official_weights.read_state_dict(PTH)
  official_weights.save(directory, official_weights.variables_from_state_dict(state, SMALL), SMALL)
  return Segmenter.load(directory)


def test_segmenter_matches_official_clicks(segmenter):
  io = np.load(GOLDEN_DIR / "sam_med3d_small_io.npz")
  embedding = segmenter.embed_prepared(io["crop"])
  assert _rel(embedding, io["embedding"][0].transpose(1, 2, 3, 0)) < 1e-4
  logits, iou = segmenter.predict(embedding, CLICKS[0][0][0], CLICKS[0][1][0])   # mask_input=None: zeros
  assert _rel(logits, io["low_res_1"]) < 1e-4 and float(iou) == pytest.approx(float(io["iou_1"]), rel=1e-4)
  logits, iou = segmenter.predict(embedding, CLICKS[1][0][0], CLICKS[1][1][0], mask_input=logits)
  assert _rel(logits, io["low_res_2"]) < 1e-4 and float(iou) == pytest.approx(float(io["iou_2"]), rel=1e-4)
  assert segmenter.upsample(logits).shape == (32, 32, 32)
  # batched = one by one
  batch = np.stack([io["crop"], -io["crop"]])
  embeddings = segmenter.embed_prepared(batch)
  points, labels = np.array([[[3, 4, 5]], [[20, 1, 9]]]), np.array([[1], [0]])
  logits, ious = segmenter.predict_batch(embeddings, points, labels)
  for i in range(2):
    single, single_iou = segmenter.predict(segmenter.embed_prepared(batch[i]), points[i], labels[i])
    assert _rel(logits[i], single) < 1e-5 and float(ious[i]) == pytest.approx(float(single_iou), rel=1e-5)


def _unpadded(config, variables, embedding, points, labels, mask):
  """The official computation: exactly N points + the padding point, every token visible (jitted, as the
  padded path, so that only the padding differs)."""
  model = sam3d.Sam3D(config)

  def run(variables, embedding, points, labels, mask):
    sparse, dense = model.apply(variables, points, labels, mask, method=model.encode_prompts)
    return model.apply(variables, embedding, sparse, dense, method=model.decode)
  return jax.jit(run)(variables, embedding, points, labels, mask)


def _clicks(rng, n, size):
  return rng.integers(0, size, (1, n, 3)).astype(np.float32), rng.integers(0, 2, (1, n)).astype(np.int32)


def test_capacity_padding_changes_nothing_and_compiles_once_per_capacity(segmenter):
  rng = np.random.default_rng(1)
  io = np.load(GOLDEN_DIR / "sam_med3d_small_io.npz")
  embedding = segmenter.embed_prepared(io["crop"])
  promptable._predict.clear_cache()                          # fresh jit caches
  logits = None
  for n in range(1, 7):                      # capacities 1, 2, 4, 4, 8, 8; mask prompt from the previous
                                             # click
    points, labels = _clicks(rng, n, 32)
    mask = np.zeros((1, 16, 16, 16), np.float32) if logits is None else np.asarray(logits)[None]
    ref_logits, ref_iou = _unpadded(SMALL, segmenter.variables, embedding[None], points, labels, mask)
    logits, iou = segmenter.predict(embedding, points[0], labels[0], None if n == 1 else mask[0])
    np.testing.assert_allclose(logits, ref_logits[0], rtol=0, atol=1e-6 * float(np.abs(ref_logits).max()))
    assert float(iou) == pytest.approx(float(ref_iou[0]), abs=1e-6)
  assert promptable._predict._cache_size() == 4      # one compile per capacity, not per click


def test_capacity_padding_in_folded_attention_orders():
  """A decoder so wide that every attention folds its projections into the few-token side (few queries or
  few keys; the golden model is too narrow for that): 16 slots, real points among them, change nothing."""
  config = sam3d.Sam3DConfig(img_size=32, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=16,
                             global_attn_indexes=(0,), window_size=0, prompt_dim=192, mask_in_chans=4,
                             decoder_heads=2, decoder_mlp_dim=32, iou_hidden=8)
  variables = sam3d.init_variables(config, jax.random.key(0))
  model = sam3d.Sam3D(config)
  rng = np.random.default_rng(2)
  embedding = rng.standard_normal((1, 4, 4, 4, 192)).astype(np.float32)
  mask = rng.standard_normal((1, 16, 16, 16)).astype(np.float32)
  for n in (1, 3, 5):
    points, labels = _clicks(rng, n, 32)
    ref = _unpadded(config, variables, embedding, points, labels, mask)
    slots = rng.permutation(16)[:n]                      # the real points at random slots of 16
    padded_points = rng.integers(0, 32, (1, 16, 3)).astype(np.float32)
    padded_labels = np.full((1, 16), sam3d.ABSENT, np.int32)
    padded_points[0, slots], padded_labels[0, slots] = points[0], labels[0]
    out = jax.jit(lambda *a: promptable.prompt_and_decode(model, *a))(
        variables, jnp.asarray(embedding), jnp.asarray(padded_points), jnp.asarray(padded_labels),
        jnp.asarray(mask))
    for a, b in zip(out, ref):      # float32 rounding: merely reordering the real points differs by ≈ 1.5e-6
      np.testing.assert_allclose(a, b, rtol=0, atol=3e-6 * max(1.0, float(np.abs(b).max())))
  assert [promptable.capacity(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


@pytest.mark.parametrize("points, labels, mask, match", [
    ([[1, 2]], [1], None, "points"), ([[1, 2, 3]], [1, 0], None, "labels"),
    ([[1, 2, 3]], [-1], None, "labels"),
    ([[1, 2, 40]], [1], None, r"\[0, 32\)"), ([[1, 2, 3]], [1], np.zeros((8, 8, 8)), "mask_input")])
def test_predict_rejects_bad_prompts(segmenter, points, labels, mask, match):
  embedding = np.zeros((4, 4, 4, 48), np.float32)
  with pytest.raises(UserError, match=match):
    segmenter.predict(embedding, points, labels, mask)
  with pytest.raises(UserError, match="crop"):
    segmenter.embed_prepared(np.zeros((16, 32, 32)))
  with pytest.raises(UserError, match="image"):
    segmenter.embed(np.zeros((32, 32, 32, 2)))


def test_crop_start_follows_torchio():
  assert preprocess.crop_start((10, 10.5, 3), 4) == (8, 8, 1)
  assert preprocess.crop_start((10, 10.5, 3), 5) == (7, 8, 0)


def test_prepare_and_map_back():
  rng = np.random.default_rng(0)
  shape = (40, 30, 36)
  image = rng.uniform(1, 5, shape).astype(np.float32)
  image[:5] = 0
  roi = np.zeros(shape, np.uint8)
  roi[20:27, 8:12, 25:34] = 1
  affine = np.diag([-1.5, 1.5, 1.5, 1.0])          # LAS: the canonical grid flips axis 0, no interpolation
  affine[:3, 3] = (30.0, -10.0, 5.0)
  crop, geo, roi_crop = preprocess.prepare(image, affine, roi=roi, size=24)
  assert crop.shape == roi_crop.shape == (24, 24, 24)
  assert roi_crop.sum() == roi.sum()
  index = np.nonzero(roi_crop)
  for i in index:                                    # the box is centred in the crop
    assert abs((i.min() + i.max() + 1) / 2 - 12) <= 0.5
  background = crop.min()                           # zeros (outside the body, padding) map to -mean/std
  body = crop[crop > background + 1e-6]
  assert abs(float(body.mean())) < 1e-3 and float(body.std(ddof=1)) == pytest.approx(1.0, abs=1e-3)
  np.testing.assert_array_equal(preprocess.to_original(roi_crop, geo), roi)
  point = preprocess.points_to_crop(np.array([[22, 9, 30]]), geo)[0]
  assert roi_crop[tuple(point)] == 1
  np.testing.assert_allclose(preprocess.z_normalise(np.array([0, 1, 2, 3], np.float32)), [-2, -1, 0, 1])
  with pytest.raises(UserError, match="roi: empty"):
    preprocess.prepare(image, affine, roi=np.zeros(shape), size=24)
