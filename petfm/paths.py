"""The one path layer of petfm: workdirs, records and outputs may be local paths or cloud URLs (`gs://`,
`s3://`, ...), through `etils.epath` (the layer Orbax uses; cloud URLs need fsspec's gcsfs / s3fs,
`pip install 'petfm[cloud]'`). Local behaviour is that of `os` and `open`.

What needs real local files gets them through this module: ArrayRecord shards are read from a local cache
copy of remote records (`local_copy`), and the converter writes into a local mirror that it then uploads
(`upload_tree`). The cache lives in $PETFM_CACHE (default ~/.cache/petfm).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import IO

from etils import epath

from petfm.errors import UserError

PathLike = str | os.PathLike


def is_local(path: PathLike) -> bool:
  return "://" not in os.fspath(path)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path (local or URL); a missing cloud client becomes one clear error."""
  out = epath.Path(p)
  if not is_local(p):
    scheme = os.fspath(p).split("://", 1)[0]
    try:
      import fsspec
      fsspec.get_filesystem_class("gcs" if scheme == "gs" else scheme)
    except (ImportError, ValueError) as e:
      raise UserError(f"{p}: {scheme}:// paths need the fsspec client for {scheme} "
                      f"(pip install 'petfm[cloud]'): {e}") from None
  return out


def join(*parts: PathLike) -> str:
  return os.fspath(epath.Path(*parts)) if not is_local(parts[0]) else os.path.join(*map(os.fspath, parts))


def absolute(p: PathLike) -> str:
  """Local paths made absolute; URLs unchanged (what Orbax wants)."""
  return os.path.abspath(p) if is_local(p) else os.fspath(p)


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def isfile(p: PathLike) -> bool:
  return path(p).is_file() if not is_local(p) else os.path.isfile(p)


def makedirs(p: PathLike) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def open_file(p: PathLike, mode: str = "r") -> IO:
  return path(p).open(mode)


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def write_atomic(p: PathLike, data: bytes | str) -> None:
  """Writes `data` to `p` so that readers never see a partial file: locally a temp file + fsync + rename; on
  object stores one object upload (atomic by itself)."""
  raw = data.encode() if isinstance(data, str) else data
  if not is_local(p):
    makedirs(path(p).parent)
    path(p).write_bytes(raw)
    return
  directory = os.path.dirname(os.path.abspath(p))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(p) + "-")
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    with os.fdopen(fd, "wb") as f:
      f.write(raw)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def cache_dir(url: PathLike) -> str:
  """The local cache folder that mirrors `url` ($PETFM_CACHE/<scheme>/<bucket>/<path>)."""
  root = os.environ.get("PETFM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "petfm")
  scheme, rest = os.fspath(url).split("://", 1)
  return os.path.join(root, scheme, *[part for part in rest.split("/") if part not in ("", ".", "..")])


def local_copy(p: PathLike) -> str:
  """A local file with the contents of `p`: `p` itself when local, else its cache copy (downloaded once;
  again when the sizes differ)."""
  if is_local(p):
    return os.fspath(p)
  local = cache_dir(p)
  if not os.path.isfile(local) or os.path.getsize(local) != path(p).stat().length:
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp-{os.getpid()}"
    with path(p).open("rb") as src, open(tmp, "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 22)
    os.replace(tmp, local)
  return local


def upload_tree(local_dir: PathLike, url: PathLike, last: tuple[str, ...] = ()) -> None:
  """Copies the files under `local_dir` to `url` (same relative paths); names in `last` (relative) go last,
  so a reader that starts from them (a manifest) never sees missing files."""
  files = [os.path.relpath(os.path.join(root, name), local_dir)
           for root, _, names in os.walk(local_dir) for name in names]
  for rel in sorted(files, key=lambda r: (r in last, r)):
    target = path(url) / rel
    makedirs(target.parent)
    with open(os.path.join(local_dir, rel), "rb") as src, target.open("wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 22)
