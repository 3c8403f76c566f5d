"""Tiny converted cohorts for pipeline tests and benchmarks: NIfTI phantoms (autoPET layout) → convert.

Each study is a box of shape about (20, 16, 28) at 2 × 2 × 3 mm (stored at that spacing, so no resampling)
with a body, a liver (organ 5), a bladder (organ 21) and one or two spherical lesions. CT is exactly
`200 · SUV − 1000` HU (SUV in multiples of 0.25), so with `aligned_intensities(cfg)` normalised PET and CT are
equal voxel for voxel: any spatial misalignment between the two shows up as a difference.
"""

from __future__ import annotations

import hashlib
import json
import os
from unittest import mock

import nibabel as nib
import numpy as np

from data_prep import convert
from data_prep.configs import convert as convert_configs
from petfm.data import studies

SPACING = (2.0, 2.0, 3.0)
VAL_FRACTION, TEST_FRACTION = 0.3, 0.2


def phantom(seed: int, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
  """Volumes (X, Y, Z): ct int16, suv float32, seg uint8 (lesions), organs uint8."""
  rng = np.random.default_rng(seed)
  grid = np.indices(shape, dtype=np.float64)
  rel = [(grid[a] - (shape[a] - 1) / 2) / shape[a] for a in range(3)]
  body = rel[0] ** 2 + rel[1] ** 2 + (rel[2] / 1.4) ** 2 < 0.2
  organs = np.zeros(shape, np.uint8)
  organs[body & (rel[0] > 0.05) & (rel[2] > 0.1)] = 5
  organs[body & (np.abs(rel[0]) < 0.15) & (rel[2] < -0.25)] = 21
  seg = np.zeros(shape, np.uint8)
  for _ in range(1 + seed % 2):
    centre = (np.array(shape) - 1) / 2 + rng.uniform(-0.2, 0.2, 3) * shape
    seg[np.linalg.norm((grid - centre[:, None, None, None]) * np.array(SPACING)[:, None, None, None],
                       axis=0) <= 5.0] = 1
  suv = 1.0 * body + 1.5 * (organs == 5) + 4.0 * (organs == 21) + 8.0 * seg + rng.integers(0, 3, shape) * 0.25
  ct = 200 * suv - 1000
  return {"ct": ct.astype(np.int16), "suv": suv.astype(np.float32), "seg": seg, "organs": organs}


def aligned_intensities(cfg):
  """Sets linear intensity scaling under which the fixture's normalised PET equals its normalised CT."""
  cfg.ct_clip = (-1000.0, 9000.0)
  cfg.suv_clip = 50.0
  cfg.suv_scale = "linear"
  return cfg


def _patients(counts: dict[str, int], seed: int) -> list[tuple[str, str]]:
  """(patient id, split) with exactly `counts[split]` patients per split under convert's hash split."""
  out, found, i = [], dict.fromkeys(counts, 0), 0
  while any(found[s] < n for s, n in counts.items()):
    name = f"PETCT_{i:04d}"
    split = studies.patient_split(name, seed, VAL_FRACTION, TEST_FRACTION)
    if found.get(split, 0) < counts.get(split, 0):
      out.append((name, split))
      found[split] += 1
    i += 1
  return out


def make_cohort(root: str, counts: dict[str, int] | None = None, embedding_dim: int = 0,
                shape: tuple[int, int, int] = (20, 16, 28), output: str | None = None,
                organ_labels: dict[str, str] | None = None) -> str:
  """Converts a cohort with `counts` studies per split (one study per patient) into `output` (default
  `root/records`; may be a URL).

  Shapes vary by up to ±2 voxels per axis around `shape`; tracer alternates FDG/PSMA, stage cycles 0..4.
  `embedding_dim > 0` stores deterministic pseudo text embeddings instead of running the text encoder.
  `organ_labels` ({"5": name, "21": name}) is written as the input's organs.json, so the manifest names them.
  Returns the records folder.
  """
  counts = counts or {"train": 4, "val": 2, "test": 1}
  nifti = os.path.join(root, "nifti")
  for i, (patient, _) in enumerate(_patients(counts, seed=0)):
    size = tuple(int(n + (i * (a + 1)) % 5 - 2) for a, n in enumerate(shape))
    volumes = phantom(i, size)
    folder = os.path.join(nifti, patient, "study")
    os.makedirs(folder, exist_ok=True)
    affine = np.diag([*SPACING, 1.0])
    for name, key in [("CTres", "ct"), ("SUV", "suv"), ("SEG", "seg"), ("ORGANS", "organs")]:
      nib.save(nib.Nifti1Image(volumes[key], affine), os.path.join(folder, f"{name}.nii.gz"))
    meta = {"tracer": ("FDG", "PSMA")[i % 2], "age": 50 + i}
    if i % 5:
      meta["stage"] = i % 5
    with open(os.path.join(folder, "meta.json"), "w") as f:
      json.dump(meta, f)
  if organ_labels:
    with open(os.path.join(nifti, "organs.json"), "w") as f:
      json.dump(organ_labels, f)
  config = convert_configs.get_config()
  config.update(spacing=SPACING, val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION, records_per_shard=2,
                prompt_template="{tracer} PET/CT, {age}")

  def fake_embeddings(prompts, encoder):
    del encoder
    return {p: np.random.default_rng(int(hashlib.sha256(p.encode()).hexdigest()[:8], 16))
            .normal(size=embedding_dim).astype(np.float32) for p in prompts}

  output = output or os.path.join(root, "records")
  with mock.patch.object(studies, "embed_prompts", fake_embeddings):
    summary = convert.convert(nifti, output, config, workers=1, progress=False)
  assert not summary.errors, summary.errors
  return output
