"""Study-level data for the downstream tasks: whole studies in memory, labelled-patient subsets, slab sampling
for training and lesion slab stacks for staging.

Downstream work needs per-study control (a seeded subset of training patients, every slab of a study for
staging, whole volumes for sliding-window evaluation), so the studies of a split are decoded once and kept in
memory (fine for the synthetic cohort and for a few hundred real 4 mm studies: ~10–40 MB each). Intensities
and axes follow the pretraining slab view (`petfm.data.pipelines.normalize` / `to_view`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np
from scipy import ndimage

from petfm.data import pipelines, records
from petfm.errors import UserError

CONNECTIVITY = ndimage.generate_binary_structure(3, 2)   # 18-connectivity, as the autoPET metrics
STUDY_FIELDS = ("study_id", "patient_id", "ct", "suv", "label", "spacing", "affine", "original_affine",
                "original_shape", "stage")


@dataclasses.dataclass
class Study:
  """One study in view axes: pet, ct (H, W, S) normalised float32, label (H, W, S) uint8, plus its record's
  geometry (canonical `affine`, `spacing`, `original_affine`, `original_shape`) and Ann Arbor `stage` (1–4, 0
  unknown)."""
  study_id: str
  patient_id: str
  pet: np.ndarray
  ct: np.ndarray
  label: np.ndarray
  spacing: np.ndarray
  affine: np.ndarray
  original_affine: np.ndarray
  original_shape: np.ndarray
  stage: int


def view_study(record: dict, data: ml_collections.ConfigDict) -> Study:
  """A decoded record (fields `STUDY_FIELDS`) → `Study` in the view `data.view`, normalised as in
  pretraining."""
  ct, pet = pipelines.normalize(record["ct"], record["suv"], data)
  view = lambda a: np.ascontiguousarray(pipelines.to_view(a, data.view))
  return Study(record["study_id"], record["patient_id"], view(pet).astype(np.float32),
               view(ct).astype(np.float32), view(record["label"]).astype(np.uint8), record["spacing"],
               record["affine"], record["original_affine"], record["original_shape"], int(record["stage"]))


def read_records(data_dir: str, split: str, fields: Sequence[str],
                 patients: Sequence[str] | None = None) -> Iterator[dict]:
  """The decoded records (only `fields`) of every study of `split` (optionally only those of `patients`), in
  manifest order."""
  from array_record.python.array_record_module import ArrayRecordReader
  manifest = records.read_manifest(data_dir)
  entries = [s for s in manifest["studies"] if s["split"] == split]
  if patients is not None:
    wanted = set(patients)
    entries = [s for s in entries if s["patient_id"] in wanted]
  readers: dict[str, ArrayRecordReader] = {}
  try:
    for entry in entries:
      path = entry["shard"]
      if path not in readers:
        readers[path] = ArrayRecordReader(records.shard_files(data_dir, [path])[0])
      yield records.decode(readers[path].read([entry["index"]])[0], fields=fields)
  finally:
    for reader in readers.values():
      reader.close()


def read_studies(data_dir: str, split: str, data: ml_collections.ConfigDict,
                 patients: Sequence[str] | None = None) -> list[Study]:
  """Every study of `split` (optionally only those of `patients`), in manifest order."""
  return [view_study(r, data) for r in read_records(data_dir, split, STUDY_FIELDS, patients)]


def split_patients(data_dir: str, split: str) -> list[str]:
  """Sorted unique patient ids of a split."""
  manifest = records.read_manifest(data_dir)
  return sorted({s["patient_id"] for s in manifest["studies"] if s["split"] == split})


def labelled_subset(patients: Sequence[str], fraction: float, seed: int, count: int = 0) -> list[str]:
  """The patients whose labels are used: the first `count` (if > 0, else ceil(fraction · N), at least 1) of a
  seeded permutation of the sorted ids; nested, so for one seed the smaller subsets lie inside the larger."""
  if not 0.0 < fraction <= 1.0:
    raise UserError(f"config.label_fraction: {fraction} must be in (0, 1]")
  if count < 0:
    raise UserError(f"config.label_patients: {count} must be >= 0 (0 = use label_fraction)")
  ordered = sorted(patients)
  if not ordered:
    return []
  if count > len(ordered):
    raise UserError(f"config.label_patients: {count} exceeds the {len(ordered)} training patients")
  order = np.random.default_rng(seed).permutation(len(ordered))
  count = count or max(1, math.ceil(fraction * len(ordered)))
  return sorted(ordered[i] for i in order[:count])


def pad_values(data: ml_collections.ConfigDict) -> tuple[float, float]:
  """Normalised (PET, CT) values of the padding outside a study (SUV 0, CT -1024 HU), as in the pipelines."""
  ct, pet = pipelines.normalize(np.float32(pipelines.CT_PAD_HU), np.float32(0.0), data)
  return float(pet), float(ct)


def crop(study: Study, starts: Sequence[int], window: Sequence[int], pad: tuple[float, float]
         ) -> dict[str, np.ndarray]:
  """One slab (h, w, D) at `starts` (may reach outside; padded with `pad` = (PET, CT) values): pet, ct,
  label and valid (1 = real voxel)."""
  scale = np.ones(3)
  pet, valid = pipelines.resample_diagonal(study.pet, scale, starts, window, 1, pad[0])
  ct, _ = pipelines.resample_diagonal(study.ct, scale, starts, window, 1, pad[1])
  label, _ = pipelines.resample_diagonal(study.label, scale, starts, window, 0, 0)
  return {"pet": pet, "ct": ct, "label": label, "valid": valid.astype(np.uint8)}


@dataclasses.dataclass
class Components:
  """Voxels (N, 3) int of connected components, grouped: component k holds voxels[starts[k]:starts[k + 1]]."""
  voxels: np.ndarray
  starts: np.ndarray

  def __len__(self) -> int:
    return len(self.starts) - 1

  def __getitem__(self, k: int) -> np.ndarray:
    """The voxels (n, 3) of component k."""
    return self.voxels[self.starts[k]:self.starts[k + 1]]

  def draw(self, rng: np.random.Generator) -> np.ndarray:
    """A voxel of a uniformly drawn component, uniform within it: small components weigh as much as large."""
    voxels = self[rng.integers(len(self))]
    return voxels[rng.integers(len(voxels))]


def components(mask: np.ndarray, min_voxels: int = 1) -> Components:
  """The 18-connected components of `mask` (H, W, S) with ≥ `min_voxels` voxels, as `Components`."""
  labels, _ = ndimage.label(mask, structure=CONNECTIVITY)
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  kept = np.flatnonzero(sizes >= min_voxels)
  voxels = np.argwhere(np.isin(labels, kept))
  order = np.argsort(labels[tuple(voxels.T)], kind="stable")
  return Components(voxels[order], np.concatenate([[0], np.cumsum(sizes[kept])]))


def slab_centres(study: Study, hot_pet: float, min_hot_voxels: int = 8) -> dict[str, Components]:
  """Candidate slab centres of a study (view axes), by connected component: `lesion` (every lesion) and `hot`
  (regions of ≥ `min_hot_voxels` voxels that are no lesion but have normalised PET ≥ `hot_pet`: physiological
  uptake, spill-over, where false positives arise)."""
  return {"lesion": components(study.label > 0),
          "hot": components((study.pet >= hot_pet) & (study.label == 0), min_hot_voxels)}


def sample_slabs(studies: Sequence[Study], centres: Sequence[dict[str, Components]], window: Sequence[int],
                 batch_size: int, rng: np.random.Generator, pad: tuple[float, float],
                 foreground_fraction: float = 0.5, hard_fraction: float = 0.0) -> dict[str, np.ndarray]:
  """A training batch of random slabs (B, h, w, D): pet, ct float32, label uint8, valid uint8.

  A study is drawn uniformly; with probability `foreground_fraction` (when it has lesions) the slab holds a
  voxel of a random lesion, with probability `hard_fraction` a voxel of a random `hot` region (hard negatives;
  `centres`: the `slab_centres` of each study), otherwise its position is uniform. Components are drawn
  uniformly, so small lesions and small hot organs (salivary glands, a hot myocardium) are seen as often as
  large ones. The chosen voxel lies at a uniformly random place in the slab (not always at its centre, which a
  model would learn as a prior); axes shorter than the window are padded at a random offset."""
  out: dict[str, list] = {"pet": [], "ct": [], "label": [], "valid": []}
  for _ in range(batch_size):
    index = rng.integers(len(studies))
    study = studies[index]
    shape = study.pet.shape
    u = rng.random()
    kind = "lesion" if u < foreground_fraction else "hot" if u < foreground_fraction + hard_fraction else ""
    if kind and len(centres[index][kind]):
      centre = centres[index][kind].draw(rng)
      starts = [int(np.clip(c - rng.integers(w), min(0, n - w), max(0, n - w)))
                for c, w, n in zip(centre, window, shape)]
    else:
      starts = [int(rng.integers(min(0, n - w), max(0, n - w) + 1)) for n, w in zip(shape, window)]
    for k, v in crop(study, starts, window, pad).items():
      out[k].append(v)
  return {k: np.stack(v) for k, v in out.items()}


def staging_regions(lesions: Components, max_slabs: int, rng: np.random.Generator | None = None,
                    hot: Components | None = None, distractors: int = 0) -> list[np.ndarray]:
  """The regions (voxel arrays) that `lesion_stack` cuts slabs at: without `rng` (evaluation) the `max_slabs`
  largest lesions; with it (training) a random subset of the lesions plus 0..`distractors` random `hot` regions
  (physiological uptake: what a lesion detector's false positives look like, so the staging model learns to
  ignore them)."""
  if rng is None:
    return sorted((lesions[k] for k in range(len(lesions))), key=len, reverse=True)[:max_slabs]
  extra = []
  if hot is not None and len(hot) and distractors:
    count = min(int(rng.integers(distractors + 1)), len(hot), max_slabs - 1)
    extra = [hot[k] for k in rng.choice(len(hot), count, replace=False)]
  return [lesions[k] for k in rng.permutation(len(lesions))[:max_slabs - len(extra)]] + extra


def lesion_stack(study: Study, regions: Sequence[np.ndarray], window: Sequence[int], max_slabs: int,
                 pad: tuple[float, float], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
  """A study as native-resolution slabs for staging: one slab (h, w, D) per region (voxels (n, 3), view axes;
  `staging_regions`: its lesions), at most `max_slabs`. With `rng` each slab holds a random voxel of its region,
  anywhere in the slab (training); without, it is centred on the region's centroid (evaluation).

  Returns pet, ct (max_slabs, h, w, D) float32, slab_valid (max_slabs,) bool and position (max_slabs, 3)
  float32: each slab's centre in the study, every axis scaled to [-1, 1] (where in the body a lesion lies,
  which a slab alone does not show)."""
  shape = np.asarray(study.pet.shape)
  h, w, d = window
  out = {"pet": np.full((max_slabs, h, w, d), pad[0], np.float32),
         "ct": np.full((max_slabs, h, w, d), pad[1], np.float32),
         "slab_valid": np.zeros(max_slabs, bool), "position": np.zeros((max_slabs, 3), np.float32)}
  for i, voxels in enumerate(regions[:max_slabs]):
    if rng is not None:
      starts = np.array([c - rng.integers(n) for c, n in zip(voxels[rng.integers(len(voxels))], window)])
    else:
      starts = np.round(voxels.mean(0)).astype(int) - np.asarray(window) // 2
    slab = crop(study, starts, window, pad)
    out["pet"][i], out["ct"][i], out["slab_valid"][i] = slab["pet"], slab["ct"], True
    out["position"][i] = 2 * (starts + (np.asarray(window) - 1) / 2) / np.maximum(shape - 1, 1) - 1
  return out


def stage_index(stage: int, classes: str = "ann_arbor") -> int:
  """Ann Arbor stage (1–4) → class index: `ann_arbor` 4 classes (I–IV → 0–3), `limited_advanced` 2 classes
  (I–II → 0, III–IV → 1). Raises for an unknown stage (0)."""
  if stage not in (1, 2, 3, 4):
    raise UserError(f"stage {stage}: staging needs a known Ann Arbor stage 1–4 (0 = unknown)")
  if classes == "ann_arbor":
    return stage - 1
  if classes == "limited_advanced":
    return int(stage >= 3)
  raise UserError(f"config.stage_classes: {classes!r} is not one of ['ann_arbor', 'limited_advanced']")


NUM_STAGE_CLASSES = {"ann_arbor": 4, "limited_advanced": 2}
