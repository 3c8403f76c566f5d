"""Canonical orientation, world-coordinate resampling and mapping back to the original grid."""

import nibabel as nib
import numpy as np
import pytest

from petfm.data import geometry


def _affine(spacing, origin, rotation=np.eye(3)):
  out = np.eye(4)
  out[:3, :3] = rotation * np.asarray(spacing, float)
  out[:3, 3] = origin
  return out


def _world(affine, shape):
  """World coordinates (3, X, Y, Z) of every voxel centre."""
  index = np.indices(shape, dtype=np.float64).reshape(3, -1)
  return (affine[:3, :3] @ index + affine[:3, 3:]).reshape(3, *shape)


def _rotation(angle_deg):
  a = np.deg2rad(angle_deg)
  return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def test_to_canonical_undoes_flips_and_permutations():
  rng = np.random.default_rng(0)
  data = rng.normal(size=(6, 5, 4)).astype(np.float32)
  ras = _affine((2, 2, 3), (-10, 20, 30))
  # LPS storage: x and y axes reversed, data flipped to keep every voxel at the same world position.
  lps = ras.copy()
  lps[:2, :2] *= -1
  lps[:2, 3] = ras[:2, 3] + ras[:2, :2] @ (np.array(data.shape[:2]) - 1)
  # Axes stored in the order (z, x, y).
  permuted = ras[:, [2, 0, 1, 3]]
  for variant, affine in [(data, ras), (data[::-1, ::-1], lps), (data.transpose(2, 0, 1), permuted)]:
    array, canonical = geometry.to_canonical(nib.Nifti1Image(np.ascontiguousarray(variant), affine))
    np.testing.assert_array_equal(array, data)
    np.testing.assert_allclose(canonical, ras, atol=1e-9)


def test_linear_resampling_reproduces_a_linear_field_exactly():
  # Trilinear interpolation is exact for a linear function of world position: an independent reference for
  # any pair of grids, including rotated ones.
  gradient, bias = np.array([0.7, -1.3, 2.1]), 5.0
  src = _affine((2.0, 2.5, 3.0), (-20, -25, -40), _rotation(20))
  src_shape = (30, 26, 28)
  values = np.tensordot(gradient, _world(src, src_shape), axes=1) + bias
  dst = _affine((1.7, 3.1, 2.2), (-5, -8, -15), _rotation(-10))
  dst_shape = (12, 9, 15)
  out = geometry.resample(values, src, dst, dst_shape, order=1, cval=-99)
  assert out.dtype == np.float32 and out.shape == dst_shape
  expected = np.tensordot(gradient, _world(dst, dst_shape), axes=1) + bias
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)


def test_points_outside_the_source_get_cval_and_edges_extend_half_a_voxel():
  src = _affine((2, 2, 2), (0, 0, 0))
  ones = np.ones((5, 5, 5), np.float32)
  dst = _affine((1, 1, 1), (-3, 0, 0))  # x = -3 .. 8 mm; the source covers -1 .. 9 mm (voxel edges)
  out = geometry.resample(ones, src, dst, (12, 3, 3), order=1, cval=-1024)
  np.testing.assert_array_equal(out[:, 0, 0], [-1024, -1024, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
  far = geometry.resample(ones, src, _affine((1, 1, 1), (100, 0, 0)), (4, 4, 4), order=0, cval=7)
  assert np.all(far == 7)


@pytest.mark.parametrize("spacing", [(1.5, 1.5, 1.5), (2.0, 2.0, 3.0), (3.0, 3.0, 3.0), (4.0, 4.0, 4.0)])
def test_sphere_keeps_its_volume_and_labels_stay_integer(spacing):
  radius = 24.0
  src = _affine((1.0, 1.0, 1.0), (-40, -40, -40))
  shape = (81, 81, 81)
  sphere = (np.linalg.norm(_world(src, shape), axis=0) <= radius).astype(np.uint8) * 3
  dst, dst_shape = geometry.grid_at_spacing(src, shape, spacing)
  out = geometry.resample(sphere, src, dst, dst_shape, order=0, cval=0)
  assert out.dtype == np.uint8
  assert set(np.unique(out)) == {0, 3}
  volume = np.count_nonzero(out) * np.prod(spacing)
  assert volume == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.03)


def test_grid_at_spacing_keeps_the_field_of_view():
  src = _affine((2.0364, 2.0364, 3.0), (-300, -250, -800), _rotation(5))
  shape = (40, 36, 60)
  dst, dst_shape = geometry.grid_at_spacing(src, shape, 4.0)
  np.testing.assert_allclose(geometry.voxel_sizes(dst), 4.0)
  np.testing.assert_allclose(dst[:3, :3] / 4.0, src[:3, :3] / geometry.voxel_sizes(src))  # same directions
  np.testing.assert_allclose(dst[:3, 3], src[:3, 3])  # starts at the first voxel centre
  extent = np.array(shape) * geometry.voxel_sizes(src)
  new_extent = np.array(dst_shape) * 4.0
  assert np.all(np.abs(extent - new_extent) <= 4.0)  # within one new voxel
  last_centre = np.linalg.solve(src, dst @ [*(np.array(dst_shape) - 1), 1])[:3]
  assert np.all(last_centre <= np.array(shape) - 0.5)  # every new voxel samples the old field of view
  same, same_shape = geometry.grid_at_spacing(src, shape, geometry.voxel_sizes(src))
  np.testing.assert_allclose(same, src, atol=1e-9)
  assert same_shape == shape


def test_integer_downsampling_samples_old_voxel_centres():
  # At 2 mm → 4 mm every stored voxel is an input voxel at the same world position: no half-voxel shift
  # between nearest-neighbour labels and the images.
  src = _affine((2.0, 2.0, 2.0), (-7, 3, 11))
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 5, (31, 30, 29)).astype(np.uint8)
  dst, dst_shape = geometry.grid_at_spacing(src, labels.shape, 4.0)
  np.testing.assert_array_equal(geometry.resample(labels, src, dst, dst_shape, order=0, cval=0),
                                labels[::2, ::2, ::2])
  image = labels.astype(np.float32)
  np.testing.assert_array_equal(geometry.resample(image, src, dst, dst_shape, order=1, cval=0),
                                image[::2, ::2, ::2])


def test_to_original_inverts_canonical_orientation_and_resampling():
  rng = np.random.default_rng(1)
  shape = (20, 16, 12)
  labels = rng.integers(0, 4, shape).astype(np.uint8)
  original = _affine((-2.0, -2.0, 3.0), (50, 40, -30))  # LPS storage
  array, canonical = geometry.to_canonical(nib.Nifti1Image(labels, original))
  grid, grid_shape = geometry.grid_at_spacing(canonical, array.shape, (1.0, 1.0, 1.5))  # finer: lossless
  stored = geometry.resample(array, canonical, grid, grid_shape, order=0, cval=0)
  back = geometry.to_original(stored, grid, original, shape)
  assert back.dtype == np.uint8
  np.testing.assert_array_equal(back, labels)


def test_overlap_fraction():
  a = _affine((1, 1, 1), (0, 0, 0))
  assert geometry.overlap_fraction(a, (10, 10, 10), a, (10, 10, 10)) == pytest.approx(1.0)
  assert geometry.overlap_fraction(a, (10, 10, 10), _affine((1, 1, 1), (5, 0, 0)), (10, 10, 10)) == \
      pytest.approx(0.5)
  assert geometry.overlap_fraction(a, (10, 10, 10), _affine((1, 1, 1), (50, 0, 0)), (10, 10, 10)) == 0.0
  # A small box inside a large one counts as fully overlapping (HECKTOR: CT inside the PET field of view).
  assert geometry.overlap_fraction(a, (4, 4, 4), _affine((4, 4, 4), (-10, -10, -10)), (10, 10, 10)) == 1.0
