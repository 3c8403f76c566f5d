"""Synthetic whole-body PET/CT cohort in the autoPET I/II layout (`petfm synthetic`).

  python -m data_prep.synthetic --out DIR --n N [--seed S] [--workers W] [--scale F] [--from-ct DIR]

Writes `DIR/<study_id>/{CTres,SUV,SEG,ORGANS}.nii.gz` + `meta.json` per study and `DIR/organs.json` (organ
label table, `data_prep.anatomy.ORGAN_LABELS`); `petfm prepare` converts the folder with its defaults.

Procedural mode (default): a random head-to-thigh body (`data_prep.anatomy.whole_body`) per study. Field of
view 480-560 mm in-plane × 1030-1110 mm cranio-caudal (vertex to mid-thigh); voxels 3.6-4.2 mm in-plane and
1.2-1.4× that between slices (≈ 4.3-5.9 mm), i.e. ≈ 130 × 130 × 210 voxels: close to the 4 mm grid that
`petfm prepare` stores by default, so a 40-study cohort takes well under a minute on two cores. `--scale F`
divides the voxel sizes by F (tests use F ≈ 0.3 for tiny studies). The affine is scanner-like: −x, −y
directions (LPS storage order), random slice direction and origin offsets, body off-centre.

`--from-ct DIR`: PET from a real CT plus its TotalSegmentator organ label map (e.g. `shared/data/totalseg`).
Organ names map to our labels and SUVs (`anatomy.organ_from_totalseg`), lymph-node stations are derived
around the aorta / IVC and the iliac vessels, and `--n` studies with different tracers and lesions are
written.

Per study: tracer, age, sex and diagnosis are drawn, then the Ann Arbor stage (I one nodal station, II ≥ 2
stations on one side of the diaphragm, III both sides, IV an extranodal organ: liver, lung or bone), then
lesions are placed to match it: irregular blobs (thresholded smoothed noise around a centre) of SUV 3-20, also
visible in the CT. PET = tracer SUV per organ, blurred by a 6.5 mm FWHM Gaussian PSF (in mm), count-like noise
(variance ∝ SUV), clipped at 0; CT gets Gaussian noise. Study i depends only on (seed, i): byte-identical for
any worker count. Each study is written to a temp folder and renamed, so a killed run leaves no half study
and a rerun skips the finished ones.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from data_prep import anatomy
from petfm.data import checks
from petfm.data.records import write_atomic
from petfm.errors import ArgumentParser, UserError

PSF_FWHM_MM = 6.5
LESION_SUV = (3.0, 20.0)
FILES = ("CTres.nii.gz", "SUV.nii.gz", "SEG.nii.gz", "ORGANS.nii.gz", "meta.json")
_STAGE_WEIGHTS = {1: 0.2, 2: 0.3, 3: 0.25, 4: 0.25}
_LESION_HU = {"nodes": 35.0, "liver": 35.0, "lungs": 30.0, "bone": 450.0, "spine": 450.0}


@dataclasses.dataclass
class SynthStudy:
  """One generated study; arrays (X, Y, Z) on the PET grid given by `affine`."""
  study_id: str
  ct: np.ndarray  # int16 HU
  suv: np.ndarray  # float32, after PSF and noise
  seg: np.ndarray  # uint8 lesion mask
  organs: np.ndarray  # uint8, ids of anatomy.ORGAN_LABELS
  suv_true: np.ndarray  # float32, SUV before PSF and noise
  affine: np.ndarray  # (4, 4)
  meta: dict[str, Any]


# ------------------------------------------------------------------------------------------ subject draw
def _draw_subject(rng: np.random.Generator, index: int, prefix: str) -> dict[str, Any]:
  tracer = "FDG" if rng.random() < 0.6 else "PSMA"
  if tracer == "PSMA":
    diagnosis, sex = "prostate cancer", "M"
  else:
    diagnosis = str(rng.choice(["lymphoma", "lymphoma", "lung cancer", "melanoma"]))
    sex = "M" if rng.random() < 0.5 else "F"
  low = 18 if diagnosis == "lymphoma" else 45
  return {"tracer": tracer, "age": int(rng.integers(low, 86)), "sex": sex, "diagnosis": diagnosis,
          "patient_id": f"{prefix}_p{index:04d}"}


def study_id(prefix: str, index: int) -> str:
  return f"{prefix}_{index:04d}"


# ----------------------------------------------------------------------------------------------- lesions
def _region_name(site: int) -> str:
  return "nodes" if site in anatomy.NODAL_STATIONS else anatomy.ORGAN_LABELS[site]


def draw_sites(rng: np.random.Generator, present: set[int]) -> tuple[int, list[int]]:
  """Draws an Ann Arbor stage among those the present labels allow, then one site (label id) per lesion."""
  sides = {side: sorted(s for s, sd in anatomy.NODAL_STATIONS.items() if sd == side and s in present)
           for side in ("above", "below")}
  nodal = sides["above"] + sides["below"]
  extranodal = sorted(set(anatomy.EXTRANODAL) & present)
  feasible = {1: bool(nodal), 2: max(map(len, sides.values())) >= 2, 3: all(sides.values()),
              4: bool(extranodal)}
  stages = [s for s, ok in feasible.items() if ok]
  if not stages:
    raise UserError("no lymph-node station or extranodal organ (liver, lung, bone) to place lesions in")
  weights = np.array([_STAGE_WEIGHTS[s] for s in stages])
  stage = int(rng.choice(stages, p=weights / weights.sum()))
  pick = lambda pool, k: [int(s) for s in rng.choice(pool, k, replace=False)]  # noqa: E731
  if stage == 1:
    stations = pick(nodal, 1)
  elif stage == 2:
    side = sides[str(rng.choice([s for s, v in sides.items() if len(v) >= 2]))]
    stations = pick(side, int(rng.integers(2, min(4, len(side)) + 1)))
  elif stage == 3:
    stations = [s for v in sides.values() for s in pick(v, int(rng.integers(1, min(3, len(v)) + 1)))]
  else:
    stations = pick(nodal, int(rng.integers(0, min(3, len(nodal)) + 1))) if nodal else []
    stations += [int(s) for s in rng.choice(extranodal, int(rng.integers(1, 4)))]
  return stage, [s for s in stations for _ in range(int(rng.integers(1, 3)))]


def add_lesions(rng: np.random.Generator, organs: np.ndarray, hu: np.ndarray, suv_true: np.ndarray,
                spacing: np.ndarray) -> tuple[np.ndarray, int]:
  """Draws a stage, places lesions to match it (in place in `hu`, `suv_true`); returns (seg, stage).

  Every lesion lies inside its site's label and at least one voxel away from other lesions, so each
  connected component of the mask belongs to one site. The stage returned is that of the sites placed.
  """
  counts = np.bincount(organs.ravel(), minlength=256)
  _, sites = draw_sites(rng, set(np.flatnonzero(counts).tolist()))
  seg = np.zeros(organs.shape, np.uint8)
  placed: set[int] = set()
  for site in sites:
    voxels = np.argwhere(organs == site)
    radius_mm = rng.uniform(5, 14 if site in anatomy.NODAL_STATIONS else 18) * rng.uniform(0.7, 1.3, 3)
    value = rng.uniform(*LESION_SUV)
    for _ in range(10):
      centre = voxels[rng.integers(len(voxels))]
      half = np.ceil(radius_mm * 1.4 / spacing).astype(int) + 1
      lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, organs.shape)
      box = tuple(slice(a, b) for a, b in zip(lo, hi))
      grid = np.indices(hi - lo, dtype=np.float32)
      offsets = (grid + (lo - centre)[:, None, None, None]) * (spacing / radius_mm)[:, None, None, None]
      noise = ndimage.gaussian_filter(rng.standard_normal(offsets.shape[1:]).astype(np.float32), 1.0)
      noise /= noise.std() + 1e-6
      blob = np.sqrt((offsets ** 2).sum(0)) + 0.3 * noise < 1
      blob[tuple(centre - lo)] = True
      blob &= (organs[box] == site) & ~ndimage.binary_dilation(seg[box] > 0, np.ones((3, 3, 3), bool))
      if blob.any():
        break
    else:
      continue
    seg[box][blob] = 1
    suv_true[box][blob] = np.clip(value * (1 + 0.1 * noise[blob]), *LESION_SUV)
    hu[box][blob] = _LESION_HU[_region_name(site)] + 10 * noise[blob]
    placed.add(site)
  if not placed:
    raise UserError("could not place any lesion (the lesion sites are too small at this voxel size)")
  return seg, anatomy.ann_arbor_stage(placed)


# ------------------------------------------------------------------------------------------- PET and CT
def organ_suv(rng: np.random.Generator, tracer: str, organs: np.ndarray, hu: np.ndarray) -> np.ndarray:
  """Noise-free SUV (X, Y, Z) float32: tracer table per label, jittered per subject; unlabelled by HU."""
  table = anatomy.SUV_TABLE[tracer]
  scale = rng.uniform(0.85, 1.15)
  lut = np.zeros(256, np.float32)
  for i, name in anatomy.ORGAN_LABELS.items():
    lut[i] = table[name] * scale * rng.uniform(0.85, 1.15)
  if tracer == "FDG":
    lut[anatomy.LABEL_IDS["heart"]] *= rng.uniform(0.6, 2.5)  # variable myocardial uptake
  suv = lut[organs]
  unlabelled = organs == 0
  by_hu = np.select([hu < -900, hu < -500, hu < -30, hu < 200],
                    [0.0, table["lungs"], table["subcutaneous_fat"], table["soft_tissue"]], table["bone"])
  suv[unlabelled] = (by_hu[unlabelled] * scale).astype(np.float32)
  return suv


def simulate_pet(rng: np.random.Generator, suv_true: np.ndarray, spacing: np.ndarray) -> np.ndarray:
  """PSF blur (FWHM PSF_FWHM_MM, Gaussian in mm) and count-like noise (variance ∝ SUV), clipped at 0."""
  sigma = PSF_FWHM_MM / (2 * math.sqrt(2 * math.log(2))) / spacing
  blurred = ndimage.gaussian_filter(suv_true, sigma, truncate=3.0, mode="constant")
  counts_per_suv = rng.uniform(15, 40) * float(np.prod(spacing)) / 64.0  # counts per SUV unit per voxel
  noise = rng.standard_normal(blurred.shape, dtype=np.float32)
  return np.maximum(blurred + np.sqrt(np.maximum(blurred, 0) / counts_per_suv) * noise, 0).astype(np.float32)


def simulate_ct(rng: np.random.Generator, hu: np.ndarray) -> np.ndarray:
  """Slight partial-volume blur and Gaussian noise; int16 HU."""
  ct = ndimage.gaussian_filter(hu, 0.5, truncate=2.0)
  ct += np.float32(rng.uniform(8, 20)) * rng.standard_normal(hu.shape, dtype=np.float32)
  return np.clip(np.rint(ct), -1024, 3071).astype(np.int16)


# ------------------------------------------------------------------------------------------ study makers
def make_study(seed: int, index: int, scale: float = 1.0, prefix: str = "synth") -> SynthStudy:
  """Procedural study `index` of the cohort `seed`; `scale` < 1 gives coarser voxels (smaller arrays)."""
  rng = np.random.default_rng([seed, index])
  meta = _draw_subject(rng, index, prefix)
  in_plane = rng.uniform(3.6, 4.2)
  spacing = np.array([in_plane, in_plane, in_plane * rng.uniform(1.2, 1.4)]) / scale
  fov = np.array([rng.uniform(480, 560)] * 2 + [rng.uniform(1030, 1110)])
  shape = np.ceil(fov / spacing).astype(int)
  centre = rng.uniform(-120, 120, 2)  # body centre in world mm (scanner origin offsets)
  vertex = rng.uniform(-200, 400)  # world z of the top of the head
  z_sign = 1.0 if rng.random() < 0.5 else -1.0  # slice order feet→head or head→feet
  affine = np.diag([-spacing[0], -spacing[1], z_sign * spacing[2], 1.0])
  origin_xy = centre + fov[:2] / 2 + rng.uniform(-25, 25, 2)  # voxel 0 lies towards the patient's right/front
  top = vertex + rng.uniform(10, 40)  # world z of the slice above the vertex
  z0 = top if z_sign < 0 else top - (shape[2] - 1) * spacing[2]
  affine[:3, 3] = [*origin_xy, z0]
  world = [affine[a, a] * np.arange(shape[a]) + affine[a, 3] for a in range(3)]
  canvas = anatomy.whole_body(rng, world[0] - centre[0], world[1] - centre[1], vertex - world[2])
  suv_true = organ_suv(rng, meta["tracer"], canvas.organs, canvas.hu)
  seg, stage = add_lesions(rng, canvas.organs, canvas.hu, suv_true, spacing)
  meta.update(ann_arbor_stage=stage, spacing_mm=spacing.round(4).tolist())
  return SynthStudy(study_id(prefix, index), simulate_ct(rng, canvas.hu),
                    simulate_pet(rng, suv_true, spacing), seg, canvas.organs, suv_true, affine, meta)


def find_ct_pair(folder: str) -> tuple[str, str]:
  """(CT, organ label map) in `folder`: a CT NIfTI and a TotalSegmentator map of the same shape and affine.

  Headers only (`checks.nifti_header`); a file that is not a usable 3-D NIfTI is a `UserError` naming it.
  """
  if not os.path.isdir(folder):
    raise UserError(f"--from-ct {folder}: no such folder")
  paths = sorted(glob.glob(os.path.join(glob.escape(folder), "*.nii*")))
  is_label = lambda p: re.search(r"seg|label|mask", os.path.basename(p), re.IGNORECASE)  # noqa: E731
  headers = {p: checks.nifti_header(p, f"--from-ct {p}") for p in paths}
  for ct_path in (p for p in paths if not is_label(p)):
    ct = headers[ct_path]
    for seg_path in (p for p in paths if is_label(p)):
      seg = headers[seg_path]
      if seg.shape == ct.shape and np.allclose(seg.affine, ct.affine, atol=1e-3):
        return ct_path, seg_path
  raise UserError(f"--from-ct {folder}: found no CT with a TotalSegmentator label map on the same grid "
                  f"(expected e.g. example_ct.nii.gz + example_seg*.nii.gz of the same shape and affine; "
                  f"found {', '.join(os.path.basename(p) for p in paths) or 'no NIfTI files'})")


def load_ct_pair(ct_path: str, seg_path: str) -> tuple[nib.Nifti1Image, np.ndarray]:
  """(canonical CT image with float32 HU, canonical uint8 TotalSegmentator labels); `UserError` for
  unreadable files, NaN/inf CT voxels or label values outside 0..255."""
  ct_where, seg_where = f"--from-ct {ct_path}", f"--from-ct {seg_path}"
  ct_image = nib.as_closest_canonical(checks.nifti_header(ct_path, ct_where))
  hu = checks.read_voxels(ct_image, ct_where, np.float32)
  checks.check_finite(hu, ct_where)
  seg_image = nib.as_closest_canonical(checks.nifti_header(seg_path, seg_where))
  ts = checks.read_voxels(seg_image, seg_where)
  checks.check_labels(ts, seg_where, range(256))
  return nib.Nifti1Image(hu, ct_image.affine, ct_image.header), ts.astype(np.uint8)


def _ts_mask(labels: np.ndarray, *names: str) -> np.ndarray:
  ids = [i for i, n in anatomy.TOTALSEG_LABELS.items() if n in names]
  return np.isin(labels, ids)


def nodal_stations_from_ct(ts: np.ndarray, organs: np.ndarray, hu: np.ndarray,
                           spacing: np.ndarray) -> np.ndarray:
  """Adds lymph-node stations (ids of anatomy.NODAL_STATIONS) to `organs` (canonical RAS, (X, Y, Z)).

  Stations are unlabelled fat/soft tissue near the big vessels: lower mediastinal (≤ 15 mm of the aorta on
  slices holding lung, upper half), para-aortic (≤ 15 mm of aorta / IVC below the lungs and above the iliac
  bifurcation), iliac right / left (≤ 12 mm of the iliac vessels, nearer their own side).
  """
  free = (organs == 0) & (hu > -250) & (hu < 150)
  k = np.arange(ts.shape[2])[None, None, :]
  lungs = _ts_mask(ts, *[n for n in anatomy.TOTALSEG_LABELS.values() if "lung" in n])
  lung_z = np.flatnonzero(lungs.any((0, 1)))
  iliac = {side: _ts_mask(ts, f"iliac_artery_{side}", f"iliac_vena_{side}") for side in ("right", "left")}
  iliac_z = np.flatnonzero((iliac["right"] | iliac["left"]).any((0, 1)))
  central = _ts_mask(ts, "aorta", "inferior_vena_cava")
  out = organs.copy()
  if central.any():
    near = ndimage.distance_transform_edt(~central, sampling=spacing) <= 15
    if lung_z.size:
      out[near & free & (k >= (lung_z.min() + lung_z.max()) / 2)] = anatomy.LABEL_IDS["nodes_mediastinal"]
    top = lung_z.min() - 3 if lung_z.size else ts.shape[2]
    bottom = iliac_z.max() + 3 if iliac_z.size else 0
    out[near & free & (k < top) & (k > bottom)] = anatomy.LABEL_IDS["nodes_paraaortic"]
  if iliac["right"].any() and iliac["left"].any():
    dist = {s: ndimage.distance_transform_edt(~m, sampling=spacing) for s, m in iliac.items()}
    for side, other in (("right", "left"), ("left", "right")):
      station = (dist[side] <= 12) & (dist[side] < dist[other] - 10) & free & (out == 0)
      out[station & (k <= iliac_z.max())] = anatomy.LABEL_IDS[f"nodes_iliac_{side}"]
  return out


def make_study_from_ct(ct_path: str, seg_path: str, seed: int, index: int) -> SynthStudy:
  """Study `index` on a real CT: organ SUVs from its TotalSegmentator labels, lesions, PET simulation."""
  rng = np.random.default_rng([seed, index])
  prefix = re.sub(r"\W+", "_", os.path.basename(ct_path).split(".nii")[0])
  meta = _draw_subject(rng, index, prefix)
  ct_image, ts = load_ct_pair(ct_path, seg_path)
  hu = np.asarray(ct_image.dataobj)
  spacing = np.array(ct_image.header.get_zooms()[:3], np.float64)
  names = [anatomy.TOTALSEG_LABELS.get(i, "") for i in range(256)]
  lut = np.array([anatomy.organ_from_totalseg(name) for name in names], np.uint8)
  organs = nodal_stations_from_ct(ts, lut[ts], hu, spacing)
  suv_true = organ_suv(rng, meta["tracer"], organs, hu)
  try:
    seg, stage = add_lesions(rng, organs, hu, suv_true, spacing)
  except UserError as e:
    raise UserError(f"--from-ct {seg_path}: {e}") from None
  meta.update(ann_arbor_stage=stage, spacing_mm=spacing.round(4).tolist(),
              source_ct=os.path.basename(ct_path))
  ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
  return SynthStudy(study_id(prefix, index), ct, simulate_pet(rng, suv_true, spacing), seg, organs, suv_true,
                    ct_image.affine, meta)


# ---------------------------------------------------------------------------------------------- writing
def write_study(study: SynthStudy, out_dir: str) -> str:
  """Writes the study folder atomically (temp folder + rename); returns its path."""
  final = os.path.join(out_dir, study.study_id)
  tmp = os.path.join(out_dir, f".tmp-{study.study_id}-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    for name, array in zip(FILES, (study.ct, study.suv, study.seg, study.organs)):
      image = nib.Nifti1Image(array, study.affine)
      image.header.set_xyzt_units("mm")
      image.set_qform(study.affine, code=1)
      image.set_sform(study.affine, code=1)
      nib.save(image, os.path.join(tmp, name))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(study.meta, f, indent=1)
    os.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


def _generate(index: int, seed: int, out_dir: str, scale: float, ct_pair: tuple[str, str] | None) -> str:
  """Worker: makes and writes one study; returns its id."""
  study = make_study_from_ct(*ct_pair, seed, index) if ct_pair else make_study(seed, index, scale)
  write_study(study, out_dir)
  return study.study_id


def generate(out_dir: str, n: int, seed: int = 0, workers: int = 1, scale: float = 1.0,
             from_ct: str | None = None, progress: bool = True) -> list[str]:
  """Writes studies 0..n-1 (skipping finished ones) and organs.json; returns the ids written by this call."""
  if n < 1:
    raise UserError(f"--n={n}: must be ≥ 1")
  if seed < 0:
    raise UserError(f"--seed={seed}: must be ≥ 0")
  if workers < 1:
    raise UserError(f"--workers={workers}: must be ≥ 1")
  if not 0.05 <= scale <= 2:
    raise UserError(f"--scale={scale}: must be in [0.05, 2]")
  checks.output_dir(out_dir, "--out")
  ct_pair = find_ct_pair(from_ct) if from_ct is not None else None
  if ct_pair:
    load_ct_pair(*ct_pair)  # every check on the voxels before anything is written
  prefix = re.sub(r"\W+", "_", os.path.basename(ct_pair[0]).split(".nii")[0]) if ct_pair else "synth"
  created = not os.path.exists(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  try:
    return _generate_all(out_dir, n, seed, workers, scale, ct_pair, prefix, progress)
  except BaseException:  # a folder this call made and filled with nothing but organs.json goes again
    if created and os.listdir(out_dir) == ["organs.json"]:
      shutil.rmtree(out_dir, ignore_errors=True)
    raise


def _generate_all(out_dir: str, n: int, seed: int, workers: int, scale: float,
                  ct_pair: tuple[str, str] | None, prefix: str, progress: bool) -> list[str]:
  for stale in glob.glob(os.path.join(glob.escape(out_dir), ".tmp-*")):
    shutil.rmtree(stale, ignore_errors=True)
  write_atomic(os.path.join(out_dir, "organs.json"),
               json.dumps({str(i): name for i, name in anatomy.ORGAN_LABELS.items()}, indent=1))
  todo = [i for i in range(n) if not os.path.exists(os.path.join(out_dir, study_id(prefix, i), "meta.json"))]
  done = []
  with tqdm(total=len(todo), desc="synthetic", unit="study", file=sys.stderr,
            disable=not progress or not todo) as bar:
    if workers == 1 or len(todo) <= 1:
      for i in todo:
        done.append(_generate(i, seed, out_dir, scale, ct_pair))
        bar.update()
      return done
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
      futures = [pool.submit(_generate, i, seed, out_dir, scale, ct_pair) for i in todo]
      try:
        for future in concurrent.futures.as_completed(futures):
          done.append(future.result())
          bar.update()
      except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
  return sorted(done)


# -------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str]) -> int:
  """`petfm synthetic`: writes the cohort; returns 0 (UserError → exit 2 in petfm.cli)."""
  parser = ArgumentParser(prog="petfm synthetic",
                          description="Synthetic whole-body PET/CT cohort (autoPET layout).")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--n", type=int, default=40, help="number of studies")
  parser.add_argument("--seed", type=int, default=0, help="cohort seed; study i depends on (seed, i) only")
  parser.add_argument("--workers", type=int, default=None, help="processes (default: number of CPUs)")
  parser.add_argument("--scale", type=float, default=1.0, help="resolution factor: voxel sizes / scale")
  parser.add_argument("--from-ct", default=None, help="folder with a real CT and its TotalSegmentator labels")
  args = parser.parse_args(list(argv))
  workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
  written = generate(args.out, args.n, args.seed, workers, args.scale, args.from_ct)
  print(f"{args.out}: wrote {len(written)} studies, {args.n - len(written)} already there")
  return 0


if __name__ == "__main__":
  from petfm.cli import main as cli_main

  sys.exit(cli_main(["synthetic", *sys.argv[1:]]))
