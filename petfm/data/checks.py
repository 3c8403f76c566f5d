"""Input checks shared by every command: one `UserError` line naming the file or field, before any work.

- `nifti_header`: a NIfTI file's header is checked before a single voxel is read: a 3-D volume (trailing
  singleton axes allowed), no empty axis, finite voxel sizes and affine, a file large enough for the
  voxels the header claims (uncompressed), or a gzip file that could hold them at all (deflate compresses
  at most ≈ 1032:1), and an estimated memory cost within `memory_limit()`.
- `check_finite`, `check_labels`: voxel values (NaN/inf; label values allowed by the layout).
- `output_file`, `output_dir`: an output path is checked before work starts (right extension, not a
  folder / not a file, a writable folder), so no run fails at its last step.
- `discarded_on_error`: a workdir made by a run that fails before its first checkpoint is removed again.
- `walk`: the folders under a root, each visited once by its real path (symlink loops, links to the same
  study).
- `read_json`: a JSON object with required fields (a workdir's config.json).
- `one_line`: a library's multi-line message as one line.

Memory limit: an image may cost at most `PETFM_MAX_IMAGE_BYTES` (default 8 GiB; suffixes K, M, G, T) and at
most half the memory available now (`MemAvailable`, or the cgroup limit if lower). The cost is estimated as
voxels × (stored bytes per voxel + 8): the stored array plus one float64 working copy.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import nibabel as nib
import numpy as np

from petfm import paths
from petfm.errors import UserError

MAX_IMAGE_BYTES_ENV = "PETFM_MAX_IMAGE_BYTES"
DEFAULT_MAX_IMAGE_BYTES = 8 * 2**30
AVAILABLE_FRACTION = 0.5  # of the memory available when the image is opened
WORKING_BYTES_PER_VOXEL = 8  # one float64 copy on top of the stored array
GZIP_MAX_RATIO = 1100  # deflate's limit is 1032:1; a gzip file claiming more than this is truncated or lying
# Voxel sizes outside this range (mm) are header errors, not scanner geometry.
MIN_SPACING_MM, MAX_SPACING_MM = 0.1, 20.0
NIFTI_SUFFIXES = (".nii.gz", ".nii")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def one_line(message: object) -> str:
  """`str(message)` with every run of whitespace (newlines included) collapsed to one space."""
  return " ".join(str(message).split())


def max_image_bytes() -> int:
  """The configured per-image limit in bytes (`PETFM_MAX_IMAGE_BYTES`, e.g. `16G`; default 8 GiB)."""
  text = os.environ.get(MAX_IMAGE_BYTES_ENV, "").strip()
  if not text:
    return DEFAULT_MAX_IMAGE_BYTES
  m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", text, re.IGNORECASE)
  if not m or float(m.group(1)) <= 0:
    raise UserError(f"{MAX_IMAGE_BYTES_ENV}={text!r}: expected a positive size such as 4G or 512M")
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def available_memory() -> int | None:
  """Bytes of memory this process could still get (MemAvailable, capped by a cgroup v2 limit); None if
  unknown."""
  found = []
  try:
    with open("/proc/meminfo") as f:
      found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
  except (OSError, ValueError, IndexError):
    pass
  try:
    with open("/sys/fs/cgroup/memory.max") as f:
      limit = f.read().strip()
    with open("/sys/fs/cgroup/memory.current") as f:
      used = int(f.read().strip())
    if limit != "max":
      found.append(max(int(limit) - used, 0))
  except (OSError, ValueError):
    pass
  return min(found) if found else None


def memory_limit() -> tuple[int, str]:
  """(bytes one image may cost, what sets that limit) — the smaller of the configured limit and half the
  available memory."""
  limit, why = max_image_bytes(), MAX_IMAGE_BYTES_ENV
  available = available_memory()
  if available is not None and AVAILABLE_FRACTION * available < limit:
    limit, why = int(AVAILABLE_FRACTION * available), "half the memory available now"
  return limit, why


def check_memory(shape: Sequence[int], dtype: np.dtype, where: str) -> None:
  """`UserError` when a volume of `shape` stored as `dtype` (plus one float64 working copy) would cost more
  than `memory_limit()`."""
  dtype = np.dtype(dtype)
  cost = int(np.prod(shape, dtype=object)) * (dtype.itemsize + WORKING_BYTES_PER_VOXEL)
  limit, why = memory_limit()
  if cost > limit:
    raise UserError(f"{where}: a {'×'.join(map(str, shape))} {dtype} volume needs about {_size(cost)} of "
                    f"memory, over the limit of {_size(limit)} ({why}; raise {MAX_IMAGE_BYTES_ENV} for "
                    "bigger images)")


def _size(n: float) -> str:
  units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")
  power = 0
  while n >= 1024 and power < len(units) - 1:
    n, power = n / 1024, power + 1
  return f"{n:.0f} bytes" if power == 0 else f"{n:.1f} {units[power]}"


def _mm(values: Sequence[float]) -> str:
  return "×".join(f"{v:g}" for v in values)


def nifti_header(path: str, where: str) -> nib.Nifti1Image:
  """Opens `path` lazily and checks its header; returns the image with its voxels still unread.

  `where` prefixes every error line (e.g. `study S: SUV.nii.gz (PET)` or `--image x.nii.gz`). Raises
  `UserError` for a missing, empty or unreadable file, a non-3-D shape, an empty axis, a non-finite or
  singular affine, voxel sizes outside [0.1, 20] mm, a file too short for the voxels its header claims, or
  an estimated memory cost above `memory_limit()`.
  """
  if not os.path.exists(path):
    raise UserError(f"{where}: file is missing ({path})")
  if not os.path.isfile(path):
    raise UserError(f"{where}: is not a file ({path})")
  file_size = os.path.getsize(path)
  if file_size == 0:
    raise UserError(f"{where}: the file is empty (0 bytes)")
  try:
    # nibabel logs and warns about the header problems it repairs; the checks below say what matters
    with nib.imageglobals.LoggingOutputSuppressor(), warnings.catch_warnings():
      warnings.simplefilter("ignore")
      image = nib.load(path)
      affine = np.asarray(image.affine, np.float64)
    if not isinstance(image, nib.Nifti1Image):  # also Nifti2Image
      raise UserError(f"{where}: is a {type(image).__name__}, not a NIfTI image")
    with nib.openers.ImageOpener(path) as f:  # nibabel's own header check turns a zero pixdim into 1 mm
      raw = image.header_class.from_fileobj(f, check=False)
    shape = tuple(int(n) for n in image.shape)
    dtype = np.dtype(image.get_data_dtype())
    offset = int(image.header.get_data_offset())
  except UserError:
    raise
  except EOFError:
    raise UserError(f"{where}: file is truncated (it ends inside the header)") from None
  except Exception as e:  # nibabel, gzip and zlib raise many kinds for bad files
    raise UserError(f"{where}: not a readable NIfTI image ({one_line(e) or type(e).__name__})") from None
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) != 3:
    raise UserError(f"{where}: has shape {shape} ({len(shape)}-D); expected a 3-D volume")
  if min(shape) <= 0:
    raise UserError(f"{where}: has shape {shape} with an empty axis")
  voxels = int(np.prod(shape, dtype=object))  # Python ints: no overflow for any header
  stored = voxels * dtype.itemsize
  check_memory(shape, dtype, where)
  compressed = path.endswith(".gz")
  if compressed and stored > GZIP_MAX_RATIO * file_size:
    raise UserError(f"{where}: the header claims {shape} {dtype} voxels ({_size(stored)}), more than a "
                    f"{_size(file_size)} gzip file can hold; the file is truncated or its header is wrong")
  if not compressed and file_size < offset + stored:
    raise UserError(f"{where}: file is truncated: the header claims {shape} {dtype} voxels "
                    f"({_size(offset + stored)} with the header) but the file has {_size(file_size)}")
  pixdim = np.asarray(raw["pixdim"][1:4], np.float64)
  if not np.all(np.isfinite(pixdim)):
    raise UserError(f"{where}: voxel spacing {_mm(pixdim)} mm in the header is not finite")
  if int(raw["sform_code"]) == 0 and not np.all(pixdim != 0):
    raise UserError(f"{where}: voxel spacing {_mm(pixdim)} mm in the header has a zero")
  if not np.all(np.isfinite(affine)):
    raise UserError(f"{where}: the affine (voxel-to-world matrix) holds NaN or inf")
  spacing = nib.affines.voxel_sizes(affine)
  if not np.all((spacing >= MIN_SPACING_MM) & (spacing <= MAX_SPACING_MM)):
    raise UserError(f"{where}: voxel spacing {_mm(spacing)} mm is outside "
                    f"[{MIN_SPACING_MM:g}, {MAX_SPACING_MM:g}] mm")
  if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * np.prod(spacing):
    raise UserError(f"{where}: the affine is singular (voxel axes are parallel)")
  return image


def read_voxels(image: nib.Nifti1Image, where: str, dtype: np.dtype | None = None) -> np.ndarray:
  """The checked image's voxels (native byte order, trailing singleton axes dropped, `dtype` if given;
  scaled by the header's slope/intercept); `UserError` when the data is truncated or corrupt."""
  try:
    data = image.get_fdata(dtype=dtype) if dtype is not None else np.asanyarray(image.dataobj)
  except EOFError:
    raise UserError(f"{where}: file is truncated (the compressed data ends early)") from None
  except MemoryError:
    raise UserError(f"{where}: not enough memory to read {image.shape} voxels") from None
  except Exception as e:  # zlib.error, gzip.BadGzipFile, OSError, ValueError from a short file, ...
    kind = "corrupt compressed data" if isinstance(e, (gzip.BadGzipFile, OSError)) else "unreadable data"
    raise UserError(f"{where}: {kind} ({one_line(e) or type(e).__name__})") from None
  data = np.asarray(data)
  data = data.astype(data.dtype.newbyteorder("="), copy=False)  # big-endian files → native byte order
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  return data


def check_finite(data: np.ndarray, where: str) -> None:
  """`UserError` when float `data` holds NaN or ±inf voxels."""
  if data.dtype.kind in "fc":
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
      raise UserError(f"{where}: {bad} voxels are NaN or infinite")


def check_labels(data: np.ndarray, where: str, allowed: Collection[int], meaning: str = "") -> None:
  """`UserError` unless every voxel is an integer in `allowed` (e.g. {0, 1} for an autoPET lesion mask)."""
  check_finite(data, where)
  if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
    raise UserError(f"{where}: label values must be whole numbers (found fractions)")
  values = np.unique(data)
  bad = [v for v in values.tolist() if int(v) not in allowed]
  if bad:
    shown = ", ".join(f"{v:g}" for v in bad[:5]) + (" …" if len(bad) > 5 else "")
    span = (f"{min(allowed)}..{max(allowed)}" if len(allowed) > 3
            else ", ".join(str(v) for v in sorted(allowed)))
    raise UserError(f"{where}: label value(s) {shown} not allowed; expected {span}{meaning}")


def read_json(path: str, what: str, fields: Sequence[str] = ()) -> dict[str, Any]:
  """The JSON object in `path` (e.g. a workdir's config.json); `UserError` naming `what` and the file when it
  is unreadable, not an object, or lacks one of the dotted `fields` (e.g. `"data.view"`)."""
  try:
    value = json.loads(paths.read_text(path))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{what} {path}: cannot read ({one_line(e)})") from None
  if not isinstance(value, dict):
    raise UserError(f"{what} {path}: expected a JSON object")
  for field in fields:
    node: Any = value
    for part in field.split("."):
      if not isinstance(node, dict) or part not in node:
        raise UserError(f"{what} {path}: has no field {field!r}")
      node = node[part]
  return value


def _writable_folder(folder: str, what: str) -> None:
  """`UserError` unless files can be created in the existing folder `folder` (a real write probe)."""
  try:
    with tempfile.TemporaryFile(dir=folder, prefix=".petfm-write-test-"):
      pass
  except OSError as e:
    raise UserError(f"{what}: cannot write into {folder} ({e.strerror or one_line(e)})") from None


def _nearest_existing(path: str, what: str) -> str:
  """The deepest existing ancestor of `path`; `UserError` if it is not a folder."""
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f"{what}: {parent} is a file, not a folder")
  return parent


def output_dir(path: str, what: str) -> str:
  """Checks that `path` is, or can be created as, a writable folder; returns it. `what` names the flag."""
  if not path:
    raise UserError(f"{what}: an output folder is required")
  if "://" in path:  # a remote location (gs://...): its own layer reports problems
    return path
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise UserError(f"{what} {path}: is a file, expected a folder")
    _writable_folder(path, f"{what} {path}")
  else:
    _writable_folder(_nearest_existing(path, f"{what} {path}"), f"{what} {path}")
  return path


def output_file(path: str, what: str, suffixes: Sequence[str] = NIFTI_SUFFIXES) -> str:
  """Checks that `path` ends in one of `suffixes`, is not a folder and can be written; returns it."""
  if not path.endswith(tuple(suffixes)):
    raise UserError(f"{what} {path}: must end in {' or '.join(suffixes)}")
  if "://" in path:
    return path
  if os.path.isdir(path):
    raise UserError(f"{what} {path}: is a folder, expected a file name")
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(folder):
    _writable_folder(folder, f"{what} {path}")
  else:
    _writable_folder(_nearest_existing(path, f"{what} {path}"), f"{what} {path}")
  return path


@contextlib.contextmanager
def discarded_on_error(folder: str, names: Collection[str] = ("config.json", "model.json")) -> Iterator[None]:
  """Removes `folder` again when the body raises, if `folder` did not exist before and holds nothing but files
  called `names` (a trainer's workdir that got its config files, then failed before any checkpoint)."""
  new = "://" not in folder and not os.path.exists(folder)
  try:
    yield
  except BaseException:
    if new and os.path.isdir(folder) and all(
        name in names for _, _, files in os.walk(folder) for name in files):
      shutil.rmtree(folder, ignore_errors=True)
    raise


def walk(root: str) -> Iterator[tuple[str, list[str]]]:
  """(folder, sorted file names) for `root` and every non-hidden folder below it, following symlinks but
  visiting each real folder once: a `loop -> ..` link adds nothing, and a folder reachable both directly and
  through a link is yielded under its direct path (links are followed after every folder without them)."""
  seen: set[str] = set()
  links: list[str] = []

  def explore(start: str) -> Iterator[tuple[str, list[str]]]:
    stack = [start]
    while stack:
      folder = stack.pop()
      real = os.path.realpath(folder)
      if real in seen:
        continue
      seen.add(real)
      try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
      except OSError:
        continue  # unreadable folder: its studies are not found, as with any missing study
      files = []
      for entry in entries:
        try:
          if not entry.is_dir():
            files.append(entry.name)
          elif not entry.name.startswith("."):  # hidden: .staging, .tmp-* of an unfinished write, .git
            (links if entry.is_symlink() else stack).append(entry.path)
        except OSError:
          continue
      yield folder, files

  yield from explore(root)
  while links:
    yield from explore(links.pop(0))
