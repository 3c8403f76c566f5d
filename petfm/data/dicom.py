"""DICOM PET/CT: series discovery, volumes with their true affine, and body-weight SUV from the PET headers.

Reading is done by pydicom; this module only interprets the standard attributes:

* `find_pet_ct(root)` reads the headers of every DICOM file under `root` and pairs each PET image series with
  its CT (same StudyInstanceUID or FrameOfReferenceUID, the frame of reference first, then the most slices).
* `read_series(files, where)` sorts the slices by position along the slice normal, checks orientation,
  pixel grid, spacing, missing slices and gantry tilt, applies RescaleSlope/Intercept per slice and returns
  the volume `(X, Y, Z)` (X = column index, Y = row index, Z = slice) with its voxel → world affine in RAS+ mm
  (DICOM positions are LPS+; x and y are negated), the same convention as `nibabel` / `petfm.data.nifti`.
* `suv_factors(headers, where)` gives per-slice factors that turn the rescaled PET values into SUVbw
  (QIBA: BQML with DecayCorrection START or ADMIN, CNTS with the Philips SUV scale factor, GML as is).

Every problem raises one `UserError` line that starts with `where`, names the series or file and the field.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.valuerep import DA, DT, TM

from petfm.data import checks
from petfm.data.checks import MAX_SPACING_MM, MIN_SPACING_MM
from petfm.errors import UserError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Plausible ranges: dose 1 MBq..100 GBq (a value in MBq would be far below), weight 1..500 kg, half-life
# 1 min..4 months; a decay time beyond 10 half-lives leaves < 0.1 % of the dose: a wrong date or time.
DOSE_BQ = (1e6, 1e11)
WEIGHT_KG = (1.0, 500.0)
HALF_LIFE_S = (60.0, 1e7)
MAX_HALF_LIVES = 10
# Slice positions may deviate from a regular spacing by this fraction of it (plus 1 µm) before it is an error.
SPACING_TOLERANCE = 0.01
# Series of these image types are not volumes (scouts, MIPs, screen captures).
_SKIP_IMAGE_TYPES = {"LOCALIZER", "MIP", "SECONDARY", "SCREEN SHOT"}
# Tracers by SNOMED code (FDG: SRT C-B1031, SCT 35321007) or by words in the radiopharmaceutical's name.
_FDG_CODES = {"C-B1031", "35321007"}
_TRACER_WORDS = {"FDG": ("FDG", "FLUDEOXYGLUCOSE", "FLUORODEOXYGLUCOSE"),
                 "PSMA": ("PSMA", "DCFPYL", "PIFLUFOLASTAT", "GOZETOTIDE", "FLOTUFOLASTAT", "DCFBC")}
# PET and CT image storage SOP classes (the enhanced ones are then reported as multi-frame, not ignored).
_IMAGE_CLASSES = {"1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130",
                  "1.2.840.10008.5.1.4.1.1.128.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",
                  "1.2.840.10008.5.1.4.1.1.2.2"}
_HEADER_TAGS = ["SOPClassUID", "Modality", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID",
                "SeriesNumber", "PatientID", "ImageType", "CorrectedImage", "NumberOfFrames",
                "RadiopharmaceuticalInformationSequence"]


# ------------------------------------------------------------------------------------------------ discovery
@dataclasses.dataclass(frozen=True)
class PetCt:
  """A PET series and the CT series of the same study, as found by `find_pet_ct`."""
  folder: str  # deepest folder holding all its files
  study_uid: str
  patient_id: str
  tracer: str  # FDG, PSMA or unknown (from the radiopharmaceutical code or name)
  pet: tuple[str, ...]  # files of the PET series
  ct: tuple[str, ...]  # files of the CT series; () when the study has none
  pet_series: str  # its SeriesInstanceUID


@dataclasses.dataclass
class _Series:
  uid: str
  study_uid: str
  frame_of_reference: str
  modality: str
  number: int
  patient_id: str
  tracer: str
  files: list[str]


def find_pet_ct(root: str) -> list[PetCt]:
  """Every attenuation-corrected PET image series under `root` with its CT, sorted by folder.

  The CT is a CT image series of the same study (StudyInstanceUID) or with the same FrameOfReferenceUID (some
  archives store PET and CT as two studies); one sharing the frame of reference wins, then one of the same
  study, then the one with the most slices.

  Only PET and CT image files count: other files (not DICOM Part 10, reports, raw data, a header cut short
  before its SOP class or series UID) are ignored; a slice lost that way shows up as a missing slice. A file
  whose pixel data is damaged stays in its series, and reading it names it.
  """
  series: dict[str, _Series] = {}
  for folder, dirs, names in os.walk(root):
    dirs.sort()
    for name in sorted(names):
      path = os.path.join(folder, name)
      try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
      except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        continue
      image_type = {str(v).upper() for v in _as_list(ds.get("ImageType"))}
      corrected = {str(v).upper() for v in _as_list(ds.get("CorrectedImage"))}
      not_attenuation_corrected = ds.get("Modality") == "PT" and corrected and "ATTN" not in corrected
      if (ds.get("Modality") not in ("PT", "CT") or ds.get("SOPClassUID") not in _IMAGE_CLASSES
          or not ds.get("SeriesInstanceUID")
          or image_type & _SKIP_IMAGE_TYPES or not_attenuation_corrected):
        continue
      uid = str(ds.SeriesInstanceUID)
      if uid not in series:
        series[uid] = _Series(
            uid=uid, study_uid=str(ds.get("StudyInstanceUID", "")),
            frame_of_reference=str(ds.get("FrameOfReferenceUID", "")), modality=ds.Modality,
            number=int(ds.get("SeriesNumber") or 0), patient_id=str(ds.get("PatientID", "")),
            tracer=tracer(ds) if ds.Modality == "PT" else "unknown", files=[])
      series[uid].files.append(path)
  found = []
  for pet in (s for s in series.values() if s.modality == "PT"):
    same_frame = {s.uid for s in series.values() if pet.frame_of_reference
                  and s.frame_of_reference == pet.frame_of_reference}
    cts = [s for s in series.values()
           if s.modality == "CT" and (s.study_uid == pet.study_uid or s.uid in same_frame)]
    cts.sort(key=lambda s: (s.uid not in same_frame, s.study_uid != pet.study_uid, -len(s.files), s.number))
    ct = tuple(cts[0].files) if cts else ()
    found.append(PetCt(folder=os.path.commonpath([os.path.dirname(f) for f in pet.files + list(ct)]),
                       study_uid=pet.study_uid, patient_id=pet.patient_id, tracer=pet.tracer,
                       pet=tuple(pet.files), ct=ct, pet_series=pet.uid))
  return sorted(found, key=lambda s: (s.folder, s.pet_series))


def tracer(ds: Dataset) -> str:
  """FDG, PSMA or unknown from RadiopharmaceuticalInformationSequence (code sequence, then the name)."""
  info = _first_item(ds, "RadiopharmaceuticalInformationSequence")
  if info is None:
    return "unknown"
  codes = list(info.get("RadiopharmaceuticalCodeSequence", []))
  if any(str(code.get("CodeValue", "")).strip() in _FDG_CODES for code in codes):
    return "FDG"
  text = " ".join([str(info.get("Radiopharmaceutical", ""))]
                  + [str(code.get("CodeMeaning", "")) for code in codes]).upper()
  return next((name for name, words in _TRACER_WORDS.items() if any(w in text for w in words)), "unknown")


# ------------------------------------------------------------------------------------------------- volumes
@dataclasses.dataclass
class Volume:
  """A DICOM series as a volume: `array` (X, Y, Z) float32 after RescaleSlope/Intercept, `affine` (4, 4)
  voxel → RAS+ mm (sheared when the gantry was tilted), `headers` one per slice in Z order (no pixel data),
  `name` e.g. `PT series 3 "WB AC"` for messages."""
  array: np.ndarray
  affine: np.ndarray
  headers: list[Dataset]
  name: str
  tilt_deg: float


def read_series(files: Sequence[str], where: str, allow_tilt: bool = True) -> Volume:
  """Reads the slices `files` of one series into a volume (see `Volume`).

  Raises `UserError` (prefixed `where`) for an unreadable file, several series or frames per file, differing
  orientation / pixel grid, duplicate or missing slices, irregular spacing, a spacing outside [0.1, 20] mm,
  or a gantry tilt when `allow_tilt` is False.
  """
  slices = []
  for path in files:
    ds = None
    try:
      ds = pydicom.dcmread(path)
      pixels = ds.pixel_array
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError,
            NotImplementedError, RuntimeError) as e:
      syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
      hint = "; install a pydicom decoder plugin, e.g. pylibjpeg" if syntax and syntax.is_compressed else ""
      reason = str(e).splitlines()[0].rstrip(": ") if str(e) else type(e).__name__
      raise UserError(f"{where}: {os.path.basename(path)}: not a readable DICOM image ({reason}{hint})") \
          from None
    if pixels.ndim != 2:
      raise UserError(f"{where}: {os.path.basename(path)}: holds {ds.get('NumberOfFrames', '?')} frames; "
                      "only one slice per file (classic DICOM) is supported")
    if not slices:
      checks.check_memory((*pixels.shape, len(files)), np.float32, where)  # before the slices pile up
    slices.append((ds, apply_modality_lut(pixels, ds).astype(np.float32)))  # slope and intercept per slice
  if not slices:
    raise UserError(f"{where}: the series has no files")
  first = slices[0][0]
  name = f"{first.get('Modality', '?')} series {first.get('SeriesNumber', '?')} " \
         f"\"{first.get('SeriesDescription', '')}\""
  where = f"{where}: {name}"
  if len(slices) < 2:
    raise UserError(f"{where}: has only one slice; a volume needs at least two")
  if len({str(ds.get("SeriesInstanceUID")) for ds, _ in slices}) > 1:
    raise UserError(f"{where}: files of several series were given as one")
  orientation = _vector(first, "ImageOrientationPatient", 6, where)
  spacing = _vector(first, "PixelSpacing", 2, where)
  for ds, pixels in slices:
    if not np.allclose(_vector(ds, "ImageOrientationPatient", 6, where), orientation, atol=1e-4):
      raise UserError(f"{where}: slices have different ImageOrientationPatient (0020,0037)")
    if not np.allclose(_vector(ds, "PixelSpacing", 2, where), spacing, rtol=1e-4) or \
       pixels.shape != slices[0][1].shape:
      raise UserError(f"{where}: slices have different sizes (Rows/Columns) or PixelSpacing (0028,0030)")
  row, col = orientation[:3], orientation[3:]
  normal = np.cross(row, col)
  if not (abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(col) - 1) < 1e-3
          and abs(row @ col) < 1e-3):
    raise UserError(f"{where}: ImageOrientationPatient (0020,0037) {orientation.tolist()} is not two "
                    "orthogonal unit vectors")
  positions = np.array([_vector(ds, "ImagePositionPatient", 3, where) for ds, _ in slices])
  order = np.argsort(positions @ normal, kind="stable")
  slices = [slices[i] for i in order]
  positions = positions[order]
  distance = positions @ normal
  steps = np.diff(distance)
  if steps.min() < 1e-3:
    at = distance[int(np.argmin(steps))]
    raise UserError(f"{where}: two slices at the same position ({at:.2f} mm along the slice normal); the "
                    "series holds several frames, time points or duplicates")
  step = float(np.median(steps))
  tolerance = SPACING_TOLERANCE * step + 1e-3
  if np.abs(steps - step).max() > tolerance:
    gaps = np.flatnonzero(np.abs(steps - step) > tolerance)
    multiple = steps[gaps] / step
    if np.all(np.abs(multiple - np.round(multiple)) * step <= tolerance) and np.all(multiple > 1.5):
      i = int(gaps[0])
      raise UserError(f"{where}: {int(round(float(np.sum(multiple - 1))))} missing slice(s): gap of "
                      f"{steps[i]:.2f} mm between {distance[i]:.2f} and {distance[i + 1]:.2f} mm "
                      f"(slice spacing {step:.2f} mm)")
    raise UserError(f"{where}: irregular slice spacing ({steps.min():.3f}..{steps.max():.3f} mm between "
                    "slice positions); cannot build one volume")
  slice_step = (positions[-1] - positions[0]) / (len(positions) - 1)
  residual = positions - positions[0] - np.arange(len(positions))[:, None] * slice_step
  if np.abs(residual).max() > tolerance:
    raise UserError(f"{where}: ImagePositionPatient (0020,0032) of the slices do not lie on one line")
  tilt = math.degrees(math.acos(min(1.0, abs(slice_step @ normal) / np.linalg.norm(slice_step))))
  if tilt > 0.01 and not allow_tilt:
    raise UserError(f"{where}: gantry tilt of {tilt:.2f}° (slices are sheared); a tilted series is not "
                    "supported here")
  sizes = np.array([spacing[1], spacing[0], step])
  if not np.all((sizes >= MIN_SPACING_MM) & (sizes <= MAX_SPACING_MM)):
    raise UserError(f"{where}: voxel spacing {'×'.join(f'{s:g}' for s in sizes)} mm is outside "
                    f"[{MIN_SPACING_MM:g}, {MAX_SPACING_MM:g}] mm")
  lps = np.eye(4)
  lps[:3, :4] = np.column_stack([row * spacing[1], col * spacing[0], slice_step, positions[0]])
  array = np.stack([pixels.T for _, pixels in slices], axis=-1)
  if not np.all(np.isfinite(array)):
    raise UserError(f"{where}: RescaleSlope/RescaleIntercept give NaN or infinite values")
  headers = [ds for ds, _ in slices]
  for ds in headers:  # keep the headers, free the pixel data
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
      if keyword in ds:
        delattr(ds, keyword)
  return Volume(array=array, affine=LPS_TO_RAS @ lps, headers=headers, name=name, tilt_deg=tilt)


def read_pet_suv(files: Sequence[str], where: str, weight_kg: float = 0.0,
                 weight_option: str = "weight_kg") -> tuple[np.ndarray, np.ndarray]:
  """The PET series as SUVbw: `(suv (X, Y, Z) float32, affine (4, 4) RAS+)`. Gantry tilt is an error.

  `weight_kg` > 0 replaces PatientWeight; `weight_option` names that override in error messages.
  """
  volume = read_series(files, where, allow_tilt=False)
  if volume.headers[0].get("Modality") != "PT":
    raise UserError(f"{where}: {volume.name}: Modality is {volume.headers[0].get('Modality')!r}, not PT")
  factors = suv_factors(volume.headers, f"{where}: {volume.name}", weight_kg, weight_option)
  return volume.array * factors.astype(np.float32), volume.affine


def suv_factors(headers: Sequence[Dataset], where: str, weight_kg: float = 0.0,
                weight_option: str = "weight_kg") -> np.ndarray:
  """Per-slice factors (N,) float64 from rescaled PET values to SUVbw, from the headers of the N slices.

  Units BQML: PatientWeight [kg] · 1000 / (RadionuclideTotalDose [Bq] · 2^(−Δt / RadionuclideHalfLife)),
  Δt = 0 for DecayCorrection ADMIN, else (START) scan start − injection start; the scan start is
  SeriesDate/Time unless that is after the first AcquisitionDate/Time (a re-processed series), then the GE
  private scan time (0009,100d) or the first acquisition time. Units CNTS: the Philips SUV scale factor
  (7053,1000), or its activity factor (7053,1009) → Bq/mL then as BQML. Units GML: 1.
  """
  first = headers[0]
  units = str(first.get("Units", "")).strip().upper()
  corrected = {str(v).upper() for v in _as_list(first.get("CorrectedImage"))}
  if corrected and "ATTN" not in corrected:
    raise UserError(f"{where}: CorrectedImage (0028,0051) {sorted(corrected)} lacks ATTN: not attenuation "
                    "corrected, no SUV")
  if units == "GML":
    return np.ones(len(headers))
  if units == "CNTS":
    suv = [_philips(ds, 0x00) for ds in headers]
    if all(f is not None and f > 0 for f in suv):
      return np.array(suv, np.float64)
    activity = [_philips(ds, 0x09) for ds in headers]
    if not all(f is not None and f > 0 for f in activity):
      raise UserError(f"{where}: Units CNTS without the Philips SUV scale factor (7053,1000) or activity "
                      "concentration factor (7053,1009); cannot compute SUV")
    return np.array(activity, np.float64) * _bqml_factor(headers, where, weight_kg, weight_option)
  if units == "BQML":
    return np.full(len(headers), _bqml_factor(headers, where, weight_kg, weight_option))
  raise UserError(f"{where}: Units (0054,1001) is {repr(units) if units else 'missing'}; SUV needs BQML, "
                  "CNTS (Philips) or GML")


def _bqml_factor(headers: Sequence[Dataset], where: str, weight_kg: float, weight_option: str) -> float:
  first = headers[0]
  if weight_kg > 0:
    weight = weight_kg
  else:
    weight = _number(first.get("PatientWeight"))
    if weight is None or not WEIGHT_KG[0] <= weight <= WEIGHT_KG[1]:
      found = "is missing" if weight is None else \
          f"is {weight:g} kg, outside {WEIGHT_KG[0]:g}..{WEIGHT_KG[1]:g}"
      raise UserError(f"{where}: PatientWeight (0010,1030) {found}; give the weight with {weight_option}")
  info = _first_item(first, "RadiopharmaceuticalInformationSequence")
  if info is None:
    raise UserError(f"{where}: RadiopharmaceuticalInformationSequence (0054,0016) is missing (dose, "
                    "injection time, half-life)")
  dose = _number(info.get("RadionuclideTotalDose"))
  if dose is None or not DOSE_BQ[0] <= dose <= DOSE_BQ[1]:
    found = "is missing" if dose is None else f"is {dose:g} Bq, outside 1 MBq..100 GBq (a value in MBq?)"
    raise UserError(f"{where}: RadionuclideTotalDose (0018,1074) {found}")
  half_life = _number(info.get("RadionuclideHalfLife"))
  if half_life is None or not HALF_LIFE_S[0] <= half_life <= HALF_LIFE_S[1]:
    found = "is missing" if half_life is None else f"is {half_life:g} s, outside 60 s..1e7 s"
    raise UserError(f"{where}: RadionuclideHalfLife (0018,1075) {found}")
  decay = str(first.get("DecayCorrection", "")).strip().upper()
  if decay == "ADMIN":
    return weight * 1000.0 / dose
  if decay != "START":
    found = repr(decay) if decay else "missing"
    raise UserError(f"{where}: DecayCorrection (0054,1102) is {found}; SUV needs START or ADMIN")
  scan = _datetime(first, "SeriesDate", "SeriesTime", where)
  acquisitions = [_datetime(ds, "AcquisitionDate", "AcquisitionTime", where, "AcquisitionDateTime")
                  for ds in headers]
  acquired = min((t for t in acquisitions if t is not None), default=None)
  if scan is None or (acquired is not None and scan > acquired):
    ge = _private(first, 0x0009, "GEMS_PETD_01", 0x0D)
    scan = _parse(DT, ge, where, "GE scan DateTime (0009,100d)") if ge else acquired
  if scan is None:
    raise UserError(f"{where}: SeriesDate/SeriesTime (0008,0021/0031) and AcquisitionTime are missing")
  scan = scan.replace(tzinfo=None)
  injected = _parse(DT, info.get("RadiopharmaceuticalStartDateTime"), where,
                    "RadiopharmaceuticalStartDateTime (0018,1078)")
  if injected is not None:
    injected = injected.replace(tzinfo=None)
  else:
    start = _parse(TM, info.get("RadiopharmaceuticalStartTime"), where,
                   "RadiopharmaceuticalStartTime (0018,1072)")
    if start is None:
      raise UserError(f"{where}: RadiopharmaceuticalStartTime (0018,1072) is missing (injection time)")
    injected = datetime.datetime.combine(scan.date(), start)
    if injected > scan:  # injected before midnight, scanned after
      injected -= datetime.timedelta(days=1)
  elapsed = (scan - injected).total_seconds()
  if not 0 <= elapsed <= MAX_HALF_LIVES * half_life:
    raise UserError(f"{where}: injection at {injected:%Y-%m-%d %H:%M:%S} and scan start at "
                    f"{scan:%Y-%m-%d %H:%M:%S} are {elapsed / 60:.0f} min apart, implausible for a half-life "
                    f"of {half_life / 60:.0f} min (RadiopharmaceuticalStartTime (0018,1072) / SeriesTime)")
  return weight * 1000.0 / (dose * 2.0 ** (-elapsed / half_life))


# ----------------------------------------------------------------------------------------------- attributes
def _as_list(value: Any) -> list:
  if value is None:
    return []
  return list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
  items = ds.get(keyword)
  return items[0] if items else None


def _number(value: Any) -> float | None:
  """A DS/IS/FD value, or raw bytes (a private tag pydicom does not know), as float; None if absent."""
  if isinstance(value, bytes):
    value = value.decode("ascii", "replace").strip("\0 ")
  if value is None or value == "":
    return None
  try:
    number = float(value)
  except (TypeError, ValueError):
    return None
  return number if math.isfinite(number) else None


def _vector(ds: Dataset, keyword: str, size: int, where: str) -> np.ndarray:
  values = [_number(v) for v in _as_list(ds.get(keyword))]
  if len(values) != size or any(v is None for v in values):
    tag = {"ImageOrientationPatient": "(0020,0037)", "ImagePositionPatient": "(0020,0032)",
           "PixelSpacing": "(0028,0030)"}[keyword]
    path = getattr(ds, "filename", None)
    raise UserError(f"{where}: {keyword} {tag} is missing or not {size} numbers in "
                    f"{os.path.basename(str(path)) if path else 'a slice'}")
  return np.array(values, np.float64)


def _private(ds: Dataset, group: int, creator: str, offset: int) -> Any:
  try:
    return ds.private_block(group, creator)[offset].value
  except KeyError:
    return None


def _philips(ds: Dataset, offset: int) -> float | None:
  return _number(_private(ds, 0x7053, "Philips PET Private Group", offset))


def _parse(kind: type, value: Any, where: str, field: str) -> Any:
  """`value` (str or bytes) as a pydicom DA / TM / DT (a date, time or datetime); None when absent."""
  if isinstance(value, bytes):
    value = value.decode("ascii", "replace")
  value = str(value or "").strip("\0 ")
  if not value:
    return None
  try:
    return kind(value)
  except ValueError:
    raise UserError(f"{where}: {field} {value!r} is not a valid DICOM date/time") from None


def _datetime(ds: Dataset, date: str, time: str, where: str, combined: str = "") -> datetime.datetime | None:
  """`date` + `time` attributes (or the `combined` DT attribute) of `ds` as naive datetime; None if absent."""
  if combined and ds.get(combined):
    return _parse(DT, ds.get(combined), where, combined).replace(tzinfo=None)
  day = _parse(DA, ds.get(date), where, date)
  clock = _parse(TM, ds.get(time), where, time)
  if day is None or clock is None:
    return None
  return datetime.datetime.combine(day, clock)
