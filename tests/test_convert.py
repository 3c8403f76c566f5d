"""NIfTI → ArrayRecord: layouts, round trip, orientation, bad input, resume, atomicity, splits, TFDS."""

import gzip
import json
import os
import struct
import subprocess
import sys
import types

import nibabel as nib
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from conftest import REPO, TOTALSEG_DIR
from scipy import ndimage

from data_prep import convert
from data_prep.configs import convert as convert_configs
from petfm.data import geometry, records
from petfm.errors import UserError

SHAPE = (24, 20, 30)
AFFINE = np.array([[2.0, 0, 0, -24], [0, 2.0, 0, -20], [0, 0, 3.0, -45], [0, 0, 0, 1]])


# ------------------------------------------------------------------------------------------ fixture builder
def phantom(seed: int, shape=SHAPE) -> dict[str, np.ndarray]:
  """A tiny PET/CT study: body, liver (organ 5), bladder (21), two separate lesions. Arrays (X, Y, Z)."""
  rng = np.random.default_rng(seed)
  grid = np.indices(shape, dtype=np.float64)
  rel = [(grid[a] - (shape[a] - 1) / 2) / shape[a] for a in range(3)]
  body = rel[0] ** 2 + rel[1] ** 2 + (rel[2] / 1.3) ** 2 < 0.16
  organs = np.zeros(shape, np.uint8)
  organs[body & (rel[0] > 0.05) & (rel[2] > 0.05)] = 5
  organs[body & (np.abs(rel[0]) < 0.12) & (rel[2] < -0.25)] = 21
  seg = np.zeros(shape, np.uint8)
  for centre in ([0.3, 0.5, 0.35], [0.65, 0.45, 0.7]):
    c = np.array(centre) * shape + rng.integers(-1, 2, 3)
    offset_mm = (grid - c[:, None, None, None]) * np.array([2.0, 2.0, 3.0])[:, None, None, None]
    distance_mm = np.linalg.norm(offset_mm, axis=0)
    seg[distance_mm <= 5.0] = 1
  ct = np.where(body, 40.0, -1000.0) + 60 * (organs == 5) + rng.normal(0, 15, shape)
  suv = 0.05 + 0.7 * body + 1.3 * (organs == 5) + 12 * (organs == 21) + rng.uniform(4, 10) * seg
  suv = np.clip(suv + rng.normal(0, 0.05, shape), 0, None)
  return {"ct": ct.astype(np.int16), "suv": suv.astype(np.float32), "seg": seg, "organs": organs}


def save(path, array, affine=AFFINE) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(nib.Nifti1Image(array, affine), path)


def write_autopet(root, patient, study, volumes, affine=AFFINE, meta=None) -> str:
  """One study in the autoPET I/II layout (+ ORGANS.nii.gz and meta.json like the synthetic cohort)."""
  folder = os.path.join(root, patient, study)
  os.makedirs(folder, exist_ok=True)
  for name, key in [("CTres", "ct"), ("SUV", "suv"), ("SEG", "seg"), ("ORGANS", "organs")]:
    if key in volumes:
      save(os.path.join(folder, f"{name}.nii.gz"), volumes[key], affine)
  if meta is not None:
    with open(os.path.join(folder, "meta.json"), "w") as f:
      json.dump(meta, f)
  return folder


def write_nnunet(root, case, volumes, affine=AFFINE) -> None:
  save(os.path.join(root, "imagesTr", f"{case}_0000.nii.gz"), volumes["ct"], affine)
  save(os.path.join(root, "imagesTr", f"{case}_0001.nii.gz"), volumes["suv"], affine)
  save(os.path.join(root, "labelsTr", f"{case}.nii.gz"), volumes["seg"], affine)


def reoriented(volumes, affine, flips=(True, True, False), order=(0, 1, 2)):
  """The same study stored with flipped and/or permuted axes: every voxel keeps its world position."""
  shape = np.array(next(iter(volumes.values())).shape)
  new_affine = affine.copy()
  for axis, flip in enumerate(flips):
    if flip:
      new_affine[:3, 3] += new_affine[:3, axis] * (shape[axis] - 1)
      new_affine[:3, axis] *= -1
  new_affine[:, :3] = new_affine[:, list(order)]
  index = tuple(slice(None, None, -1) if f else slice(None) for f in flips)
  return {k: np.ascontiguousarray(v[index].transpose(order)) for k, v in volumes.items()}, new_affine


def config(**overrides):
  c = convert_configs.get_config()
  c.update(overrides)
  return c


def run(input_dir, output_dir, workers=1, **overrides) -> convert.Summary:
  return convert.convert(str(input_dir), str(output_dir), config(**overrides), workers=workers,
                         progress=False)


def load_records(output_dir) -> dict[str, dict]:
  """Every record of a converted folder, keyed by study id, read through the manifest's shard lists."""
  manifest = records.read_manifest(str(output_dir))
  out = {}
  for info in manifest["splits"].values():
    for shard in info["shards"]:
      reader = ArrayRecordReader(os.path.join(output_dir, shard))
      assert "group_size:1" in reader.writer_options_string()
      for data in reader.read_all():
        record = records.decode(data)
        out[record["study_id"]] = record
      reader.close()
  return out


def assert_records_equal(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for key in a:
    if isinstance(a[key], np.ndarray):
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    elif isinstance(a[key], float) and np.isnan(a[key]):
      assert np.isnan(b[key]), key
    else:
      assert a[key] == b[key], key


# ----------------------------------------------------------------------------------------------- round trip
def test_autopet_round_trip_at_native_spacing(tmp_path):
  meta = {"tracer": "PSMA", "age": 61, "sex": "male", "diagnosis": "prostate cancer", "stage": "IIIB"}
  volumes = {name: phantom(i) for i, name in enumerate(["s0", "s1", "s2"])}
  volumes["s2"]["seg"][2, 2, 2] = volumes["s2"]["seg"][3, 3, 3] = 1  # touching at a corner: one lesion
  write_autopet(tmp_path / "in", "PETCT_aa", "s0", volumes["s0"], meta=meta)
  write_autopet(tmp_path / "in", "PETCT_aa", "s1", volumes["s1"])
  write_autopet(tmp_path / "in", "PETCT_bb", "s2", {k: v for k, v in volumes["s2"].items() if k != "organs"})
  summary = run(tmp_path / "in", tmp_path / "out", spacing=(2.0, 2.0, 3.0),
                prompt_template="{tracer} PET/CT, {age} {sex}, {diagnosis}")
  assert (summary.converted, summary.skipped, summary.failed) == (3, 0, 0)
  got = load_records(tmp_path / "out")
  assert sorted(got) == ["PETCT_aa/s0", "PETCT_aa/s1", "PETCT_bb/s2"]
  for name, vol in volumes.items():
    record = next(r for k, r in got.items() if k.endswith(name))
    np.testing.assert_array_equal(record["ct"], vol["ct"])
    np.testing.assert_array_equal(record["suv"], vol["suv"])
    np.testing.assert_array_equal(record["label"], vol["seg"])
    np.testing.assert_array_equal(record["organs"], vol["organs"] if name != "s2" else 0)
    assert record["ct"].dtype == np.int16 and record["suv"].dtype == np.float32
    assert record["label"].dtype == np.uint8 and record["lesions"].dtype == np.uint16
    assert record["lesions"].max() == (3 if name == "s2" else 2)  # components with 26-connectivity
    np.testing.assert_array_equal(record["lesions"] > 0, vol["seg"] > 0)
    lesion_rows = record["targets"][record["targets"][:, 0] == records.TARGET_LESION]
    for kind, ident, voxels, *centre in lesion_rows:
      assert voxels == np.count_nonzero(record["lesions"] == ident)
      np.testing.assert_allclose(centre, ndimage.center_of_mass(record["lesions"] == ident), atol=0.5)
    organ_ids = record["targets"][record["targets"][:, 0] == records.TARGET_ORGAN][:, 1]
    assert sorted(organ_ids) == ([] if name == "s2" else [5, 21])
    np.testing.assert_allclose(record["affine"], AFFINE)
    np.testing.assert_allclose(record["original_affine"], AFFINE)
    np.testing.assert_array_equal(record["original_shape"], SHAPE)
    np.testing.assert_allclose(record["spacing"], [2, 2, 3])
    assert record["source"] == "autopet" and record["text_embedding"].shape == (0,)
  s0, s1 = got["PETCT_aa/s0"], got["PETCT_aa/s1"]
  assert (s0["tracer"], s0["age"], s0["sex"], s0["stage"], s0["diagnosis"]) == ("PSMA", 61.0, "M", 3,
                                                                                 "prostate cancer")
  assert s0["text"] == "PSMA PET/CT, 61-year-old male, prostate cancer"
  assert (s1["tracer"], s1["sex"], s1["stage"], s1["diagnosis"]) == ("FDG", "unknown", 0, "")
  assert s1["text"] == "FDG PET/CT"
  assert np.isnan(s1["age"])
  assert s0["patient_id"] == s1["patient_id"] == "PETCT_aa" and s0["split"] == s1["split"]

  manifest = records.read_manifest(str(tmp_path / "out"))
  assert sum(info["num_records"] for info in manifest["splits"].values()) == 3
  assert manifest["prompts"] == sorted({r["text"] for r in got.values()})
  for entry in manifest["studies"]:
    reader = ArrayRecordReader(str(tmp_path / "out" / entry["shard"]))
    record = records.decode(reader.read([entry["index"]])[0])
    reader.close()
    assert record["study_id"] == entry["study_id"] and record["split"] == entry["split"]
    assert entry["shape"] == list(SHAPE) and entry["has_label"]
    assert sorted(v for _, v in entry["lesions"]) == sorted(np.bincount(record["lesions"].ravel())[1:])


def test_resampled_study_matches_direct_nibabel_and_geometry(tmp_path):
  vol = phantom(3)
  flipped, lps = reoriented(vol, AFFINE)
  folder = write_autopet(tmp_path / "in", "PETCT_cc", "s", flipped, affine=lps)
  run(tmp_path / "in", tmp_path / "out")  # default 4 mm
  record = load_records(tmp_path / "out")["PETCT_cc/s"]
  pet = nib.as_closest_canonical(nib.load(os.path.join(folder, "SUV.nii.gz")))
  grid, shape = geometry.grid_at_spacing(pet.affine, pet.shape, 4.0)
  expected = {}
  for name, key, order, cval in [("SUV", "suv", 1, 0), ("CTres", "ct", 1, -1024), ("SEG", "label", 0, 0),
                                 ("ORGANS", "organs", 0, 0)]:
    image = nib.as_closest_canonical(nib.load(os.path.join(folder, f"{name}.nii.gz")))
    expected[key] = geometry.resample(np.asanyarray(image.dataobj), image.affine, grid, shape, order, cval)
  np.testing.assert_array_equal(record["suv"], expected["suv"])
  np.testing.assert_array_equal(record["ct"], np.rint(expected["ct"]).astype(np.int16))
  np.testing.assert_array_equal(record["label"], expected["label"])
  np.testing.assert_array_equal(record["organs"], expected["organs"])
  np.testing.assert_allclose(record["affine"], grid)
  np.testing.assert_allclose(record["original_affine"], lps)
  # A stored mask maps back onto the input grid (what a viewer overlays), up to the 4 mm resolution.
  back = geometry.to_original(record["organs"], record["affine"], record["original_affine"],
                              record["original_shape"])
  liver, liver_back = flipped["organs"] == 5, back == 5
  assert back.shape == SHAPE and 2 * np.sum(liver & liver_back) / (liver.sum() + liver_back.sum()) > 0.9


def test_flipped_and_permuted_copies_give_the_same_canonical_arrays(tmp_path):
  vol = phantom(4)
  write_autopet(tmp_path / "in", "PETCT_r", "ras", vol)
  write_autopet(tmp_path / "in", "PETCT_l", "lps", *reoriented(vol, AFFINE, (True, True, False)))
  write_autopet(tmp_path / "in", "PETCT_p", "zxy", *reoriented(vol, AFFINE, (False, True, True), (2, 0, 1)))
  for spacing in [(2.0, 2.0, 3.0), (4.0, 4.0, 4.0)]:
    run(tmp_path / "in", tmp_path / f"out{spacing[0]}", spacing=spacing)
    got = load_records(tmp_path / f"out{spacing[0]}")
    reference = got["PETCT_r/ras"]
    for other in ["PETCT_l/lps", "PETCT_p/zxy"]:
      for key in ["ct", "suv", "label", "lesions", "organs", "targets"]:
        np.testing.assert_array_equal(got[other][key], reference[key], err_msg=f"{other} {key}")
      np.testing.assert_allclose(got[other]["affine"], reference["affine"], atol=1e-9)


def test_nnunet_layout_tracer_and_patient_from_case_names(tmp_path):
  cases = ["fdg_0cda25453b_10-12-2003-NA-PET-CT Ganzkoerper  primaer mit KM-47333",
           "psma_95b833d46f153cd2_2018-04-16", "synth_0007"]
  for i, case in enumerate(cases):
    write_nnunet(tmp_path / "in", case, phantom(10 + i))
  summary = run(tmp_path / "in", tmp_path / "out")
  assert summary.layout == "nnunet" and summary.converted == 3
  got = load_records(tmp_path / "out")
  assert [(got[c]["tracer"], got[c]["patient_id"], got[c]["text"]) for c in cases] == [
      ("FDG", "fdg_0cda25453b", "FDG PET/CT"), ("PSMA", "psma_95b833d46f153cd2", "PSMA PET/CT"),
      ("unknown", "synth_0007", "PET/CT")]
  assert all(r["source"] == "nnunet" and r["lesions"].max() == 2 for r in got.values())


@pytest.mark.parametrize("per_patient", [False, True])
def test_hecktor_ct_and_pet_on_different_grids(tmp_path, per_patient):
  pet_affine = np.diag([4.0, 4.0, 4.0, 1.0])
  pet_affine[:3, 3] = [-46, -38, -58]
  pet_shape = (24, 20, 30)
  # CT: 1 × 1 × 3 mm over a smaller field of view, HU a linear function of world position, so trilinear
  # resampling onto any grid has an exact reference.
  ct_affine = np.diag([1.0, 1.0, 3.0, 1.0])
  ct_affine[:3, 3] = [-30, -25, -40]
  ct_shape = (60, 50, 27)

  def world(affine, shape):  # (3, X, Y, Z) mm
    return np.tensordot(affine[:3, :3], np.indices(shape, float), 1) + affine[:3, 3, None, None, None]

  def hu(xyz):
    return 3.0 * xyz[0] - 2.0 * xyz[1] + 1.5 * xyz[2] + 10

  label = np.zeros(pet_shape, np.uint8)
  label[8:12, 8:11, 10:14] = 1  # GTVp
  label[15:17, 12:14, 18:20] = 2  # GTVn
  suv = phantom(5, pet_shape)["suv"]
  for case in ["CHUM-001", "CHUP-002"]:
    folder = os.path.join(tmp_path, "in", case if per_patient else "imagesTr")
    ct = hu(world(ct_affine, ct_shape)).astype(np.float32)
    save(os.path.join(folder, f"{case}__CT.nii.gz"), ct, ct_affine)
    save(os.path.join(folder, f"{case}__PT.nii.gz"), suv, pet_affine)
    labels = folder if per_patient else os.path.join(tmp_path, "in", "labelsTr")
    save(os.path.join(labels, f"{case}.nii.gz"), label, pet_affine)
  summary = run(tmp_path / "in", tmp_path / "out")
  assert summary.layout == "hecktor" and summary.converted == 2
  record = load_records(tmp_path / "out")["CHUM-001"]
  np.testing.assert_allclose(record["affine"], pet_affine)  # 4 mm PET grid = stored grid
  np.testing.assert_array_equal(record["suv"], suv)
  np.testing.assert_array_equal(record["label"], label)
  assert record["lesions"].max() == 2 and record["tracer"] == "FDG"
  low, high = geometry.world_bounds(ct_affine, ct_shape)
  xyz = world(pet_affine, pet_shape)
  inside = np.all((xyz >= low[:, None, None, None]) & (xyz <= high[:, None, None, None]), axis=0)
  assert 0.1 < inside.mean() < 0.9
  np.testing.assert_allclose(record["ct"][inside], hu(xyz)[inside], atol=0.51)
  assert np.all(record["ct"][~inside] == -1024)


# --------------------------------------------------------------------------------------------- bad input
def _patch_pixdim(path, axis, value):
  """Rewrites pixdim[axis] in a .nii.gz and makes the qform (which uses it) the only affine."""
  data = bytearray(gzip.decompress(open(path, "rb").read()))
  data[76 + 4 * axis:80 + 4 * axis] = struct.pack("<f", value)
  data[252:256] = struct.pack("<hh", 1, 0)  # qform_code 1, sform_code 0
  open(path, "wb").write(gzip.compress(bytes(data)))


BAD_STUDIES = {  # study → (how it is broken, words the error line must contain)
    "truncated": ("SUV.nii.gz cut in half", "truncated"),
    "corrupt": ("CTres.nii.gz is garbage", "not a readable NIfTI"),
    "missing": ("SEG.nii.gz deleted", "missing"),
    "four_d": ("PET with 2 frames", "3-D"),
    "nan": ("NaN voxels in the SUV", "NaN"),
    "zero_spacing": ("pixdim 0 in the PET header", "zero"),
    "absurd_spacing": ("50 mm voxels", "outside [0.1, 20] mm"),
    "misaligned": ("same shape, CT 300 mm away", "cannot align"),
    "no_overlap": ("CT on another grid far away", "cannot be aligned"),
    "empty_label": ("all-zero lesion mask", "allow_empty_label=True"),
    "bad_meta": ("stage V in meta.json", "Ann Arbor"),
}


def write_bad_cohort(root) -> None:
  for i, name in enumerate(["good_a", "good_b", *BAD_STUDIES]):
    vol = phantom(20 + i)
    affine = AFFINE.copy()
    if name == "four_d":
      vol["suv"] = np.stack([vol["suv"]] * 2, axis=-1)
    if name == "nan":
      vol["suv"][3, 4, 5] = np.nan
    if name == "absurd_spacing":
      affine[0, 0] = 50.0
    if name == "empty_label":
      vol["seg"][:] = 0
    folder = write_autopet(root, name, "study", vol, affine=affine,
                           meta={"stage": "V"} if name == "bad_meta" else None)
    if name == "truncated":
      data = open(os.path.join(folder, "SUV.nii.gz"), "rb").read()
      open(os.path.join(folder, "SUV.nii.gz"), "wb").write(data[:len(data) // 2])
    if name == "corrupt":
      open(os.path.join(folder, "CTres.nii.gz"), "wb").write(b"not a nifti file" * 20)
    if name == "missing":
      os.remove(os.path.join(folder, "SEG.nii.gz"))
    if name == "zero_spacing":
      _patch_pixdim(os.path.join(folder, "SUV.nii.gz"), 1, 0.0)
    if name == "misaligned":
      shifted = AFFINE.copy()
      shifted[0, 3] += 300
      save(os.path.join(folder, "CTres.nii.gz"), vol["ct"], shifted)
    if name == "no_overlap":
      far = np.diag([4.0, 4.0, 4.0, 1.0])
      far[:3, 3] = [500, 500, 500]
      save(os.path.join(folder, "CTres.nii.gz"), vol["ct"][::2, ::2, ::2], far)


def test_every_bad_input_gives_one_line_and_the_rest_convert(tmp_path, capsys):
  write_bad_cohort(tmp_path / "in")
  summary = run(tmp_path / "in", tmp_path / "out")
  assert summary.converted == 2 and summary.failed == len(BAD_STUDIES)
  for name, (_, words) in BAD_STUDIES.items():
    lines = [e for e in summary.errors if e.startswith(f"study {name}/study:")]
    assert len(lines) == 1 and "\n" not in lines[0], (name, summary.errors)
    assert words in lines[0], (name, lines[0])
  stderr = capsys.readouterr().err
  assert stderr.count("error: study ") == len(BAD_STUDIES) and "Traceback" not in stderr
  assert sorted(load_records(tmp_path / "out")) == ["good_a/study", "good_b/study"]
  manifest = records.read_manifest(str(tmp_path / "out"))
  assert sorted(manifest["errors"]) == sorted(summary.errors)

  # Negative controls and studies without a label file are kept on request (a changed config converts every
  # study again).
  summary = run(tmp_path / "in", tmp_path / "out", allow_empty_label=True, require_label=False)
  assert (summary.converted, summary.skipped, summary.failed) == (4, 0, len(BAD_STUDIES) - 2)
  got = load_records(tmp_path / "out")
  for name in ("empty_label/study", "missing/study"):
    assert got[name]["label"].max() == 0 and not np.any(got[name]["targets"][:, 0] == records.TARGET_LESION)
  has_label = {s["study_id"]: s["has_label"] for s in records.read_manifest(str(tmp_path / "out"))["studies"]}
  assert has_label == {"good_a/study": True, "good_b/study": True, "empty_label/study": True,
                       "missing/study": False}


def _cli(*args, cwd=REPO):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)


def test_cli_bad_input_one_line_no_traceback_nonzero_exit(tmp_path):
  for i, name in enumerate(["a", "b", "c"]):
    folder = write_autopet(tmp_path / "in", f"PETCT_{name}", "study", phantom(30 + i))
  suv = os.path.join(folder, "SUV.nii.gz")
  open(suv, "wb").write(open(suv, "rb").read()[:300])
  result = _cli("-m", "data_prep.convert", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                "--workers", "2")
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if "error:" in line]
  assert len(errors) == 1 and "study PETCT_c/study: SUV.nii.gz (PET)" in errors[0], result.stderr
  assert "converted 2, skipped 0 (already converted), failed 1" in result.stdout
  assert len(load_records(tmp_path / "out")) == 2

  result = _cli("-m", "petfm.cli", "prepare", "--input", str(tmp_path / "in"),
                "--output", str(tmp_path / "o2"), "--config.spacing=(0,0,0)")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("petfm prepare: error: config.spacing")


# ------------------------------------------------------------------------------------ resume and atomicity
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, monkeypatch):
  for i in range(4):
    write_autopet(tmp_path / "in", f"PETCT_{i}", "study", phantom(40 + i))
  run(tmp_path / "in", tmp_path / "uninterrupted")
  real = convert.convert_study
  calls = []

  def interrupted_after_two(job, cfg):
    if len(calls) == 2:
      raise KeyboardInterrupt
    calls.append(job.study.study_id)
    return real(job, cfg)

  monkeypatch.setattr(convert, "convert_study", interrupted_after_two)
  with pytest.raises(KeyboardInterrupt):
    run(tmp_path / "in", tmp_path / "out")
  assert not os.path.exists(tmp_path / "out" / records.MANIFEST)
  assert len(os.listdir(tmp_path / "out" / convert.STAGING)) == 2

  def counting(job, cfg):
    calls.append(job.study.study_id)
    return real(job, cfg)

  monkeypatch.setattr(convert, "convert_study", counting)
  summary = run(tmp_path / "in", tmp_path / "out")
  assert (summary.converted, summary.skipped) == (2, 2) and len(set(calls)) == 4 and len(calls) == 4
  expected, got = load_records(tmp_path / "uninterrupted"), load_records(tmp_path / "out")
  assert expected.keys() == got.keys()
  for study in expected:
    assert_records_equal(got[study], expected[study])
  assert sorted(os.listdir(tmp_path / "out")) == ["manifest.json", records.read_manifest(
      str(tmp_path / "out"))["records_dir"]]

  manifest_before = open(tmp_path / "out" / records.MANIFEST).read()
  summary = run(tmp_path / "in", tmp_path / "out")
  assert (summary.converted, summary.skipped) == (0, 4) and len(calls) == 4
  assert open(tmp_path / "out" / records.MANIFEST).read() == manifest_before


def test_crash_while_packing_leaves_the_previous_dataset_intact(tmp_path, monkeypatch):
  for i in range(3):
    write_autopet(tmp_path / "in", f"PETCT_{i}", "study", phantom(50 + i))
  run(tmp_path / "in", tmp_path / "out", records_per_shard=1)
  manifest_before = open(tmp_path / "out" / records.MANIFEST).read()
  records_before = load_records(tmp_path / "out")
  write_autopet(tmp_path / "in", "PETCT_3", "study", phantom(53))

  real = convert.write_array_record
  written = []

  def disk_full_on_second_shard(path, items):
    if os.path.basename(os.path.dirname(path)).startswith(".tmp-records-"):
      written.append(path)
      if len(written) == 2:
        raise OSError(28, "No space left on device")
    return real(path, items)

  monkeypatch.setattr(convert, "write_array_record", disk_full_on_second_shard)
  with pytest.raises(OSError):
    run(tmp_path / "in", tmp_path / "out", records_per_shard=1)
  assert open(tmp_path / "out" / records.MANIFEST).read() == manifest_before
  after_crash = load_records(tmp_path / "out")
  for study in records_before:
    assert_records_equal(after_crash[study], records_before[study])

  monkeypatch.setattr(convert, "write_array_record", real)
  summary = run(tmp_path / "in", tmp_path / "out", records_per_shard=1)
  assert (summary.converted, summary.skipped, summary.num_shards) == (0, 4, 4)  # PETCT_3 was staged
  manifest = records.read_manifest(str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path / "out")) == ["manifest.json", manifest["records_dir"]]
  assert len(load_records(tmp_path / "out")) == 4


def test_write_array_record_is_all_or_nothing(tmp_path):
  path = str(tmp_path / "shard.array_record")

  def items():
    yield b"first"
    raise RuntimeError("killed")

  with pytest.raises(RuntimeError):
    convert.write_array_record(path, items())
  assert os.listdir(tmp_path) == []
  assert convert.write_array_record(path, [b"a", b"b"]) == 2
  reader = ArrayRecordReader(path)
  assert reader.read_all() == [b"a", b"b"]
  reader.close()


# --------------------------------------------------------------------------------- splits and metadata
def test_splits_are_by_patient_deterministic_and_stable(tmp_path):
  for p in range(150):
    for s in range(2):
      folder = tmp_path / "in" / f"PETCT_{p:03d}" / f"study{s}"
      folder.mkdir(parents=True)
      for name in ("CTres", "SUV", "SEG"):
        (folder / f"{name}.nii.gz").touch()
  _, studies = convert.find_studies(str(tmp_path / "in"))
  jobs, errors = convert.plan_jobs(studies, config(val_fraction=0.2, test_fraction=0.2))
  assert not errors and len(jobs) == 300
  by_patient = {}
  for job in jobs:
    by_patient.setdefault(job.study.patient_id, set()).add(job.split)
  assert all(len(splits) == 1 for splits in by_patient.values())
  counts = {s: sum(splits == {s} for splits in by_patient.values()) for s in ("train", "val", "test")}
  assert 60 <= counts["train"] <= 120 and 15 <= counts["val"] <= 45 and 15 <= counts["test"] <= 45
  again, _ = convert.plan_jobs(studies[:50], config(val_fraction=0.2, test_fraction=0.2))
  assert [j.split for j in again] == [j.split for j in jobs[:50]]  # fewer patients: same assignment
  reseeded, _ = convert.plan_jobs(studies, config(val_fraction=0.2, test_fraction=0.2, seed=1))
  assert [j.split for j in reseeded] != [j.split for j in jobs]


def test_clinical_csv_overrides_meta_json_and_feeds_the_prompt(tmp_path):
  for p in ("PETCT_a", "PETCT_b"):
    folder = write_autopet(tmp_path / "in", p, "study", {}, meta={"tracer": "FDG", "age": 40, "stage": 1})
    open(os.path.join(folder, "SUV.nii.gz"), "w").close()  # metadata planning does not read volumes
  csv_path = tmp_path / "clinical.csv"
  csv_path.write_text("PatientID,Age,Gender,Diagnosis,Ann Arbor Stage\nPETCT_a,70,F,lymphoma,IVB\n"
                      "PETCT_b,,M,,\n")
  _, studies = convert.find_studies(str(tmp_path / "in"))
  template = "{tracer} PET/CT, {age} {sex}, {diagnosis}"
  jobs, errors = convert.plan_jobs(studies, config(metadata_csv=str(csv_path), prompt_template=template))
  assert not errors
  a, b = jobs
  assert (a.age, a.sex, a.diagnosis, a.stage, a.text) == (70.0, "F", "lymphoma", 4,
                                                         "FDG PET/CT, 70-year-old female, lymphoma")
  assert (b.age, b.sex, b.stage, b.text) == (40.0, "M", 1, "FDG PET/CT, 40-year-old male")
  csv_path.write_text("name,age\nx,3\n")
  with pytest.raises(UserError, match="needs a study_id or patient_id column"):
    convert.plan_jobs(studies, config(metadata_csv=str(csv_path)))


def test_text_encoder_embeds_each_distinct_prompt_once(tmp_path, monkeypatch):
  seen = []

  def encode_texts(texts):
    seen.append(list(texts))
    return np.array([[len(t), i, 1.0] for i, t in enumerate(texts)], np.float32)

  fake_module = types.SimpleNamespace(encode_texts=encode_texts)
  monkeypatch.setitem(sys.modules, "petfm.models.text_encoder", fake_module)
  write_autopet(tmp_path / "in", "PETCT_a", "s", phantom(60), meta={"tracer": "PSMA"})
  write_autopet(tmp_path / "in", "PETCT_b", "s", phantom(61), meta={"tracer": "PSMA"})
  write_autopet(tmp_path / "in", "PETCT_c", "s", phantom(62))
  run(tmp_path / "in", tmp_path / "out", text_encoder="minilm")
  assert seen == [["FDG PET/CT", "PSMA PET/CT"]]
  got = load_records(tmp_path / "out")
  np.testing.assert_array_equal(got["PETCT_a/s"]["text_embedding"], [11, 1, 1])
  np.testing.assert_array_equal(got["PETCT_c/s"]["text_embedding"], [10, 0, 1])


# ------------------------------------------------------------------------------------------------- TFDS
def test_tfds_builder_serves_the_same_records(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from data_prep.tfds_builder import PetfmRecords

  for i in range(3):
    write_autopet(tmp_path / "in", f"PETCT_{i}", "study", phantom(70 + i), meta={"age": 50 + i, "sex": "F"})
  run(tmp_path / "in", tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
  expected = load_records(tmp_path / "out")
  for source in ("out", "in"):  # converted records, and NIfTI through the same per-study conversion
    builder = PetfmRecords(data_dir=str(tmp_path / f"tfds_{source}"), file_format="array_record")
    download_config = tfds.download.DownloadConfig(manual_dir=str(tmp_path / source))
    builder.download_and_prepare(download_config=download_config)
    train = tfds.data_source("petfm_records", data_dir=str(tmp_path / f"tfds_{source}"), split="train")
    assert len(train) == 3
    for example in train:
      example = {k: v.decode() if isinstance(v, bytes) else v for k, v in example.items()}
      assert_records_equal(example, expected[example["study_id"]])
  assert "tensorflow" not in sys.modules


# -------------------------------------------------------------------------------------------- real data
def test_real_ct_with_pseudo_pet_converts(tmp_path):
  ct_path = TOTALSEG_DIR / "example_ct.nii.gz"
  if not ct_path.exists():
    pytest.skip(f"real CT not found at {ct_path} (the shared/data/totalseg folder sits beside the checkout)")
  ct_image = nib.load(ct_path)
  ct = np.asanyarray(ct_image.dataobj)
  organ_image = nib.load(TOTALSEG_DIR / "example_seg_fast_force_split.nii.gz")
  organs = np.asanyarray(organ_image.dataobj).astype(np.uint8)
  suv = np.where(ct > -500, 0.7, 0.05) + 1.3 * (organs == 5) + 0.8 * (organs == 1) + 20 * (organs == 21)
  liver = np.argwhere(organs == 5)
  centre = liver[len(liver) // 2]
  lesion = np.linalg.norm(np.indices(ct.shape) - centre[:, None, None, None], axis=0) * 3.0 <= 12.0
  lesion &= organs == 5
  suv = ndimage.gaussian_filter(suv + 8.0 * lesion, 1.0).astype(np.float32)
  folder = tmp_path / "in" / "PETCT_totalseg" / "study"
  for name, array in [("CTres", ct), ("SUV", suv), ("SEG", lesion.astype(np.uint8)), ("ORGANS", organs)]:
    save(str(folder / f"{name}.nii.gz"), array, ct_image.affine)
  summary = run(tmp_path / "in", tmp_path / "out")
  assert summary.converted == 1, summary.errors
  record = load_records(tmp_path / "out")["PETCT_totalseg/study"]
  assert np.all(np.abs(np.array(record["ct"].shape) - np.array(ct.shape) * 3 / 4) <= 1)  # 3 mm → 4 mm
  assert record["ct"].min() >= -1210 and record["ct"].max() > 1000  # air to bone
  organ_ids = set(record["targets"][record["targets"][:, 0] == records.TARGET_ORGAN][:, 1])
  assert {1, 2, 3, 5, 21} <= organ_ids
  assert record["lesions"].max() == 1
  assert record["suv"][record["label"] > 0].mean() > 2 * record["suv"][record["organs"] == 5].mean() / 1.5
