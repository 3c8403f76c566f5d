"""The official SAM-Med3D / SegAnyPET inference preprocessing, and the way back to the original image grid.

Official steps (SAM-Med3D `utils/infer_utils.py`, torchio): resample to 1.5 mm isotropic (linear for the
image), reorient to RAS+ (`ToCanonical`), crop or zero-pad to 128³ centred on the target's bounding box
(`CropOrPad(mask_name=...)`), then z-normalise with the mean and (Bessel-corrected) standard deviation of the
crop's voxels > 0 (`ZNormalization(masking_method=x > 0)`), which is also SegAnyPET's only PET normalisation
(no SUV conversion or clipping). Here the canonical 1.5 mm grid is `petfm.data.geometry`'s (voxel centres from
the first original voxel centre), and the image is resampled straight onto the 128³ crop grid: voxels outside
the image get 0, exactly what padding gives. The crop start follows torchio's rule: bounding box [min, max+1),
centre = its midpoint, moved down by half a voxel when that and the crop size's parity disagree, start =
centre − size/2. Crop array axes are canonical (R, A, S) voxel axes; points fed to the model use them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from petfm.data import geometry
from petfm.errors import UserError

SPACING = 1.5
CROP_SIZE = 128


@dataclasses.dataclass(frozen=True)
class CropGeometry:
  """Where a crop lies: its grid (affine (4, 4), side), the 1.5 mm canonical grid it was cut from and the
  crop's start index on it (may be negative = padding), and the original image grid."""
  affine: np.ndarray
  size: int
  grid_affine: np.ndarray
  grid_shape: tuple[int, int, int]
  start: tuple[int, int, int]
  original_affine: np.ndarray
  original_shape: tuple[int, int, int]


def canonical_grid(affine: np.ndarray, shape: Sequence[int], spacing: float = SPACING
                   ) -> tuple[np.ndarray, tuple[int, int, int]]:
  """RAS+ grid at `spacing` mm over the field of view of `(affine, shape)` → (affine (4, 4), shape)."""
  ornt = nib.orientations.io_orientation(affine)
  canonical = np.asarray(affine, np.float64) @ nib.orientations.inv_ornt_aff(ornt, shape)
  canonical_shape = tuple(int(shape[int(axis)]) for axis in ornt[:, 0])
  return geometry.grid_at_spacing(canonical, canonical_shape, spacing)


def crop_start(centre: Sequence[float], size: int = CROP_SIZE) -> tuple[int, int, int]:
  """torchio's CropOrPad start index for a crop of `size` around `centre` (continuous voxel coordinates in
  which a bounding box [min, max+1) has centre (min + max + 1) / 2)."""
  start = []
  for c in centre:
    if (size % 2 == 0) != (float(c) % 1 == 0):
      c -= 0.5
    start.append(int(round(c - size / 2)))
  return tuple(start)


def prepare(image: np.ndarray, affine: np.ndarray, roi: np.ndarray | None = None,
            centre: Sequence[float] | None = None, size: int = CROP_SIZE, spacing: float = SPACING
            ) -> tuple[np.ndarray, CropGeometry, np.ndarray | None]:
  """Official crop of an image (X, Y, Z) on its NIfTI grid `affine`.

  The crop is centred on the bounding box of `roi` (a mask on the same grid, e.g. the label used to simulate
  clicks), else on `centre` (voxel indices of the original grid, e.g. a first click), else on the image
  centre. Returns (crop (size,)*3 float32 z-normalised over voxels > 0, geometry, roi on the crop grid
  (uint8) or None).
  """
  image = np.asarray(image)
  if image.ndim != 3:
    raise UserError(f"image: {image.ndim} dimensions, expected 3")
  affine = np.asarray(affine, np.float64)
  grid_affine, grid_shape = canonical_grid(affine, image.shape, spacing)
  if roi is not None:
    roi = np.asarray(roi) > 0
    if roi.shape != image.shape:
      raise UserError(f"roi: shape {roi.shape} differs from the image's {image.shape}")
    on_grid = geometry.resample(roi.astype(np.uint8), affine, grid_affine, grid_shape, order=0, cval=0)
    if not on_grid.any():
      raise UserError("roi: empty (after resampling to the 1.5 mm grid)")
    index = np.nonzero(on_grid)
    mid = [(i.min() + i.max() + 1) / 2 for i in index]
  else:
    voxel = (np.asarray(image.shape) - 1) / 2 if centre is None else np.asarray(centre, np.float64)
    world = affine[:3, :3] @ voxel + affine[:3, 3]
    mid = np.linalg.solve(grid_affine[:3, :3], world - grid_affine[:3, 3]) + 0.5   # voxel i spans [i, i+1)
    mid = np.round(mid * 2) / 2
  start = crop_start(mid, size)
  crop_affine = grid_affine.copy()
  crop_affine[:3, 3] = grid_affine[:3, :3] @ np.asarray(start, np.float64) + grid_affine[:3, 3]
  crop = geometry.resample(image.astype(np.float32), affine, crop_affine, (size,) * 3, order=1, cval=0)
  crop = z_normalise(crop)
  geo = CropGeometry(crop_affine, size, grid_affine, grid_shape, start, affine, tuple(image.shape))
  roi_crop = None
  if roi is not None:
    roi_crop = geometry.resample(roi.astype(np.uint8), affine, crop_affine, (size,) * 3, order=0, cval=0)
  return crop, geo, roi_crop


def z_normalise(crop: np.ndarray) -> np.ndarray:
  """(x − mean) / std over the voxels > 0 (std with Bessel's correction, as torch), applied to the whole
  crop."""
  values = crop[crop > 0]
  if values.size < 2 or values.std() == 0:
    raise UserError("image: the crop has fewer than 2 distinct voxels > 0; cannot z-normalise")
  return ((crop - values.mean(dtype=np.float64)) / values.std(ddof=1, dtype=np.float64)).astype(np.float32)


def to_original(mask: np.ndarray, geo: CropGeometry) -> np.ndarray:
  """A crop-grid label map (size,)*3 → the original image grid (nearest neighbour, as the official
  postprocess); original voxels outside the crop get 0."""
  return geometry.resample(np.asarray(mask), geo.affine, geo.original_affine, geo.original_shape, order=0,
                           cval=0)


def points_to_crop(points: np.ndarray, geo: CropGeometry) -> np.ndarray:
  """Voxel indices (N, 3) of the original grid → nearest voxel indices (N, 3) on the crop grid (int)."""
  points = np.asarray(points, np.float64).reshape(-1, 3)
  world = points @ geo.original_affine[:3, :3].T + geo.original_affine[:3, 3]
  crop = np.linalg.solve(geo.affine[:3, :3], (world - geo.affine[:3, 3]).T).T
  return np.rint(crop).astype(np.int64)
