"""grain views over converted records: shapes, geometry, PET/CT alignment, determinism, resume, sharding."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from petfm import rundir
from petfm.data import pipelines, records
from petfm.errors import UserError
from tests.fixtures_records import aligned_intensities, make_cohort

E = 8  # text embedding size of the fixture cohort


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  counts = {"train": 5, "val": 3, "test": 1}
  return make_cohort(str(tmp_path_factory.mktemp("cohort")), counts, embedding_dim=E)


def slab_config(**overrides):
  cfg = pipelines.default_slab_config()
  cfg.update(plane_size=(24, 16), depth=4, samples_per_read=2, read_threads=0)
  cfg.update(overrides)
  return cfg


def crop_config(**overrides):
  cfg = pipelines.default_crop_config()
  cfg.update(crop_size=(12, 10, 8), samples_per_read=2, read_threads=0)
  cfg.update(overrides)
  return cfg


def study_config(**overrides):
  cfg = pipelines.default_study_config()
  cfg.update(plane_size=(16, 8), depth=4, max_slabs=6, read_threads=0)
  cfg.update(overrides)
  return cfg


def take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def stored(data_dir, split):
  """Decoded records of a split in manifest (record) order."""
  split_ = pipelines._Split(data_dir, split)
  return [split_.read(i, ("ct", "suv", "label", "lesions", "organs", "targets")) for i in range(len(split_))]


# -------------------------------------------------------------------------------------------- geometry
def test_view_axes_and_round_trip():
  vol = np.arange(3 * 4 * 5).reshape(3, 4, 5)
  coronal = pipelines.to_view(vol, "coronal")
  axial = pipelines.to_view(vol, "axial")
  assert coronal.shape == (5, 3, 4) and axial.shape == (4, 3, 5)
  for h, w, d in np.ndindex(coronal.shape):  # H superior → inferior, W right → left, D posterior → anterior
    assert coronal[h, w, d] == vol[2 - w, d, 4 - h]
  for h, w, d in np.ndindex(axial.shape):  # H anterior → posterior, W right → left, D inferior → superior
    assert axial[h, w, d] == vol[2 - w, 3 - h, d]
  extra = np.arange(3 * 4 * 5 * 2).reshape(3, 4, 5, 2)
  for view in pipelines.VIEWS:
    np.testing.assert_array_equal(pipelines.from_view(pipelines.to_view(extra, view), view), extra)


def test_resample_diagonal_matches_map_coordinates():
  rng = np.random.default_rng(0)
  array = rng.normal(size=(9, 7, 6)).astype(np.float32)
  for scale, offset in [((1.3, -0.7, 1.0), (-2.2, 5.5, 1.0)), ((0.5, 2.0, -1.0), (3.0, -1.0, 4.0)),
                        ((1, -1, 1), (-3, 8, 2)), ((-1, 1, -1), (10, -2, 3))]:
    out_shape = (11, 5, 7)
    out, valid = pipelines.resample_diagonal(array, scale, offset, out_shape, order=1, cval=-5.0)
    coords = np.stack(np.meshgrid(*[s * np.arange(n) + o for s, o, n in zip(scale, offset, out_shape)],
                                  indexing="ij"))
    inside = np.all((coords >= -0.5) & (coords <= np.array(array.shape)[:, None, None, None] - 0.5), axis=0)
    np.testing.assert_array_equal(valid, inside)
    expected = ndimage.map_coordinates(array, coords.reshape(3, -1), order=1, mode="nearest")
    expected = expected.reshape(out_shape)
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-5)
    assert np.all(out[~inside] == -5.0)
    labels, _ = pipelines.resample_diagonal(array > 0, scale, offset, out_shape, order=0, cval=False)
    assert labels.dtype == bool


def test_normalize_ranges():
  cfg = slab_config()
  ct, pet = pipelines.normalize(np.array([-3000, -1000, 0, 1000, 3000]), np.array([-1, 0, 1, 20, 100]), cfg)
  np.testing.assert_allclose(ct, [-1, -1, 0, 1, 1])
  np.testing.assert_allclose(pet, [-1, -1, 2 * np.log1p(1) / np.log1p(20) - 1, 1, 1], rtol=1e-6)
  cfg.suv_scale = "linear"
  np.testing.assert_allclose(pipelines.normalize(0, np.array([0, 10, 20]), cfg)[1], [-1, 0, 1])


# ------------------------------------------------------------------------------------------------- views
@pytest.mark.parametrize("view,fit", [("coronal", "crop"), ("axial", "resize")])
def test_slab_shapes_and_dtypes(data_dir, view, fit):
  cfg = slab_config(view=view, fit=fit, with_label=True)
  for train in (True, False):
    batch = take(pipelines.slab_dataset(data_dir, "train", cfg, seed=0, train=train, batch_size=4), 1)[0]
    for key in ("pet", "ct", "voxel_valid", "label"):
      assert batch[key].shape == (4, 24, 16, 4), key
    assert batch["pet"].dtype == batch["ct"].dtype == np.float32
    assert batch["label"].dtype == np.uint8 and batch["voxel_valid"].dtype == bool
    assert batch["text_embedding"].shape == (4, E) and batch["text_embedding"].dtype == np.float32
    for key in ("tracer", "stage", "text_id", "index"):
      assert batch[key].shape == (4,) and batch[key].dtype == np.int32, key
    assert batch["valid"].all()
    if not train:  # padding is air, -1 (training adds intensity jitter)
      assert np.all(batch["pet"][~batch["voxel_valid"]] == -1)
  manifest = records.read_manifest(data_dir)
  assert set(batch["text_id"]) <= set(range(len(manifest["prompts"])))


def test_eval_slab_is_the_centre_slab_of_the_study(data_dir):
  cfg = slab_config(plane_size=(40, 32), depth=3)  # plane larger than every study: whole plane, padded
  batches = list(pipelines.slab_dataset(data_dir, "train", cfg, seed=0, train=False, batch_size=2))
  for i, rec in enumerate(stored(data_dir, "train")):
    batch = batches[i // 2]
    ct, pet = pipelines.normalize(rec["ct"], rec["suv"], cfg)
    view_pet, view_ct = pipelines.to_view(pet, cfg.view), pipelines.to_view(ct, cfg.view)
    start = (view_pet.shape[2] - cfg.depth) // 2
    valid = batch["voxel_valid"][i % 2]
    assert valid.sum() == view_pet.shape[0] * view_pet.shape[1] * cfg.depth
    got_pet = batch["pet"][i % 2][valid].reshape(view_pet.shape[0], view_pet.shape[1], cfg.depth)
    got_ct = batch["ct"][i % 2][valid].reshape(view_pet.shape[0], view_pet.shape[1], cfg.depth)
    np.testing.assert_array_equal(got_pet, view_pet[:, :, start:start + cfg.depth])
    np.testing.assert_array_equal(got_ct, view_ct[:, :, start:start + cfg.depth])


def test_pet_and_ct_stay_aligned_under_augmentation(data_dir):
  augment = dict(flips=("lr", "ap", "si"), scale_jitter=0.3, translate=4.0, intensity_scale=0.0,
                 intensity_shift=0.0)
  for view in pipelines.VIEWS:
    cfg = aligned_intensities(slab_config(view=view, with_label=True))
    cfg.augment.update(augment)
    for batch in take(pipelines.slab_dataset(data_dir, "train", cfg, seed=1, train=True, batch_size=4), 3):
      np.testing.assert_allclose(batch["pet"], batch["ct"], atol=1e-5)
  cfg = aligned_intensities(crop_config(channels=("pet", "ct")))
  cfg.augment.update(augment)
  for batch in take(pipelines.crop_dataset(data_dir, "train", cfg, seed=1, train=True, batch_size=4), 3):
    np.testing.assert_allclose(batch["image"][..., 0], batch["image"][..., 1], atol=1e-5)
  cfg = aligned_intensities(study_config())
  cfg.augment.update(augment)
  batch = take(pipelines.study_dataset(data_dir, "train", cfg, seed=1, train=True, batch_size=2), 1)[0]
  np.testing.assert_allclose(batch["pet"], batch["ct"], atol=1e-5)
  # Without zoom every sample is an exact copy: lesion voxels (SUV ≥ 8) are exactly the labelled ones.
  cfg = aligned_intensities(slab_config(with_label=True))
  cfg.augment.update(augment, scale_jitter=0.0)
  seen = 0
  for batch in take(pipelines.slab_dataset(data_dir, "train", cfg, seed=2, train=True, batch_size=4), 4):
    np.testing.assert_array_equal(batch["label"] > 0, batch["pet"] > 7.5 / cfg.suv_clip * 2 - 1)
    seen += batch["label"].sum()
  assert seen > 0


def test_crop_view_centres_on_the_target(data_dir):
  cfg = crop_config()
  recs = stored(data_dir, "val")
  batches = list(pipelines.crop_dataset(data_dir, "val", cfg, seed=0, train=False, batch_size=3))
  samples = [{k: v[j] for k, v in b.items()} for b in batches for j in range(3)]
  expected = [(i, int(r[0]), int(r[1])) for i, rec in enumerate(recs) for r in rec["targets"]]
  got = [(int(s["index"]), int(s["target_kind"]), int(s["target_id"])) for s in samples if s["valid"]]
  assert got == expected  # every target of every study once, in order
  centre = tuple(n // 2 for n in cfg.crop_size)
  for s in samples:
    if s["valid"]:
      rec = recs[s["index"]]
      labels = rec["lesions" if s["target_kind"] == records.TARGET_LESION else "organs"]
      row = next(r for r in rec["targets"] if (r[0], r[1]) == (s["target_kind"], s["target_id"]))
      assert s["mask"][centre] == (labels[tuple(row[3:6])] == s["target_id"])
      assert s["mask"].sum() > 0 and set(np.unique(s["mask"])) <= {0, 1}
  cfg = crop_config(target_kinds=("lesion",))
  cfg.augment.update(translate=2.0, scale_jitter=0.1)
  for batch in take(pipelines.crop_dataset(data_dir, "train", cfg, seed=0, train=True, batch_size=4), 3):
    assert np.all(batch["target_kind"] == records.TARGET_LESION)
    for mask in batch["mask"]:
      com = np.array(ndimage.center_of_mass(mask))
      assert np.all(np.abs(com - (np.array(cfg.crop_size) - 1) / 2) <= 2.0 / 0.9 + 1.5)


def test_study_view_tiles_the_whole_study(data_dir):
  cfg = study_config(fit="crop", plane_size=(40, 32), depth=4, max_slabs=12)
  batches = list(pipelines.study_dataset(data_dir, "val", cfg, seed=0, train=False, batch_size=2))
  assert batches[0]["pet"].shape == (2, 12, 40, 32, 4) and batches[0]["slab_valid"].shape == (2, 12)
  for i, rec in enumerate(stored(data_dir, "val")):
    b, j = divmod(i, 2)
    pet = pipelines.to_view(pipelines.normalize(rec["ct"], rec["suv"], cfg)[1], cfg.view)
    slabs = math.ceil(pet.shape[2] / cfg.depth)
    np.testing.assert_array_equal(batches[b]["slab_valid"][j], np.arange(12) < slabs)
    stacked = np.concatenate(list(batches[b]["pet"][j][:slabs]), axis=-1)  # (H, W, slabs · D)
    valid = np.concatenate(list(batches[b]["voxel_valid"][j][:slabs]), axis=-1)
    assert valid.sum() == pet.size
    h, w = pet.shape[:2]
    rows, cols = np.flatnonzero(valid.any(axis=(1, 2))), np.flatnonzero(valid.any(axis=(0, 2)))
    deep = np.flatnonzero(valid.any(axis=(0, 1)))
    box = stacked[rows[0]:rows[0] + h, cols[0]:cols[0] + w, deep[0]:deep[0] + pet.shape[2]]
    np.testing.assert_array_equal(box, pet)
  assert batches[-1]["valid"].tolist() == [True, False]  # 3 studies, batch 2: last sample is padding
  assert not batches[-1]["pet"][1].any()


# ------------------------------------------------------------------------- determinism, resume, sharding
def test_deterministic_for_a_seed_and_seeds_differ(data_dir):
  cfg = slab_config()
  def run(seed):
    return take(pipelines.slab_dataset(data_dir, "train", cfg, seed=seed, train=True, batch_size=4), 3)

  assert_batches_equal(run(0), run(0))
  assert not np.array_equal(run(0)[0]["pet"], run(1)[0]["pet"])


def test_iterator_state_restores_the_following_batches(data_dir, tmp_path):
  ds = pipelines.crop_dataset(data_dir, "train", crop_config(), seed=0, train=True, batch_size=4)
  it = iter(ds)
  take_from = lambda it, n: [next(it) for _ in range(n)]
  take_from(it, 2)
  state = it.get_state()
  expected = take_from(it, 3)
  fresh = iter(ds)
  fresh.set_state(state)
  assert_batches_equal(take_from(fresh, 3), expected)

  # Through Orbax, as the trainers save it.
  it = iter(ds)
  take_from(it, 2)
  ckpt = rundir.Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=1, async_save=False)
  ckpt.save(2, {"step": jnp.zeros((), jnp.int32)}, it, force=True)
  ckpt.wait()
  restored = iter(ds)
  ckpt.restore(2, {"step": jnp.zeros((), jnp.int32)}, restored)
  ckpt.close()
  assert_batches_equal(take_from(restored, 3), expected)


def test_worker_processes_give_the_same_batches(data_dir):
  cfg = slab_config()
  expected = take(pipelines.slab_dataset(data_dir, "train", cfg, seed=3, train=True, batch_size=4), 3)
  cfg.worker_count = 2
  it = iter(pipelines.slab_dataset(data_dir, "train", cfg, seed=3, train=True, batch_size=4))
  try:
    assert_batches_equal([next(it) for _ in range(3)], expected)
  finally:
    it.close()


def test_host_shards_are_disjoint_and_eval_covers_every_study_once(data_dir):
  """Eval: host i gets studies i::2. Train: host i's batch j is the i-th half of the global batch j that one
  host would draw (so the run does not depend on the host count), and one epoch reads every study once."""
  n = len(stored(data_dir, "train"))
  cfg = slab_config()
  per_host = []
  for host in range(2):
    batches = list(pipelines.slab_dataset(data_dir, "train", cfg, seed=0, train=False, batch_size=2,
                                          shard_index=host, shard_count=2))
    assert len(batches) == 2  # ceil(5 / 2) = 3 studies per host → 2 batches of 2 on both hosts
    per_host.append([int(i) for b in batches for i in b["index"][b["valid"]]])
  assert not set(per_host[0]) & set(per_host[1])
  assert sorted(per_host[0] + per_host[1]) == list(range(n))
  single = list(pipelines.slab_dataset(data_dir, "train", cfg, seed=0, train=False, batch_size=4))
  assert sorted(int(i) for b in single for i in b["index"][b["valid"]]) == list(range(n))
  hosts = [take(pipelines.slab_dataset(data_dir, "train", cfg, seed=0, train=True, batch_size=4,
                                       shard_index=h, shard_count=2), 3) for h in range(2)]
  one = take(pipelines.slab_dataset(data_dir, "train", cfg, seed=0, train=True, batch_size=8), 3)
  assert_batches_equal([{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*hosts)], one)
  reads = np.concatenate([b["index"] for b in one])[::cfg.samples_per_read]   # one study per read
  assert sorted(reads[:n].tolist()) == list(range(n))


# ----------------------------------------------------------------------------------------------- errors
def test_missing_data_dir_and_unknown_split(data_dir, tmp_path):
  with pytest.raises(UserError, match="no manifest.json"):
    pipelines.slab_dataset(str(tmp_path / "nowhere"), "train", slab_config(), seed=0, train=True,
                           batch_size=2)
  with pytest.raises(UserError, match="no split 'tain'"):
    pipelines.slab_dataset(data_dir, "tain", slab_config(), seed=0, train=True, batch_size=2)
  with pytest.raises(UserError, match=r"shard_index=8: must be in \[0, shard_count=8\)"):
    pipelines.slab_dataset(data_dir, "train", slab_config(), seed=0, train=True, batch_size=2, shard_index=8,
                           shard_count=8)
  with pytest.raises(UserError, match="samples_per_read=2: must divide the batch size 3"):
    pipelines.slab_dataset(data_dir, "train", slab_config(), seed=0, train=True, batch_size=3)


@pytest.mark.parametrize("make,field,value,message", [
    (slab_config, "view", "sagittal", "config.data.view: 'sagittal' is not one of"),
    (slab_config, "plane_size", (24, 0), r"config.data.plane_size: \(24, 0\) must be 2 positive numbers"),
    (slab_config, "fit", "stretch", "config.data.fit: 'stretch' is not one of"),
    (slab_config, "ct_clip", (100.0, -100.0), "config.data.ct_clip: low 100.0 must be below high -100.0"),
    (slab_config, "suv_scale", "sqrt", "config.data.suv_scale"),
    (slab_config, "worker_count", -1, "config.data.worker_count: must be >= 0"),
    (crop_config, "target_kinds", ("tumour",), "config.data.target_kinds"),
    (crop_config, "channels", ("ct",), "config.data.channels"),
    (study_config, "max_slabs", 0, "config.data.max_slabs: must be >= 1"),
])
def test_bad_config_values(data_dir, make, field, value, message):
  cfg = make()
  cfg[field] = value
  dataset = {slab_config: pipelines.slab_dataset, crop_config: pipelines.crop_dataset,
             study_config: pipelines.study_dataset}[make]
  with pytest.raises(UserError, match=message):
    dataset(data_dir, "train", cfg, seed=0, train=True, batch_size=2)


def test_bad_augment_value(data_dir):
  cfg = slab_config()
  cfg.augment.flips = ("up",)
  with pytest.raises(UserError, match="config.data.augment.flips"):
    pipelines.slab_dataset(data_dir, "train", cfg, seed=0, train=True, batch_size=2)
