"""PET/CT studies in the supported input layouts → one record each: discovery, metadata, conversion.

The per-study core of `petfm prepare` (whose batching, shards and manifest live in `data_prep/convert.py`) and
of `petfm predict-lesions`, which converts one study exactly as it was stored for training.

Layouts (auto-detected by `find_studies`, or named):
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

Per study (`convert_study`): every volume is reoriented to RAS+ from its affine, checked to overlap the PET in
world space, and resampled straight from its own grid onto the stored grid, which is the PET field of view at
the configured spacing (linear for CT and SUV, nearest for labels). See `petfm.data.records` for the fields.
The config (`get_config`, also `data_prep/configs/convert.py`) holds every conversion setting.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Collection, Sequence
from typing import Any

import ml_collections
import nibabel as nib
import numpy as np
from scipy import ndimage

from petfm.config import parse_arg
from petfm.data import checks, dicom, geometry, records
from petfm.data.nifti import load_image
from petfm.data.text import make_prompt
from petfm.errors import UserError

LAYOUTS = ("autopet", "nnunet", "hecktor", "dicom")
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
SPLITS = ("train", "val", "test")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Conversion settings; ARG = `SPACING[,layout=...]`, e.g. "1.5" or "4.0,layout=hecktor"."""
  arg = parse_arg(arg, spacing=4.0, layout="auto")
  c = ml_collections.ConfigDict()
  # Input layout: auto | autopet (PETCT_*/<study>/{CTres,SUV,SEG}.nii.gz) | nnunet (imagesTr/<case>_0000 CT,
  # _0001 SUV, labelsTr/<case>) | hecktor (<Center>-<ID>__CT / __PT / <Center>-<ID>.nii.gz).
  # | dicom (DICOM files, any folders: a PET and a CT series per study; SUV from the PET headers).
  c.layout = arg.layout
  # Voxel size (mm) of the stored grid: one value (isotropic) or three. Images linear, labels nearest.
  c.spacing = (arg.spacing,) * 3
  # Optional CSV with clinical data, keyed by a study_id (or case) and/or patient_id column; other columns:
  # age, sex (or gender), diagnosis, stage (Ann Arbor 1-4 or I-IV), tracer. Overrides meta.json values.
  c.metadata_csv = ""
  # Splits by patient: a hash of (seed, patient id) puts each patient in test / val / train.
  c.seed = 0
  c.val_fraction = 0.1
  c.test_fraction = 0.1
  # An all-zero lesion mask is an error unless this is True (autoPET FDG has 513 negative controls).
  c.allow_empty_label = False
  # A study without a label file is an error unless this is False (it is then stored with an all-zero label).
  c.require_label = True
  # CT and PET on different grids must share at least this fraction of the smaller field of view.
  c.min_overlap = 0.5
  # Metadata prompt (see petfm.data.text) and the frozen text encoder that embeds it: none | minilm.
  c.prompt_template = "{tracer} PET/CT"
  c.text_encoder = "none"
  # Studies per ArrayRecord shard (≈ 10-40 MB per whole-body study at 4 mm before compression).
  c.records_per_shard = 16
  # DICOM input: patient weight (kg) for SUV instead of PatientWeight (0010,1030) in every PET series; 0 = use
  # the headers. For studies whose weight is missing or wrong (e.g. removed by de-identification).
  c.dicom_weight_kg = 0.0
  return c


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
