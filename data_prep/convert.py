"""NIfTI or DICOM PET/CT studies → ArrayRecord shards and `manifest.json` (`petfm prepare`).

  python -m data_prep.convert --input DIR --output DIR [--config data_prep/configs/convert.py[:ARG]]
      [--config.FIELD=VALUE ...] [--workers N]

Input layouts (auto-detected, or `--config.layout=...`):
  autopet  autoPET I/II: `PETCT_<id>/<study>/{CTres,SUV,SEG}.nii.gz` (CT on the PET grid, PET in SUV, lesion
           mask); optional `ORGANS.nii.gz` (organ label map) and `meta.json` (tracer, age, sex, diagnosis,
           stage, patient_id) as written by `data_prep.synthetic`. Tracer FDG unless meta.json says otherwise.
  nnunet   autoPET III/IV/V: `imagesTr/<case>_0000.nii.gz` CT, `<case>_0001.nii.gz` PET in SUV,
           `labelsTr/<case>.nii.gz`; tracer and patient from `fdg_<patient>_...` / `psma_<patient>_...`.
  hecktor  HECKTOR: `imagesTr/<Center>-<ID>__CT.nii.gz`, `__PT.nii.gz` (SUV), `labelsTr/<Center>-<ID>.nii.gz`
           (1 GTVp, 2 GTVn), or one folder per patient holding the three files; CT and PET on different grids.
  dicom    DICOM files anywhere below the input (any folder structure, any file names): each attenuation-
           corrected PET series with the CT series of its study (`petfm.data.dicom.find_pet_ct`), SUV computed
           from the PET headers; optional lesion mask `label.nii.gz` in the study's folder. Study id = that
           folder (plus the PET SeriesInstanceUID when the folder holds several PET series).

Per study: every volume is reoriented to RAS+ from its affine, checked to overlap the PET in world space, and
resampled straight from its own grid onto the stored grid, which is the PET field of view at the configured
spacing (linear for CT and SUV, nearest for labels). See `petfm.data.records` for the fields stored.

Output folder:
  manifest.json                         splits, shards, per-study summary, prompts, config, errors, and
                                        organ_labels (id → name, from the input's organs.json when present)
  records-<id>/<split>-00000-of-0000N.array_record   one record per study, `group_size:1`
  .staging/                             finished studies of an unfinished run (removed once packed)

Resumable and atomic: each study is first written to `.staging/<key>.array_record` (key = hash of the study,
its input files' sizes and times, and the config), so a rerun skips finished studies, also those already in
the shards of an earlier manifest. Shards go to a fresh `records-<id>/` folder and the manifest is replaced
last (temp file, fsync, rename), so after a crash or `kill -9` the previous manifest and the shards it names
are intact. Bad input prints one line naming the study and the problem, the other studies convert, and the
exit status is 1.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import ml_collections
import nibabel as nib
import numpy as np
from absl import flags
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from scipy import ndimage
from tqdm import tqdm

from petfm import paths
from petfm.config import check, check_choice, parse_command_line
from petfm.data import checks, dicom, geometry, records
from petfm.data.nifti import load_image
from petfm.data.text import make_prompt
from petfm.errors import UserError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "convert.py")
LAYOUTS = ("autopet", "nnunet", "hecktor", "dicom")
SPLITS = ("train", "val", "test")
STAGING = ".staging"
CT_FILL_HU = -1024
# Bump when the stored arrays change for the same input and config, so staged studies are not reused.
CONVERTER_VERSION = 1
# Lesion label values each layout allows: autoPET masks are binary, HECKTOR has 1 GTVp and 2 GTVn (other
# sources: any uint8 value).
LABEL_VALUES = {"autopet": (0, 1), "nnunet": (0, 1), "hecktor": (0, 1, 2), "dicom": (0, 1)}
_LAYOUT_HINTS = {
    "autopet": "<patient>/<study>/ with CTres.nii.gz, SUV.nii.gz, SEG.nii.gz",
    "nnunet": "imagesTr/<case>_0000.nii.gz (CT) and <case>_0001.nii.gz (PET) with labelsTr/<case>.nii.gz",
    "hecktor": "<Center>-<ID>__CT.nii.gz and <Center>-<ID>__PT.nii.gz with <Center>-<ID>.nii.gz labels",
    "dicom": "DICOM files of a PET series and a CT series per study",
}


# ----------------------------------------------------------------------------------------------- discovery
@dataclasses.dataclass(frozen=True)
class Study:
  """One study found in the input folder. Paths may name missing files; conversion reports those."""
  study_id: str
  patient_id: str
  source: str  # the layout: autopet, nnunet or hecktor
  ct: str
  pet: str
  label: str
  organs: str = ""  # organ label map, '' when the layout has none
  meta_json: str = ""  # per-study metadata file, '' when absent
  tracer: str = "unknown"  # what the layout implies about the tracer
  pet_files: tuple[str, ...] = ()  # dicom layout: the slices of the PET series (`pet` is their folder)
  ct_files: tuple[str, ...] = ()  # dicom layout: the slices of the CT series


def find_studies(input_dir: str, layout: str = "auto") -> tuple[str, list[Study]]:
  """Finds the studies under `input_dir` in `layout` (or the layout present); returns (layout, studies)."""
  if not os.path.isdir(input_dir):
    raise UserError(f"--input {input_dir}: no such folder")
  finders = {"autopet": _find_autopet, "nnunet": _find_nnunet, "hecktor": _find_hecktor, "dicom": _find_dicom}
  if layout != "auto":
    studies = finders[layout](input_dir)
    if not studies:
      raise UserError(f"--input {input_dir}: no {layout} studies found (expected {_LAYOUT_HINTS[layout]})")
    return layout, studies
  found = {name: find(input_dir) for name, find in finders.items()}
  present = [name for name, studies in found.items() if studies]
  if not present:
    hints = "; ".join(f"{name}: {hint}" for name, hint in _LAYOUT_HINTS.items())
    raise UserError(f"--input {input_dir}: no PET/CT studies found. Expected one of the layouts {hints}")
  if len(present) > 1:
    raise UserError(f"--input {input_dir}: holds studies in several layouts ({', '.join(present)}); "
                    "choose one with --config.layout")
  return present[0], found[present[0]]


def _find_autopet(root: str) -> list[Study]:
  names = ("CTres.nii.gz", "SUV.nii.gz", "SEG.nii.gz")
  folders = sorted(folder for folder, files in checks.walk(root) if any(n in files for n in names))
  studies = []
  for folder in folders:
    parts = os.path.relpath(folder, root).split(os.sep)
    if parts == ["."]:
      parts = [os.path.basename(os.path.abspath(root))]
    optional = {name: os.path.join(folder, name) for name in ("ORGANS.nii.gz", "meta.json")}
    optional = {name: path if os.path.isfile(path) else "" for name, path in optional.items()}
    studies.append(Study(
        study_id="/".join(parts), patient_id=parts[-2] if len(parts) > 1 else parts[-1], source="autopet",
        ct=os.path.join(folder, "CTres.nii.gz"), pet=os.path.join(folder, "SUV.nii.gz"),
        label=os.path.join(folder, "SEG.nii.gz"), organs=optional["ORGANS.nii.gz"],
        meta_json=optional["meta.json"], tracer="FDG"))
  return studies


_NNUNET_IMAGE = re.compile(r"^(.+)_(0000|0001)\.nii\.gz$")
_NNUNET_CASE = re.compile(r"^(fdg|psma)_([0-9A-Za-z]+)_", re.IGNORECASE)


def _find_nnunet(root: str) -> list[Study]:
  images = os.path.join(root, "imagesTr")
  if not os.path.isdir(images):
    return []
  cases = sorted({m.group(1) for name in os.listdir(images) if (m := _NNUNET_IMAGE.match(name))})
  studies = []
  for case in cases:
    m = _NNUNET_CASE.match(case)
    studies.append(Study(
        study_id=case, patient_id=f"{m.group(1).lower()}_{m.group(2)}" if m else case, source="nnunet",
        ct=os.path.join(images, f"{case}_0000.nii.gz"), pet=os.path.join(images, f"{case}_0001.nii.gz"),
        label=os.path.join(root, "labelsTr", f"{case}.nii.gz"),
        tracer=m.group(1).upper() if m else "unknown"))
  return studies


_HECKTOR_IMAGE = re.compile(r"^(.+)__(CT|PT)\.nii\.gz$")


def _find_hecktor(root: str) -> list[Study]:
  cases = sorted({(folder, m.group(1)) for folder, names in checks.walk(root)
                  for name in names if (m := _HECKTOR_IMAGE.match(name))})
  studies = []
  for folder, case in cases:
    kind = os.path.basename(folder)
    if kind in ("imagesTr", "imagesTs"):
      label = os.path.join(os.path.dirname(folder), "labels" + kind[len("images"):], f"{case}.nii.gz")
    else:
      label = os.path.join(folder, f"{case}.nii.gz")
    studies.append(Study(
        study_id=case, patient_id=case, source="hecktor", ct=os.path.join(folder, f"{case}__CT.nii.gz"),
        pet=os.path.join(folder, f"{case}__PT.nii.gz"), label=label, tracer="FDG"))
  seen: dict[str, str] = {}
  for study in studies:
    if study.study_id in seen:
      raise UserError(f"--input {root}: case {study.study_id} appears in both {seen[study.study_id]} and "
                      f"{os.path.dirname(study.pet)}; point --input at one of them")
    seen[study.study_id] = os.path.dirname(study.pet)
  return studies


def _find_dicom(root: str) -> list[Study]:
  found = dicom.find_pet_ct(root)
  per_folder = collections.Counter(study.folder for study in found)
  studies = []
  for study in found:
    study_id = os.path.relpath(study.folder, root)
    study_id = os.path.basename(os.path.abspath(root)) if study_id == "." else study_id.replace(os.sep, "/")
    label = os.path.join(study.folder, "label.nii.gz")
    if per_folder[study.folder] > 1:
      study_id += f"/{study.pet_series}"
      label = ""
    studies.append(Study(
        study_id=study_id, patient_id=study.patient_id or study_id.split("/")[0], source="dicom",
        ct=os.path.dirname(study.ct[0]) if study.ct else "", pet=os.path.dirname(study.pet[0]),
        label=label if os.path.isfile(label) else "", tracer=study.tracer, pet_files=study.pet,
        ct_files=study.ct))
  return studies


# ---------------------------------------------------------------------------------- metadata and planning
@dataclasses.dataclass(frozen=True)
class Job:
  """A study plus everything decided before its volumes are read."""
  study: Study
  tracer: str
  age: float
  sex: str
  diagnosis: str
  stage: int
  split: str
  text: str
  text_embedding: np.ndarray  # (E,) float32
  key: str  # names the staged record: hash of study, input files, metadata and config


_CSV_KEYS = {"study_id": ("study_id", "study", "case", "case_id"), "patient_id": ("patient_id", "patientid",
                                                                                  "patient")}
_CSV_FIELDS = {"age": ("age",), "sex": ("sex", "gender"), "diagnosis": ("diagnosis",),
               "stage": ("stage", "ann_arbor_stage", "ann_arbor"), "tracer": ("tracer",)}


@dataclasses.dataclass(frozen=True)
class ClinicalTable:
  """Rows of a clinical CSV, keyed by study id (`key == "study_id"`) or by patient id."""
  path: str
  key: str
  rows: dict[str, dict[str, str]]

  def lookup(self, study: Study) -> dict[str, str]:
    return self.rows.get(study.study_id if self.key == "study_id" else study.patient_id, {})


def read_clinical_csv(path: str) -> ClinicalTable:
  """Reads the metadata CSV: a study_id (or case) or patient_id column plus age/sex/diagnosis/stage/tracer."""
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      header = {re.sub(r"\W+", "_", (h or "").strip().lower()): h for h in reader.fieldnames or []}
      rows = list(reader)
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise UserError(f"config.metadata_csv={path}: cannot read ({e})") from None
  key = next((k for k, names in _CSV_KEYS.items() if any(n in header for n in names)), None)
  if key is None:
    raise UserError(f"config.metadata_csv={path}: needs a study_id or patient_id column; "
                    f"found {', '.join(header) or 'no columns'}")
  key_column = header[next(n for n in _CSV_KEYS[key] if n in header)]
  columns = {field: header[n] for field, names in _CSV_FIELDS.items() for n in names if n in header}
  table: dict[str, dict[str, str]] = {}
  for line, row in enumerate(rows, start=2):
    name = (row.get(key_column) or "").strip()
    if name in table:
      raise UserError(f"config.metadata_csv={path}: line {line}: {key} {name!r} appears twice")
    table[name] = {field: (row.get(column) or "").strip() for field, column in columns.items()}
  return ClinicalTable(path, key, table)


def plan_jobs(studies: Sequence[Study], config: ml_collections.ConfigDict) -> tuple[list[Job], list[str]]:
  """Metadata, patient-level split, prompt and text embedding per study. Returns (jobs, error lines)."""
  table = read_clinical_csv(config.metadata_csv) if config.metadata_csv else None
  planned, errors = [], []
  for study in studies:
    try:
      planned.append(_study_metadata(study, table))
    except UserError as e:
      errors.append(str(e))
  prompts = [make_prompt(meta, config.prompt_template) for _, meta in planned]
  embeddings = embed_prompts(sorted(set(prompts)), config.text_encoder)
  jobs = []
  for (study, meta), text in zip(planned, prompts):
    split = patient_split(study.patient_id, config.seed, config.val_fraction, config.test_fraction)
    job = Job(study=study, split=split, text=text, text_embedding=embeddings[text], key="", **meta)
    jobs.append(dataclasses.replace(job, key=_job_key(job, config)))
  return jobs, errors


def embed_prompts(prompts: Sequence[str], encoder: str) -> dict[str, np.ndarray]:
  """Text embedding (E,) float32 per distinct prompt; E = 0 for `encoder == "none"`."""
  if encoder == "none":
    return {p: np.zeros((0,), np.float32) for p in prompts}
  try:
    from petfm.models.text_encoder import encode_texts  # frozen MiniLM, torch-free
  except ImportError as e:
    raise UserError(f"config.text_encoder={encoder!r}: the text encoder is not available ({e})") from None
  vectors = np.asarray(encode_texts(list(prompts)), np.float32) if prompts else np.zeros((0, 0), np.float32)
  return dict(zip(prompts, vectors))


def patient_split(patient_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
  """train / val / test from a hash of (seed, patient): stable when patients are added or removed."""
  digest = hashlib.sha256(f"{seed}/{patient_id}".encode()).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def _study_metadata(study: Study, table: ClinicalTable | None) -> tuple[Study, dict[str, Any]]:
  values: dict[str, Any] = {"tracer": study.tracer}
  sources = [study.meta_json] if study.meta_json else []
  if study.meta_json:
    try:
      with open(study.meta_json) as f:
        meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise UserError(f"study {study.study_id}: meta.json: cannot read ({e})") from None
    if not isinstance(meta, dict):
      raise UserError(f"study {study.study_id}: meta.json: expected a JSON object")
    meta = {k.lower(): v for k, v in meta.items()}
    if meta.get("patient_id"):
      study = dataclasses.replace(study, patient_id=str(meta["patient_id"]))
    values.update({field: meta[name] for field, names in _CSV_FIELDS.items() for name in reversed(names)
                   if name in meta and not _missing(meta[name])})
  if table is not None:
    row = {k: v for k, v in table.lookup(study).items() if not _missing(v)}
    sources += [os.path.basename(table.path)] if row else []
    values.update(row)
  where = f"study {study.study_id}: {' / '.join(os.path.basename(s) for s in sources) or 'metadata'}"
  return study, {
      "tracer": _parse_tracer(values.get("tracer")), "age": _parse_age(values.get("age"), where),
      "sex": _parse_sex(values.get("sex"), where), "stage": _parse_stage(values.get("stage"), where),
      "diagnosis": "" if _missing(values.get("diagnosis")) else str(values["diagnosis"]).strip()}


def _missing(value: Any) -> bool:
  if isinstance(value, float):
    return math.isnan(value)
  return value is None or str(value).strip().lower() in ("", "nan", "na", "n/a", "none", "unknown", "?")


def _parse_tracer(value: Any) -> str:
  text = "" if _missing(value) else str(value).upper()
  return "PSMA" if "PSMA" in text else "FDG" if "FDG" in text else "unknown"


def _parse_age(value: Any, where: str) -> float:
  if _missing(value):
    return math.nan
  try:
    age = float(value)
  except (TypeError, ValueError):
    age = math.nan
  if not 0 <= age <= 130:
    raise UserError(f"{where}: age {value!r} is not a number of years in [0, 130]")
  return age


def _parse_sex(value: Any, where: str) -> str:
  text = "" if _missing(value) else str(value).strip().upper()
  if text in ("", "U", "O", "OTHER"):
    return "unknown"
  if text in ("M", "MALE", "F", "FEMALE"):
    return text[0]
  raise UserError(f"{where}: sex {value!r} is not M or F")


_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4}


def _parse_stage(value: Any, where: str) -> int:
  if _missing(value):
    return 0
  text = re.sub(r"^STAGE\s*", "", str(value).strip().upper())
  m = re.fullmatch(r"(IV|III|II|I|[0-4](?:\.0)?)[A-Z]*", text)
  if not m:
    raise UserError(f"{where}: stage {value!r} is not an Ann Arbor stage (1-4 or I-IV)")
  return _ROMAN.get(m.group(1)) or int(float(m.group(1)))


def _job_key(job: Job, config: ml_collections.ConfigDict) -> str:
  study = dataclasses.asdict(job.study)
  files = {name: _file_stamp(path) for name, path in study.items() if name in ("ct", "pet", "label", "organs",
                                                                               "meta_json")}
  settings = {k: v for k, v in config.to_dict().items() if k != "records_per_shard"}
  payload = json.dumps({
      "study": study, "files": files, "config": settings,
      "dicom": [_file_stamp(path) for path in job.study.pet_files + job.study.ct_files],
      "version": [records.FORMAT_VERSION, CONVERTER_VERSION],
      "job": [job.tracer, job.age, job.sex, job.diagnosis, job.stage, job.split, job.text],
      "embedding": hashlib.sha256(job.text_embedding.tobytes()).hexdigest()}, sort_keys=True, default=str)
  return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _file_stamp(path: str) -> list[int] | None:
  try:
    stat = os.stat(path)
  except OSError:
    return None
  return [stat.st_size, stat.st_mtime_ns]


# --------------------------------------------------------------------------------------- one study → record
def convert_study(job: Job, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Reads, checks, aligns and resamples one study; returns its record (fields: `petfm.data.records`).

  Raises `UserError` (one line naming the study, file and problem) for bad input.
  """
  study = job.study
  pet_image = _read_image(study, "PET", config)
  pet, pet_affine = geometry.to_canonical(pet_image)
  reference = (pet_affine, pet.shape)
  grid = geometry.grid_at_spacing(pet_affine, pet.shape, config.spacing)
  suv = geometry.resample(pet.astype(np.float32, copy=False), pet_affine, *grid, order=1, cval=0.0)
  ct_image = _read_image(study, "CT", config)
  ct = _onto_grid(ct_image, study, "CT", reference, grid, config, order=1, cval=CT_FILL_HU)
  ct = np.clip(np.rint(ct), np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)
  label = np.zeros(grid[1], np.uint8)
  if study.label and (os.path.exists(study.label) or config.require_label):  # '' = none in this layout
    label_image = _as_labels(load_image(study.label, "label", study.study_id), _where(study, "label"),
                             LABEL_VALUES.get(study.source, range(256)))
    if not np.any(label_image.dataobj) and not config.allow_empty_label:
      raise UserError(
          f"{_where(study, 'label')}: the lesion mask is empty (all zeros); if this is a negative control "
          "(real autoPET FDG has 513 of them), keep it with --config.allow_empty_label=True")
    label = _onto_grid(label_image, study, "label", reference, grid, config, order=0, cval=0)
  organs = np.zeros(grid[1], np.uint8)
  if study.organs:
    organ_image = _as_labels(load_image(study.organs, "organs", study.study_id), _where(study, "organs"),
                             range(256))
    organs = _onto_grid(organ_image, study, "organs", reference, grid, config, order=0, cval=0)
  lesions, count = ndimage.label(label > 0, structure=np.ones((3, 3, 3), bool))
  if count > np.iinfo(np.uint16).max:
    raise UserError(f"study {study.study_id}: the lesion mask has {count} separate components (max 65535)")
  lesions = lesions.astype(np.uint16)
  return {
      "study_id": study.study_id, "patient_id": study.patient_id, "split": job.split, "source": study.source,
      "ct": ct, "suv": suv, "label": label, "lesions": lesions, "organs": organs,
      "targets": np.concatenate([_targets(organs, records.TARGET_ORGAN),
                                 _targets(lesions, records.TARGET_LESION)]),
      "spacing": geometry.voxel_sizes(grid[0]), "affine": grid[0],
      "original_affine": pet_image.affine, "original_shape": np.asarray(pet_image.shape),
      "tracer": job.tracer, "age": job.age, "sex": job.sex, "diagnosis": job.diagnosis, "stage": job.stage,
      "text": job.text, "text_embedding": job.text_embedding,
  }


def _read_image(study: Study, role: str, config: ml_collections.ConfigDict) -> nib.Nifti1Image:
  """The study's PET (in SUV) or CT: its NIfTI file, or for the dicom layout its series read from DICOM."""
  if study.source != "dicom":
    return load_image(study.pet if role == "PET" else study.ct, role, study.study_id)
  files = study.pet_files if role == "PET" else study.ct_files
  where = f"study {study.study_id}"
  if not files:
    raise UserError(f"{where}: no {role} series in the DICOM study (needs a PET series and a CT series)")
  if role == "CT":
    volume = dicom.read_series(files, where)
    return nib.Nifti1Image(volume.array, volume.affine)
  suv, affine = dicom.read_pet_suv(files, where, config.dicom_weight_kg, "--config.dicom_weight_kg=KG")
  return nib.Nifti1Image(suv, affine)


def _onto_grid(image: nib.Nifti1Image, study: Study, role: str, reference: tuple[np.ndarray, tuple],
               grid: tuple[np.ndarray, tuple], config: ml_collections.ConfigDict, order: int,
               cval: float) -> np.ndarray:
  """Canonical orientation, alignment check against the PET grid `reference`, resampling onto `grid`."""
  array, affine = geometry.to_canonical(image)
  pet_affine, pet_shape = reference
  where = _where(study, role)
  if array.shape == tuple(pet_shape):
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in pet_shape], [1], indexing="ij")).reshape(4, -1)
    offset = float(np.abs((affine - pet_affine) @ corners).max())
    if offset > geometry.voxel_sizes(pet_affine).max():
      raise UserError(f"{where}: same shape {array.shape} as the PET but its affine places it up to "
                      f"{offset:.0f} mm away from the PET voxels; the headers disagree, cannot align")
  else:
    overlap = geometry.overlap_fraction(affine, array.shape, pet_affine, pet_shape)
    if overlap < config.min_overlap:
      raise UserError(f"{where}: overlaps the PET in only {overlap:.0%} of the smaller field of view (needs "
                      f"{config.min_overlap:.0%}); PET and {role} cannot be aligned, check the affines")
  return geometry.resample(array, affine, *grid, order=order, cval=cval)


def _where(study: Study, role: str) -> str:
  """Error-message prefix naming the study and one of its files, e.g. `study S: SEG.nii.gz (label)`."""
  path = {"CT": study.ct, "PET": study.pet, "label": study.label, "organs": study.organs}[role]
  return f"study {study.study_id}: {os.path.basename(path)} ({role})"


def _as_labels(image: nib.Nifti1Image, where: str, allowed: Collection[int]) -> nib.Nifti1Image:
  """The image with uint8 data; raises `UserError` unless every voxel is an integer in `allowed`."""
  data = np.asanyarray(image.dataobj)
  checks.check_labels(data, where, allowed)
  return nib.Nifti1Image(data.astype(np.uint8), image.affine, image.header)


def _targets(labels: np.ndarray, kind: int) -> np.ndarray:
  """Rows [kind, id, voxels, cx, cy, cz] (int32) for every nonzero id in `labels`; centroid in voxels."""
  counts = np.bincount(labels.ravel())
  ids = np.flatnonzero(counts[1:]) + 1
  if not ids.size:
    return np.zeros((0, 6), np.int32)
  centres = np.rint(np.array(ndimage.center_of_mass(labels > 0, labels, ids)))
  return np.column_stack([np.full(ids.size, kind), ids, counts[ids], centres]).astype(np.int32)


# ------------------------------------------------------------------------------ batch: stage, pack, manifest
@dataclasses.dataclass
class Summary:
  """What a conversion run did."""
  output_dir: str
  layout: str
  converted: int  # studies converted by this run
  skipped: int  # studies already converted by an earlier run (reused)
  errors: list[str]  # one line per study that failed
  split_counts: dict[str, int]
  spacing: tuple[float, ...]
  num_shards: int
  total_bytes: int

  @property
  def failed(self) -> int:
    return len(self.errors)

  def __str__(self) -> str:
    splits = ", ".join(f"{name} {n}" for name, n in self.split_counts.items())
    lines = [f"{self.output_dir} ({self.layout} input): converted {self.converted}, skipped {self.skipped} "
             f"(already converted), failed {self.failed}",
             f"  studies per split: {splits}; spacing {'×'.join(f'{s:g}' for s in self.spacing)} mm; "
             f"{self.num_shards} shards, {self.total_bytes / 2**20:.1f} MiB"]
    if self.errors:
      lines.append(f"  {self.failed} studies failed (lines above, also under 'errors' in manifest.json)")
    return "\n".join(lines)


def read_organ_labels(input_dir: str) -> dict[str, str]:
  """`input_dir/organs.json` ({"id": "name"} of the ORGANS.nii.gz label values, as `data_prep.synthetic`
  writes), or {} when there is none."""
  path = os.path.join(input_dir, "organs.json")
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      table = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not a readable JSON file ({e})") from None
  if not isinstance(table, dict) or not all(k.isdigit() and isinstance(v, str) for k, v in table.items()):
    raise UserError(f"{path}: expected an object of label id → organ name, e.g. {{\"10\": \"liver\"}}")
  return {str(int(k)): v for k, v in table.items()}


def convert(input_dir: str, output_dir: str, config: ml_collections.ConfigDict, workers: int = 1,
            progress: bool = True) -> Summary:
  """Converts every study under `input_dir` into ArrayRecord shards + manifest.json in `output_dir`.

  Bad studies are reported (one line each on stderr, and in `Summary.errors` and the manifest) and skipped.
  Studies converted by an earlier run with the same input files and config are reused, not reconverted.
  A URL `output_dir` (gs://...) is converted in its local mirror `paths.cache_dir(output_dir)` (ArrayRecord
  writes local files), then uploaded, manifest last.
  """
  if not paths.is_local(output_dir):
    summary = convert(input_dir, paths.cache_dir(output_dir), config, workers, progress)
    paths.upload_tree(paths.cache_dir(output_dir), output_dir, last=(records.MANIFEST,))
    return summary
  check_config(config)
  checks.output_dir(output_dir, "--output")
  layout, studies = find_studies(input_dir, config.layout)
  organ_labels = read_organ_labels(input_dir)
  jobs, errors = plan_jobs(studies, config)
  for line in errors:
    _report(line)
  previous = _read_previous(output_dir)
  staging = os.path.join(output_dir, STAGING)
  os.makedirs(staging, exist_ok=True)
  done = {job.key for job in jobs if job.key in previous or os.path.exists(_staged_path(staging, job.key))}
  skipped = len(done)
  todo = [job for job in jobs if job.key not in done]
  for job, error in _run(todo, config, staging, workers, progress):
    if error:
      errors.append(error)
      _report(error)
    else:
      done.add(job.key)
  packed = [job for job in jobs if job.key in done]
  splits = (_pack(output_dir, layout, packed, previous, errors, config, organ_labels)["splits"]
            if packed else {})
  if os.path.isdir(staging) and not os.listdir(staging):
    os.rmdir(staging)
  return Summary(
      output_dir=output_dir, layout=layout, converted=len(packed) - skipped, skipped=skipped, errors=errors,
      split_counts={s: splits[s]["num_records"] if splits else 0 for s in SPLITS},
      spacing=tuple(float(s) for s in np.broadcast_to(config.spacing, (3,))),
      num_shards=sum(len(v["shards"]) for v in splits.values()),
      total_bytes=sum(v["num_bytes"] for v in splits.values()))


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `UserError` naming the first bad config field."""
  check_choice(config, "layout", ("auto", *LAYOUTS))
  check_choice(config, "text_encoder", ("none", "minilm"))
  spacing = np.asarray(config.spacing, np.float64)
  check(spacing.ndim == 1 and spacing.size in (1, 3) and bool(np.all((spacing >= 0.1) & (spacing <= 20))),
        "spacing", f"{config.spacing} must be one or three voxel sizes in [0.1, 20] mm, e.g. '(2,2,3)'")
  fractions = (config.val_fraction, config.test_fraction)
  check(min(fractions) >= 0 and sum(fractions) <= 1, "val_fraction",
        f"val_fraction={fractions[0]} and test_fraction={fractions[1]} must be ≥ 0 with a sum ≤ 1")
  check(config.records_per_shard >= 1, "records_per_shard", "must be ≥ 1")
  check(0 < config.min_overlap <= 1, "min_overlap", "must be in (0, 1]")
  check(config.dicom_weight_kg == 0 or 1 <= config.dicom_weight_kg <= 500, "dicom_weight_kg",
        "must be 0 (use PatientWeight from the DICOM headers) or a weight in [1, 500] kg")
  check(not config.metadata_csv or os.path.isfile(config.metadata_csv), "metadata_csv",
        f"file {config.metadata_csv!r} does not exist")
  make_prompt({}, config.prompt_template)


def _report(line: str) -> None:
  tqdm.write(f"error: {line}", file=sys.stderr)


def _staged_path(staging: str, key: str) -> str:
  return os.path.join(staging, f"{key}.array_record")


def _stage(job: Job, config: dict[str, Any], path: str) -> str | None:
  """Worker: converts one study into its staging file. Returns the error line for bad input, else None."""
  try:
    record = convert_study(job, ml_collections.ConfigDict(config))
  except UserError as e:
    return str(e)
  except MemoryError:
    return f"study {job.study.study_id}: not enough memory to convert it"
  write_array_record(path, [records.encode(record)])
  return None


def _run(jobs: Sequence[Job], config: ml_collections.ConfigDict, staging: str, workers: int,
         progress: bool) -> Iterable[tuple[Job, str | None]]:
  """Converts `jobs` to staging files with `workers` processes; yields (job, error or None) as they finish."""
  settings = config.to_dict()
  bar = tqdm(total=len(jobs), desc="converting", unit="study", file=sys.stderr,
             disable=not progress or not jobs)
  with bar:
    if workers <= 1 or len(jobs) <= 1:
      for job in jobs:
        yield job, _stage(job, settings, _staged_path(staging, job.key))
        bar.update()
      return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
      futures = {pool.submit(_stage, job, settings, _staged_path(staging, job.key)): job for job in jobs}
      try:
        for future in concurrent.futures.as_completed(futures):
          yield futures[future], future.result()
          bar.update()
      except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise


def write_array_record(path: str, items: Iterable[bytes]) -> int:
  """Writes `items` to an ArrayRecord file (`group_size:1`) so that it appears complete or not at all."""
  tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}-{os.getpid()}")
  count = 0
  try:
    writer = ArrayRecordWriter(tmp, "group_size:1")
    try:
      for item in items:
        writer.write(item)
        count += 1
    finally:
      writer.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return count


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _read_previous(output_dir: str) -> dict[str, tuple[str, int]]:
  """Studies in the output folder's current manifest: key → (shard path, index)."""
  if not os.path.exists(os.path.join(output_dir, records.MANIFEST)):
    return {}
  try:
    manifest = records.read_manifest(output_dir)
  except (UserError, ValueError) as e:
    raise UserError(f"--output {output_dir}: holds a manifest.json that is not a petfm dataset ({e}); "
                    "choose an empty or petfm output folder") from None
  found = {}
  for study in manifest.get("studies", []):
    shard = os.path.join(output_dir, study["shard"])
    if study.get("key") and os.path.exists(shard):
      found[study["key"]] = (shard, study["index"])
  return found


def _pack(output_dir: str, layout: str, jobs: Sequence[Job], previous: dict[str, tuple[str, int]],
          errors: Sequence[str], config: ml_collections.ConfigDict,
          organ_labels: dict[str, str] | None = None) -> dict[str, Any]:
  """Writes the shards of every split into a new `records-<id>/` folder, then the manifest; cleans up."""
  by_split = {split: sorted((j for j in jobs if j.split == split), key=lambda j: j.study.study_id)
              for split in SPLITS}
  per_shard = config.records_per_shard
  layout_id = json.dumps([[s, [j.key for j in js], per_shard] for s, js in by_split.items()])
  records_dir = "records-" + hashlib.sha256(layout_id.encode()).hexdigest()[:12]
  staging = os.path.join(output_dir, STAGING)
  readers: dict[str, ArrayRecordReader] = {}

  def record_bytes(job: Job) -> bytes:
    staged = _staged_path(staging, job.key)
    if os.path.exists(staged):
      path, index = staged, 0
    else:
      path, index = previous[job.key]
    if path not in readers:
      readers[path] = ArrayRecordReader(path)
    return readers[path].read([index])[0]

  tmp_dir = os.path.join(output_dir, f".tmp-{records_dir}")
  shutil.rmtree(tmp_dir, ignore_errors=True)
  os.makedirs(tmp_dir)
  splits, studies = {}, []
  try:
    for split, split_jobs in by_split.items():
      num_shards = math.ceil(len(split_jobs) / per_shard)
      shards = []
      for shard_index in range(num_shards):
        name = f"{split}-{shard_index:05d}-of-{num_shards:05d}.array_record"
        chunk = split_jobs[shard_index * per_shard:(shard_index + 1) * per_shard]
        data = [record_bytes(job) for job in chunk]
        write_array_record(os.path.join(tmp_dir, name), data)
        shards.append(f"{records_dir}/{name}")
        for index, (job, item) in enumerate(zip(chunk, data)):
          studies.append(_manifest_entry(job, item, shards[-1], index))
      num_bytes = sum(os.path.getsize(os.path.join(tmp_dir, os.path.basename(s))) for s in shards)
      splits[split] = {"shards": shards, "num_records": len(split_jobs), "num_bytes": num_bytes}
  finally:
    for reader in readers.values():
      reader.close()
  _fsync_dir(tmp_dir)
  final_dir = os.path.join(output_dir, records_dir)
  if os.path.exists(final_dir):  # same studies as the current manifest, or left over from a crash
    shutil.rmtree(final_dir)
  os.replace(tmp_dir, final_dir)
  _fsync_dir(output_dir)
  manifest = {
      "format": "petfm-records", "version": records.FORMAT_VERSION, "layout": layout,
      "spacing": [float(s) for s in np.broadcast_to(config.spacing, (3,))], "records_dir": records_dir,
      "splits": splits, "studies": studies, "prompts": sorted({j.text for j in jobs}),
      "config": config.to_dict(), "errors": list(errors), "organ_labels": organ_labels or {}}
  records.write_atomic(os.path.join(output_dir, records.MANIFEST), json.dumps(manifest, indent=1))
  for name in os.listdir(output_dir):
    if (name.startswith("records-") and name != records_dir) or name.startswith(".tmp-") or name == STAGING:
      path = os.path.join(output_dir, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  return manifest


def _manifest_entry(job: Job, item: bytes, shard: str, index: int) -> dict[str, Any]:
  record = records.decode(item, fields=("label", "spacing", "targets"))
  targets = record["targets"]
  return {
      "study_id": job.study.study_id, "patient_id": job.study.patient_id, "split": job.split, "shard": shard,
      "index": index, "shape": list(record["label"].shape), "spacing": record["spacing"].tolist(),
      "tracer": job.tracer, "stage": job.stage, "has_label": os.path.exists(job.study.label),
      "lesions": targets[targets[:, 0] == records.TARGET_LESION][:, 1:3].tolist(),
      "organs": targets[targets[:, 0] == records.TARGET_ORGAN][:, 1:3].tolist(),
      "text": job.text, "source": job.study.source, "key": job.key}


# -------------------------------------------------------------------------------------------------- CLI
def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("input", None, "folder of NIfTI studies (autoPET, nnU-Net or HECKTOR layout) or DICOM",
                      flag_values=fv)
  flags.DEFINE_string("output", None, "folder for the ArrayRecord shards and manifest.json", flag_values=fv)
  flags.DEFINE_integer("workers", None, "parallel processes (default: the number of CPUs)", flag_values=fv)


def main(argv: Sequence[str]) -> int:
  """`petfm prepare`: returns 0 when every study converted, 1 when some failed (UserError → exit 2)."""
  argv = list(argv)
  if not any(a in ("--config", "-config") or a.startswith(("--config=", "-config=")) for a in argv):
    argv = ["--config", DEFAULT_CONFIG, *argv]
  fv = parse_command_line(argv, "prepare", _define_flags)
  for name in ("input", "output"):
    if not fv[name].value:
      raise UserError(f"--{name} DIR is required")
  workers = fv.workers if fv.workers is not None else len(os.sched_getaffinity(0))
  if workers < 1:
    raise UserError(f"--workers={workers}: must be ≥ 1")
  summary = convert(fv.input, fv.output, fv.config, workers=workers)
  print(summary)
  return 1 if summary.errors else 0


if __name__ == "__main__":
  from petfm.cli import main as cli_main

  sys.exit(cli_main(["prepare", *sys.argv[1:]]))
