"""The on-disk study record: one ArrayRecord record per study, plus a JSON manifest per dataset folder.

A record is an uncompressed `.npz` archive (numpy's own format, no pickle) holding the fields below; the
ArrayRecord writer compresses each record with zstd. All volumes share one canonical grid: RAS+ axes
(array axis 0 increases towards the patient's Right, axis 1 towards Anterior, axis 2 towards Superior), the
orientation `nibabel.as_closest_canonical` produces, resampled to the configured spacing.

| field            | dtype / shape     | meaning                                                            |
|------------------|-------------------|--------------------------------------------------------------------|
| study_id         | str               | unique study name                                                  |
| patient_id       | str               | patient (splits are by patient)                                    |
| split            | str               | train / val / test                                                 |
| ct               | int16 (X, Y, Z)   | CT in HU on the PET grid, canonical orientation, target spacing    |
| suv              | float32 (X, Y, Z) | PET in SUV (body weight)                                           |
| label            | uint8 (X, Y, Z)   | semantic label (autoPET: 1 = lesion; HECKTOR: 1 GTVp, 2 GTVn)      |
| lesions          | uint16 (X, Y, Z)  | connected components of label > 0, numbered 1..K                   |
| organs           | uint8 (X, Y, Z)   | organ label map (0 = none; all zeros when the study has none)      |
| targets          | int32 (T, 6)      | rows [kind, id, voxels, cx, cy, cz]; kind 0 = organ id,            |
|                  |                   | 1 = lesion component                                               |
| spacing          | float64 (3,)      | voxel size in mm of the stored grid                                |
| affine           | float64 (4, 4)    | voxel → world (mm, RAS+) of the stored grid                        |
| original_affine  | float64 (4, 4)    | affine of the reference (PET) image as read from disk              |
| original_shape   | int64 (3,)        | its shape                                                          |
| tracer           | str               | FDG, PSMA or unknown                                               |
| age              | float64 ()        | years, NaN when unknown                                            |
| sex              | str               | M, F or unknown                                                    |
| diagnosis        | str               | free text, '' when unknown                                         |
| stage            | int64 ()          | Ann Arbor 1..4, 0 when unknown                                     |
| text             | str               | metadata prompt used by ContextAlign                               |
| text_embedding   | float32 (E,)      | frozen text-encoder embedding of `text` (E = 0 when none was       |
|                  |                   | computed)                                                          |
| source           | str               | input layout: autopet, nnunet, hecktor, dicom                      |

`decode` returns a dict with numpy arrays for array fields and Python scalars/str for the others.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from petfm import paths
from petfm.paths import write_atomic  # noqa: F401  (records.write_atomic: the path layer's)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

ARRAY_FIELDS = {
    "ct": np.int16, "suv": np.float32, "label": np.uint8, "lesions": np.uint16, "organs": np.uint8,
    "targets": np.int32, "spacing": np.float64, "affine": np.float64, "original_affine": np.float64,
    "original_shape": np.int64, "text_embedding": np.float32,
}
STR_FIELDS = ("study_id", "patient_id", "split", "tracer", "sex", "diagnosis", "text", "source")
SCALAR_FIELDS = {"age": float, "stage": int}
VOLUME_FIELDS = ("ct", "suv", "label", "lesions", "organs")
TARGET_ORGAN, TARGET_LESION = 0, 1
TRACERS = ("FDG", "PSMA", "unknown")


def encode(record: Mapping[str, Any]) -> bytes:
  """Serialises a study record (see the module docstring) to bytes; checks fields, dtypes and shapes."""
  missing = set(ARRAY_FIELDS) | set(STR_FIELDS) | set(SCALAR_FIELDS)
  missing -= set(record)
  if missing:
    raise ValueError(f"record {record.get('study_id', '?')}: missing fields {sorted(missing)}")
  arrays = {k: np.asarray(record[k], dtype=dt) for k, dt in ARRAY_FIELDS.items()}
  shape = arrays["ct"].shape
  for k in VOLUME_FIELDS:
    if arrays[k].shape != shape or arrays[k].ndim != 3:
      raise ValueError(f"record {record['study_id']}: {k} has shape {arrays[k].shape}, "
                       f"expected {shape} (3-D)")
  for k in STR_FIELDS:
    arrays[k] = np.asarray(str(record[k]))
  for k, kind in SCALAR_FIELDS.items():
    arrays[k] = np.asarray(kind(record[k]))
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def decode(data: bytes, fields: Iterable[str] | None = None) -> dict[str, Any]:
  """Inverse of `encode`. `fields` limits the result to those fields (only they are read)."""
  wanted = set(ARRAY_FIELDS) | set(STR_FIELDS) | set(SCALAR_FIELDS) if fields is None else set(fields)
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    out: dict[str, Any] = {k: npz[k] for k in ARRAY_FIELDS if k in wanted}
    out.update({k: str(npz[k]) for k in STR_FIELDS if k in wanted})
    out.update({k: kind(npz[k]) for k, kind in SCALAR_FIELDS.items() if k in wanted})
  return out


def read_manifest(data_dir: str) -> dict[str, Any]:
  """Reads `DATA_DIR/manifest.json` (local folder or URL); raises `UserError` when the folder holds no
  converted dataset."""
  from petfm.errors import UserError
  path = paths.join(data_dir, MANIFEST)
  if not paths.exists(path):
    raise UserError(f"{data_dir}: no {MANIFEST}; convert NIfTI studies first with `petfm prepare`")
  try:
    manifest = json.loads(paths.read_text(path))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path}: cannot read ({' '.join(str(e).split())})") from None
  if (not isinstance(manifest, dict) or manifest.get("format") != "petfm-records"
      or manifest.get("version") != FORMAT_VERSION):
    raise UserError(f"{path}: not a petfm records manifest of version {FORMAT_VERSION}")
  missing = [k for k in ("spacing", "splits", "studies", "prompts") if k not in manifest]
  if missing:
    raise UserError(f"{path}: incomplete manifest, no {', '.join(missing)}; convert again with `petfm prepare`")
  return manifest


def organ_labels(data_dir: str) -> dict[str, str]:
  """{"label id": organ name} of the dataset's organ label maps (manifest `organ_labels`, written by `petfm
  prepare` from the input's organs.json; {} when the input had none). `UserError` for a manifest written
  before `petfm prepare` recorded them."""
  from petfm.errors import UserError
  manifest = read_manifest(data_dir)
  if "organ_labels" not in manifest:
    raise UserError(f"{paths.join(data_dir, MANIFEST)}: has no organ_labels (written by an older `petfm "
                    "prepare`); convert the studies again with `petfm prepare` to record the organ names")
  return manifest["organ_labels"]


def shard_files(data_dir: str, shards: Iterable[str]) -> list[str]:
  """Local files of the ArrayRecord `shards` of `data_dir` (ArrayRecord reads local files only: shards of a
  remote `data_dir` are read from their `paths.local_copy`); `UserError` for a missing one."""
  from petfm.errors import UserError
  out = []
  for shard in shards:
    path = paths.join(data_dir, shard)
    if not paths.isfile(path):
      raise UserError(f"{path}: shard named in {paths.join(data_dir, MANIFEST)} is missing")
    out.append(paths.local_copy(path))
  return out
