"""Loading NIfTI volumes with validation: every problem becomes one `UserError` line naming study and file."""

from __future__ import annotations

import os

import nibabel as nib

from petfm.data import checks


def load_image(path: str, role: str, study: str) -> nib.Nifti1Image:
  """Reads a 3-D NIfTI image fully into memory and checks it.

  `role` (e.g. "CT", "PET", "label") and `study` only go into error messages. The header is checked before
  any voxel is read (`checks.nifti_header`: shape, memory limit, truncation, voxel sizes in [0.1, 20] mm,
  affine); a trailing singleton 4th axis is dropped; NaN/inf voxels are an error. Raises
  `UserError("study S: FILE (ROLE): problem")`. Returns an in-memory `Nifti1Image` with the (scaled) stored
  data and the file's affine.
  """
  where = f"study {study}: {os.path.basename(path)} ({role})"
  img = checks.nifti_header(path, where)
  data = checks.read_voxels(img, where)
  checks.check_finite(data, where)
  return nib.Nifti1Image(data, img.affine, img.header)
