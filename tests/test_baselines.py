"""Classical lesion baselines and the Ann Arbor staging rule against hand-computed cases."""

import numpy as np
import pytest

from petfm.errors import UserError
from petfm.eval import baselines, staging

SPACING = (2.0, 2.0, 2.0)   # 8 mm³ = 0.008 mL per voxel


def small_case():
  """8³ volume, SUV 1; organ 1 = the slab x = 0 at SUV 3.5 (median > 2: "hot"), organ 2 elsewhere.
  Lesion A (the truth): a line of 3 voxels at SUV 10, 5, 3. B: a lone voxel at SUV 2.8 (not a lesion)."""
  suv = np.ones((8, 8, 8), np.float32)
  organs = np.full(suv.shape, 2, np.uint8)
  organs[0] = 1
  suv[0] = 3.5
  suv[4, 4, 4:7] = (10.0, 5.0, 3.0)
  suv[6, 6, 1] = 2.8
  label = np.zeros(suv.shape, np.uint8)
  label[4, 4, 4:7] = 1
  return suv, organs, label


def test_rules_give_the_hand_computed_masks():
  suv, organs, label = small_case()
  slab = np.zeros(suv.shape, bool)
  slab[0] = True
  a_hot = np.zeros(suv.shape, bool)
  a_hot[4, 4, 4:6] = True                            # SUV 10 and 5 (> 4, > 3, ≥ 41 % of 10 = 4.1)
  b = np.zeros(suv.shape, bool)
  b[6, 6, 1] = True
  np.testing.assert_array_equal(baselines.threshold(suv, 2.5), slab | (label > 0) | b)
  np.testing.assert_array_equal(baselines.threshold(suv, 4.0), a_hot)
  # components of SUV > 2.5: slab (max 3.5, all ≥ 1.435 kept), A (max 10: the SUV 3 voxel goes), B (kept)
  np.testing.assert_array_equal(baselines.percent_of_max(suv), slab | a_hot | b)
  # organ 1 (median 3.5) is excluded, organ 2 (median 1) is not; SUV > 3 leaves A's two hot voxels
  np.testing.assert_array_equal(baselines.organ_exclusion(suv, organs), a_hot)
  # without an organ map the exclusion is the plain threshold
  np.testing.assert_array_equal(baselines.organ_exclusion(suv, np.zeros_like(organs)), slab | a_hot)


def test_baseline_metrics_are_the_hand_computed_figures():
  suv, organs, label = small_case()
  rows = baselines.study_rows(suv, organs, label, SPACING)
  assert set(rows) == {"suv>2.5", "suv>4", "41% SUVmax", "suv>3 w/o organs"}
  # SUV > 2.5: 64 + 3 + 1 voxels predicted, the slab and B (65 voxels) miss the truth
  assert rows["suv>2.5"]["dice"] == pytest.approx(2 * 3 / (68 + 3))
  assert rows["suv>2.5"]["fpv_ml"] == pytest.approx(65 * 0.008)
  assert rows["41% SUVmax"]["dice"] == pytest.approx(2 * 2 / (67 + 3))
  for name in ("suv>4", "suv>3 w/o organs"):
    assert rows[name]["dice"] == pytest.approx(0.8)
    assert rows[name]["fpv_ml"] == 0 and rows[name]["fnv_ml"] == 0   # A is found (shares voxels)
  results = baselines.evaluate([dict(study_id="s", suv=suv, organs=organs, label=label, spacing=SPACING)] * 2)
  assert results["suv>4"]["dice"] == pytest.approx(0.8) and len(results["suv>4"]["studies"]) == 2


NAMES = {"2": "muscle", "7": "lungs", "20": "nodes_cervical_right", "24": "nodes_mediastinal",
         "25": "nodes_paraaortic", "27": "nodes_iliac_right"}


@pytest.mark.parametrize("sites, stage", [((20,), 1), ((20, 24), 2), ((25, 27), 2), ((24, 27), 3),
                                          ((20, 7), 4), ((2,), 1), ((20, 2), 1)])
def test_stage_rule(sites, stage):
  organs = np.zeros((4, 4, 3 * len(sites) + 1), np.uint8)
  lesions = np.zeros(organs.shape, bool)
  for i, site in enumerate(sites):                   # one separate 2-voxel lesion per site
    organs[:, :, 3 * i:3 * i + 2] = site
    lesions[1, 1, 3 * i:3 * i + 2] = True
  assert staging.stage_from_lesions(lesions, organs, NAMES) == stage


def test_stage_rule_majority_label_min_size_and_bad_tables():
  organs = np.full((3, 3, 6), 25, np.uint8)
  organs[:, :, :2] = 7                                # lungs under 2 of the 5 lesion voxels
  lesions = np.zeros(organs.shape, bool)
  lesions[1, 1, :5] = True
  assert staging.involved_sites(lesions, organs) == {25}
  assert staging.involved_sites(lesions, organs, min_voxels=6) == set()
  with pytest.raises(UserError, match="no lymph-node station"):
    staging.stage_from_lesions(lesions, organs, {"1": "muscle"})
  with pytest.raises(UserError, match="unknown nodal region"):
    staging.station_table({"20": "nodes_elbow"})
