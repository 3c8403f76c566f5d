"""Loading NIfTI volumes with validation: every problem becomes one `UserError` line naming study and file."""

from __future__ import annotations

import os
import zlib

import nibabel as nib
import numpy as np

from petfm.errors import UserError

# Voxel sizes outside this range (mm) are header errors, not scanner geometry.
MIN_SPACING_MM, MAX_SPACING_MM = 0.1, 20.0


def load_image(path: str, role: str, study: str) -> nib.Nifti1Image:
  """Reads a 3-D NIfTI image fully into memory and checks it.

  `role` (e.g. "CT", "PET", "label") and `study` only go into error messages. A trailing singleton 4th
  axis is dropped. Raises `UserError("study S: FILE (ROLE): problem")` when the file is missing, truncated
  or corrupt, not 3-D, holds NaN/inf voxels, or has a singular affine or a voxel size outside
  [0.1, 20] mm. Returns an in-memory `Nifti1Image` with the (scaled) stored data and the file's affine.
  """
  where = f"study {study}: {os.path.basename(path)} ({role})"
  if not os.path.isfile(path):
    raise UserError(f"{where}: file is missing ({path})")
  try:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
  except EOFError:
    raise UserError(f"{where}: file is truncated (the compressed data ends early)") from None
  except (zlib.error, OSError) as e:
    raise UserError(f"{where}: corrupt compressed data ({e})") from None
  except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, ValueError) as e:
    raise UserError(f"{where}: not a readable NIfTI image ({e})") from None
  if isinstance(img, nib.Nifti1Image):  # also Nifti2Image
    with nib.openers.ImageOpener(path) as f:  # nibabel's own header check turns a zero pixdim into 1 mm
      raw = img.header_class.from_fileobj(f, check=False)
    if int(raw["sform_code"]) == 0 and not np.all(raw["pixdim"][1:4] != 0):
      raise UserError(f"{where}: voxel spacing {_mm(raw['pixdim'][1:4])} mm in the header has a zero")
  data = data.astype(data.dtype.newbyteorder("="), copy=False)  # big-endian files → native byte order
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise UserError(f"{where}: array has shape {data.shape}; expected a 3-D volume")
  if min(data.shape) == 0:
    raise UserError(f"{where}: array has shape {data.shape} with an empty axis")
  affine = np.asarray(img.affine, np.float64)
  if not np.all(np.isfinite(affine)):
    raise UserError(f"{where}: the affine (voxel-to-world matrix) holds NaN or inf")
  spacing = nib.affines.voxel_sizes(affine)
  if not np.all((spacing >= MIN_SPACING_MM) & (spacing <= MAX_SPACING_MM)):
    raise UserError(f"{where}: voxel spacing {_mm(spacing)} mm is outside "
                    f"[{MIN_SPACING_MM:g}, {MAX_SPACING_MM:g}] mm")
  if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * np.prod(spacing):
    raise UserError(f"{where}: the affine is singular (voxel axes are parallel)")
  if data.dtype.kind == "f":
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
      raise UserError(f"{where}: {bad} voxels are NaN or infinite")
  return nib.Nifti1Image(data, affine, img.header if isinstance(img, nib.Nifti1Image) else None)


def _mm(values: np.ndarray) -> str:
  return "×".join(f"{v:g}" for v in values)
