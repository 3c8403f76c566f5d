"""DICOM PET/CT → records: SUV from the headers (vendor styles) vs hand calculation, geometry vs the NIfTI
twin and vs world coordinates, and one error line per broken study."""

import datetime
import os

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_convert import load_records, phantom, run, save

from data_prep import convert
from petfm.data import dicom
from petfm.errors import UserError

PET_SHAPE = (12, 10, 8)
CT_SHAPE = (14, 12, 10)
SCAN_DAY = datetime.date(2024, 3, 5)
INJECTED = datetime.datetime(2024, 3, 5, 9, 0, 0)
SERIES_START = datetime.datetime(2024, 3, 5, 10, 2, 30)
F18_HALF_LIFE = 6586.2
PET_CLASS, CT_CLASS = "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.2"


def lps_geometry(row, col, spacing, step, origin):
  """(RAS affine (4, 4), (row, col, pixel spacing, step, origin) as written to the headers)."""
  row, col, step, origin = (np.round(np.asarray(v, np.float64), 6) for v in (row, col, step, origin))
  lps = np.eye(4)
  lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * spacing[1], col * spacing[0], step, origin
  return np.diag([-1.0, -1, 1, 1]) @ lps, (row, col, spacing, step, origin)


# Axial PET at 4×4×3 mm; the CT on another grid (2.5 mm, rows flipped); a CT tilted by 12° (sheared slices).
PET_AFFINE, PET_GEOMETRY = lps_geometry([1, 0, 0], [0, 1, 0], (4.0, 4.0), [0, 0, 3.0], [-22.0, -18.0, -10.0])
CT_AFFINE, CT_GEOMETRY = lps_geometry([1, 0, 0], [0, -1, 0], (2.5, 2.5), [0, 0, 2.5], [-15.0, 14.0, -9.0])
_TILT = np.radians(12)
TILTED_AFFINE, TILTED_GEOMETRY = lps_geometry(
    [1, 0, 0], [0, np.cos(_TILT), -np.sin(_TILT)], (2.5, 2.5), [0, 0, 2.5 / np.cos(_TILT)],
    [-15.0, -14.0, -9.0])


def write_series(folder, values, geometry, modality, headers, rng, skip=(), pet_headers=None):
  """Writes `values` (X, Y, Z) as one DICOM file per slice (random names, shuffled); returns stored values.

  Slices are int16 with a per-slice RescaleSlope (PET) or slope 1 / intercept -1024 (CT), as scanners write
  them; `skip` leaves slices out, `pet_headers(ds, k)` adds per-slice PET attributes.
  """
  row, col, spacing, step, origin = geometry
  os.makedirs(folder, exist_ok=True)
  series_uid = generate_uid()
  stored = np.zeros(values.shape, np.float64)
  for k in rng.permutation(values.shape[2]):
    plane = values[:, :, k]
    if modality == "PT":
      slope = float(f"{max(np.abs(plane).max(), 1e-3) / 30000 * (1 + 0.3 * rng.random()):.6g}")
      intercept = 0.0
    else:
      slope, intercept = 1.0, -1024.0
    pixels = np.rint((plane - intercept) / slope).astype(np.int16)
    stored[:, :, k] = pixels * slope + intercept
    if k in skip:
      continue
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = PET_CLASS if modality == "PT" else CT_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, 3 if modality == "PT" else 2
    ds.SeriesDescription = f"{modality} test"
    ds.update(headers)
    if modality == "PT" and pet_headers:
      pet_headers(ds, k)
    ds.Rows, ds.Columns = plane.shape[1], plane.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelSpacing = [f"{s:g}" for s in spacing]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in [*row, *col]]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + k * step]
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.6g}", f"{intercept:g}"
    ds.PixelData = np.ascontiguousarray(pixels.T).astype("<i2").tobytes()
    ds.save_as(os.path.join(folder, f"IM{rng.integers(1e9)}"), enforce_file_format=True)
  return stored


def study_headers(study_uid, frame_uid, patient):
  return {"StudyInstanceUID": study_uid, "FrameOfReferenceUID": frame_uid, "PatientID": patient}


def pet_headers(units="BQML", decay="START", weight="72.5", dose=3.1e8, tracer_code=("35321007", "SCT", ""),
                name="", series_time=SERIES_START):
  info = Dataset()
  info.RadionuclideTotalDose, info.RadionuclideHalfLife = f"{dose:g}", f"{F18_HALF_LIFE}"
  info.RadiopharmaceuticalStartTime = f"{INJECTED:%H%M%S}"
  if name:
    info.Radiopharmaceutical = name
  if tracer_code:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = tracer_code
    info.RadiopharmaceuticalCodeSequence = [code]
  headers = {"Units": units, "DecayCorrection": decay, "CorrectedImage": ["ATTN", "DECY"],
             "SeriesDate": f"{series_time:%Y%m%d}", "SeriesTime": f"{series_time:%H%M%S}",
             "AcquisitionDate": f"{SCAN_DAY:%Y%m%d}", "AcquisitionTime": "100300",
             "RadiopharmaceuticalInformationSequence": [info]}
  if weight is not None:
    headers["PatientWeight"] = weight
  return headers


def bqml_factor(weight=72.5, dose=3.1e8, start=SERIES_START, decay="START"):
  """The SUV factor by hand: weight (g) / decayed dose (Bq)."""
  elapsed = (start - INJECTED).total_seconds() if decay == "START" else 0.0
  return weight * 1000 / (dose * 0.5 ** (elapsed / F18_HALF_LIFE))


def ct_values(shape):
  """HU linear in the voxel index, hence in world position: resampling must reproduce it exactly."""
  i, j, k = np.indices(shape, dtype=np.float64)
  return -400 + 9 * i + 5 * j + 13 * k


# ----------------------------------------------------------------------------------------------- SUV factors
def header_slices(n=3, **kw):
  out = []
  for k in range(n):
    ds = Dataset()
    ds.update(pet_headers(**kw))
    out.append(ds)
  return out


def philips(ds, offset, value):
  ds.private_block(0x7053, "Philips PET Private Group", create=True).add_new(offset, "DS", value)


def test_suv_factors_match_the_hand_calculation():
  start, admin = header_slices(), header_slices(decay="ADMIN")
  np.testing.assert_allclose(dicom.suv_factors(start, "s"), bqml_factor(), rtol=1e-12)
  np.testing.assert_allclose(dicom.suv_factors(admin, "s"), bqml_factor(decay="ADMIN"), rtol=1e-12)
  np.testing.assert_allclose(dicom.suv_factors(start, "s", weight_kg=60), bqml_factor(weight=60), rtol=1e-12)
  # A re-processed series (SeriesTime after the acquisition): the first acquisition time is the scan start.
  late = header_slices(series_time=datetime.datetime(2024, 3, 5, 14, 0))
  for ds, clock in zip(late, ["100500", "100300", "100400"]):
    ds.AcquisitionTime = clock
  np.testing.assert_allclose(dicom.suv_factors(late, "s"),
                             bqml_factor(start=datetime.datetime(2024, 3, 5, 10, 3)), rtol=1e-12)
  # Injected at 23:30, scanned after midnight: the start time belongs to the day before.
  night = header_slices(series_time=datetime.datetime(2024, 3, 6, 0, 40))
  for ds in night:
    ds.AcquisitionDate, ds.AcquisitionTime = "20240306", "004000"
    ds.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartTime = "233000"
  np.testing.assert_allclose(dicom.suv_factors(night, "s"),
                             bqml_factor(start=INJECTED + datetime.timedelta(minutes=70)), rtol=1e-12)
  # Philips CNTS: the private SUV scale factor per slice, or the activity factor (counts → Bq/mL) then BQML.
  counts = header_slices(units="CNTS")
  for k, ds in enumerate(counts):
    philips(ds, 0x00, f"{0.0011 * (k + 1):g}")
  np.testing.assert_allclose(dicom.suv_factors(counts, "s"), [0.0011, 0.0022, 0.0033], rtol=1e-12)
  activity = header_slices(units="CNTS")
  for ds in activity:
    philips(ds, 0x09, "2.5")
  np.testing.assert_allclose(dicom.suv_factors(activity, "s"), 2.5 * bqml_factor(), rtol=1e-12)
  np.testing.assert_array_equal(dicom.suv_factors(header_slices(units="GML", weight=None), "s"), 1.0)


@pytest.mark.parametrize("change, field", [
    (lambda ds: ds.__delattr__("PatientWeight"),
     "PatientWeight (0010,1030) is missing; give the weight with W"),
    (lambda ds: setattr(ds, "PatientWeight", "0"), "PatientWeight (0010,1030) is 0 kg"),
    (lambda ds: setattr(ds.RadiopharmaceuticalInformationSequence[0], "RadionuclideTotalDose", "310"),
     "RadionuclideTotalDose (0018,1074) is 310 Bq"),
    (lambda ds: ds.RadiopharmaceuticalInformationSequence[0].__delattr__("RadionuclideHalfLife"),
     "RadionuclideHalfLife (0018,1075) is missing"),
    (lambda ds: ds.RadiopharmaceuticalInformationSequence[0].__delattr__("RadiopharmaceuticalStartTime"),
     "RadiopharmaceuticalStartTime (0018,1072) is missing"),
    (lambda ds: setattr(ds, "DecayCorrection", "NONE"), "DecayCorrection (0054,1102) is 'NONE'"),
    (lambda ds: setattr(ds, "Units", "PROPCNTS"), "Units (0054,1001) is 'PROPCNTS'"),
    (lambda ds: setattr(ds, "Units", "CNTS"), "Units CNTS without the Philips SUV scale factor"),
    (lambda ds: setattr(ds, "CorrectedImage", ["DECY"]), "lacks ATTN"),
    (lambda ds: setattr(ds.RadiopharmaceuticalInformationSequence[0], "RadiopharmaceuticalStartDateTime",
                        "20240303090000"),
     "are 2942 min apart, implausible for a half-life of 110 min"),
    (lambda ds: setattr(ds, "SeriesTime", "1O0000"), "SeriesTime '1O0000' is not a valid DICOM date/time"),
])
def test_missing_or_implausible_pet_fields_name_the_field(change, field):
  headers = header_slices(n=1)
  change(headers[0])
  with pytest.raises(UserError, match="^study X: PT series 3: ") as e:
    dicom.suv_factors(headers, "study X: PT series 3", weight_option="W")
  assert field in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------- volumes and records
def test_read_series_geometry_equals_the_nifti_affine_and_orders_slices(tmp_path):
  rng = np.random.default_rng(0)
  values = ct_values(CT_SHAPE)
  stored = write_series(tmp_path / "t", values, TILTED_GEOMETRY, "CT", study_headers("1.2", "1.3", "p"), rng)
  volume = dicom.read_series(sorted(str(p) for p in (tmp_path / "t").iterdir()), "study t")
  np.testing.assert_allclose(volume.affine, TILTED_AFFINE, atol=1e-9)
  np.testing.assert_array_equal(volume.array, stored)
  assert volume.tilt_deg == pytest.approx(12, abs=1e-3)
  with pytest.raises(UserError, match=r"^study t: CT series 2 \"CT test\": gantry tilt of 12.00°"):
    dicom.read_series([str(p) for p in (tmp_path / "t").iterdir()], "study t", allow_tilt=False)


def test_a_series_above_the_image_memory_limit_is_one_line_before_it_is_read(tmp_path, monkeypatch):
  write_series(tmp_path / "t", ct_values(CT_SHAPE), TILTED_GEOMETRY, "CT", study_headers("1.2", "1.3", "p"),
               np.random.default_rng(0))
  monkeypatch.setenv("PETFM_MAX_IMAGE_BYTES", "1K")
  with pytest.raises(UserError, match=r"^study t: a .* float32 volume needs about .* "
                                       r"over the limit of 1\.0 KiB \(PETFM_MAX_IMAGE"):
    dicom.read_series(sorted(str(p) for p in (tmp_path / "t").iterdir()), "study t")


def write_dicom_cohort(root, twins, rng):
  """Good studies (with NIfTI twins in autoPET layout under `twins`) and broken ones; returns expected SUV."""
  expected = {}
  good = {
      # name: (PET header changes, CT geometry, hand factor per slice, tracer, PET and CT in sub-folders)
      "ge_start": (pet_headers(), CT_GEOMETRY, np.full(8, bqml_factor()), "FDG", False),
      "siemens_admin": (pet_headers(decay="ADMIN", tracer_code=None, name="Ga-68 PSMA-11"), TILTED_GEOMETRY,
                        np.full(8, bqml_factor(decay="ADMIN")), "PSMA", True),
      "philips_cnts": (pet_headers(units="CNTS", weight=None, tracer_code=("X", "99", "Fluorodeoxyglucose")),
                       CT_GEOMETRY, 4e-4 * (1 + np.arange(8) / 10), "FDG", False),
  }
  for index, (name, (headers, ct_geometry, factors, tracer, nested)) in enumerate(good.items()):
    volumes = phantom(index, PET_SHAPE)
    activity = volumes["suv"].astype(np.float64) / factors  # what the scanner measured
    common = study_headers(generate_uid(), generate_uid(), f"patient{index}")
    philips_scale = (lambda ds, k: philips(ds, 0x00, f"{factors[k]:g}")) if name == "philips_cnts" else None
    stored = write_series(root / name / ("pet" if nested else ""), activity, PET_GEOMETRY, "PT",
                          {**common, **headers}, rng, pet_headers=philips_scale)
    ct = write_series(root / name / ("ct" if nested else ""), ct_values(CT_SHAPE), ct_geometry, "CT", common,
                      rng)
    save(str(root / name / "label.nii.gz"), volumes["seg"], PET_AFFINE)
    ct_affine = TILTED_AFFINE if ct_geometry is TILTED_GEOMETRY else CT_AFFINE
    suv = (stored * factors).astype(np.float32)
    folder = twins / name / "study"
    save(str(folder / "SUV.nii.gz"), suv, PET_AFFINE)
    save(str(folder / "CTres.nii.gz"), ct.astype(np.int16), ct_affine)
    save(str(folder / "SEG.nii.gz"), volumes["seg"], PET_AFFINE)
    (folder / "meta.json").write_text(f'{{"tracer": "{tracer}", "patient_id": "patient{index}"}}')
    expected[name] = (suv, ct_affine, tracer)
  broken = {
      "missing_slice": ({}, {"skip": (4,)}, "1 missing slice(s): gap of 6.00 mm between -1.00 and 5.00 mm"),
      "no_weight": ({"weight": None}, {}, "PatientWeight (0010,1030) is missing; give the weight with "
                                          "--config.dicom_weight_kg=KG"),
      "dose_in_mbq": ({"dose": 310}, {}, "RadionuclideTotalDose (0018,1074) is 310 Bq"),
      "tilted_pet": ({}, {"geometry": TILTED_GEOMETRY}, "gantry tilt of 12.00°"),
      "no_ct": ({}, {"no_ct": True}, "no CT series in the DICOM study"),
  }
  for name, (header_changes, how, message) in broken.items():
    common = study_headers(generate_uid(), generate_uid(), name)
    write_series(root / name, np.ones(PET_SHAPE), how.get("geometry", PET_GEOMETRY), "PT",
                 {**common, **pet_headers(**header_changes)}, rng, skip=how.get("skip", ()))
    if not how.get("no_ct"):
      write_series(root / name, ct_values(CT_SHAPE), CT_GEOMETRY, "CT", common, rng)
    expected[name] = message
  return expected


def test_dicom_studies_convert_like_their_nifti_twins_and_broken_ones_are_skipped(tmp_path, capsys):
  expected = write_dicom_cohort(tmp_path / "dicom", tmp_path / "nifti", np.random.default_rng(1))
  (tmp_path / "dicom" / "README.txt").write_text("not DICOM")
  layout, studies = convert.find_studies(str(tmp_path / "dicom"))
  assert layout == "dicom" and sorted(s.study_id for s in studies) == sorted(expected)
  summary = run(tmp_path / "dicom", tmp_path / "out", spacing=(3.0, 3.0, 3.0))
  twins = run(tmp_path / "nifti", tmp_path / "out_nifti", spacing=(3.0, 3.0, 3.0))
  assert (summary.converted, summary.failed, twins.converted, twins.failed) == (3, 5, 3, 0)
  stderr = capsys.readouterr().err.strip().splitlines()
  assert len(stderr) == 5
  for name, message in expected.items():
    if isinstance(message, str):
      line = next(e for e in summary.errors if e.startswith(f"study {name}:"))
      assert message in line and "\n" not in line
      assert sum(name in e for e in stderr) == 1
  got, want = load_records(tmp_path / "out"), load_records(tmp_path / "out_nifti")
  for name, value in expected.items():
    if isinstance(value, str):
      continue
    suv, ct_affine, tracer = value
    record, twin = got[name], want[f"{name}/study"]
    assert (record["source"], record["tracer"], record["patient_id"]) == ("dicom", tracer, twin["patient_id"])
    for key in ("affine", "original_affine", "spacing"):
      np.testing.assert_allclose(record[key], twin[key], atol=1e-5, err_msg=key)
    np.testing.assert_allclose(record["original_affine"], PET_AFFINE, atol=1e-9)
    np.testing.assert_array_equal(record["original_shape"], PET_SHAPE)
    np.testing.assert_allclose(record["suv"], twin["suv"], rtol=1e-4, atol=1e-6, err_msg=name)
    assert np.abs(record["ct"].astype(int) - twin["ct"]).max() <= 1, name
    np.testing.assert_array_equal(record["label"], twin["label"])
    assert record["label"].any()
    # CT against world coordinates, independent of the NIfTI path: HU is linear in the CT voxel index.
    index = np.indices(record["ct"].shape).reshape(3, -1)
    world = record["affine"] @ np.vstack([index, np.ones(index.shape[1])])
    ct_index = np.linalg.solve(ct_affine, world)[:3]
    inside = np.all((ct_index >= 0) & (ct_index <= np.array(CT_SHAPE)[:, None] - 1), axis=0)
    hu = -400 + np.array([9, 5, 13]) @ ct_index[:, inside]
    assert inside.sum() > 50
    assert np.abs(record["ct"].reshape(-1)[inside] - hu).max() <= 0.5 + 1e-3, name
    # SUV at native resolution: the hand-calculated SUV at the stored voxels that are PET voxel centres.
    pet_index = np.linalg.solve(PET_AFFINE, world)[:3]
    on_voxel = np.all(np.abs(pet_index - np.rint(pet_index)) < 1e-6, axis=0) & np.all(
        (pet_index > -0.5) & (pet_index < np.array(PET_SHAPE)[:, None] - 0.5), axis=0)
    i, j, k = np.rint(pet_index[:, on_voxel]).astype(int)
    assert on_voxel.sum() > 50
    np.testing.assert_allclose(record["suv"].reshape(-1)[on_voxel], suv[i, j, k], rtol=1e-4, atol=1e-6)


def test_pairing_prefers_the_pets_frame_of_reference_and_skips_scouts_and_uncorrected_pet(tmp_path):
  rng = np.random.default_rng(2)
  common = study_headers("1.2.3", "1.2.3.1", "p1")
  write_series(tmp_path / "pet", np.ones(PET_SHAPE), PET_GEOMETRY, "PT", {**common, **pet_headers()}, rng)
  nac = {**common, **pet_headers(), "CorrectedImage": ["DECY"]}
  write_series(tmp_path / "nac", np.ones(PET_SHAPE), PET_GEOMETRY, "PT", nac, rng)
  write_series(tmp_path / "ct", ct_values(CT_SHAPE), CT_GEOMETRY, "CT", common, rng)
  other = ct_values((14, 12, 20))
  elsewhere = {**common, "FrameOfReferenceUID": "9.9"}
  write_series(tmp_path / "diagnostic", other, CT_GEOMETRY, "CT", elsewhere, rng)
  scout = {**common, "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}
  write_series(tmp_path / "scout", ct_values((14, 12, 30)), CT_GEOMETRY, "CT", scout, rng)
  damaged = sorted((tmp_path / "pet").iterdir())[0]
  damaged.write_bytes(damaged.read_bytes()[:-100])  # pixel data cut short
  # An archive that stores PET and CT as two studies sharing one frame of reference.
  psma = {**study_headers("4.5", "4.5.1", "p2"), **pet_headers(tracer_code=None, name="PSMA-1007")}
  write_series(tmp_path / "split", np.ones(PET_SHAPE), PET_GEOMETRY, "PT", psma, rng)
  ct_study = study_headers("4.6", "4.5.1", "p2")
  write_series(tmp_path / "split", ct_values(CT_SHAPE), CT_GEOMETRY, "CT", ct_study, rng)
  found, split = dicom.find_pet_ct(str(tmp_path))
  assert {os.path.dirname(f) for f in found.ct} == {str(tmp_path / "ct")} and len(found.ct) == CT_SHAPE[2]
  assert {os.path.basename(os.path.dirname(f)) for f in found.pet} == {"pet"} and len(found.pet) == 8
  assert (found.folder, found.tracer, found.patient_id) == (str(tmp_path), "FDG", "p1")
  assert (split.folder, split.tracer, len(split.pet), len(split.ct)) == (str(tmp_path / "split"), "PSMA", 8,
                                                                          10)
  with pytest.raises(UserError, match=rf"^study s: {damaged.name}: not a readable DICOM image \("):
    dicom.read_series(sorted(found.pet), "study s")
  # Two PET series in one folder: one study each, named by folder and series UID.
  write_series(tmp_path / "split", np.ones(PET_SHAPE), PET_GEOMETRY, "PT",
               {**study_headers("4.5", "4.5.1", "p2"), **pet_headers()}, rng)
  layout, studies = convert.find_studies(str(tmp_path / "split"))
  assert layout == "dicom" and len({s.study_id for s in studies}) == 2
  assert all(s.study_id.startswith("split/1.") and len(s.ct_files) == 10 for s in studies)


@pytest.mark.parametrize("edit, message", [
    (lambda files: setattr_file(files[3], "ImagePositionPatient", files[2]),
     "two slices at the same position"),
    (lambda files: shift_file(files[5], 1.0), "irregular slice spacing (1.500..3.500 mm"),
    (lambda files: setattr_file(files[1], "ImageOrientationPatient", ["0", "1", "0", "1", "0", "0"]),
     "slices have different ImageOrientationPatient (0020,0037)"),
    (lambda files: setattr_file(files[1], "PixelSpacing", ["3", "3"]),
     "different sizes (Rows/Columns) or PixelSpacing"),
])
def test_inconsistent_slices_give_one_line(tmp_path, edit, message):
  write_series(tmp_path, ct_values(CT_SHAPE), CT_GEOMETRY, "CT", study_headers("1", "2", "p"),
               np.random.default_rng(3))
  files = sorted((str(p) for p in tmp_path.iterdir()),
                 key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
  edit(files)
  with pytest.raises(UserError, match=r"^study s: CT series 2 \"CT test\": ") as e:
    dicom.read_series(files, "study s")
  assert message in str(e.value)


def setattr_file(path, keyword, value):
  """Sets `keyword` in the file `path` to `value`, or to that attribute of the file `value` names."""
  ds = pydicom.dcmread(path)
  setattr(ds, keyword, pydicom.dcmread(value)[keyword].value if isinstance(value, str) else value)
  ds.save_as(path)


def shift_file(path, mm):
  """Moves the slice `path` by `mm` along z: from there on the spacing is irregular."""
  ds = pydicom.dcmread(path)
  ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], f"{float(ds.ImagePositionPatient[2]) + mm:g}"]
  ds.save_as(path)
