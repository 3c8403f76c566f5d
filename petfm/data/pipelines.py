"""grain input pipelines over the ArrayRecord study records (`petfm.data.records`): slab, crop, study views.

Every view is a grain `MapDataset` over the studies of one split → (train) shuffle + repeat → `random_map`
(decode only the needed fields, sample, augment, normalise; the RNG is derived from the seed and the element
index) → batch → `to_iter_dataset` (reader threads) → `mp_prefetch` (`worker_count` processes). `iter(ds)` is
a grain `DatasetIterator`: deterministic for a seed, with `get_state`/`set_state` resuming exactly.

Hosts (`shard_index` of `shard_count`, default jax.process_index() of jax.process_count()). Training: all
hosts share one shuffled stream of reads; host i takes the i-th of `shard_count` equal blocks of every global
batch, so within an epoch every study is read by exactly one host, the global batch (host blocks in order)
does not depend on the number of hosts, and local batch j of every host belongs to global batch j (the
iterator state is the same on all hosts and valid for any host count). Evaluation: host i takes studies
i::shard_count.

Geometry. Records hold canonical RAS+ arrays (X: →Right, Y: →Anterior, Z: →Superior). A view reorders them
to (H, W, D) in radiological display order (`to_view` / `from_view`):

  coronal  H = Z flipped (superior → inferior), W = X flipped (patient right → left),
           D = Y (posterior → anterior)
  axial    H = Y flipped (anterior → posterior), W = X flipped (patient right → left),
           D = Z (inferior → superior)

A slab is D consecutive slices along the view's D axis (stacked as channels); the plane (H, W) is a crop
(`fit="crop"`) or the whole plane scaled to fit (`fit="resize"`, aspect kept). PET and CT always share one
spatial transform. Voxels outside the study are padding (CT -1024 HU, SUV 0, both → -1 after `normalize`),
marked False in `voxel_valid`.

Batches (numpy; B = batch size):
  every view  valid (B,) bool (False for the padding samples of an evaluation pass), index (B,) int32
              (position of the study in the split, manifest order), tracer (B,) int32 (index into
              records.TRACERS), stage (B,) int32 (0 unknown), text_id (B,) int32 (index into
              manifest["prompts"]),
              text_embedding (B, E) float32 (only when the records hold embeddings, E > 0)
  slab_dataset   pet, ct (B, H, W, D) float32, voxel_valid (B, H, W, D) bool, label (B, H, W, D) uint8
                 (semantic lesion label, with_label only)
  crop_dataset   image (B, X, Y, Z, C) float32 (C: PET, then CT if channels has it), mask (B, X, Y, Z) uint8
                 (binary target), voxel_valid (B, X, Y, Z) bool, target_kind (B,) int32
                 (records.TARGET_ORGAN / TARGET_LESION), target_id (B,) int32
  study_dataset  pet, ct (B, S, H, W, D) float32 (S = max_slabs), voxel_valid (B, S, H, W, D) bool,
                 slab_valid (B, S) bool

train=True: infinite, shuffled (reshuffled every epoch), augmented; the `samples_per_read` samples cut from
one decoded study land in the same batch. train=False: one deterministic pass (centre slab / every target
once / whole study), no augmentation; the last batch is padded to the full batch size with `valid=False`
samples (all zero), and every host yields the same number of batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from petfm.config import check
from petfm.data import records
from petfm.errors import UserError

VIEWS = ("coronal", "axial")
# view → (canonical axis of H, W, D; which of H, W, D run against the canonical direction)
_VIEW_AXES = {"coronal": ((2, 0, 1), (True, True, False)), "axial": ((1, 0, 2), (True, True, False))}
_CANONICAL_AXES = {"lr": 0, "ap": 1, "si": 2}  # augmentation flip names → canonical axis
CT_PAD_HU = -1024.0
TARGET_KINDS = {"organ": records.TARGET_ORGAN, "lesion": records.TARGET_LESION}
_TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------------------- configs
def default_augment_config() -> ml_collections.ConfigDict:
  """Training-time augmentation shared by all views (evaluation passes never augment)."""
  c = ml_collections.ConfigDict()
  c.flips = ("lr",)          # canonical axes that may flip (probability 1/2 each): any of "lr", "ap", "si"
  c.scale_jitter = 0.1       # zoom factor uniform in [1 - j, 1 + j] (same for all spatial axes), 0 = off
  c.translate = 8.0          # extra shift of the sampled centre, uniform in ±translate stored voxels per axis
  c.intensity_scale = 0.1    # after normalisation x → x·(1 + u) + v per modality, u ~ U(±intensity_scale),
  c.intensity_shift = 0.1    # v ~ U(±intensity_shift)
  return c


def _common_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  # Intensities: CT clipped to ct_clip HU and mapped linearly to [-1, 1]; SUV clipped to [0, suv_clip] and
  # mapped to [-1, 1] linearly or via log1p(SUV) / log1p(suv_clip) (compresses hot lesions and bladder).
  c.ct_clip = (-1000.0, 1000.0)
  c.suv_clip = 20.0
  c.suv_scale = "log1p"      # "log1p" | "linear"
  c.augment = default_augment_config()
  c.samples_per_read = 4     # samples cut from one decoded study (train only; must divide the batch size)
  c.worker_count = 0         # grain worker processes (mp_prefetch); 0 = decode in this process
  c.worker_buffer_size = 2   # batches buffered per worker process
  c.read_threads = 2         # threads decoding elements inside each process (ReadOptions.num_threads)
  c.prefetch_buffer_size = 8 # elements read ahead per process (ReadOptions.prefetch_buffer_size)
  return c


def default_slab_config() -> ml_collections.ConfigDict:
  """2.5-D slabs for FratMAE pretraining: D consecutive slices of one view, plane (H, W)."""
  c = ml_collections.ConfigDict()
  c.view = "coronal"         # "coronal" | "axial" (axis mapping in the module docstring)
  c.plane_size = (448, 224)  # (H, W) in voxels of the stored grid
  c.depth = 8                # D: consecutive slices stacked as channels
  c.fit = "crop"             # "crop": random (train) / centre (eval) crop, padded where the plane is smaller;
                             # "resize": whole plane scaled to fit (H, W), aspect ratio kept, rest padded
  c.with_label = False       # also return the lesion label slab (downstream segmentation)
  c.body_hu = -500.0         # random slabs lie within the slices holding CT > body_hu (-2000: anywhere); lesion
                             # evaluation slides its windows over the box of those voxels
  return _common_config(c)


def default_crop_config() -> ml_collections.ConfigDict:
  """3-D crops around a segmentation target (SegAnyPET click training)."""
  c = ml_collections.ConfigDict()
  c.crop_size = (128, 128, 128)     # (X, Y, Z) output voxels, canonical axes
  c.zoom = 1.0                      # stored voxels per output voxel (2.0 = twice the field of view)
  c.target_kinds = ("lesion", "organ")  # which `targets` rows may be drawn: "lesion" and/or "organ"
  c.organ_ids = ()                  # organ ids allowed (empty = all)
  c.min_voxels = 1                  # targets smaller than this are never drawn
  c.balance_kinds = False           # train: draw the kind (lesion / organ) uniformly, then a target of it
                                    # (False: uniform over all targets, ≈ 1 lesion in 7 on autoPET-like data)
  c.channels = ("pet",)             # image channels in order: "pet" and optionally "ct"
  return _common_config(c)


def default_study_config() -> ml_collections.ConfigDict:
  """Whole studies as a stack of slabs (patient-level staging)."""
  c = default_slab_config()
  c.fit = "resize"
  c.plane_size = (128, 64)
  c.max_slabs = 16           # S: slabs per study; longer studies keep the central S·D slices, shorter pad
  c.samples_per_read = 1     # unused: the study view always yields one sample per study
  return c


def check_config(cfg: ml_collections.ConfigDict, kind: str) -> None:
  """Raises `UserError('config.data.FIELD: ...')` for a bad value; `kind` is "slab", "crop" or "study"."""

  def pair(field, value, n, positive=True):
    ok = len(value) == n and all(isinstance(v, (int, float)) and (v > 0 or not positive) for v in value)
    check(ok, f"data.{field}", f"{tuple(value)} must be {n} {'positive ' if positive else ''}numbers")

  def choice(field, choices):
    check(cfg[field] in choices, f"data.{field}", f"{cfg[field]!r} is not one of {list(choices)}")

  lo, hi = cfg.ct_clip
  pair("ct_clip", cfg.ct_clip, 2, positive=False)
  check(lo < hi, "data.ct_clip", f"low {lo} must be below high {hi}")
  check(cfg.suv_clip > 0, "data.suv_clip", f"must be > 0, got {cfg.suv_clip}")
  choice("suv_scale", ("log1p", "linear"))
  a = cfg.augment
  check(set(a.flips) <= set(_CANONICAL_AXES), "data.augment.flips",
        f"{tuple(a.flips)} may only hold {', '.join(_CANONICAL_AXES)}")
  check(0 <= a.scale_jitter < 1, "data.augment.scale_jitter", f"must be in [0, 1), got {a.scale_jitter}")
  for field in ("translate", "intensity_scale", "intensity_shift"):
    check(a[field] >= 0, f"data.augment.{field}", f"must be >= 0, got {a[field]}")
  check(cfg.samples_per_read >= 1, "data.samples_per_read", f"must be >= 1, got {cfg.samples_per_read}")
  for field in ("worker_count", "read_threads"):
    check(cfg[field] >= 0, f"data.{field}", f"must be >= 0, got {cfg[field]}")
  for field in ("worker_buffer_size", "prefetch_buffer_size"):
    check(cfg[field] >= 1, f"data.{field}", f"must be >= 1, got {cfg[field]}")
  if kind == "crop":
    pair("crop_size", cfg.crop_size, 3)
    check(cfg.zoom > 0, "data.zoom", f"must be > 0, got {cfg.zoom}")
    check(len(cfg.target_kinds) > 0 and set(cfg.target_kinds) <= set(TARGET_KINDS), "data.target_kinds",
          f"{tuple(cfg.target_kinds)} must be a non-empty subset of {tuple(TARGET_KINDS)}")
    check(len(cfg.channels) > 0 and cfg.channels[0] == "pet" and set(cfg.channels) <= {"pet", "ct"}
          and len(set(cfg.channels)) == len(cfg.channels), "data.channels",
          f"{tuple(cfg.channels)} must be ('pet',) or ('pet', 'ct')")
    return
  choice("view", VIEWS)
  pair("plane_size", cfg.plane_size, 2)
  check(cfg.depth >= 1, "data.depth", f"must be >= 1, got {cfg.depth}")
  choice("fit", ("crop", "resize"))
  if kind == "study":
    check(cfg.max_slabs >= 1, "data.max_slabs", f"must be >= 1, got {cfg.max_slabs}")


# ------------------------------------------------------------------------------------- public helpers
def to_view(volume: np.ndarray, view: str) -> np.ndarray:
  """Canonical (X, Y, Z, ...) → view (H, W, D, ...) axes (a strided view, no copy)."""
  order, flips = _VIEW_AXES[view]
  out = np.transpose(volume, (*order, *range(3, volume.ndim)))
  return np.flip(out, [a for a, f in enumerate(flips) if f])


def from_view(array: np.ndarray, view: str) -> np.ndarray:
  """Inverse of `to_view`: view (H, W, D, ...) → canonical (X, Y, Z, ...) axes."""
  order, flips = _VIEW_AXES[view]
  out = np.flip(array, [a for a, f in enumerate(flips) if f])
  return np.transpose(out, (*np.argsort(order), *range(3, array.ndim)))


def normalize(ct: np.ndarray, suv: np.ndarray, cfg: ml_collections.ConfigDict
              ) -> tuple[np.ndarray, np.ndarray]:
  """CT (HU) and SUV arrays of any shape → float32 in [-1, 1] (`ct_clip`, `suv_clip`, `suv_scale`)."""
  lo, hi = cfg.ct_clip
  ct = (np.clip(np.asarray(ct, np.float32), lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0
  suv = np.clip(np.asarray(suv, np.float32), 0.0, cfg.suv_clip)
  if cfg.suv_scale == "log1p":
    suv = np.log1p(suv) * (2.0 / math.log1p(cfg.suv_clip)) - 1.0
  else:
    suv = suv * (2.0 / cfg.suv_clip) - 1.0
  return ct.astype(np.float32, copy=False), suv.astype(np.float32, copy=False)


def _take(array: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
  """`np.take(array, index, axis)` by indexing: np.take first copies a strided array (e.g. a transposed view
  of a whole volume) in full, indexing reads only the chosen entries (≈ 15× faster for a slab)."""
  return array[(slice(None),) * axis + (index,)]


def resample_diagonal(array: np.ndarray, scale: Sequence[float], offset: Sequence[float],
                      out_shape: Sequence[int], order: int, cval: float) -> tuple[np.ndarray, np.ndarray]:
  """Samples `array` (3-D) at source index `scale * o + offset` for every output index o (per axis).

  `order` 1 trilinear (float32 out) or 0 nearest (dtype kept). Points more than half a voxel outside the
  array get `cval`. Unit scales with integer offsets (crops, flips, padding) are exact copies, no
  interpolation. Only the needed voxels of `array` are read.
  Returns `(out (out_shape), valid (out_shape) bool)`.
  """
  scale, offset = np.asarray(scale, np.float64), np.asarray(offset, np.float64)
  coords = [scale[k] * np.arange(n) + offset[k] for k, n in enumerate(out_shape)]
  inside = [(c >= -0.5 - _TOLERANCE) & (c <= n - 0.5 + _TOLERANCE) for c, n in zip(coords, array.shape)]
  valid = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
  dtype = np.float32 if order == 1 else array.dtype
  out = np.full(tuple(out_shape), cval, dtype)
  if not all(m.any() for m in inside):
    return out, valid
  if np.all(np.abs(scale) == 1) and np.all(offset == np.round(offset)):
    dst, src = [], []
    for c, m in zip(coords, inside):
      kept = np.flatnonzero(m)
      dst.append(slice(kept[0], kept[-1] + 1))
      first, last = int(round(c[kept[0]])), int(round(c[kept[-1]]))
      backwards = slice(first, last - 1 if last > 0 else None, -1)
      src.append(slice(first, last + 1) if last >= first else backwards)
    out[tuple(dst)] = array[tuple(src)]
    return out, valid
  # Separable: one axis at a time, the most shrinking axis first (linear = two gathers and a blend).
  out = array
  for axis in np.argsort(np.asarray(out_shape) / np.asarray(array.shape)):
    c, n = coords[axis], array.shape[axis]
    shape = [-1 if a == axis else 1 for a in range(3)]
    if order == 0 or np.all(c == np.round(c)):
      out = _take(out, np.clip(np.floor(c + 0.5).astype(np.intp), 0, n - 1), axis)
    else:
      low = np.floor(c)
      weight = (c - low).astype(np.float32).reshape(shape)
      low = low.astype(np.intp)
      out = (_take(out, np.clip(low, 0, n - 1), axis) * (1 - weight)
             + _take(out, np.clip(low + 1, 0, n - 1), axis) * weight)
  out = out.astype(dtype, copy=False)
  out[~valid] = cval
  return out, valid


# ------------------------------------------------------------------------------------------ records
class _Split:
  """The studies of one split: manifest entries (record order), the ArrayRecord source, prompt ids."""

  def __init__(self, data_dir: str, split: str):
    manifest = records.read_manifest(data_dir)
    if split not in manifest["splits"]:
      raise UserError(f"{data_dir}: no split {split!r} in manifest.json; "
                      f"splits: {', '.join(manifest['splits'])}")
    shards = manifest["splits"][split]["shards"]
    paths = records.shard_files(data_dir, shards)
    position = {shard: i for i, shard in enumerate(shards)}
    entries = [e for e in manifest["studies"] if e["split"] == split]
    counts = np.bincount([position[e["shard"]] for e in entries], minlength=len(shards))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    self.entries = sorted(entries, key=lambda e: starts[position[e["shard"]]] + e["index"])
    self.source = grain.sources.ArrayRecordDataSource(paths) if paths else None
    if len(self.entries) != (len(self.source) if self.source is not None else 0):
      raise UserError(f"{data_dir}: manifest.json lists {len(self.entries)} {split} studies but the shards "
                      f"hold {len(self.source) if self.source is not None else 0}; convert again")
    prompts = {p: i for i, p in enumerate(manifest["prompts"])}
    self.meta = [{"tracer": np.int32(records.TRACERS.index(e["tracer"])), "stage": np.int32(e["stage"]),
                  "text_id": np.int32(prompts[e["text"]]), "index": np.int32(i), "valid": np.bool_(True)}
                 for i, e in enumerate(self.entries)]
    self.embedding_dim = 0
    if self.entries:
      self.embedding_dim = self.read(0, ("text_embedding",))["text_embedding"].size

  def __len__(self) -> int:
    return len(self.entries)

  def read(self, index: int, fields: Sequence[str]) -> dict[str, Any]:
    return records.decode(self.source[index], fields)

  def fields(self, *names: str) -> tuple[str, ...]:
    return names + (("text_embedding",) if self.embedding_dim else ())

  def sample_meta(self, index: int, record: dict[str, Any]) -> dict[str, np.ndarray]:
    out = dict(self.meta[index])
    if self.embedding_dim:
      out["text_embedding"] = record["text_embedding"].astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------ sampling
def _flip_signs(axes: Sequence[int], cfg: ml_collections.ConfigDict, rng: np.random.Generator | None
                ) -> np.ndarray:
  """±1 per output axis: -1 where a random flip (train) of that canonical axis was drawn."""
  allowed = {_CANONICAL_AXES[name] for name in cfg.augment.flips}
  if rng is None:
    return np.ones(len(axes))
  draws = rng.random(3) < 0.5  # always three draws, so the RNG stream does not depend on the config
  return np.array([-1.0 if a in allowed and draws[a] else 1.0 for a in axes])


def _axis_transform(centre: np.ndarray, out_size: Sequence[int], step: np.ndarray, sign: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(scale, offset) mapping output index o to source index: centre + sign·step·(o - (n-1)/2)."""
  scale = sign * step
  offset = centre - scale * (np.asarray(out_size) - 1) / 2
  return scale, np.where(np.abs(scale) == 1, np.round(offset), offset)  # unit steps stay on the grid


def _jitter(cfg: ml_collections.ConfigDict, rng: np.random.Generator | None, n: int
            ) -> tuple[float, np.ndarray]:
  """Training zoom factor and centre shift (n axes); (1, 0) for evaluation."""
  if rng is None:
    return 1.0, np.zeros(n)
  a = cfg.augment
  return float(rng.uniform(1 - a.scale_jitter, 1 + a.scale_jitter)), rng.uniform(-a.translate, a.translate, n)


def _intensities(ct: np.ndarray, suv: np.ndarray, cfg: ml_collections.ConfigDict,
                 rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
  ct, pet = normalize(ct, suv, cfg)
  if rng is not None:
    a = cfg.augment
    u = rng.uniform(-a.intensity_scale, a.intensity_scale, 2)
    v = rng.uniform(-a.intensity_shift, a.intensity_shift, 2)
    ct, pet = ct * np.float32(1 + u[0]) + np.float32(v[0]), pet * np.float32(1 + u[1]) + np.float32(v[1])
  return ct, pet


def _plane_and_depth(shape: Sequence[int], cfg: ml_collections.ConfigDict, depth: int,
                     rng: np.random.Generator | None, depth_range: tuple[int, int] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(scale, offset) over view axes (H, W, D) for a (H, W, depth) sample of a view volume of `shape`.

  Random slabs start within `depth_range` = (first, last) slice along D when given (the body's extent)."""
  plane = np.asarray(cfg.plane_size, np.float64)
  size = np.asarray(shape[:2], np.float64)
  zoom, shift = _jitter(cfg, rng, 3)
  step = zoom * (1.0 if cfg.fit == "crop" else max(size / plane))
  centre = (size - 1) / 2
  if rng is not None and cfg.fit == "crop":
    extent = plane * step
    free = np.maximum(size - extent, 0) / 2
    centre = centre + rng.uniform(-free, free)
  free_depth = shape[2] - depth
  lo, hi = min(free_depth, 0), max(free_depth, 0)
  if depth_range is not None and free_depth > 0:
    lo = int(np.clip(depth_range[0], 0, free_depth))
    hi = int(np.clip(depth_range[1] - depth + 1, lo, free_depth))
  start = rng.integers(lo, hi + 1) if rng is not None else free_depth // 2
  centre = np.append(centre + shift[:2], start + (depth - 1) / 2)
  return _axis_transform(centre, (*cfg.plane_size, depth), np.array([step, step, 1.0]),
                         _flip_signs(_VIEW_AXES[cfg.view][0], cfg, rng))


# ---------------------------------------------------------------------------------------------- views
class _SlabSampler:
  """One decoded study → `count` slabs (leading axis), see `slab_dataset`."""

  def __init__(self, split: _Split, cfg: ml_collections.ConfigDict, count: int):
    self.split, self.cfg, self.count = split, ml_collections.FrozenConfigDict(cfg), count

  def __call__(self, index: int, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    cfg = self.cfg
    record = self.split.read(index, self.split.fields("ct", "suv", *(("label",) if cfg.with_label else ())))
    volumes = {k: to_view(record[k], cfg.view) for k in ("ct", "suv", "label") if k in record}
    body = np.flatnonzero((volumes["ct"] > cfg.body_hu).any(axis=(0, 1)))
    body_range = (int(body[0]), int(body[-1])) if body.size else None
    samples = []
    for _ in range(self.count):
      scale, offset = _plane_and_depth(volumes["ct"].shape, cfg, cfg.depth, rng, body_range)
      out_shape = (*cfg.plane_size, cfg.depth)
      ct, valid = resample_diagonal(volumes["ct"], scale, offset, out_shape, 1, CT_PAD_HU)
      suv, _ = resample_diagonal(volumes["suv"], scale, offset, out_shape, 1, 0.0)
      ct, pet = _intensities(ct, suv, cfg, rng)
      sample = {"pet": pet, "ct": ct, "voxel_valid": valid, **self.split.sample_meta(index, record)}
      if cfg.with_label:
        sample["label"] = resample_diagonal(volumes["label"], scale, offset, out_shape, 0, 0)[0]
      samples.append(sample)
    return _stack(samples)


class _CropSampler:
  """One decoded study → `count` 3-D crops around targets (leading axis), see `crop_dataset`."""

  def __init__(self, split: _Split, cfg: ml_collections.ConfigDict, count: int):
    self.split, self.cfg, self.count = split, ml_collections.FrozenConfigDict(cfg), count
    self.kinds = {TARGET_KINDS[k] for k in cfg.target_kinds}

  def eligible(self, entry: dict[str, Any]) -> list[tuple[int, int]]:
    """(kind, id) of the study's targets that may be drawn, from its manifest entry."""
    out = []
    for kind, key in ((records.TARGET_ORGAN, "organs"), (records.TARGET_LESION, "lesions")):
      if kind in self.kinds:
        out += [(kind, int(i)) for i, voxels in entry[key] if voxels >= self.cfg.min_voxels and (
            kind == records.TARGET_LESION or not self.cfg.organ_ids or i in self.cfg.organ_ids)]
    return out

  def __call__(self, item: tuple[int, int, int], rng: np.random.Generator | None = None
               ) -> dict[str, np.ndarray]:
    """`item` = (study index, kind, id) for evaluation; the target is drawn per crop when training."""
    cfg, index = self.cfg, item[0]
    kinds = {kind for kind, _ in self.eligible(self.split.entries[index])} if rng is not None else {item[1]}
    maps = [name for kind, name in ((records.TARGET_ORGAN, "organs"), (records.TARGET_LESION, "lesions"))
            if kind in kinds]
    record = self.split.read(index, self.split.fields("suv", "targets", *maps, *cfg.channels[1:]))
    rows = {(int(r[0]), int(r[1])): r[3:6].astype(np.float64) for r in record["targets"]}
    choices = self.eligible(self.split.entries[index])
    samples = []
    by_kind = [[c for c in choices if c[0] == k] for k in sorted({c[0] for c in choices})]
    for _ in range(self.count):
      if rng is None:
        kind, ident = item[1:]
      else:
        pool = by_kind[rng.integers(len(by_kind))] if cfg.balance_kinds else choices
        kind, ident = pool[rng.integers(len(pool))]
      zoom, shift = _jitter(cfg, rng, 3)
      scale, offset = _axis_transform(rows[(kind, ident)] + shift, cfg.crop_size,
                                      np.full(3, cfg.zoom * zoom), _flip_signs((0, 1, 2), cfg, rng))
      labels = record["organs" if kind == records.TARGET_ORGAN else "lesions"]
      mask, valid = resample_diagonal((labels == ident).astype(np.uint8), scale, offset, cfg.crop_size, 0, 0)
      suv, _ = resample_diagonal(record["suv"], scale, offset, cfg.crop_size, 1, 0.0)
      ct = resample_diagonal(record["ct"], scale, offset, cfg.crop_size, 1, CT_PAD_HU)[0] if "ct" in record \
          else np.full(cfg.crop_size, CT_PAD_HU, np.float32)
      ct, pet = _intensities(ct, suv, cfg, rng)
      image = np.stack([pet, ct][:len(cfg.channels)], axis=-1)
      samples.append({"image": image, "mask": mask, "voxel_valid": valid,
                      "target_kind": np.int32(kind), "target_id": np.int32(ident),
                      **self.split.sample_meta(index, record)})
    return _stack(samples)


class _StudySampler:
  """One decoded study → the whole study as `max_slabs` slabs (leading axis 1), see `study_dataset`."""

  def __init__(self, split: _Split, cfg: ml_collections.ConfigDict):
    self.split, self.cfg = split, ml_collections.FrozenConfigDict(cfg)

  def __call__(self, index: int, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    cfg = self.cfg
    record = self.split.read(index, self.split.fields("ct", "suv"))
    ct, suv = to_view(record["ct"], cfg.view), to_view(record["suv"], cfg.view)
    slabs = min(math.ceil(ct.shape[2] / cfg.depth), cfg.max_slabs)
    scale, offset = _plane_and_depth(ct.shape, cfg, slabs * cfg.depth, rng)
    out_shape = (*cfg.plane_size, slabs * cfg.depth)
    ct, valid = resample_diagonal(ct, scale, offset, out_shape, 1, CT_PAD_HU)
    suv, _ = resample_diagonal(suv, scale, offset, out_shape, 1, 0.0)
    ct, pet = _intensities(ct, suv, cfg, rng)

    def stack(x, fill):  # (H, W, S·D) → (max_slabs, H, W, D)
      x = np.moveaxis(x.reshape(*cfg.plane_size, slabs, cfg.depth), 2, 0)
      return np.concatenate([x, np.full((cfg.max_slabs - slabs, *x.shape[1:]), fill, x.dtype)])

    return _stack([{"pet": stack(pet, -1.0), "ct": stack(ct, -1.0), "voxel_valid": stack(valid, False),
                    "slab_valid": np.arange(cfg.max_slabs) < slabs, **self.split.sample_meta(index, record)}])


def _stack(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


class _Flatten:
  """(B / k, k, ...) → (B, ...) after batching groups of k samples per study."""

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


class _HostBlock:
  """Element k of one host's training stream: read (k // m)·m·count + index·m + k % m of the shared stream
  (m reads per host and batch), so the global batch is the same for any number of hosts."""

  def __init__(self, stream: grain.MapDataset, m: int, index: int, count: int):
    self.stream, self.m, self.index, self.count = stream, m, index, count

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    step, j = divmod(k, self.m)
    return self.stream[(step * self.count + self.index) * self.m + j]


class _EvalItem:
  """Evaluation element j: item j of this host (no augmentation), or an all-zero padding sample."""

  def __init__(self, items: Sequence[Any], pad_item: Any, sample: Callable):
    self.items, self.pad_item, self.sample = list(items), pad_item, sample

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    if j < len(self.items):
      return self.sample(self.items[j])
    return {k: np.zeros_like(v) for k, v in self.sample(self.pad_item).items()}


def _pipeline(items: Sequence[Any], sampler, cfg: ml_collections.ConfigDict, *, what: str, seed: int,
              train: bool, batch_size: int, per_read: int, shard_index: int | None,
              shard_count: int | None) -> grain.IterDataset:
  if batch_size < 1:
    raise UserError(f"batch_size: must be >= 1, got {batch_size}")
  if shard_index is None or shard_count is None:
    import jax
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if not 0 <= shard_index < shard_count:
    raise UserError(f"shard_index={shard_index}: must be in [0, shard_count={shard_count})")
  if train:
    if batch_size % per_read:
      raise UserError(f"config.data.samples_per_read={per_read}: must divide the batch size {batch_size}")
    if not items:
      raise UserError(f"{what}: has no training examples")
    # One stream for all hosts (seeded like host 0 of old single-stream runs): global batch j is reads
    # [j·n, (j+1)·n) of it, and this host takes the `shard_index`-th block of m = n / shard_count reads.
    stream_seed = int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])
    stream = grain.MapDataset.source(list(items)).shuffle(seed=stream_seed).repeat()
    stream = stream.random_map(sampler, seed=stream_seed)
    ds = grain.MapDataset.range(len(stream) // shard_count).map(
        _HostBlock(stream, batch_size // per_read, shard_index, shard_count))
  else:
    mine = list(items)[shard_index::shard_count]
    per_host = math.ceil(len(items) / shard_count)
    length = math.ceil(per_host / batch_size) * batch_size
    ds = grain.MapDataset.range(length).map(_EvalItem(mine, items[0] if items else None, sampler))
  ds = ds.batch(batch_size // per_read, drop_remainder=train).map(_Flatten())
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                            prefetch_buffer_size=cfg.prefetch_buffer_size))
  if cfg.worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags; petfm parses its own FlagValues
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                     per_worker_buffer_size=cfg.worker_buffer_size))
  return it


def slab_dataset(data_dir: str, split: str, cfg: ml_collections.ConfigDict, *, seed: int, train: bool,
                 batch_size: int, shard_index: int | None = None, shard_count: int | None = None
                 ) -> grain.IterDataset:
  """Batches of 2.5-D slabs (module docstring): train = random slabs (`samples_per_read` per decoded
  study), eval = the centre slab of every study once. `batch_size` is per host; hosts as in the module
  docstring."""
  check_config(cfg, "slab")
  records_ = _Split(data_dir, split)
  per_read = cfg.samples_per_read if train else 1
  return _pipeline(range(len(records_)), _SlabSampler(records_, cfg, per_read), cfg,
                   what=f"{data_dir} split {split}", seed=seed, train=train, batch_size=batch_size,
                   per_read=per_read, shard_index=shard_index, shard_count=shard_count)


def crop_dataset(data_dir: str, split: str, cfg: ml_collections.ConfigDict, *, seed: int, train: bool,
                 batch_size: int, shard_index: int | None = None, shard_count: int | None = None
                 ) -> grain.IterDataset:
  """Batches of 3-D crops centred (with jitter when training) on a lesion component or organ of a study.

  train: studies with an eligible target, each crop draws one of the study's targets uniformly (or, with
  `balance_kinds`, a kind present in the study uniformly, then one of its targets); eval: every
  eligible (study, target) once, centred exactly on the target's centroid.
  """
  check_config(cfg, "crop")
  records_ = _Split(data_dir, split)
  per_read = cfg.samples_per_read if train else 1
  sampler = _CropSampler(records_, cfg, per_read)
  items = [(i, kind, ident) for i, e in enumerate(records_.entries) for kind, ident in sampler.eligible(e)]
  if train:
    items = sorted({(i,) for i, *_ in items})
  what = f"{data_dir} split {split} ({', '.join(cfg.target_kinds)} targets)"
  return _pipeline(items, sampler, cfg, what=what, seed=seed, train=train, batch_size=batch_size,
                   per_read=per_read, shard_index=shard_index, shard_count=shard_count)


def study_dataset(data_dir: str, split: str, cfg: ml_collections.ConfigDict, *, seed: int, train: bool,
                  batch_size: int, shard_index: int | None = None, shard_count: int | None = None
                  ) -> grain.IterDataset:
  """Batches of whole studies, each a stack of `max_slabs` slabs (padded, `slab_valid`) + stage/tracer."""
  check_config(cfg, "study")
  records_ = _Split(data_dir, split)
  return _pipeline(range(len(records_)), _StudySampler(records_, cfg), cfg,
                   what=f"{data_dir} split {split}", seed=seed, train=train, batch_size=batch_size,
                   per_read=1, shard_index=shard_index, shard_count=shard_count)
