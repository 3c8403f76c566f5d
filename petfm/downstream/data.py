"""Study-level data for the downstream tasks: whole studies in memory, labelled-patient subsets, slab sampling
for training and whole-study slab stacks for staging.

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

from petfm.data import pipelines, records
from petfm.errors import UserError

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


def slab_centres(study: Study, hot_pet: float) -> dict[str, np.ndarray]:
  """Candidate slab centres of a study (view axes, (N, 3) int): `lesion` voxels and `hot` voxels that are no
  lesion but have normalised PET ≥ `hot_pet` (physiological uptake, spill-over: where false positives
  arise)."""
  hot = (study.pet >= hot_pet) & (study.label == 0)
  return {"lesion": np.argwhere(study.label > 0), "hot": np.argwhere(hot)}


def sample_slabs(studies: Sequence[Study], centres: Sequence[dict[str, np.ndarray]], window: Sequence[int],
                 batch_size: int, rng: np.random.Generator, pad: tuple[float, float],
                 foreground_fraction: float = 0.5, hard_fraction: float = 0.0) -> dict[str, np.ndarray]:
  """A training batch of random slabs (B, h, w, D): pet, ct float32, label uint8, valid uint8.

  A study is drawn uniformly; with probability `foreground_fraction` (when it has lesions) the slab holds a
  random lesion voxel, with probability `hard_fraction` a random `hot` voxel (hard negatives; `centres`: the
  `slab_centres` of each study), otherwise its position is uniform. The chosen voxel lies at a uniformly
  random place in the slab (not always at its centre, which a model would learn as a prior); axes shorter than
  the window are padded at a random offset."""
  out: dict[str, list] = {"pet": [], "ct": [], "label": [], "valid": []}
  for _ in range(batch_size):
    index = rng.integers(len(studies))
    study = studies[index]
    shape = study.pet.shape
    u = rng.random()
    kind = "lesion" if u < foreground_fraction else "hot" if u < foreground_fraction + hard_fraction else ""
    pool = centres[index][kind] if kind else np.zeros((0, 3))
    if len(pool):
      centre = pool[rng.integers(len(pool))]
      starts = [int(np.clip(c - rng.integers(w), min(0, n - w), max(0, n - w)))
                for c, w, n in zip(centre, window, shape)]
    else:
      starts = [int(rng.integers(min(0, n - w), max(0, n - w) + 1)) for n, w in zip(shape, window)]
    for k, v in crop(study, starts, window, pad).items():
      out[k].append(v)
  return {k: np.stack(v) for k, v in out.items()}


def study_stack(study: Study, window: Sequence[int], max_slabs: int, pad: tuple[float, float]
                ) -> dict[str, np.ndarray]:
  """A whole study as slabs for staging, with the geometry of `pipelines.study_dataset`: the plane scaled to
  fit (h, w) (aspect kept, centred), the central S·D slices of the stacking axis cut into S ≤ `max_slabs`
  slabs. Returns pet, ct (max_slabs, h, w, D) float32 and slab_valid (max_slabs,) bool."""
  h, w, d = window
  shape = np.asarray(study.pet.shape, np.float64)
  slabs = min(math.ceil(shape[2] / d), max_slabs)
  step = float(max(shape[0] / h, shape[1] / w))
  out_shape = (h, w, slabs * d)
  scale = np.array([step, step, 1.0])
  centre = (shape - 1) / 2
  offset = centre - scale * (np.asarray(out_shape, np.float64) - 1) / 2
  offset[2] = np.floor(offset[2])
  stacks = []
  for volume, fill in ((study.pet, pad[0]), (study.ct, pad[1])):
    x, _ = pipelines.resample_diagonal(volume, scale, offset, out_shape, 1, fill)
    x = np.moveaxis(x.reshape(h, w, slabs, d), 2, 0)
    stacks.append(np.concatenate([x, np.full((max_slabs - slabs, h, w, d), fill, np.float32)]))
  return {"pet": stacks[0], "ct": stacks[1], "slab_valid": np.arange(max_slabs) < slabs}


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
