"""Hostile and broken inputs against every command: one error line, exit status, nothing left, bounded memory.

The corpus (built here from small generated files) is run through `petfm.cli.main` in one child process
(`python THIS_FILE CASES RESULTS`), whose peak memory is read with `getrusage(RUSAGE_CHILDREN)` by a wrapper;
a few cases also go through a real `petfm` process each. The fuzz test corrupts a small valid study's bytes
and header fields (fixed seed) and loads them in-process under a memory tracer and an alarm.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import traceback
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (12, 10, 14)
AFFINE = np.diag([3.0, 3.0, 4.0, 1.0])
PEAK_LIMIT_BYTES = 2**30
CASE_TIMEOUT_S = 60  # a corpus case still running after this long has hung
IS_ROOT = os.geteuid() == 0  # root writes into mode-555 folders

# One wrapper process runs the command and reports the peak memory of its child (the command).
_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(f'PEAK_KB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); "
            "sys.exit(rc)")


# ------------------------------------------------------------------------------------------- file builders
def save(path: str, array: np.ndarray, affine: np.ndarray = AFFINE) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = nib.Nifti1Image(array, affine)
  image.set_sform(affine, code=1)
  image.set_qform(affine, code=1)
  nib.save(image, path)
  return path


def good_volumes(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  grid = np.indices(SHAPE)
  body = sum(((grid[a] - (SHAPE[a] - 1) / 2) / SHAPE[a]) ** 2 for a in range(3)) < 0.18
  seg = np.zeros(SHAPE, np.uint8)
  seg[5:8, 4:7, 6:9] = 1
  ct = (np.where(body, 40, -1000) + rng.normal(0, 10, SHAPE)).astype(np.int16)
  suv = (0.1 + body + 6 * seg + rng.uniform(0, 0.1, SHAPE)).astype(np.float32)
  return {"CTres.nii.gz": ct, "SUV.nii.gz": suv, "SEG.nii.gz": seg}


def write_study(folder: str, seed: int = 0) -> str:
  for name, array in good_volumes(seed).items():
    save(os.path.join(folder, name), array)
  return folder


def header_only(path: str, shape: tuple[int, ...], nifti2: bool = False) -> str:
  """A small .nii.gz whose header claims `shape` float32 voxels (with 1 KB of zeros after it)."""
  header = (nib.Nifti2Header if nifti2 else nib.Nifti1Header)()
  header.set_data_shape(shape)
  header.set_data_dtype(np.float32)
  header.set_zooms((2.0,) * len(shape))
  header.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
  header["vox_offset"] = len(header.binaryblock) + 4
  with gzip.open(path, "wb") as f:
    f.write(header.binaryblock + b"\0" * 4 + b"\0" * 1024)
  return path


def patch_header(path: str, field_offset: int, fmt: str, *values) -> str:
  """Rewrites header bytes at `field_offset` of a .nii.gz (NIfTI-1 byte offsets)."""
  data = bytearray(gzip.decompress(open(path, "rb").read()))
  data[field_offset:field_offset + struct.calcsize(fmt)] = struct.pack("<" + fmt, *values)
  open(path, "wb").write(gzip.compress(bytes(data)))
  return path


def bad_file(kind: str, path: str, template: np.ndarray) -> str:
  """Writes the broken NIfTI `kind` at `path` (`template`: the good array it replaces); returns `path`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if kind == "huge_32767":
    return header_only(path, (32767,) * 3)
  if kind == "huge_1024":
    return header_only(path, (1024,) * 3)
  if kind == "huge_nifti2":
    return header_only(path, (100000,) * 3, nifti2=True)
  if kind == "lying":  # 64 MiB of voxels claimed: within the memory limit, but not in a 100-byte file
    return header_only(path, (256,) * 3)
  if kind == "empty":
    open(path, "wb").close()
    return path
  if kind == "text":
    open(path, "w").write("this is not an image\n" * 40)
    return path
  if kind == "four_d":
    return save(path, np.stack([template] * 3, axis=-1))
  save(path, template.astype(np.float32) if kind in ("nan", "inf") else template)
  if kind == "truncated":
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
  elif kind in ("nan", "inf"):
    array = template.astype(np.float32)
    array[3, 4, 5] = np.nan if kind == "nan" else np.inf
    save(path, array)
  elif kind == "nan_affine":
    patch_header(path, 280, "f", float("nan"))  # srow_x[0]
  elif kind == "nan_spacing":
    patch_header(path, 80, "f", float("nan"))  # pixdim[1]
    patch_header(path, 252, "hh", 1, 0)  # qform only: the spacing comes from pixdim
  elif kind == "label_2":
    array = template.copy()
    array[array == 1] = 2
    save(path, array)
  else:
    raise AssertionError(kind)
  return path


def read_only_folder(root: str) -> str | None:
  """A folder no file can be created in: a mode-555 one, or for root (who writes anyway) /sys where it is
  mounted read-only; None if there is none."""
  if not IS_ROOT:
    folder = os.path.join(root, "read_only")
    os.makedirs(folder)
    os.chmod(folder, 0o555)
    return folder
  try:
    with open("/sys/petfm-write-probe", "w"):
      pass
  except OSError:
    return "/sys"
  os.remove("/sys/petfm-write-probe")
  return None


# Broken NIfTI files → words their error line must hold.
IMAGE_CASES = {
    "huge_32767": "memory", "huge_1024": "memory", "huge_nifti2": "memory", "lying": "header is wrong",
    "truncated": "truncated",
    "empty": "empty", "text": "not a readable NIfTI", "four_d": "3-D", "nan": "NaN", "inf": "infinite",
    "nan_affine": "NaN or inf", "nan_spacing": "not finite",
}


# ------------------------------------------------------------------------------------------- the corpus
def build_corpus(root: str) -> list[dict]:
  """Files under `root` and the cases: {argv, rc, words (all in the one error line), name (a test id)}."""
  cases = []
  add = lambda name, argv, words, rc=2: cases.append(  # noqa: E731
      {"name": name, "argv": argv, "words": words, "rc": rc})
  good = write_study(os.path.join(root, "good"))
  volumes = good_volumes()
  nothing = os.path.join(root, "nothing")  # never created: commands that fail must not create it
  a_file = os.path.join(root, "a_file")
  open(a_file, "w").write("I am a file\n")

  # A fine-tuning workdir as far as predict-lesions checks before the model (config.json), and a promptable
  # model's workdir.
  finetuned = os.path.join(root, "finetuned")
  os.makedirs(finetuned)
  json.dump({"task": "lesions", "spacing": [3.0, 3.0, 4.0], "model": {"patch_size": [4, 4, 4]},
             "data": {"plane_size": [8, 8]}, "sharding_rules": []},
            open(os.path.join(finetuned, "config.json"), "w"))
  promptable = os.path.join(root, "promptable")
  os.makedirs(promptable)
  json.dump({"backbone": "sam3d"}, open(os.path.join(promptable, "model.json"), "w"))
  json.dump({"model": {"img_size": 16}, "data": {"crop_size": [16, 16, 16]}},
            open(os.path.join(promptable, "config.json"), "w"))

  # ---- NIfTI inputs: segment (--image, --ct), predict-lesions (--study), synthetic (--from-ct CT and labels)
  for kind, words in IMAGE_CASES.items():
    image = bad_file(kind, os.path.join(root, "images", f"{kind}.nii.gz"), volumes["SUV.nii.gz"])
    add(f"segment-image-{kind}", ["segment", "--image", image, "--point", "1,1,1", "--out",
                                  f"{nothing}/m.nii.gz", "--checkpoint", promptable],
        [words, f"{kind}.nii.gz"])
    study = write_study(os.path.join(root, "studies", kind))
    bad_file(kind, os.path.join(study, "SUV.nii.gz"), volumes["SUV.nii.gz"])
    add(f"predict-{kind}", ["predict-lesions", "--checkpoint", finetuned, "--study", study, "--out",
                            f"{nothing}/m.nii.gz"], [words, "SUV.nii.gz"])
    ct_dir = os.path.join(root, "from_ct", kind)
    bad_file(kind, os.path.join(ct_dir, "ct.nii.gz"), volumes["CTres.nii.gz"])
    save(os.path.join(ct_dir, "seg.nii.gz"), volumes["SEG.nii.gz"])
    add(f"synthetic-ct-{kind}", ["synthetic", "--out", nothing, "--n", "1", "--workers", "1", "--from-ct",
                                 ct_dir], [words, "ct.nii.gz"])
  for kind in ("truncated", "text", "empty", "four_d"):
    ct_dir = os.path.join(root, "from_ct_seg", kind)
    save(os.path.join(ct_dir, "ct.nii.gz"), volumes["CTres.nii.gz"])
    bad_file(kind, os.path.join(ct_dir, "seg.nii.gz"), volumes["SEG.nii.gz"])
    add(f"synthetic-seg-{kind}", ["synthetic", "--out", nothing, "--n", "1", "--workers", "1", "--from-ct",
                                  ct_dir], [IMAGE_CASES[kind], "seg.nii.gz"])
  no_organs = os.path.join(root, "from_ct_seg", "no_organs")
  save(os.path.join(no_organs, "ct.nii.gz"), volumes["CTres.nii.gz"])
  save(os.path.join(no_organs, "seg.nii.gz"), np.zeros(SHAPE, np.uint8))
  add("synthetic-seg-no-organs", ["synthetic", "--out", nothing, "--n", "2", "--workers", "1", "--from-ct",
                                  no_organs], ["seg.nii.gz", "no lymph-node station"])
  ct_nan = bad_file("nan", os.path.join(root, "images", "ct_nan.nii.gz"), volumes["CTres.nii.gz"])
  add("segment-ct-nan", ["segment", "--image", os.path.join(good, "SUV.nii.gz"), "--ct", ct_nan, "--point",
                         "1,1,1", "--out", f"{nothing}/m.nii.gz", "--checkpoint", promptable],
      ["--ct", "NaN"])

  # ---- prepare: every broken file as one study's SUV (labels: SEG), beside a good study; links that loop
  # back, a second link to the good study, a hidden temp folder. One line per bad study, exit 1, the good
  # study once.
  cohort = os.path.join(root, "cohort")
  write_study(os.path.join(cohort, "P_good", "study"))
  os.symlink("..", os.path.join(cohort, "P_good", "loop"))
  os.symlink(os.path.join(cohort, "P_good"), os.path.join(cohort, "P_alias"))
  partial = write_study(os.path.join(cohort, ".tmp-synth_0009-77"))  # a killed writer's hidden temp folder
  bad_file("truncated", os.path.join(partial, "SUV.nii.gz"), volumes["SUV.nii.gz"])
  bad_studies = {}
  for kind, words in [*IMAGE_CASES.items(), ("label_2", "label value(s) 2 not allowed")]:
    study = write_study(os.path.join(cohort, f"P_{kind}", "study"))
    name = "SEG.nii.gz" if kind == "label_2" else "SUV.nii.gz"
    bad_file(kind, os.path.join(study, name), volumes[name])
    bad_studies[f"P_{kind}/study"] = [words, name]
  records = os.path.join(root, "records")
  cases.append({"name": "prepare-cohort", "argv": ["prepare", "--input", cohort, "--output", records,
                                                   "--workers", "1"], "rc": 1, "bad_studies": bad_studies})

  # ---- output paths: a file where a folder goes, a folder where a file goes, the wrong extension, a file as
  # a parent folder
  add("prepare-output-is-file", ["prepare", "--input", cohort, "--output", a_file], ["--output", "is a file"])
  add("prepare-output-under-file", ["prepare", "--input", cohort, "--output", f"{a_file}/out"],
      ["--output", "is a file, not a folder"])
  add("synthetic-out-is-file", ["synthetic", "--out", a_file, "--n", "1"], ["--out", "is a file"])
  add("segment-out-txt", ["segment", "--image", os.path.join(good, "SUV.nii.gz"), "--point", "1,1,1",
                          "--out", f"{nothing}/mask.txt", "--checkpoint", promptable],
      ["mask.txt", ".nii.gz"])
  add("segment-out-is-folder", ["segment", "--image", os.path.join(good, "SUV.nii.gz"), "--point", "1,1,1",
                                "--out", os.path.join(root, "images.nii.gz"), "--checkpoint", promptable],
      ["is a folder"])
  os.makedirs(os.path.join(root, "images.nii.gz"))
  add("predict-out-txt", ["predict-lesions", "--checkpoint", finetuned, "--study", good, "--out",
                          f"{nothing}/m.txt"], ["m.txt", ".nii.gz"])
  add("predict-out-under-file", ["predict-lesions", "--checkpoint", finetuned, "--study", good, "--out",
                                 f"{a_file}/m.nii.gz"], ["is a file, not a folder"])
  add("predict-promptable-checkpoint", ["predict-lesions", "--checkpoint", promptable, "--study", good,
                                        "--out", f"{nothing}/m.nii.gz"],
      ["promptable model", "petfm segment"])
  add("eval-clicks-out-is-file", ["eval-clicks", "--checkpoint", promptable, "--data_dir", records, "--out",
                                  a_file], ["--out", "is a file"])
  pth = os.path.join(root, "weights.pth")
  open(pth, "wb").write(b"\x80\x02garbage" * 10)
  empty_pth = os.path.join(root, "empty.pth")
  open(empty_pth, "wb").close()
  add("convert-out-is-file", ["convert-sam-med3d", pth, a_file], ["is a file"])
  add("convert-garbage-pth", ["convert-sam-med3d", pth, nothing], ["weights.pth", "not a PyTorch"])
  add("convert-empty-pth", ["convert-sam-med3d", empty_pth, nothing], ["empty.pth"])

  read_only = read_only_folder(root)

  # ---- records folders for the trainers and eval-clicks: no manifest, a corrupt manifest, workdir a file
  no_manifest = os.path.join(root, "no_manifest")
  os.makedirs(no_manifest)
  bad_manifest = os.path.join(root, "bad_manifest")
  os.makedirs(bad_manifest)
  open(os.path.join(bad_manifest, "manifest.json"), "w").write('{"format": "petfm-rec')
  incomplete = os.path.join(root, "incomplete_manifest")
  os.makedirs(incomplete)
  json.dump({"format": "petfm-records", "version": 1}, open(os.path.join(incomplete, "manifest.json"), "w"))
  garbage_checkpoint = os.path.join(root, "garbage_checkpoint")  # a converted SAM-Med3D folder, broken
  os.makedirs(os.path.join(garbage_checkpoint, "variables"))
  open(os.path.join(garbage_checkpoint, "config.json"), "w").write("{not json")
  pretrained = os.path.join(root, "pretrained")  # a pretraining workdir whose config.json lacks fields
  os.makedirs(os.path.join(pretrained, "checkpoints"))
  json.dump({"model": {}}, open(os.path.join(pretrained, "config.json"), "w"))
  trainers = {"pretrain": "experiments/fratmae.py:tiny", "sweep": "experiments/fratmae.py:tiny",
              "finetune": "experiments/finetune.py:tiny", "train-seganypet": "experiments/seganypet.py:tiny"}
  for command, config in trainers.items():
    config = os.path.join(REPO, config)
    add(f"{command}-no-manifest", [command, "--config", config, "--workdir", nothing,
                                   f"--config.data_dir={no_manifest}"], ["no_manifest", "no manifest.json"])
    add(f"{command}-bad-manifest", [command, "--config", config, "--workdir", nothing,
                                    f"--config.data_dir={bad_manifest}"], ["manifest.json", "cannot read"])
    add(f"{command}-incomplete-manifest", [command, "--config", config, "--workdir", nothing,
                                           f"--config.data_dir={incomplete}"], ["incomplete manifest"])
    add(f"{command}-workdir-is-file", [command, "--config", config, "--workdir", a_file], ["is a file"])
    if read_only:
      add(f"{command}-read-only-workdir", [command, "--config", config, "--workdir", f"{read_only}/w"],
          ["cannot write"])
  if read_only:
    for command, flag_and_rest in [
        ("prepare", ["--input", cohort, "--output", f"{read_only}/out"]),
        ("synthetic", ["--n", "1", "--out", f"{read_only}/out"]),
        ("segment", ["--image", os.path.join(good, "SUV.nii.gz"), "--point", "1,1,1", "--checkpoint",
                     promptable, "--out", f"{read_only}/m.nii.gz"]),
        ("predict-lesions", ["--checkpoint", finetuned, "--study", good, "--out", f"{read_only}/m.nii.gz"]),
        ("eval-clicks", ["--checkpoint", promptable, "--data_dir", records, "--out", f"{read_only}/out"]),
        ("convert-sam-med3d", [pth, f"{read_only}/out"])]:
      add(f"{command}-read-only-output", [command, *flag_and_rest], ["cannot write", read_only])
  # finetune reads init_from first; train-seganypet fails later (the one-study records have no training
  # split), after writing config.json and model.json into the workdir, which must go again.
  for command, config, words in (
      ("finetune", "experiments/finetune.py:tiny", ["--config.init_from", "config.json"]),
      ("train-seganypet", "experiments/seganypet.py:tiny,backbone=fratmae_twin", ["no training examples"])):
    add(f"{command}-bad-init-from", [command, "--config", os.path.join(REPO, config), "--workdir", nothing,
                                     f"--config.data_dir={records}", f"--config.init_from={pretrained}"], words)
  add("segment-garbage-checkpoint", ["segment", "--image", os.path.join(good, "SUV.nii.gz"), "--point",
                                     "1,1,1", "--out", f"{nothing}/m.nii.gz", "--checkpoint",
                                     garbage_checkpoint], ["config.json", "cannot read"])
  add("eval-clicks-garbage-checkpoint", ["eval-clicks", "--checkpoint", garbage_checkpoint, "--data_dir",
                                         records, "--out", nothing], ["config.json", "cannot read"])
  add("eval-clicks-no-manifest", ["eval-clicks", "--checkpoint", promptable, "--data_dir", no_manifest,
                                  "--out", nothing], ["no manifest.json"])

  add("predict-incomplete-checkpoint", ["predict-lesions", "--checkpoint", finetuned, "--study", good,
                                        "--out", f"{nothing}/m.nii.gz"], ["finetuned", "config.json"])

  # ---- a few fuzzed images through the command line (the fuzz test below runs hundreds in-process)
  rng = np.random.default_rng(99)
  compressed = open(os.path.join(good, "SUV.nii.gz"), "rb").read()
  for i in range(8):
    what, data = _corrupt(rng, gzip.decompress(compressed), compressed)
    image = os.path.join(root, "fuzzed", f"{i}.nii" if what.startswith("uncompressed") else f"{i}.nii.gz")
    os.makedirs(os.path.dirname(image), exist_ok=True)
    open(image, "wb").write(data)
    add(f"segment-fuzzed-{i}", ["segment", "--image", image, "--point", "1,1,1", "--out",
                                f"{nothing}/m.nii.gz", "--checkpoint", promptable], [])

  # ---- command-line details from the issue
  add("pretrain-bad-variant", ["pretrain", "--config", os.path.join(REPO, "experiments/fratmae.py:tinyy"),
                               "--workdir", nothing], ["unknown variant 'tinyy'"])
  add("pretrain-unknown-field", ["pretrain", "--config", os.path.join(REPO, "experiments/fratmae.py:tiny"),
                                 "--workdir", nothing, "--config.model.bogus=1"],
      ["unknown config field 'model.bogus'"])
  add("segment-negative-point", ["segment", "--image", os.path.join(good, "SUV.nii.gz"), "--point",
                                 "-1,10,10", "--out", f"{nothing}/m.nii.gz", "--checkpoint", promptable],
      ["'-1,10,10'", "outside the image"])
  return cases


class _Hang(Exception):
  pass


_PROGRESS = re.compile(r"^\w+: +\d+%\|")


def _tree(root: str) -> set[str]:
  return {os.path.join(folder, name) for folder, dirs, files in os.walk(root) for name in dirs + files}


def run_cases(cases_path: str, results_path: str) -> None:
  """Child process: runs every case through `petfm.cli.main`, capturing its output and what it left."""
  from petfm import cli

  def hung(signum, frame):
    raise _Hang(f"still running after {CASE_TIMEOUT_S} s")

  signal.signal(signal.SIGALRM, hung)
  with open(cases_path) as f:
    root, cases = json.load(f)
  results = []
  for case in cases:
    before = _tree(root)
    out, err, tb = io.StringIO(), io.StringIO(), ""
    start = time.perf_counter()
    signal.alarm(CASE_TIMEOUT_S)
    try:
      with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(case["argv"])
    except BaseException:  # noqa: BLE001  (what the test must never see, a hang included)
      rc, tb = -1, traceback.format_exc()
    finally:
      signal.alarm(0)
    results.append({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(), "traceback": tb,
                    "new": sorted(_tree(root) - before), "seconds": time.perf_counter() - start})
  with open(results_path, "w") as f:
    json.dump(results, f)


def run_measured(args: list[str], timeout: int) -> tuple[subprocess.CompletedProcess, int]:
  """Runs `args` in a child of a wrapper process; returns (result, the child's peak RSS in bytes)."""
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-c", _WRAPPER, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
  peak = [line for line in result.stderr.splitlines() if line.startswith("PEAK_KB ")]
  assert peak, result.stderr[-2000:]
  result.stderr = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("PEAK_KB "))
  return result, int(peak[-1].split()[1]) * 1024


def test_every_hostile_input_gives_one_line_exit_status_no_leftovers_bounded_memory(tmp_path):
  root = str(tmp_path / "corpus")
  cases = build_corpus(root)
  with open(tmp_path / "cases.json", "w") as f:
    json.dump([root, cases], f)
  proc, peak = run_measured([sys.executable, __file__, str(tmp_path / "cases.json"),
                             str(tmp_path / "results.json")], timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  failures = []
  for case, got in zip(cases, results):
    # Progress bars (tqdm, rewritten in place with \r) are not error lines.
    lines = [line for line in got["stderr"].strip().splitlines() if not _PROGRESS.search(line)]
    problems = []
    if got["traceback"] or "Traceback" in got["stderr"]:
      problems.append(got["traceback"] or got["stderr"])
    if got["rc"] != case["rc"]:
      problems.append(f"exit status {got['rc']}, expected {case['rc']}")
    if case["rc"] == 2:
      if len(lines) != 1 or not lines[0].startswith(f"petfm {case['argv'][0]}: error: "):
        problems.append(f"expected one error line, got {lines}")
      elif not all(w in lines[0] for w in case["words"]):
        problems.append(f"{lines[0]!r} lacks one of {case['words']}")
      if got["new"]:
        problems.append(f"left behind {got['new']}")
    else:  # prepare: one line per bad study, the good study converted once, nothing temporary left
      errors = [line for line in lines if line.startswith("error: ")]
      for study, words in case["bad_studies"].items():
        mine = [line for line in errors if line.startswith(f"error: study {study}: ")]
        if len(mine) != 1 or not all(w in mine[0] for w in words):
          problems.append(f"{study}: expected one line with {words}, got {mine}")
      if len(errors) != len(case["bad_studies"]):
        problems.append(f"{len(errors)} error lines for {len(case['bad_studies'])} bad studies: {errors}")
      if "converted 1, skipped 0" not in got["stdout"]:
        problems.append(f"summary: {got['stdout']!r}")
      if any(".tmp" in path or ".staging" in path for path in got["new"]):
        problems.append(f"temporary files left: {got['new']}")
    if problems:
      failures.append(f"{case['name']}: {'; '.join(problems)}")
  assert not failures, "\n".join(failures)
  assert peak < PEAK_LIMIT_BYTES, f"peak memory {peak / 2**20:.0f} MiB"
  manifest = json.load(open(os.path.join(root, "records", "manifest.json")))
  assert [s["study_id"] for s in manifest["studies"]] == ["P_good/study"]


def test_real_processes_with_huge_headers_exit_status_and_memory(tmp_path):
  """The two commands of the issue's MemoryError as separate `petfm` processes (exit status as the shell sees
  it): synthetic stops with one line; prepare reports the study, converts the good one and exits 1."""
  os.makedirs(tmp_path / "ct")
  header_only(str(tmp_path / "ct" / "huge_ct.nii.gz"), (1024,) * 3)
  cohort = tmp_path / "cohort"
  write_study(str(cohort / "P_good" / "study"))
  write_study(str(cohort / "P_huge" / "study"))
  header_only(str(cohort / "P_huge" / "study" / "SUV.nii.gz"), (32767,) * 3)
  petfm = [sys.executable, "-m", "petfm.cli"]
  result, peak = run_measured([*petfm, "synthetic", "--out", str(tmp_path / "out"), "--n", "1", "--from-ct",
                               str(tmp_path / "ct")], timeout=120)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and "huge_ct.nii.gz" in lines[0], result.stderr
  assert "memory" in lines[0] and peak < PEAK_LIMIT_BYTES and not os.path.exists(tmp_path / "out")
  result, peak = run_measured([*petfm, "prepare", "--input", str(cohort), "--output", str(tmp_path / "rec"),
                               "--workers", "1"], timeout=120)
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
  assert len(errors) == 1 and errors[0].startswith("error: study P_huge/study: SUV.nii.gz (PET): ")
  assert "converted 1, skipped 0 (already converted), failed 1" in result.stdout
  assert peak < PEAK_LIMIT_BYTES


# ------------------------------------------------------------------------------------------------ fuzz
# NIfTI-1 header fields (offset, struct format) that the fuzzer overwrites with hostile values.
HEADER_FIELDS = [(0, "i"), (40, "8h"), (70, "h"), (72, "h"), (76, "8f"), (108, "f"), (112, "f"), (116, "f"),
                 (252, "h"), (254, "h"), (256, "3f"), (268, "3f"), (280, "4f"), (296, "4f"), (312, "4f"),
                 (344, "4s")]
_HOSTILE_INTS = [0, -1, 1, 2, 3, 4, 7, 8, 16, 64, 255, 256, 511, 1024, 32767, -32768]
_HOSTILE_FLOATS = [0.0, -0.0, 1e-30, -1.0, 1e30, float("nan"), float("inf"), -float("inf"), 3.0, 1e6]


def _corrupt(rng: np.random.Generator, raw: bytes, compressed: bytes) -> tuple[str, bytes]:
  """One random corruption of a study file: (what, new file bytes)."""
  kind = rng.integers(5)
  if kind == 0:  # header field(s) get hostile values
    data = bytearray(raw)
    for _ in range(rng.integers(1, 4)):
      offset, fmt = HEADER_FIELDS[rng.integers(len(HEADER_FIELDS))]
      count = int(fmt[:-1] or 1)
      if fmt.endswith("s"):
        values = [bytes(rng.integers(0, 256, 4, dtype=np.uint8))]
      elif fmt.endswith("f"):
        values = [float(rng.choice(_HOSTILE_FLOATS)) for _ in range(count)]
      else:
        values = [int(rng.choice(_HOSTILE_INTS)) for _ in range(count)]
      data[offset:offset + struct.calcsize("<" + fmt)] = struct.pack("<" + fmt, *values)
    return f"fields {offset}", gzip.compress(bytes(data), mtime=0)
  if kind == 1:  # random bytes of the decompressed file
    data = bytearray(raw)
    for i in rng.integers(0, len(data), rng.integers(1, 20)):
      data[i] = rng.integers(256)
    return "raw bytes", gzip.compress(bytes(data), mtime=0)
  if kind == 2:  # random bytes of the compressed file
    data = bytearray(compressed)
    for i in rng.integers(0, len(data), rng.integers(1, 8)):
      data[i] = rng.integers(256)
    return "gzip bytes", bytes(data)
  if kind == 3:  # truncation at a random point
    return "truncated", compressed[:rng.integers(0, len(compressed))]
  return "uncompressed, truncated", raw[:rng.integers(0, len(raw) + 1)]  # written as .nii


def test_fuzzed_study_files_never_crash_hang_or_grow_memory(tmp_path, monkeypatch):
  from petfm.data import checks, nifti
  from petfm.errors import UserError
  monkeypatch.setenv(checks.MAX_IMAGE_BYTES_ENV, "64M")  # every accepted image is small: memory is bounded
  folder = write_study(str(tmp_path / "study"))
  rng = np.random.default_rng(1234)
  outcomes = {"loaded": 0, "rejected": 0}

  def alarm(signum, frame):
    raise _Hang()

  previous = signal.signal(signal.SIGALRM, alarm)
  tracemalloc.start()
  try:
    for case in range(300):
      name = ["SUV.nii.gz", "CTres.nii.gz", "SEG.nii.gz"][case % 3]
      compressed = open(os.path.join(folder, name), "rb").read()
      what, data = _corrupt(rng, gzip.decompress(compressed), compressed)
      path = str(tmp_path / ("fuzz.nii" if what.startswith("uncompressed") else "fuzz.nii.gz"))
      with open(path, "wb") as f:
        f.write(data)
      signal.alarm(10)
      try:
        image = nifti.load_image(path, "PET", f"fuzz{case}")
        if name == "SEG.nii.gz":
          checks.check_labels(np.asanyarray(image.dataobj), "fuzz", range(256))
        outcomes["loaded"] += 1
      except UserError as e:
        assert "\n" not in str(e) and str(e), (case, what)
        outcomes["rejected"] += 1
      except _Hang:
        pytest.fail(f"case {case} ({what}) hung")
      except Exception as e:  # noqa: BLE001
        pytest.fail(f"case {case} ({what}): {type(e).__name__}: {e}")
      finally:
        signal.alarm(0)
      os.remove(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
    signal.signal(signal.SIGALRM, previous)
  assert peak < 256 * 2**20, f"traced peak {peak / 2**20:.0f} MiB"
  assert outcomes["rejected"] > 100 and outcomes["loaded"] > 10, outcomes


if __name__ == "__main__":
  run_cases(sys.argv[1], sys.argv[2])
