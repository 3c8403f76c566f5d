"""`petfm predict-lesions --checkpoint WORKDIR --study DIR --out mask.nii.gz`: lesion mask of one study.

The study folder is in the autoPET layout (`CTres.nii.gz` + `SUV.nii.gz`; a `SEG.nii.gz` is ignored). It is
loaded, checked and resampled exactly as `petfm prepare` does (canonical RAS+ orientation, the spacing the
model was fine-tuned at), segmented by sliding the model's slab over the body's box with overlap averaging
(`lesions.predict_volume`), thresholded, and mapped back onto the grid of SUV.nii.gz (inverse reorientation
and resampling, nearest neighbour), so the mask has the shape and affine of the input PET and overlays it in
3D Slicer.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from absl import flags

from petfm.data import checks, geometry, studies
from petfm.downstream import data as ddata, finetuned, lesions
from petfm.errors import UserError


def load_study(study_dir: str, spacing) -> dict:
  """The record of an autoPET-layout study folder as `petfm prepare` would store it (`UserError` on bad
  input)."""
  check_study(study_dir)
  config = studies.get_config()
  config.update(layout="autopet", spacing=tuple(float(s) for s in np.broadcast_to(spacing, (3,))),
                require_label=False, allow_empty_label=True)
  _, found = studies.find_studies(study_dir, "autopet")
  found = [s for s in found if os.path.abspath(os.path.dirname(s.pet)) == os.path.abspath(study_dir)]
  jobs, errors = studies.plan_jobs(found[:1], config)
  if errors:
    raise UserError(errors[0])
  return studies.convert_study(jobs[0], config)


def check_study(study_dir: str) -> None:
  """Header checks of the study's images (`checks.nifti_header`) before any voxel is read."""
  if not os.path.isdir(study_dir):
    raise UserError(f"--study {study_dir}: no such folder")
  for name, role in (("CTres.nii.gz", "CT"), ("SUV.nii.gz", "PET")):
    path = os.path.join(study_dir, name)
    if not os.path.isfile(path):
      raise UserError(f"--study {study_dir}: {name} is missing (expected CTres.nii.gz and SUV.nii.gz)")
    checks.nifti_header(path, f"--study {study_dir}: {name} ({role})")


def predict_lesions(checkpoint: str, study_dir: str, out_path: str) -> tuple[int, tuple[int, ...]]:
  """Writes the lesion mask (uint8, 1 = lesion) of `study_dir` to `out_path` in the study's original PET
  geometry; returns (lesion voxels, mask shape)."""
  checks.output_file(out_path, "--out")
  if not os.path.isdir(checkpoint):
    raise UserError(f"--checkpoint {checkpoint}: no such folder (expected a `petfm finetune` workdir)")
  if os.path.isfile(os.path.join(checkpoint, "model.json")):
    raise UserError(f"--checkpoint {checkpoint}: is a promptable model (`petfm train-seganypet`), not a "
                    "`petfm finetune` workdir; use it with `petfm segment`")
  saved = finetuned.read_config(checkpoint)
  if saved.task != "lesions":
    raise UserError(f"--checkpoint {checkpoint}: was fine-tuned for {saved.task}, not lesion segmentation")
  record = load_study(study_dir, saved.spacing)  # every input check before the model is built
  config, predictor = finetuned.load(checkpoint, lesions)
  study = ddata.view_study(record, config.data)
  prob = lesions.predict_volume(config, predictor, study)
  mask = geometry.to_original((prob >= config.eval.threshold).astype(np.uint8), study.affine,
                              study.original_affine, tuple(int(n) for n in study.original_shape), order=0,
                              cval=0)
  directory = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(out_path)}")
  try:
    image = nib.Nifti1Image(mask, study.original_affine)
    image.set_qform(study.original_affine, code=1)
    image.set_sform(study.original_affine, code=1)
    nib.save(image, tmp)
    os.replace(tmp, out_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return int(mask.sum()), mask.shape


def main(argv: list[str]) -> int:
  fv = flags.FlagValues()
  flags.DEFINE_string("checkpoint", None, "`petfm finetune` workdir of a lesion model", flag_values=fv)
  flags.DEFINE_string("study", None, "study folder with CTres.nii.gz and SUV.nii.gz (autoPET layout)",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "output mask, .nii.gz", flag_values=fv)
  if any(a in ("-h", "--help") for a in argv):
    print("usage: petfm predict-lesions --checkpoint WORKDIR --study DIR --out mask.nii.gz")
    return 0
  try:
    fv(["predict-lesions", *argv])
  except flags.Error as e:
    raise UserError(f"command line: {e}") from None
  for name in ("checkpoint", "study", "out"):
    if not fv[name].value:
      raise UserError(f"--{name} is required")
  voxels, shape = predict_lesions(fv.checkpoint, fv.study, fv.out)
  print(f"wrote {fv.out}: {voxels} lesion voxels on the {'×'.join(map(str, shape))} grid of the input PET")
  return 0
