"""Voxel grids in world coordinates: canonical orientation, resampling, and mapping back to the input grid.

A grid is a 4×4 affine (voxel index (i, j, k) → world millimetres, RAS+ as in NIfTI) plus a shape. Every
function here works in world coordinates, so an array on one grid can be put onto any other grid whatever
the two orientations, spacings and fields of view: that is how CT meets the PET grid, how studies reach the
configured spacing, and how a prediction on the stored grid goes back onto the original image
(`to_original`) to overlay it in a viewer such as 3D Slicer.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

# Voxel centres this close (in voxels) to a grid point or to the edge of a field of view count as on it.
_TOLERANCE = 1e-4


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
  """Voxel size in mm along each array axis, (3,)."""
  return nib.affines.voxel_sizes(np.asarray(affine, np.float64))


def to_canonical(img: nib.spatialimages.SpatialImage) -> tuple[np.ndarray, np.ndarray]:
  """Reorders and flips the axes of a 3-D image to the closest RAS+ orientation, without interpolation.

  Returns `(array (X, Y, Z), affine (4, 4))`: array axis 0 increases towards the patient's Right, axis 1
  towards Anterior, axis 2 towards Superior (the NIfTI RAS+ convention). The world position of every voxel
  is unchanged; only the index order changes.
  """
  canonical = nib.as_closest_canonical(img)
  return np.ascontiguousarray(np.asanyarray(canonical.dataobj)), np.array(canonical.affine, np.float64)


def grid_at_spacing(
    affine: np.ndarray, shape: Sequence[int], spacing: float | Sequence[float]
) -> tuple[np.ndarray, tuple[int, int, int]]:
  """The grid with the same axis directions and field of view as `(affine, shape)` at a new voxel size.

  `spacing` is in mm, one value (isotropic) or one per axis. The new grid starts at the centre of the first
  voxel and has as many voxels as fit before the far edge of the old field of view, so at an integer ratio
  (e.g. 2 mm → 4 mm) every new voxel centre is an old voxel centre: nearest-neighbour labels are sampled
  without a half-voxel bias and linear images without blur. Returns `(affine (4, 4), shape)`.
  """
  affine = np.asarray(affine, np.float64)
  old = voxel_sizes(affine)
  new = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
  new_shape = np.floor((np.asarray(shape) - 0.5) * old / new + _TOLERANCE).astype(int) + 1
  out = affine.copy()
  out[:3, :3] = affine[:3, :3] / old * new
  return out, tuple(int(n) for n in new_shape)


def resample(
    array: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    order: int,
    cval: float,
) -> np.ndarray:
  """Samples `array` (X, Y, Z) on the grid `(dst_affine, dst_shape)`, matching voxels by world position.

  `order` 1 is trilinear (images; returns float32), 0 is nearest neighbour (labels; keeps the dtype, so
  integer labels stay integer and no new values appear). Points within half a voxel of the source field of
  view take the nearest edge value; points further out get `cval` (e.g. -1024 HU for CT, 0 for SUV).
  """
  src_affine = np.asarray(src_affine, np.float64)
  dst_affine = np.asarray(dst_affine, np.float64)
  dst_shape = tuple(int(n) for n in dst_shape)
  dst_to_src = np.linalg.solve(src_affine, dst_affine)
  matrix, offset = dst_to_src[:3, :3], dst_to_src[:3, 3]
  is_bool = array.dtype == np.bool_
  source = array.view(np.uint8) if is_bool else array
  output = source.dtype if order == 0 else np.float32
  if array.shape == dst_shape and np.allclose(dst_to_src, np.eye(4), atol=_TOLERANCE):
    out = source.astype(output, copy=True)
  else:
    diagonal = np.allclose(matrix, np.diag(np.diag(matrix)), atol=1e-9)
    out = ndimage.affine_transform(
        source, np.diag(matrix) if diagonal else matrix, offset, output_shape=dst_shape, output=output,
        order=order, mode="nearest")
    out[~_inside(array.shape, matrix, offset, dst_shape)] = cval
  return out.view(np.bool_) if is_bool else out


def _inside(src_shape: Sequence[int], matrix: np.ndarray, offset: np.ndarray, dst_shape: Sequence[int]):
  """Boolean (dst_shape) mask of destination voxels whose centre lies inside the source field of view."""
  axes = [np.arange(n, dtype=np.float64).reshape([-1 if a == b else 1 for b in range(3)])
          for a, n in enumerate(dst_shape)]
  inside = np.ones(dst_shape, bool)
  for k, n in enumerate(src_shape):
    coordinate = offset[k] + sum(matrix[k, j] * axes[j] for j in range(3) if matrix[k, j] != 0)
    inside &= (coordinate >= -0.5 - _TOLERANCE) & (coordinate <= n - 0.5 + _TOLERANCE)
  return inside


def to_original(
    array: np.ndarray,
    affine: np.ndarray,
    original_affine: np.ndarray,
    original_shape: Sequence[int],
    order: int = 0,
    cval: float = 0,
) -> np.ndarray:
  """Maps an array on the stored (canonical, resampled) grid back onto the original image grid.

  Inverse of the reorientation and resampling done at conversion: the result (original_shape) lines up
  voxel for voxel with the input NIfTI whose affine is `original_affine`, e.g. to save a predicted mask
  with `nib.Nifti1Image(mask, original_affine)`. Nearest neighbour by default (label maps).
  """
  return resample(array, affine, original_affine, original_shape, order=order, cval=cval)


def world_bounds(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Axis-aligned world box (mm) around a grid's field of view (voxel edges), as `(low (3,), high (3,))`."""
  corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij")).reshape(3, -1)
  world = np.asarray(affine, np.float64)[:3, :3] @ corners + np.asarray(affine, np.float64)[:3, 3:]
  return world.min(axis=1), world.max(axis=1)


def overlap_fraction(affine_a: np.ndarray, shape_a: Sequence[int], affine_b: np.ndarray,
                     shape_b: Sequence[int]) -> float:
  """Volume shared by the world boxes of two grids, as a fraction of the smaller box (0 = disjoint)."""
  (low_a, high_a), (low_b, high_b) = world_bounds(affine_a, shape_a), world_bounds(affine_b, shape_b)
  shared = np.prod(np.clip(np.minimum(high_a, high_b) - np.maximum(low_a, low_b), 0, None))
  smaller = min(np.prod(high_a - low_a), np.prod(high_b - low_b))
  return float(shared / smaller) if smaller > 0 else 0.0
