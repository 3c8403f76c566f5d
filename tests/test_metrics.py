"""petfm.eval.metrics against DeepMind's surface-distance, medpy, brute force and hand-computed cases."""

import collections
import itertools
import math

import numpy as np
import pytest
from scipy import ndimage

from petfm.errors import UserError
from petfm.eval import metrics

sd = pytest.importorskip("surface_distance")

def blob(rng, shape, sigma=2.5, fraction=0.2):
  """Smooth random blobs covering about `fraction` of the volume."""
  field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
  return field > np.quantile(field, 1 - fraction)


def blob_pairs(ndim, count=6, seed=0):
  """(pred, truth, spacing): independent blobs, dilated truth, shifted truth, and truth with salt noise."""
  rng = np.random.default_rng(seed)
  for i in range(count):
    shape = tuple(rng.integers(18, 30, ndim))
    spacing = tuple(np.round(rng.uniform(0.6, 2.8, ndim), 2))
    truth = blob(rng, shape)
    pred = [blob(rng, shape),
            ndimage.binary_dilation(truth),
            np.roll(truth, (1, -2, 1)[:ndim], axis=tuple(range(ndim))),
            truth ^ (rng.random(shape) < 0.02)][i % 4]
    yield pred, truth, spacing


def deepmind(pred, truth, spacing):
  return sd.compute_surface_distances(truth.astype(bool), pred.astype(bool), spacing)


# --- cross-checks against independent implementations ------------------------------------------------------

def test_dice_matches_surface_distance():
  for pred, truth, _ in blob_pairs(3):
    assert metrics.dice(pred, truth) == pytest.approx(sd.compute_dice_coefficient(truth, pred), abs=1e-12)


def test_dice_matches_medpy():
  binary = pytest.importorskip("medpy.metric.binary")
  for pred, truth, _ in blob_pairs(3, seed=1):
    expected = binary.dc(pred, truth)
    assert metrics.dice(pred.astype(np.float32), truth.astype(np.uint8)) == pytest.approx(expected)


def test_surface_metrics_equal_surface_distance_in_2d():
  # In 2-D both use midpoint contours, so every figure must agree exactly.
  for pred, truth, spacing in blob_pairs(2, count=8):
    ref = deepmind(pred, truth, spacing)
    for percent in (50, 95, 100):
      assert metrics.hausdorff_distance(pred, truth, spacing, percent) == pytest.approx(
          sd.compute_robust_hausdorff(ref, percent), abs=1e-9)
    for tolerance in (0.0, 1.0, 2.0, 4.0):
      assert metrics.surface_dice(pred, truth, spacing, tolerance) == pytest.approx(
          sd.compute_surface_dice_at_tolerance(ref, tolerance), abs=1e-9)


def test_surface_metrics_agree_with_surface_distance_in_3d():
  """Same surface points and distances (so the maximum distance is identical); the areas differ only for
  non-planar marching-cubes polygons, which are triangulated differently."""
  for pred, truth, spacing in blob_pairs(3, count=8):
    ref = deepmind(pred, truth, spacing)
    assert metrics.hausdorff_distance(pred, truth, spacing, 100) == sd.compute_robust_hausdorff(ref, 100)
    assert metrics.hd95(pred, truth, spacing) == pytest.approx(sd.compute_robust_hausdorff(ref, 95),
                                                               abs=0.1 * max(spacing))
    for tolerance in (1.0, 1.5, 3.0):
      assert metrics.surface_dice(pred, truth, spacing, tolerance) == pytest.approx(
          sd.compute_surface_dice_at_tolerance(ref, tolerance), abs=2e-3)


def connected_volume_brute_force(mask, other):
  """Voxels in the 18-connected components of `mask` sharing no voxel with `other` (breadth-first search)."""
  offsets = [d for d in itertools.product((-1, 0, 1), repeat=3) if 0 < sum(map(abs, d)) <= 2]
  seen, unmatched = set(), 0
  for start in map(tuple, np.argwhere(mask)):
    if start in seen:
      continue
    component, queue = [], collections.deque([start])
    seen.add(start)
    while queue:
      voxel = queue.popleft()
      component.append(voxel)
      for d in offsets:
        n = tuple(np.add(voxel, d))
        if all(0 <= c < s for c, s in zip(n, mask.shape)) and mask[n] and n not in seen:
          seen.add(n)
          queue.append(n)
    if not any(other[v] for v in component):
      unmatched += len(component)
  return unmatched


def test_fpv_fnv_match_brute_force_components():
  rng = np.random.default_rng(2)
  spacing = (2.0, 1.5, 3.0)
  for _ in range(4):
    truth, pred = rng.random((10, 11, 9)) < 0.08, rng.random((10, 11, 9)) < 0.08
    voxel_ml = 9.0 / 1000
    assert metrics.false_positive_volume(pred, truth, spacing) == pytest.approx(
        connected_volume_brute_force(pred, truth) * voxel_ml)
    assert metrics.false_negative_volume(pred, truth, spacing) == pytest.approx(
        connected_volume_brute_force(truth, pred) * voxel_ml)


# --- hand-computed cases -----------------------------------------------------------------------------------

def box_layer_areas(shape, spacing):
  """Marching-cubes surface area of a box of `shape` voxels, per layer of surface points along axis 0.

  Cells on a face carry the face's area element, cells on an edge a chamfer 0.5 * s_edge * hypot(other two),
  and the 8 corner cells a triangle |(s1 s2, s0 s2, s0 s1)| / 8. Returns (end layer area, middle layer area).
  """
  (_, n1, n2), (s0, s1, s2) = shape, spacing
  edge = [0.5 * s0 * math.hypot(s1, s2), 0.5 * s1 * math.hypot(s0, s2), 0.5 * s2 * math.hypot(s0, s1)]
  corner = math.hypot(s1 * s2, s0 * s2, s0 * s1) / 8
  end = (n1 - 1) * (n2 - 1) * s1 * s2 + 2 * (n1 - 1) * edge[1] + 2 * (n2 - 1) * edge[2] + 4 * corner
  middle = 2 * (n2 - 1) * s0 * s2 + 2 * (n1 - 1) * s0 * s1 + 4 * edge[0]
  return end, middle


@pytest.mark.parametrize("spacing", [(0.8, 1.3, 2.5), (1.0, 1.0, 1.0)])
def test_overlapping_cubes_hand_computed(spacing):
  """Cube of side a and the same cube shifted by one voxel along axis 0 (the finest axis).

  Dice = (a-1)/a. Every surface point of one cube lies on the other surface except the near end face and the
  interior of the far end face, which are s0 away: HD95 = s0, and NSD below s0 is the remaining area fraction.
  """
  a, s0 = 5, spacing[0]
  truth = np.zeros((9, 8, 8), bool)
  truth[1:1 + a, 1:1 + a, 1:1 + a] = True
  pred = np.roll(truth, 1, axis=0)
  end, middle = box_layer_areas((a, a, a), spacing)
  total = 2 * end + (a - 1) * middle
  far_face_interior = (a - 1) ** 2 * spacing[1] * spacing[2]
  on_other_surface = total - end - far_face_interior
  assert metrics.dice(pred, truth) == pytest.approx((a - 1) / a)
  assert metrics.hd95(pred, truth, spacing) == pytest.approx(s0)
  assert metrics.surface_dice(pred, truth, spacing, 0.99 * s0) == pytest.approx(on_other_surface / total)
  assert metrics.surface_dice(pred, truth, spacing, 1.01 * s0) == pytest.approx(1.0)
  # All cells here are planar marching-cubes cases, where surface-distance's areas are the same.
  ref = deepmind(pred, truth, spacing)
  assert ref["surfel_areas_gt"].sum() == pytest.approx(total)
  assert sd.compute_surface_dice_at_tolerance(ref, 0.99 * s0) == pytest.approx(on_other_surface / total)


def test_disjoint_boxes_hand_computed():
  """A 24 x 3 x 2 box and its copy 27 voxels further along axis 0: a surface point in layer j of one box is
  (27 - j) * s0 from the other box's near end face, so the distances fall by layer and HD95 lands in the layer
  where the areas reach 95 %."""
  spacing, shape, gap = (1.2, 1.6, 2.2), (24, 3, 2), 27
  truth = np.zeros((54, 5, 4), bool)
  truth[1:25, 1:4, 1:3] = True
  pred = np.roll(truth, gap, axis=0)
  end, middle = box_layer_areas(shape, spacing)
  layers = [(gap - j) * spacing[0] for j in range(shape[0] + 1)]  # distance of layer j
  areas = [end] + [middle] * (shape[0] - 1) + [end]
  order = np.argsort(layers)
  covered = np.cumsum(np.array(areas)[order]) / sum(areas)
  expected_hd95 = np.array(layers)[order][np.argmax(covered >= 0.95)]
  assert expected_hd95 < max(layers)  # the end face holds less than 5 % of the area
  assert metrics.hd95(pred, truth, spacing) == pytest.approx(expected_hd95)
  assert metrics.hausdorff_distance(pred, truth, spacing, 100) == pytest.approx(gap * spacing[0])
  tolerance = (gap - shape[0] + 2.5) * spacing[0]  # layers j = 22, 23, 24 are within it
  within = (2 * middle + end) / sum(areas)
  assert metrics.surface_dice(pred, truth, spacing, tolerance) == pytest.approx(within)
  voxel_ml = np.prod(spacing) / 1000
  assert metrics.dice(pred, truth) == 0.0
  assert metrics.false_positive_volume(pred, truth, spacing) == pytest.approx(truth.sum() * voxel_ml)
  assert metrics.false_negative_volume(pred, truth, spacing) == pytest.approx(truth.sum() * voxel_ml)


def test_fpv_fnv_components_hand_computed():
  """Components use 18-connectivity (faces and edges, not corners), as the autoPET evaluation's cc3d call."""
  spacing = (2.0, 1.5, 3.0)  # 9 mm³ = 0.009 mL per voxel
  truth = np.zeros((12, 12, 12), bool)
  pred = np.zeros_like(truth)
  truth[1:3, 1:3, 1:3] = True              # T1, 8 voxels
  pred[2:4, 2:4, 2:4] = True               # P1 overlaps T1 at one voxel: neither FP nor FN
  pred[1, 4, 3] = True                     # joined to P1 through an edge: not FP
  pred[4, 4, 4] = True                     # touches P1 only at a corner: own component, FP 1
  truth[8, 8, 8] = True                    # T2 missed: FN 1 ...
  pred[8, 8, 9] = True                     # ... by a prediction touching it without overlap: FP 1
  truth[5, 1, 1] = truth[6, 2, 1] = True   # T3, edge-joined pair ...
  pred[5, 1, 1] = True                     # ... hit in one voxel: not FN
  truth[5, 8, 1] = truth[6, 9, 2] = True   # corner-joined voxels are two components ...
  pred[5, 8, 1] = True                     # ... and hitting one leaves the other missed: FN 1
  pred[10, 1, 10] = pred[11, 2, 10] = True  # edge-joined pair far from the truth: FP 2
  assert metrics.false_positive_volume(pred, truth, spacing) == pytest.approx(4 * 0.009)
  assert metrics.false_negative_volume(pred, truth, spacing) == pytest.approx(2 * 0.009)


def test_fpv_fnv_2d_use_8_connectivity():
  truth = np.zeros((6, 6), bool)
  truth[1, 1] = truth[2, 2] = True  # diagonal pixels: one component
  pred = np.zeros_like(truth)
  pred[1, 1] = True
  pred[4, 4] = pred[5, 5] = True  # diagonal pair, no overlap
  assert metrics.false_negative_volume(pred, truth, (2.0, 5.0)) == 0.0
  assert metrics.false_positive_volume(pred, truth, (2.0, 5.0)) == pytest.approx(2 * 10.0 / 1000)


# --- empty masks -------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("case, expected", [
    ("both empty", dict(dice=NAN, fpv_ml=0.0, fnv_ml=NAN, hd95_mm=NAN, surface_dice=NAN)),
    ("truth empty", dict(dice=0.0, fpv_ml=8 * 0.006, fnv_ml=NAN, hd95_mm=INF, surface_dice=0.0)),
    ("prediction empty", dict(dice=0.0, fpv_ml=0.0, fnv_ml=27 * 0.006, hd95_mm=INF, surface_dice=0.0)),
])
def test_empty_masks(case, expected):
  spacing = (1.0, 2.0, 3.0)  # 0.006 mL per voxel
  truth, pred = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
  if case == "prediction empty":
    truth[1:4, 1:4, 1:4] = True
  if case == "truth empty":
    pred[4:6, 4:6, 4:6] = True
  singles = dict(dice=metrics.dice(pred, truth),
                 fpv_ml=metrics.false_positive_volume(pred, truth, spacing),
                 fnv_ml=metrics.false_negative_volume(pred, truth, spacing),
                 hd95_mm=metrics.hd95(pred, truth, spacing),
                 surface_dice=metrics.surface_dice(pred, truth, spacing))
  for got in (singles, metrics.segmentation_metrics(pred, truth, spacing)):
    assert got.keys() == expected.keys()
    for name, value in expected.items():
      assert got[name] == pytest.approx(value, nan_ok=True), name


def test_segmentation_metrics_bundles_the_single_metrics():
  pred, truth, spacing = next(blob_pairs(3, count=1, seed=3))
  got = metrics.segmentation_metrics(pred, truth, spacing, tolerance_mm=2.0)
  assert got == {
      "dice": metrics.dice(pred, truth),
      "fpv_ml": metrics.false_positive_volume(pred, truth, spacing),
      "fnv_ml": metrics.false_negative_volume(pred, truth, spacing),
      "hd95_mm": metrics.hd95(pred, truth, spacing),
      "surface_dice": metrics.surface_dice(pred, truth, spacing, 2.0),
  }


# --- aggregation -------------------------------------------------------------------------------------------

def test_aggregate_skips_nan_with_a_count_and_keeps_inf():
  rows = [{"dice": 0.5, "hd95_mm": INF, "note": "ignored"}, {"dice": NAN, "hd95_mm": 2.0}, {"dice": 0.7}]
  got = metrics.aggregate(rows)
  assert set(got) == {"dice", "hd95_mm"}
  assert got["dice"]["mean"] == pytest.approx(0.6)
  assert got["dice"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
  assert (got["dice"]["n"], got["dice"]["n_nan"]) == (2, 1)
  assert got["hd95_mm"]["mean"] == INF and (got["hd95_mm"]["n"], got["hd95_mm"]["n_nan"]) == (2, 1)
  lonely = metrics.aggregate([{"dice": 0.4}, {"dice": NAN}])["dice"]
  assert lonely["mean"] == 0.4 and math.isnan(lonely["std"]) and (lonely["n"], lonely["n_nan"]) == (1, 1)
  assert math.isnan(metrics.aggregate([{"dice": NAN}])["dice"]["mean"])


# --- staging metrics ---------------------------------------------------------------------------------------

def test_classification_metrics_hand_computed():
  scores = np.array([[0.7, 0.2, 0.1],    # label 0, predicted 0
                     [0.3, 0.5, 0.2],    # label 1, predicted 1
                     [0.1, 0.3, 0.6],    # label 2, predicted 2
                     [0.4, 0.35, 0.25],  # label 1, predicted 0
                     [0.3, 0.3, 0.4],    # label 0, predicted 2
                     [0.2, 0.2, 0.6]])   # label 2, predicted 2
  labels = np.array([0, 1, 2, 1, 0, 2])
  got = metrics.classification_metrics(scores, labels)
  assert got["accuracy"] == pytest.approx(4 / 6)
  # F1 = 2 TP / (|labelled c| + |predicted c|): class 0: 2/4, class 1: 2/3, class 2: 4/5.
  assert [got[f"f1_class_{c}"] for c in range(3)] == pytest.approx([0.5, 2 / 3, 0.8])
  assert got["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
  # Class 0 positives score 0.7 and 0.3, negatives 0.3, 0.1, 0.4, 0.2: 4 + (0.5 + 1 + 0 + 1) of 8 pairs.
  assert [got[f"auc_class_{c}"] for c in range(3)] == pytest.approx([6.5 / 8, 1.0, 1.0])
  assert got["macro_auc"] == pytest.approx((6.5 / 8 + 2) / 3)
  assert got["n"] == 6 and got["note"] == ""


def test_auc_rank_formula_matches_pairwise_count():
  rng = np.random.default_rng(4)
  scores = np.round(rng.random((40, 4)), 1)  # coarse scores: many ties
  labels = rng.integers(0, 4, 40)
  got = metrics.classification_metrics(scores, labels)
  for c in range(4):
    positive, negative = scores[labels == c, c], scores[labels != c, c]
    wins = (positive[:, None] > negative[None]).sum() + 0.5 * (positive[:, None] == negative[None]).sum()
    assert got[f"auc_class_{c}"] == pytest.approx(wins / (positive.size * negative.size))


def test_absent_classes_are_left_out_of_the_macros():
  scores = np.array([[0.8, 0.1, 0.1, 0.0], [0.3, 0.6, 0.1, 0.0], [0.6, 0.3, 0.1, 0.0], [0.2, 0.3, 0.5, 0.0]])
  got = metrics.classification_metrics(scores, np.array([0, 1, 0, 1]))
  assert math.isnan(got["auc_class_2"]) and math.isnan(got["auc_class_3"])
  assert got["macro_auc"] == pytest.approx((got["auc_class_0"] + got["auc_class_1"]) / 2)
  assert "[2, 3]" in got["note"] and "macro_auc" in got["note"]
  # Class 2 is predicted once but never a label: its F1 of 0 counts. Class 3 is never seen: NaN, left out.
  assert got["f1_class_2"] == 0.0 and math.isnan(got["f1_class_3"])
  assert got["macro_f1"] == pytest.approx((got["f1_class_0"] + got["f1_class_1"]) / 3)
  assert metrics.aggregate([got])["accuracy"]["mean"] == got["accuracy"]


# --- bad inputs --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: metrics.dice(np.zeros((4, 4)), np.zeros((4, 5))), "shape"),
    (lambda: metrics.hd95(np.ones((4, 4, 4)), np.ones((4, 4, 4)), (1.0, 1.0)), "spacing"),
    (lambda: metrics.false_positive_volume(np.ones((4, 4)), np.ones((4, 4)), (1.0, -1.0)), "spacing"),
    (lambda: metrics.false_negative_volume(np.ones((4, 4)), np.ones((4, 4)), ("1.0mm", 1.0)), "spacing"),
    (lambda: metrics.surface_dice(np.ones((2, 2, 2, 2)), np.ones((2, 2, 2, 2)), (1.0,) * 4), "2-D or 3-D"),
    (lambda: metrics.surface_dice(np.ones((3, 3)), np.ones((3, 3)), (1.0, 1.0), -1.0), "tolerance"),
    (lambda: metrics.classification_metrics(np.ones((3, 2)), np.array([0, 1, 2])), "labels"),
    (lambda: metrics.classification_metrics(np.ones((3, 2)), np.array([0, 1])), "labels"),
    (lambda: metrics.classification_metrics(np.ones(3), np.array([0, 1, 1])), "scores"),
])
def test_bad_inputs_raise_one_clear_user_error(call, message):
  with pytest.raises(UserError, match=message):
    call()
