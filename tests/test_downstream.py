"""Downstream tasks: heads, losses, sliding-window inference, inverse geometry, fine-tuning, staging, predict
CLI."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from conftest import REPO
from test_convert import AFFINE, phantom, reoriented, write_autopet

from data_prep import convert
from data_prep.configs import convert as convert_configs
from petfm import config as config_lib
from petfm.data import geometry, pipelines
from petfm.downstream import data as ddata
from petfm.downstream import finetuned, lesions
from petfm.downstream import predict as predict_lib
from petfm.errors import UserError
from petfm.models import fratmae, heads
from petfm.train import common, finetune

SMALL = dict(patch_size=(4, 4), width=32, depth=2, num_heads=4, mlp_dim=64)
SPACING = 3.0
# Tiny fine-tuning run on the phantom cohort: coronal view of a 16 × 14 × 30 grid, 16 × 8 × 2 slabs.
OVERRIDES = {"model.patch_size": (4, 4), "model.width": 32, "model.depth": 2, "model.num_heads": 4,
             "model.mlp_dim": 64, "data.plane_size": (16, 8), "data.depth": 2, "head.features": 4,
             "batch_size": 8, "total_steps": 400, "foreground_fraction": 0.3, "hard_negative_fraction": 0.3,
             "optim.warmup_steps": 2,
             "optim.lr": 3e-3, "head.prior": 0.5,
             "checkpoint.every_steps": 40, "log_every_steps": 10, "eval.batch_size": 16,
             "staging.max_slabs": 4}


def backbone(method="fratmae"):
  c = fratmae.default_config("tiny", method)
  c.update(SMALL)
  return fratmae.model_from_config(c)


# ------------------------------------------------------------------------------------------------ heads


@pytest.mark.parametrize("method", ["fratmae", "mae"])
@pytest.mark.parametrize("head", ["unetr", "linear"])
def test_segmentation_heads_shapes_and_gradient_flow(method, head):
  rng = np.random.default_rng(0)
  pet, ct = (jnp.asarray(rng.random((2, 16, 8, 3), np.float32)) for _ in range(2))
  labels = jnp.asarray(rng.random((2, 16, 8, 3)) > 0.8)
  grads = {}
  for frozen in (False, True):
    model = heads.LesionSegmenter(backbone(method), head=head, features=4, freeze_backbone=frozen)
    params = nn.unbox(model.init(jax.random.key(0), pet, ct)["params"])
    assert model.apply({"params": params}, pet, ct).shape == (2, 16, 8, 3)
    loss = lambda p: lesions.dice_bce_loss(model.apply({"params": p}, pet, ct), labels)[0]
    grads[frozen] = jax.grad(loss)(params)
  encoders = ["pet_encoder", "ct_encoder"] if method == "fratmae" else ["encoder"]
  assert sorted(grads[False]["backbone"]) == sorted(encoders)
  for name in encoders:
    patch = grads[False]["backbone"][name]["patch_embed"]["proj"]["kernel"]
    assert float(jnp.abs(patch).sum()) > 0                                   # gradients reach the encoders
    assert float(jnp.abs(grads[True]["backbone"][name]["patch_embed"]["proj"]["kernel"]).sum()) == 0
  for leaf in jax.tree.leaves(grads[False]["head"]):
    assert np.all(np.isfinite(leaf))
  # every head param gets a gradient (at most one bias is 0)
  assert sum(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads[False]["head"])) >= \
      len(jax.tree.leaves(grads[False]["head"])) - 1


def test_upconv_is_the_transposed_conv_with_the_same_params():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5, 6)), jnp.float32)
  params = heads.UpConv(4).init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(1), p.shape), nn.unbox(params))
  reference = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID").apply(params, x)
  assert reference.shape == (2, 6, 10, 4)
  np.testing.assert_allclose(heads.UpConv(4).apply(params, x), reference, rtol=1e-5, atol=1e-5)


def test_unetr_taps_evenly_spaced_layers_and_rejects_bad_patch():
  assert heads.tap_layers(12, 4) == (3, 6, 9, 12)
  assert heads.tap_layers(4, 3) == (1, 3, 4)
  with pytest.raises(UserError, match="need 2 block indices"):
    heads.tap_layers(2, 2, (1, 5))
  model = heads.LesionSegmenter(backbone().clone(patch_size=(6, 6)), features=4)
  with pytest.raises(UserError, match="power-of-two"):
    model.init(jax.random.key(0), jnp.zeros((1, 12, 12, 2)), jnp.zeros((1, 12, 12, 2)))


@pytest.mark.parametrize("aggregation", ["mean", "sum", "attention"])
def test_staging_ignores_padding_slabs(aggregation):
  model = heads.Stager(backbone(), num_classes=4, aggregation=aggregation)
  rng = np.random.default_rng(1)
  pet, ct = rng.random((2, 3, 8, 8, 2), np.float32), rng.random((2, 3, 8, 8, 2), np.float32)
  valid = np.array([[True, True, False], [True, False, False]])
  position = rng.uniform(-1, 1, (2, 3, 3)).astype(np.float32)
  params = nn.unbox(model.init(jax.random.key(0), pet, ct, valid, position)["params"])
  logits, weights = model.apply({"params": params}, pet, ct, valid, position)
  assert logits.shape == (2, 4) and weights.shape == (2, 3)
  np.testing.assert_allclose(weights.sum(1), valid.sum(1) if aggregation == "sum" else 1.0, rtol=1e-6)
  assert np.all(np.asarray(weights)[~valid] == 0)
  pet2, ct2, position2 = pet.copy(), ct.copy(), position.copy()
  pet2[~valid], ct2[~valid], position2[~valid] = 5.0, -3.0, 0.5               # change only the padding slabs
  np.testing.assert_allclose(model.apply({"params": params}, pet2, ct2, valid, position2)[0], logits,
                             rtol=1e-5, atol=1e-6)
  moved = position.copy()
  moved[0, 0] = -moved[0, 0]                                                  # where a lesion lies matters
  assert not np.allclose(model.apply({"params": params}, pet, ct, valid, moved)[0][0], logits[0])


def test_lesion_stack_has_one_slab_per_lesion_at_its_place():
  label = np.zeros((20, 16, 12), np.uint8)
  label[2:5, 2:5, 1:4] = 1                          # 27 voxels near the first corner, centroid (3, 3, 2)
  label[15, 12, 9] = 1                              # 1 voxel near the far corner
  pet = np.arange(label.size, dtype=np.float32).reshape(label.shape)
  study = ddata.Study("s", "p", pet, -pet, label, np.ones(3), np.eye(4), np.eye(4), np.array(label.shape), 1)
  regions = ddata.staging_regions(ddata.components(label > 0), 3)
  stack = ddata.lesion_stack(study, regions, (4, 4, 2), 3, (-1.0, -2.0))
  assert stack["pet"].shape == (3, 4, 4, 2) and stack["slab_valid"].tolist() == [True, True, False]
  np.testing.assert_array_equal(stack["pet"][0], pet[1:5, 1:5, 1:3])   # the larger lesion first, centred
  np.testing.assert_array_equal(stack["ct"][1], -pet[13:17, 10:14, 8:10])
  assert np.all(stack["pet"][2] == -1.0) and np.all(stack["ct"][2] == -2.0)
  centre = np.array([2.5, 2.5, 1.5])                # of the slab pet[1:5, 1:5, 1:3]
  np.testing.assert_allclose(stack["position"][0], 2 * centre / (np.array(label.shape) - 1) - 1)
  rng = np.random.default_rng(0)
  for _ in range(5):                                # training: random placement, the lesion always inside
    regions = ddata.staging_regions(ddata.components(label > 0), 1, rng)
    stack = ddata.lesion_stack(study, regions, (4, 4, 2), 1, (-1.0, -2.0), rng)
    assert stack["slab_valid"].sum() == 1 and np.any(np.isin(stack["pet"][0], pet[label > 0]))
  hot = np.zeros_like(label)
  hot[10:12, 2:4, 8:10] = 1                           # physiological uptake: a distractor region
  lesions, distractors = ddata.components(label > 0), ddata.components(hot > 0)
  counts = []
  for _ in range(20):
    regions = ddata.staging_regions(lesions, 3, rng, distractors, 1)
    counts.append(sum(len(r) == 8 for r in regions))
    assert len(regions) <= 3 and sum(len(r) in (1, 27) for r in regions) == len(regions) - counts[-1]
  assert set(counts) == {0, 1}                        # 0..distractors hot regions per bag


# ---------------------------------------------------------------------------------------------- loss, windows


def test_dice_bce_loss_matches_numpy_and_ignores_padding():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 4, 2)).astype(np.float32)
  labels = (rng.random((2, 4, 4, 2)) > 0.6).astype(np.uint8)
  valid = np.ones_like(labels)
  valid[:, :, 3] = 0
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  m = valid > 0
  bce = -np.mean(labels[m] * np.log(p[m]) + (1 - labels[m]) * np.log(1 - p[m]))
  dice = 1 - (2 * np.sum(p[m] * labels[m]) + 1) / (p[m].sum() + labels[m].sum() + 1)
  loss, parts = lesions.dice_bce_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid))
  np.testing.assert_allclose([parts["bce"], parts["dice_loss"], loss], [bce, dice, bce + dice], rtol=1e-5)
  changed = logits.copy()
  changed[:, :, 3] = 50.0                                                      # padding voxels do not count
  np.testing.assert_allclose(lesions.dice_bce_loss(jnp.asarray(changed), jnp.asarray(labels),
                                                   jnp.asarray(valid))[0], loss, rtol=1e-6)


def test_window_starts_cover_the_axis():
  assert lesions.window_starts(5, 8, 0.5) == [0]
  assert lesions.window_starts(20, 8, 0.5) == [0, 4, 8, 12]
  for size, window, overlap in ((37, 8, 0.5), (9, 8, 0.25), (100, 16, 0.0)):
    starts = lesions.window_starts(size, window, overlap)
    covered = np.zeros(size, bool)
    for s in starts:
      covered[s:s + window] = True
    assert covered.all() and starts[-1] + window == size


def test_sliding_window_of_a_pointwise_model_equals_the_whole_volume():
  rng = np.random.default_rng(0)
  pet, ct = rng.random((21, 10, 13), np.float32), rng.random((21, 10, 13), np.float32)
  calls = []

  def predict(p, c):
    calls.append(p.shape)
    return 1 / (1 + np.exp(-(p - c)))

  prob = lesions.sliding_window_probabilities(predict, pet, ct, (8, 16, 4), overlap=0.5, batch_size=4)
  np.testing.assert_allclose(prob, 1 / (1 + np.exp(-(pet - ct))), rtol=1e-6)
  assert all(shape[1:] == (8, 16, 4) and shape[0] <= 4 for shape in calls)

  def position(p, c):   # a model that sees the window position: outputs average over overlapping windows
    return np.broadcast_to(p[:, :1, :1, :1], p.shape)

  averaged = lesions.sliding_window_probabilities(position, pet, ct, (8, 16, 4), overlap=0.5)
  assert averaged.shape == pet.shape and np.all(np.isfinite(averaged))


def test_sliding_windows_visit_only_the_body_box():
  config = finetune_config("tiny")                                   # window (16, 8, 2), coronal view
  air, tissue = pipelines.normalize(np.float32(-1000.0), np.float32(0.0), config.data)[0], 0.0
  ct = np.full((30, 20, 12), air, np.float32)                        # view axes (H, W, S)
  ct[10:20, 5:9, 3:9] = tissue                                       # the body: 10 × 4 × 6 voxels
  study = ddata.Study("s", "p", np.zeros_like(ct), ct, np.zeros(ct.shape, np.uint8), *([None] * 4), 0)
  # S keeps the body's extent; H (10 < 16) and W (4 < 8) grow to the window, centred on the body
  assert lesions.body_box(study, config.data, (16, 8, 2)) == (slice(7, 23), slice(3, 11), slice(3, 9))
  seen = []

  class Predictor:    # p = 1 on every window voxel it is shown
    def __call__(self, pet, ct):
      seen.append(ct.copy())
      return np.ones_like(pet)

  prob = pipelines.to_view(lesions.predict_volume(config, Predictor(), study), config.data.view)
  expected = np.zeros(ct.shape, bool)
  expected[7:23, 3:11, 3:9] = True
  np.testing.assert_array_equal(prob, expected)
  assert len(seen) == 1 and seen[0].shape[1:] == (16, 8, 2)          # 5 windows, one batch of 16
  ct[:] = air                                                        # no body: the whole volume
  assert lesions.body_box(study, config.data, (16, 8, 2)) == (slice(0, 30), slice(0, 20), slice(0, 12))


# ----------------------------------------------------------------------------------------------- data helpers


def test_components_are_drawn_uniformly_whatever_their_size():
  mask = np.zeros((12, 12, 12), bool)
  mask[:6, :6, :6] = True                                   # 216 voxels
  mask[10, 10, 10] = True                                   # 1 voxel
  mask[10, 0, 10] = mask[10, 1, 10] = True                  # 2 voxels
  assert len(ddata.components(mask)) == 3 and len(ddata.components(mask, min_voxels=2)) == 2
  found = ddata.components(mask)
  rng = np.random.default_rng(0)
  draws = np.array([found.draw(rng) for _ in range(600)])
  assert mask[tuple(draws.T)].all()
  share = np.mean(np.all(draws == [10, 10, 10], axis=1))
  assert 0.25 < share < 0.42, share                         # ≈ 1/3, not 1/219


def test_threshold_with_the_best_held_out_dice_is_chosen(monkeypatch):
  # Hand-computed: lesion voxels at p = 0.32 (5) and 0.62 (5), 10 background voxels at 0.2. Dice: 2/3 for
  # t <= 0.2 (all 20 voxels), 1 for 0.25 and 0.3, 2/3 up to 0.6, then 0 (empty). Tie → the one nearest 0.5.
  label = np.r_[np.ones(10), np.zeros(10)].astype(np.uint8)
  lesion = {"label": label, "prob": np.r_[[0.32] * 5, [0.62] * 5, [0.2] * 10].astype(np.float32)}
  clean = {"label": np.zeros(20, np.uint8), "prob": np.full(20, 0.9, np.float32)}  # no lesion: left out
  monkeypatch.setattr(ddata, "view_study", lambda record, data: record)
  monkeypatch.setattr(lesions, "predict_volume", lambda config, predictor, study: study["prob"])
  config = finetune_config("tiny")
  chosen = lesions.choose_threshold(config, None, [lesion, clean])
  assert (chosen["value"], chosen["n"], chosen["split"]) == (0.3, 1, "val")
  assert [chosen["dice"][t] for t in ("0.2", "0.25", "0.6", "0.65")] == [pytest.approx(2 / 3, abs=1e-4), 1.0,
                                                                          pytest.approx(2 / 3, abs=1e-4), 0.0]
  assert lesions.choose_threshold(config, None, [clean]) == {"value": 0.5, "split": "val", "n": 0, "dice": {}}
  with pytest.raises(UserError, match="eval.threshold_from: must differ from eval.split"):
    finetune.validate(finetune_config("tiny", **{"eval.threshold_from": "test"}))


def test_labelled_subsets_are_seeded_nested_and_never_empty():
  patients = [f"p{i:02d}" for i in range(20)]
  ten, quarter, full = (ddata.labelled_subset(patients, f, seed=3) for f in (0.1, 0.25, 1.0))
  assert len(ten) == 2 and len(quarter) == 5 and full == patients
  assert set(ten) <= set(quarter)
  assert ten == ddata.labelled_subset(list(reversed(patients)), 0.1, seed=3)
  assert (ten != ddata.labelled_subset(patients, 0.1, seed=4)
          or quarter != ddata.labelled_subset(patients, 0.25, 4))
  assert len(ddata.labelled_subset(patients[:3], 0.1, seed=0)) == 1
  one, three, ten = (ddata.labelled_subset(patients, 1.0, seed=3, count=n) for n in (1, 3, 10))
  assert len(one) == 1 and len(ten) == 10 and set(one) <= set(three) <= set(ten)
  with pytest.raises(UserError, match="label_patients: 21 exceeds the 20 training patients"):
    ddata.labelled_subset(patients, 1.0, seed=0, count=21)
  with pytest.raises(UserError, match="label_patients: set either"):
    finetune.validate(finetune_config("tiny,patients=3,fraction=0.5"))


def test_layer_wise_lr_decay_multipliers():
  config = config_lib.override(finetune_config("tiny,protocol=finetune"), {"optim.layer_decay": 0.5})
  model = lesions.make_model(config)
  x = jnp.zeros((1, *config.data.plane_size, config.data.depth))
  params = nn.unbox(model.init(jax.random.key(0), x, x)["params"])
  depth = config.model.depth
  ids = jax.tree_util.tree_map_with_path(lambda path, _: finetune.layer_id(path, depth), params)
  assert {jax.tree.leaves(ids["backbone"]["pet_encoder"]["patch_embed"])[0]} == {0}
  assert set(jax.tree.leaves(ids["backbone"]["pet_encoder"]["encoder"]["block_1"])) == {2}
  assert set(jax.tree.leaves(ids["head"])) == {depth + 1}
  # One AdamW step: with equal gradients the update of block i is 0.5^(depth + 1 - id) times the head's.
  tx, _ = finetune.make_optimizer(
      config_lib.override(config, {"optim.weight_decay": 0.0, "optim.warmup_steps": 0}), params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  head = float(jax.tree.leaves(updates["head"])[0].ravel()[0])
  embed = float(updates["backbone"]["pet_encoder"]["patch_embed"]["proj"]["bias"][0])
  np.testing.assert_allclose(embed / head, 0.5 ** (depth + 1), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ cohort


def lesion_phantom(seed: int, shape=(24, 20, 30)) -> dict[str, np.ndarray]:
  """A study for learning tests: body (SUV ~1, CT 40 HU) with 2–3 hot spherical lesions (SUV 5–9, radius 6–8
  mm) at random places, and a larger hot organ that is no lesion (SUV 5–9 like them, radius 11–13 mm, CT 640
  HU, no organ map), so that no SUV threshold separates the two. Arrays (X, Y, Z) on the 2 × 2 × 3 mm grid of
  test_convert."""
  rng = np.random.default_rng(100 + seed)
  grid = np.indices(shape, dtype=np.float64)
  rel = [(grid[a] - (shape[a] - 1) / 2) / shape[a] for a in range(3)]
  body = rel[0] ** 2 + rel[1] ** 2 + (rel[2] / 1.3) ** 2 < 0.2
  mm = np.array([2.0, 2.0, 3.0])[:, None, None, None]
  ball = lambda centre, radius: np.linalg.norm((grid - centre[:, None, None, None]) * mm, axis=0) <= radius
  organ = ball(rng.uniform(0.35, 0.65, 3) * shape, rng.uniform(11, 13)) & body
  seg = np.zeros(shape, np.uint8)
  for _ in range(rng.integers(2, 4)):
    seg[ball(rng.uniform(0.3, 0.7, 3) * shape, rng.uniform(6, 8))] = 1
  seg &= body & ~organ
  ct = np.where(body, 40.0, -1000.0) + 600.0 * organ + rng.normal(0, 15, shape)
  suv = 0.05 + 1.0 * body + rng.uniform(5, 9) * seg + rng.uniform(5, 9) * organ + rng.normal(0, 0.1, shape)
  return {"ct": ct.astype(np.int16), "suv": np.clip(suv, 0, None).astype(np.float32), "seg": seg}


def finetune_config(arg, **overrides):
  spec = os.path.join(REPO, "experiments", "finetune.py") + ":" + arg
  return config_lib.load_config(spec, {**OVERRIDES, **overrides})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  """Eight phantom patients (Ann Arbor stage from the patient number) → records at 3 mm."""
  root = tmp_path_factory.mktemp("cohort")
  nifti, out = root / "nifti", root / "records"
  for i in range(8):
    write_autopet(str(nifti), f"P{i}", "s0", lesion_phantom(i),
                  meta={"stage": 1 + i % 4, "patient_id": f"P{i}"})
  config = convert_configs.get_config()
  config.update(spacing=(SPACING,) * 3, val_fraction=0.0, test_fraction=0.3, seed=1)
  summary = convert.convert(str(nifti), str(out), config, workers=1, progress=False)
  assert not summary.errors and summary.split_counts["test"] >= 1 and summary.split_counts["train"] >= 4
  return {"nifti": str(nifti), "records": str(out)}


def test_canonical_mask_lands_on_the_input_voxels_of_an_lps_anisotropic_study(tmp_path):
  volumes = phantom(5)
  lps, affine = reoriented(volumes, AFFINE, flips=(True, True, False), order=(1, 0, 2))
  write_autopet(str(tmp_path / "in"), "P", "s", lps, affine)
  record = predict_lib.load_study(str(tmp_path / "in" / "P" / "s"), SPACING)
  data = finetune_config("tiny").data
  study = ddata.view_study(record, data)
  # A mask made in the view (here: the stored label) → canonical → original grid = the input SEG.
  canonical = pipelines.from_view(study.label, data.view)
  np.testing.assert_array_equal(canonical, record["label"])
  back = geometry.to_original(canonical, study.affine, study.original_affine, study.original_shape)
  assert back.shape == lps["seg"].shape
  assert ddata.stage_index(3) == 2
  # 3 mm stored grid vs the 2 × 2 × 3 mm input: nearest-neighbour round trip keeps the lesions in place.
  assert lesions.study_metrics(back, lps["seg"], geometry.voxel_sizes(affine))["dice"] > 0.75
  world = lambda a, m: (a[:3, :3] @ np.argwhere(m).mean(0) + a[:3, 3])
  np.testing.assert_allclose(world(affine, back > 0), world(affine, lps["seg"] > 0), atol=2.0)


@pytest.fixture(scope="module")
def lesion_run(cohort, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lesions"))
  # The cohort has no val split: the threshold is chosen on the training studies (not the scored ones).
  config = finetune_config("tiny,task=lesions,protocol=scratch", data_dir=cohort["records"],
                           **{"eval.threshold_from": "train"})
  results = finetune.train(config, workdir)
  return {"config": config, "workdir": workdir, "results": results}


def test_tiny_finetune_improves_dice_over_the_untrained_head(cohort, lesion_run):
  config = finetune.resolve(lesion_run["config"])
  mesh = common.create_mesh(config.mesh, jax.devices()[:1])
  setup = finetune.build(config, mesh)
  with jax.set_mesh(mesh):
    untrained = finetune.evaluate(config, setup.predictor(setup.init(jax.random.key(0), None)["params"], lesions))
  trained = lesion_run["results"]
  assert len(trained["studies"]) >= 1 and {"dice", "fpv_ml", "fnv_ml", "hd95_mm"} <= set(trained)
  assert trained["dice"] > untrained["dice"] + 0.15, (trained["dice"], untrained["dice"])
  # learning beats every classical rule on the held-out studies (the hot organ fools the thresholds)
  best = max(row["dice"] for row in trained["baselines"].values())
  assert trained["dice"] > best, (trained["dice"], {k: v["dice"] for k, v in trained["baselines"].items()})
  saved = json.load(open(os.path.join(lesion_run["workdir"], "results.json")))
  assert saved["dice"] == pytest.approx(trained["dice"])
  # The threshold with the best Dice on the held-out studies is used and kept with the run, where
  # predict-lesions and staging's lesions_from read it.
  chosen = trained["threshold"]
  assert chosen["n"] >= 1 and chosen["dice"][str(chosen["value"])] == max(chosen["dice"].values())
  assert finetuned.read_config(lesion_run["workdir"]).eval.threshold == chosen["value"]


def test_rerun_of_a_finished_run_resumes_and_reevaluates(lesion_run):
  again = finetune.train(lesion_run["config"], lesion_run["workdir"])
  assert again["dice"] == pytest.approx(lesion_run["results"]["dice"], abs=1e-9)


def test_a_killed_rerun_keeps_the_chosen_threshold(lesion_run, monkeypatch):
  chosen = lesion_run["results"]["threshold"]["value"]
  config = lesion_run["config"].copy_and_resolve_references()
  config.eval.threshold = 0.05 if chosen != 0.05 else 0.95  # what this re-run's command line says

  def killed(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(finetune, "evaluate", killed)
  with pytest.raises(KeyboardInterrupt):
    finetune.train(config, lesion_run["workdir"])
  assert finetuned.read_config(lesion_run["workdir"]).eval.threshold == chosen


def test_predict_lesions_cli_writes_a_mask_in_the_input_geometry(cohort, lesion_run, tmp_path):
  volumes = lesion_phantom(11)
  lps, affine = reoriented(volumes, AFFINE, flips=(True, True, False))
  folder = write_autopet(str(tmp_path / "study"), "P", "s", {k: v for k, v in lps.items() if k != "seg"},
                         affine)
  out = str(tmp_path / "pred" / "mask.nii.gz")
  proc = subprocess.run([sys.executable, "-m", "petfm.cli", "predict-lesions", "--checkpoint",
                         lesion_run["workdir"], "--study", folder, "--out", out],
                        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert proc.returncode == 0, proc.stderr
  mask = nib.load(out)
  assert mask.shape == lps["suv"].shape
  np.testing.assert_allclose(mask.affine, affine)
  assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


@pytest.mark.parametrize("case", ["missing_checkpoint", "missing_suv"])
def test_predict_lesions_bad_input_gives_one_line(cohort, lesion_run, tmp_path, case):
  folder = write_autopet(str(tmp_path / "study"), "P", "s", {"ct": phantom(1)["ct"]})
  checkpoint = str(tmp_path / "nope") if case == "missing_checkpoint" else lesion_run["workdir"]
  proc = subprocess.run([sys.executable, "-m", "petfm.cli", "predict-lesions", "--checkpoint", checkpoint,
                         "--study", folder, "--out", str(tmp_path / "m.nii.gz")],
                        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in proc.stderr
  assert ("nope" in lines[0]) if case == "missing_checkpoint" else ("SUV.nii.gz is missing" in lines[0])


def test_staging_runs_end_to_end_on_a_few_studies(cohort, tmp_path):
  config = finetune_config("tiny,task=staging,protocol=scratch,fraction=0.5", data_dir=cohort["records"],
                           total_steps=6, batch_size=8, **{"staging.aggregation": "attention"})
  results = finetune.train(config, str(tmp_path / "staging"))
  assert results["task"] == "staging" and 0 <= results["accuracy"] <= 1
  assert {"macro_f1", "macro_auc", "n"} <= set(results)
  patients = ddata.split_patients(cohort["records"], "train")
  assert len(finetune.train_studies(finetune.resolve(config))) == len(ddata.labelled_subset(patients, 0.5, 0))


def test_staging_reads_the_lesions_a_lesion_run_predicts(cohort, lesion_run, tmp_path):
  config = finetune_config("tiny,task=staging,protocol=scratch", data_dir=cohort["records"], total_steps=2,
                           batch_size=8, **{"staging.lesions_from": lesion_run["workdir"]})
  results = finetune.train(config, str(tmp_path / "staging"))
  assert results["lesions"] == "predicted" and results["n"] == len(results["studies"]) >= 1
  # a staging run is no lesion model: refused before any training, naming the flag
  wrong = config_lib.override(config, {"staging.lesions_from": str(tmp_path / "staging")})
  with pytest.raises(UserError, match=r"^--config.staging.lesions_from .*staging fine-tune, not a lesions one"):
    finetune.train(wrong, str(tmp_path / "never"))
  assert not os.path.exists(tmp_path / "never" / "checkpoints")
