"""Torch-free, restricted reader for PyTorch `.pth` checkpoints (the zip container of `torch.save`,
torch ≥ 1.6).

Only the globals needed to rebuild tensors and dicts are admitted (`collections.OrderedDict`, the typed
storage classes, `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`); they are mapped to numpy, so no
torch code and nothing named by the pickle is ever executed. A pickle that asks for any other global (e.g.
`os.system`) is refused with a `UserError` naming it, unless it is admitted by `inert_objects` (True: any
global; or a collection of qualified names such as {"argparse.Namespace"}): then such objects (e.g. an
`argparse.Namespace` of training arguments stored beside the weights) become inert placeholders that keep
their arguments but never run anything.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Collection
from typing import Any

import ml_dtypes
import numpy as np

from petfm.errors import UserError

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
  def __init__(self, name: str):
    self.dtype = np.dtype(STORAGE_DTYPES[name])


class InertObject:
  """Stands in for a non-tensor object of the checkpoint; records how it was built, runs nothing."""

  def __init__(self, qualname: str, args: tuple = (), state: Any = None):
    self.qualname, self.args, self.state = qualname, args, state

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def __repr__(self) -> str:
    return f"InertObject({self.qualname})"


def _inert_class(qualname: str) -> type:
  def new(cls, *args):
    return InertObject(qualname, args)
  return type("Inert", (), {"__new__": new})


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_unused) -> np.ndarray:
  if not size:
    return storage[offset].copy()
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=[s * itemsize for s in stride])
  return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_unused) -> np.ndarray:
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str,
               inert_objects: bool | Collection[str]):
    super().__init__(file)
    self._archive, self._prefix, self._path, self._inert = archive, prefix, path, inert_objects
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if self._inert is True or (not isinstance(self._inert, bool) and f"{module}.{name}" in self._inert):
      return _inert_class(f"{module}.{name}")
    raise UserError(
        f"{self._path}: refusing to load: the pickle asks for '{module}.{name}', but only tensor data is "
        "admitted (nothing was executed)")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise UserError(f"{self._path}: unsupported persistent id {pid!r} in the pickle")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise UserError(f"{self._path}: storage of unsupported type {storage_type!r}")
    if key not in self._storages:
      try:
        raw = self._archive.read(f"{self._prefix}data/{key}")
      except KeyError:
        raise UserError(f"{self._path}: tensor storage data/{key} is missing from the archive") from None
      self._storages[key] = np.frombuffer(raw, dtype=storage_type.dtype)
    return self._storages[key]


def load(path: str, *, inert_objects: bool | Collection[str] = False) -> Any:
  """Loads a `torch.save` zip checkpoint into Python containers of numpy arrays (tensors → `np.ndarray`).
  `inert_objects`: True, or the qualified names of other globals to admit as `InertObject`s (module doc)."""
  try:
    archive = zipfile.ZipFile(path)
  except FileNotFoundError:
    raise UserError(f"{path}: no such file") from None
  except (zipfile.BadZipFile, OSError) as e:
    raise UserError(f"{path}: not a PyTorch zip checkpoint ({e}); legacy pre-1.6 .pth files are not "
                    "supported, re-save with a current torch.save") from None
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(pickles) != 1:
      raise UserError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = f"{prefix}byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
      raise UserError(f"{path}: big-endian checkpoints are not supported")
    with archive.open(pickles[0]) as f:
      try:
        return _RestrictedUnpickler(f, archive, prefix, path, inert_objects).load()
      except UserError:
        raise
      except Exception as e:  # a malformed pickle stream
        raise UserError(f"{path}: corrupt checkpoint pickle ({type(e).__name__}: {e})") from None


def state_dict(obj: Any, path: str = "checkpoint") -> dict[str, np.ndarray]:
  """Finds the weights in a loaded checkpoint: a bare state dict, or one under `model_state_dict` /
  `state_dict` / `model`; strips a DistributedDataParallel `module.` prefix."""
  for key in ("model_state_dict", "state_dict", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict) or not obj or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise UserError(f"{path}: no state dict of tensors found (looked for a bare state dict and the keys "
                    "model_state_dict, state_dict, model)")
  if all(k.startswith("module.") for k in obj):
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return dict(obj)
