"""`petfm segment --image SUV.nii.gz --point x,y,z[:+|-] ... --out mask.nii.gz --checkpoint DIR
[--interactive]`.

Promptable segmentation of one image from clicks given in voxel coordinates of the input image (`+`
positive, the default; `-` negative). The crop (the model's size and spacing, canonical RAS+ axes) is centred
on the first positive point and resampled as the official inference does (`preprocess.prepare`); intensities
follow the model spec (`promptable`); the twin PET/CT model also needs `--ct` on any grid overlapping the
image. The mask (sigmoid > 0.5) is mapped back onto the input's grid (nearest) and written with the input's
affine.

`--interactive` keeps the image embedding and reads one more click per line from stdin (`x,y,z[:+|-]`; an
empty line or `q` ends): each click refines the mask (all clicks so far plus the previous low-res logits as
the mask prompt), rewrites `--out` and prints its latency. `--checkpoint` is a `petfm train-seganypet`
workdir or a `petfm convert-sam-med3d` directory (e.g. of the official `seganypet_v2.pth`); there is no
default.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from petfm.data import checks, geometry, pipelines
from petfm.errors import ArgumentParser, UserError
from petfm.models.sam3d import NEGATIVE, POSITIVE
from petfm.seganypet import preprocess, promptable

_POINT = re.compile(r"^\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*(?::\s*([+-]))?\s*$")


def parse_point(text: str, shape: Sequence[int]) -> tuple[np.ndarray, int]:
  """'x,y,z[:+|-]' → (voxel (3,), POSITIVE/NEGATIVE); raises UserError when malformed or outside `shape`."""
  match = _POINT.match(text)
  if not match:
    raise UserError(f"point {text!r}: expected x,y,z[:+|-] with integer voxel indices, e.g. 40,52,87:+")
  voxel = np.array([int(match.group(i)) for i in (1, 2, 3)])
  if (voxel < 0).any() or (voxel >= np.asarray(shape)).any():
    raise UserError(f"point {text!r}: outside the image of shape {tuple(shape)}")
  return voxel, NEGATIVE if match.group(4) == "-" else POSITIVE


def load_volume(path: str, role: str) -> nib.Nifti1Image:
  """The checked 3-D image at `path` with float32 voxels in memory (`checks`: header and memory limit before
  reading, no NaN/inf voxels); `role` (the flag) prefixes error lines."""
  where = f"{role} {path}"
  image = checks.nifti_header(path, where)
  data = checks.read_voxels(image, where, np.float32)
  checks.check_finite(data, where)
  return nib.Nifti1Image(data, image.affine, image.header)


def _join_negative_points(argv: Sequence[str]) -> list[str]:
  """`--point -1,10,10` → `--point=-1,10,10`: argparse would take a value starting with '-' for a flag."""
  out = []
  for arg in argv:
    if out and out[-1] == "--point" and re.match(r"^-\d", arg):
      out[-1] = f"--point={arg}"
    else:
      out.append(arg)
  return out


class Session:
  """One image, its crop and embedding; `click` adds a click and returns the mask on the input grid."""

  def __init__(self, model: promptable.Segmenter, image: nib.Nifti1Image, first: np.ndarray,
               ct: nib.Nifti1Image | None = None):
    self.model = model
    suv = image.get_fdata(dtype=np.float32)
    size = model.size
    _, self.geo, _ = preprocess.prepare(suv, image.affine, centre=first, size=size,
                                        spacing=model.spec.spacing)
    suv_crop = geometry.resample(suv, image.affine, self.geo.affine, (size,) * 3, order=1, cval=0)
    if "ct" in model.spec.channels:
      if ct is None:
        raise UserError("--ct: this model reads PET and CT; give the CT image")
      ct_crop = geometry.resample(ct.get_fdata(dtype=np.float32), ct.affine, self.geo.affine, (size,) * 3,
                                  order=1, cval=pipelines.CT_PAD_HU)
    else:
      ct_crop = np.full_like(suv_crop, pipelines.CT_PAD_HU)
    ct_n, pet_n = pipelines.normalize(ct_crop, suv_crop, model.spec.intensities)
    self.embedding = model.embed(np.stack([pet_n, ct_n][:len(model.spec.channels)], axis=-1))
    self.points, self.labels, self.logits = [], [], None

  def click(self, voxel: np.ndarray, label: int) -> np.ndarray:
    point = preprocess.points_to_crop(voxel, self.geo)[0]
    if (point < 0).any() or (point >= self.model.size).any():
      raise UserError(f"point {tuple(int(v) for v in voxel)}: outside the {self.model.size}³ crop around the "
                      "first positive point")
    self.points.append(point)
    self.labels.append(label)
    self.logits, _ = self.model.predict(self.embedding, self.points, self.labels, self.logits)
    mask = (np.asarray(self.model.upsample(self.logits)) > 0).astype(np.uint8)
    return preprocess.to_original(mask, self.geo)


def save_mask(mask: np.ndarray, like: nib.Nifti1Image, path: str) -> None:
  """Writes `mask` with the affine of `like` (atomically)."""
  out = nib.Nifti1Image(mask.astype(np.uint8), like.affine)
  out.set_qform(like.affine, code=1)
  out.set_sform(like.affine, code=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  suffix = ".nii.gz" if path.endswith(".gz") else ".nii"
  tmp = f"{path}.tmp{suffix}"
  try:
    nib.save(out, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def main(argv: Sequence[str], stdin=None) -> int:
  parser = ArgumentParser(prog="petfm segment", description=__doc__.split("\n\n")[0])
  parser.add_argument("--image", required=True, help="PET image in SUV (NIfTI)")
  parser.add_argument("--ct", help="CT in HU (NIfTI), for PET/CT models")
  parser.add_argument("--point", action="append", default=[],
                      help="x,y,z[:+|-] voxel of --image (repeatable)")
  parser.add_argument("--out", required=True, help="output mask (NIfTI)")
  parser.add_argument("--checkpoint", help="train-seganypet workdir or convert-sam-med3d directory")
  parser.add_argument("--interactive", action="store_true", help="read further clicks from stdin")
  args = parser.parse_args(_join_negative_points(argv))
  checks.output_file(args.out, "--out")
  if not args.checkpoint:
    raise UserError("--checkpoint: required: a `petfm train-seganypet` workdir or a "
                    "`petfm convert-sam-med3d` directory (e.g. made from the official seganypet_v2.pth)")
  image = load_volume(args.image, "--image")
  clicks = [parse_point(p, image.shape) for p in args.point]
  positives = [voxel for voxel, label in clicks if label == POSITIVE]
  if not positives:
    raise UserError("--point: give at least one positive point (x,y,z or x,y,z:+); the crop is centred on it")
  ct = load_volume(args.ct, "--ct") if args.ct else None
  model = promptable.Segmenter.load(args.checkpoint)
  start = time.perf_counter()
  session = Session(model, image, positives[0], ct)
  print(f"embedded a {model.size}³ crop in {1e3 * (time.perf_counter() - start):.0f} ms")
  for voxel, label in clicks:
    start = time.perf_counter()
    mask = session.click(voxel, label)
  save_mask(mask, image, args.out)
  print(f"{len(clicks)} click(s) → {int(mask.sum())} voxels in {args.out} "
        f"(last click {1e3 * (time.perf_counter() - start):.0f} ms)")
  if not args.interactive:
    return 0
  stdin = stdin or sys.stdin
  print("more clicks, one per line: x,y,z[:+|-] (empty line or q to stop)", flush=True)
  for line in stdin:
    if line.strip() in ("", "q"):
      break
    try:
      voxel, label = parse_point(line.strip(), image.shape)
      start = time.perf_counter()
      mask = session.click(voxel, label)
      latency = time.perf_counter() - start
    except UserError as e:
      print(f"error: {e}", flush=True)
      continue
    save_mask(mask, image, args.out)
    sign = "+" if label == POSITIVE else "-"
    print(f"click {len(session.points)} ({sign} {tuple(int(v) for v in voxel)}): "
          f"{int(mask.sum())} voxels, {1e3 * latency:.0f} ms", flush=True)
  return 0
