"""Synthetic PET/CT cohort: layout, determinism, tracer tables, stage ↔ lesions, conversion, bad input."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import TOTALSEG_DIR
from scipy import ndimage

from data_prep import anatomy, convert, synthetic
from data_prep.configs import convert as convert_configs
from petfm import cli
from petfm.data import records
from petfm.downstream import data as ddata
from petfm.eval import staging

NAMES = {str(i): name for i, name in anatomy.ORGAN_LABELS.items()}   # organs.json / manifest organ_labels
SCALE = 0.3  # voxels ≈ 11 × 11 × 15 mm: a whole body in ≈ 50 × 50 × 75 voxels


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  out = tmp_path_factory.mktemp("cohort")
  assert cli.main(["synthetic", "--out", str(out), "--n", "3", "--seed", "7", "--workers", "1",
                   "--scale", str(SCALE)]) == 0
  return out


def load(folder, name):
  image = nib.load(os.path.join(folder, name))
  return np.asanyarray(image.dataobj), image.affine


def reference_stage(seg: np.ndarray, organs: np.ndarray) -> int:
  """Ann Arbor stage from the mask and organ map alone: each 26-connected lesion's site is its organ label."""
  components, count = ndimage.label(seg > 0, np.ones((3, 3, 3), bool))
  sites = set()
  for i in range(1, count + 1):
    labels = np.unique(organs[components == i])
    assert len(labels) == 1, f"lesion {i} spans labels {labels}"
    sites.add(int(labels[0]))
  extranodal = {anatomy.LABEL_IDS[n] for n in ("liver", "lungs", "bone", "spine")}
  above = {anatomy.LABEL_IDS[f"nodes_{n}"] for n in ("cervical_right", "cervical_left", "axillary_right",
                                                     "axillary_left", "mediastinal")}
  assert sites <= extranodal | set(range(20, 31)), f"lesions outside stations and extranodal organs {sites}"
  if sites & extranodal:
    return 4
  if sites & above and sites - above:
    return 3
  return 2 if len(sites) > 1 else 1


def test_layout_dtypes_meta_and_organ_table(cohort):
  ids = sorted(n for n in os.listdir(cohort) if not n.endswith(".json"))
  assert ids == ["synth_0000", "synth_0001", "synth_0002"]
  with open(cohort / "organs.json") as f:
    assert {int(k): v for k, v in json.load(f).items()} == anatomy.ORGAN_LABELS
  for study_id in ids:
    folder = cohort / study_id
    assert sorted(os.listdir(folder)) == sorted(synthetic.FILES)
    arrays = {name: load(folder, name) for name in synthetic.FILES[:4]}
    dtypes = [a.dtype for a, _ in arrays.values()]
    assert dtypes == [np.int16, np.float32, np.uint8, np.uint8]
    shapes = {a.shape for a, _ in arrays.values()}
    affines = [aff for _, aff in arrays.values()]
    assert len(shapes) == 1 and all(np.allclose(a, affines[0]) for a in affines)
    assert affines[0][0, 0] < 0 and affines[0][1, 1] < 0  # scanner-style storage order
    seg, organs = arrays["SEG.nii.gz"][0], arrays["ORGANS.nii.gz"][0]
    assert seg.max() == 1 and arrays["SUV.nii.gz"][0].min() >= 0
    assert set(np.unique(organs)) - {0} <= set(anatomy.ORGAN_LABELS)
    with open(folder / "meta.json") as f:
      meta = json.load(f)
    assert meta["tracer"] in ("FDG", "PSMA") and meta["sex"] in ("M", "F") and isinstance(meta["age"], int)
    assert meta["ann_arbor_stage"] in (1, 2, 3, 4) and meta["diagnosis"] and meta["patient_id"]
    assert meta["ann_arbor_stage"] == reference_stage(seg, organs)


def test_same_seed_same_bytes_any_worker_count_different_seed_differs(cohort, tmp_path):
  assert synthetic.generate(str(tmp_path / "a"), 2, seed=7, workers=2, scale=SCALE, progress=False) == [
      "synth_0000", "synth_0001"]
  for study_id in ("synth_0000", "synth_0001"):
    for name in synthetic.FILES:
      with open(cohort / study_id / name, "rb") as f, open(tmp_path / "a" / study_id / name, "rb") as g:
        assert f.read() == g.read(), (study_id, name)
  a, b = synthetic.make_study(7, 0, SCALE), synthetic.make_study(8, 0, SCALE)
  assert a.ct.shape != b.ct.shape or not np.array_equal(a.ct, b.ct)
  assert not np.array_equal(synthetic.make_study(7, 1, SCALE).suv, a.suv)


@pytest.mark.parametrize("tracer", ["FDG", "PSMA"])
def test_organ_hu_and_suv_follow_the_tables(tracer):
  draw = lambda i: synthetic._draw_subject(np.random.default_rng([3, i]), i, "s")  # noqa: E731  as make_study
  index = next(i for i in range(20) if draw(i)["tracer"] == tracer)
  study = synthetic.make_study(3, index, scale=0.5)
  assert study.meta["tracer"] == tracer
  ids = anatomy.LABEL_IDS
  inside = lambda name: ndimage.binary_erosion(study.organs == ids[name]) & (study.seg == 0)  # noqa: E731
  suv = {n: float(np.median(study.suv[inside(n)])) for n in ("brain", "liver", "muscle", "lungs", "kidneys")}
  suv["salivary_glands"] = float(np.percentile(study.suv[study.organs == ids["salivary_glands"]], 90))
  table = anatomy.SUV_TABLE[tracer]
  for name in ("brain", "liver", "muscle", "lungs"):
    assert 0.55 < suv[name] / table[name] < 1.6, (name, suv[name], table[name])
  if tracer == "FDG":
    assert suv["brain"] > suv["liver"] > suv["muscle"] > suv["lungs"]
  else:
    assert suv["salivary_glands"] > 3 * suv["brain"] and suv["kidneys"] > suv["liver"] > suv["muscle"]
  hu = {n: float(np.median(study.ct[inside(n)]))
        for n in ("lungs", "liver", "brain", "muscle", "subcutaneous_fat")}
  assert -900 < hu["lungs"] < -800 and 40 < hu["liver"] < 80 and 20 < hu["brain"] < 50
  assert 30 < hu["muscle"] < 70 and -130 < hu["subcutaneous_fat"] < -70
  assert np.percentile(study.ct[study.organs == ids["bone"]], 90) > 650  # cortical bone


def test_stage_follows_lesion_placement_and_lesion_suv_range():
  stages = []
  for index in range(12):
    study = synthetic.make_study(11, index, scale=0.25)
    lesion_suv = study.suv_true[study.seg > 0]
    assert lesion_suv.size and lesion_suv.min() >= 3 and lesion_suv.max() <= 20
    assert study.meta["ann_arbor_stage"] == reference_stage(study.seg, study.organs)
    assert staging.stage_from_lesions(study.seg, study.organs, NAMES) == study.meta["ann_arbor_stage"]
    stages.append(study.meta["ann_arbor_stage"])
  assert len(set(stages)) >= 3, stages


def test_converter_reads_the_cohort_with_its_defaults(cohort, tmp_path):
  summary = convert.convert(str(cohort), str(tmp_path / "rec"), convert_configs.get_config(), workers=1,
                            progress=False)
  assert summary.converted == 3 and not summary.errors and summary.layout == "autopet"
  manifest = records.read_manifest(str(tmp_path / "rec"))
  for entry in manifest["studies"]:
    with open(cohort / entry["study_id"] / "meta.json") as f:
      meta = json.load(f)
    assert (entry["tracer"], entry["stage"], entry["patient_id"]) == (meta["tracer"], meta["ann_arbor_stage"],
                                                                     meta["patient_id"])
    assert entry["lesions"] and entry["spacing"] == [4.0, 4.0, 4.0]
  assert manifest["organ_labels"] == NAMES
  # the staging rule on the stored (resampled) lesion and organ maps gives the stored stage
  stored = [r for split in ("train", "val", "test")
            for r in ddata.read_records(str(tmp_path / "rec"), split, ("label", "organs", "stage"))]
  assert len(stored) == 3
  for record in stored:
    assert staging.stage_from_lesions(record["label"], record["organs"], NAMES) == record["stage"]


def test_rerun_skips_finished_studies_and_failed_writes_leave_nothing(cohort, tmp_path, monkeypatch):
  out = tmp_path / "c"
  assert synthetic.generate(str(out), 1, seed=7, scale=SCALE, progress=False) == ["synth_0000"]
  stamp = os.stat(out / "synth_0000" / "SUV.nii.gz").st_mtime_ns
  os.makedirs(out / ".tmp-synth_0001-999")  # left by a killed run
  assert synthetic.generate(str(out), 2, seed=7, scale=SCALE, progress=False) == ["synth_0001"]
  assert os.stat(out / "synth_0000" / "SUV.nii.gz").st_mtime_ns == stamp
  assert sorted(os.listdir(out)) == ["organs.json", "synth_0000", "synth_0001"]

  def failing_save(image, path):
    raise OSError("disk full")

  monkeypatch.setattr(nib, "save", failing_save)
  with pytest.raises(OSError):
    synthetic.generate(str(out), 3, seed=7, scale=SCALE, progress=False)
  assert sorted(os.listdir(out)) == ["organs.json", "synth_0000", "synth_0001"]


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n=0: must be ≥ 1"),
    (["--n", "2", "--out-is-file"], "is a file"),
    (["--n", "1", "--from-ct", "/nonexistent/ct"], "--from-ct /nonexistent/ct: no such folder"),
    (["--n", "x"], "command line:"),
])
def test_bad_arguments_one_line_exit_2(tmp_path, capsys, args, message):
  out = tmp_path / "out"
  if "--out-is-file" in args:
    args = [a for a in args if a != "--out-is-file"]
    out.write_text("not a folder")
  assert cli.main(["synthetic", "--out", str(out), *args]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err, err


def test_from_real_ct_with_totalsegmentator_labels(tmp_path):
  if not (TOTALSEG_DIR / "example_ct.nii.gz").exists():
    pytest.skip(f"real CT not found at {TOTALSEG_DIR} (shared/data/totalseg beside the checkout, or set "
                "PETFM_TOTALSEG_DIR)")
  out = tmp_path / "ct"
  assert cli.main(["synthetic", "--out", str(out), "--n", "2", "--seed", "1", "--workers", "1", "--from-ct",
                   str(TOTALSEG_DIR)]) == 0
  ct_source = nib.as_closest_canonical(nib.load(TOTALSEG_DIR / "example_ct.nii.gz"))
  for study_id in ("example_ct_0000", "example_ct_0001"):
    folder = out / study_id
    ct, affine = load(folder, "CTres.nii.gz")
    suv, _ = load(folder, "SUV.nii.gz")
    seg, _ = load(folder, "SEG.nii.gz")
    organs, _ = load(folder, "ORGANS.nii.gz")
    with open(folder / "meta.json") as f:
      meta = json.load(f)
    assert np.allclose(affine, ct_source.affine) and ct.shape == ct_source.shape
    unchanged = seg == 0
    assert np.array_equal(ct[unchanged], np.asarray(ct_source.dataobj)[unchanged].clip(-1024, 3071))
    ids = anatomy.LABEL_IDS
    assert {ids[n] for n in ("liver", "kidneys", "spleen", "bladder", "spine")} <= set(np.unique(organs))
    inside = lambda name: ndimage.binary_erosion(organs == ids[name]) & (seg == 0)  # noqa: E731
    liver, muscle = np.median(suv[inside("liver")]), np.median(suv[inside("muscle")])
    assert 0.6 < liver / anatomy.SUV_TABLE[meta["tracer"]]["liver"] < 1.5 and liver > muscle
    assert meta["ann_arbor_stage"] == reference_stage(seg, organs)
  summary = convert.convert(str(out), str(tmp_path / "rec"), convert_configs.get_config(), progress=False)
  assert summary.converted == 2 and not summary.errors


def test_from_ct_folder_without_a_ct_label_pair_is_a_user_error(tmp_path):
  nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "ct.nii.gz")
  nib.save(nib.Nifti1Image(np.zeros((5, 4, 4), np.uint8), np.eye(4)), tmp_path / "seg.nii.gz")
  with pytest.raises(synthetic.UserError, match="no CT with a TotalSegmentator label map on the same grid"):
    synthetic.find_ct_pair(str(tmp_path))
