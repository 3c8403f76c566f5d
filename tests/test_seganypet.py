"""Segmenter API (against the official-code golden outputs) and the official crop preprocessing."""

import numpy as np
import pytest

from conftest import GOLDEN_DIR
from petfm.errors import UserError
from petfm.seganypet import Segmenter, convert, preprocess
from test_sam3d import CLICKS, PTH, SMALL, _rel


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("ckpt") / "small")
  convert.save(directory, convert.variables_from_state_dict(convert.read_state_dict(PTH), SMALL), SMALL)
  return Segmenter.from_checkpoint(directory)


def test_segmenter_matches_official_clicks(segmenter):
  io = np.load(GOLDEN_DIR / "sam_med3d_small_io.npz")
  embedding = segmenter.embed(io["crop"])
  assert _rel(embedding, io["embedding"][0].transpose(1, 2, 3, 0)) < 1e-4
  logits, iou = segmenter.predict(embedding, CLICKS[0][0][0], CLICKS[0][1][0])   # mask_input=None: zeros
  assert _rel(logits, io["low_res_1"]) < 1e-4 and iou == pytest.approx(float(io["iou_1"]), rel=1e-4)
  logits, iou = segmenter.predict(embedding, CLICKS[1][0][0], CLICKS[1][1][0], mask_input=logits)
  assert _rel(logits, io["low_res_2"]) < 1e-4 and iou == pytest.approx(float(io["iou_2"]), rel=1e-4)
  assert segmenter.upsample(logits).shape == (32, 32, 32)
  # batched = one by one
  batch = np.stack([io["crop"], -io["crop"]])
  embeddings = segmenter.embed_batch(batch)
  points, labels = np.array([[[3, 4, 5]], [[20, 1, 9]]]), np.array([[1], [0]])
  logits, ious = segmenter.predict_batch(embeddings, points, labels)
  for i in range(2):
    single, single_iou = segmenter.predict(segmenter.embed(batch[i]), points[i], labels[i])
    assert _rel(logits[i], single) < 1e-5 and ious[i] == pytest.approx(single_iou, rel=1e-5)


@pytest.mark.parametrize("points, labels, mask, match", [
    ([[1, 2]], [1], None, "points"), ([[1, 2, 3]], [1, 0], None, "labels"),
    ([[1, 2, 3]], [-1], None, "labels"),
    ([[1, 2, 40]], [1], None, r"\[0, 32\)"), ([[1, 2, 3]], [1], np.zeros((8, 8, 8)), "mask_input")])
def test_predict_rejects_bad_prompts(segmenter, points, labels, mask, match):
  embedding = np.zeros((4, 4, 4, 48), np.float32)
  with pytest.raises(UserError, match=match):
    segmenter.predict(embedding, points, labels, mask)
  with pytest.raises(UserError, match="crop"):
    segmenter.embed(np.zeros((16, 32, 32)))


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
