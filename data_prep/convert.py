"""NIfTI or DICOM PET/CT studies → ArrayRecord shards and `manifest.json` (`petfm prepare`): the batch job.

  python -m data_prep.convert --input DIR --output DIR [--config data_prep/configs/convert.py[:ARG]]
      [--config.FIELD=VALUE ...] [--workers N]

The input layouts (autopet, nnunet, hecktor, dicom; auto-detected or `--config.layout=...`), the metadata, the
patient-level splits and the conversion of one study live in the library, `petfm.data.studies`; this module
runs those conversions in parallel, stages, packs and writes the manifest.

Output folder:
  manifest.json                         splits, shards, per-study summary, prompts, config, errors, and
                                        organ_labels (id → name, from the input's organs.json when present)
  records-<id>/<split>-00000-of-0000N.array_record   one record per study, `group_size:1`
  .staging/                             finished studies of an unfinished run (removed once packed)

Resumable and atomic: each study is first written to `.staging/<key>.array_record` (key = hash of the study,
its input files' sizes and times, and the config), so a rerun skips finished studies, also those already in
the shards of an earlier manifest. Shards go to a fresh `records-<id>/` folder and the manifest is replaced
last (temp file, fsync, rename), so after a crash or `kill -9` the previous manifest and the shards it names
are intact. Bad input prints one line naming the study and the problem, the other studies convert, and the
exit status is 1.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import flags
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from tqdm import tqdm

from petfm import paths
from petfm.config import check, check_choice, parse_command_line
from petfm.data import checks, records
from petfm.data.studies import LAYOUTS, SPLITS, Job, convert_study, find_studies, plan_jobs
from petfm.data.text import make_prompt
from petfm.errors import UserError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "convert.py")
STAGING = ".staging"


# ------------------------------------------------------------------------------ batch: stage, pack, manifest
@dataclasses.dataclass
class Summary:
  """What a conversion run did."""
  output_dir: str
  layout: str
  converted: int  # studies converted by this run
  skipped: int  # studies already converted by an earlier run (reused)
  errors: list[str]  # one line per study that failed
  split_counts: dict[str, int]
  spacing: tuple[float, ...]
  num_shards: int
  total_bytes: int

  @property
  def failed(self) -> int:
    return len(self.errors)

  def __str__(self) -> str:
    splits = ", ".join(f"{name} {n}" for name, n in self.split_counts.items())
    lines = [f"{self.output_dir} ({self.layout} input): converted {self.converted}, skipped {self.skipped} "
             f"(already converted), failed {self.failed}",
             f"  studies per split: {splits}; spacing {'×'.join(f'{s:g}' for s in self.spacing)} mm; "
             f"{self.num_shards} shards, {self.total_bytes / 2**20:.1f} MiB"]
    if self.errors:
      lines.append(f"  {self.failed} studies failed (lines above, also under 'errors' in manifest.json)")
    return "\n".join(lines)


def read_organ_labels(input_dir: str) -> dict[str, str]:
  """`input_dir/organs.json` ({"id": "name"} of the ORGANS.nii.gz label values, as `data_prep.synthetic`
  writes), or {} when there is none."""
  path = os.path.join(input_dir, "organs.json")
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      table = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not a readable JSON file ({e})") from None
  if not isinstance(table, dict) or not all(k.isdigit() and isinstance(v, str) for k, v in table.items()):
    raise UserError(f"{path}: expected an object of label id → organ name, e.g. {{\"10\": \"liver\"}}")
  return {str(int(k)): v for k, v in table.items()}


def convert(input_dir: str, output_dir: str, config: ml_collections.ConfigDict, workers: int = 1,
            progress: bool = True) -> Summary:
  """Converts every study under `input_dir` into ArrayRecord shards + manifest.json in `output_dir`.

  Bad studies are reported (one line each on stderr, and in `Summary.errors` and the manifest) and skipped.
  Studies converted by an earlier run with the same input files and config are reused, not reconverted.
  A URL `output_dir` (gs://...) is converted in its local mirror `paths.cache_dir(output_dir)` (ArrayRecord
  writes local files), then uploaded, manifest last.
  """
  if not paths.is_local(output_dir):
    summary = convert(input_dir, paths.cache_dir(output_dir), config, workers, progress)
    paths.upload_tree(paths.cache_dir(output_dir), output_dir, last=(records.MANIFEST,))
    return summary
  check_config(config)
  checks.output_dir(output_dir, "--output")
  layout, studies = find_studies(input_dir, config.layout)
  organ_labels = read_organ_labels(input_dir)
  jobs, errors = plan_jobs(studies, config)
  for line in errors:
    _report(line)
  previous = _read_previous(output_dir)
  staging = os.path.join(output_dir, STAGING)
  os.makedirs(staging, exist_ok=True)
  done = {job.key for job in jobs if job.key in previous or os.path.exists(_staged_path(staging, job.key))}
  skipped = len(done)
  todo = [job for job in jobs if job.key not in done]
  for job, error in _run(todo, config, staging, workers, progress):
    if error:
      errors.append(error)
      _report(error)
    else:
      done.add(job.key)
  packed = [job for job in jobs if job.key in done]
  splits = (_pack(output_dir, layout, packed, previous, errors, config, organ_labels)["splits"]
            if packed else {})
  if os.path.isdir(staging) and not os.listdir(staging):
    os.rmdir(staging)
  return Summary(
      output_dir=output_dir, layout=layout, converted=len(packed) - skipped, skipped=skipped, errors=errors,
      split_counts={s: splits[s]["num_records"] if splits else 0 for s in SPLITS},
      spacing=tuple(float(s) for s in np.broadcast_to(config.spacing, (3,))),
      num_shards=sum(len(v["shards"]) for v in splits.values()),
      total_bytes=sum(v["num_bytes"] for v in splits.values()))


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `UserError` naming the first bad config field."""
  check_choice(config, "layout", ("auto", *LAYOUTS))
  check_choice(config, "text_encoder", ("none", "minilm"))
  spacing = np.asarray(config.spacing, np.float64)
  check(spacing.ndim == 1 and spacing.size in (1, 3) and bool(np.all((spacing >= 0.1) & (spacing <= 20))),
        "spacing", f"{config.spacing} must be one or three voxel sizes in [0.1, 20] mm, e.g. '(2,2,3)'")
  fractions = (config.val_fraction, config.test_fraction)
  check(min(fractions) >= 0 and sum(fractions) <= 1, "val_fraction",
        f"val_fraction={fractions[0]} and test_fraction={fractions[1]} must be ≥ 0 with a sum ≤ 1")
  check(config.records_per_shard >= 1, "records_per_shard", "must be ≥ 1")
  check(0 < config.min_overlap <= 1, "min_overlap", "must be in (0, 1]")
  check(config.dicom_weight_kg == 0 or 1 <= config.dicom_weight_kg <= 500, "dicom_weight_kg",
        "must be 0 (use PatientWeight from the DICOM headers) or a weight in [1, 500] kg")
  check(not config.metadata_csv or os.path.isfile(config.metadata_csv), "metadata_csv",
        f"file {config.metadata_csv!r} does not exist")
  make_prompt({}, config.prompt_template)


def _report(line: str) -> None:
  tqdm.write(f"error: {line}", file=sys.stderr)


def _staged_path(staging: str, key: str) -> str:
  return os.path.join(staging, f"{key}.array_record")


def _stage(job: Job, config: dict[str, Any], path: str) -> str | None:
  """Worker: converts one study into its staging file. Returns the error line for bad input, else None."""
  try:
    record = convert_study(job, ml_collections.ConfigDict(config))
  except UserError as e:
    return str(e)
  except MemoryError:
    return f"study {job.study.study_id}: not enough memory to convert it"
  write_array_record(path, [records.encode(record)])
  return None


def _run(jobs: Sequence[Job], config: ml_collections.ConfigDict, staging: str, workers: int,
         progress: bool) -> Iterable[tuple[Job, str | None]]:
  """Converts `jobs` to staging files with `workers` processes; yields (job, error or None) as they finish."""
  settings = config.to_dict()
  bar = tqdm(total=len(jobs), desc="converting", unit="study", file=sys.stderr,
             disable=not progress or not jobs)
  with bar:
    if workers <= 1 or len(jobs) <= 1:
      for job in jobs:
        yield job, _stage(job, settings, _staged_path(staging, job.key))
        bar.update()
      return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
      futures = {pool.submit(_stage, job, settings, _staged_path(staging, job.key)): job for job in jobs}
      try:
        for future in concurrent.futures.as_completed(futures):
          yield futures[future], future.result()
          bar.update()
      except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise


def write_array_record(path: str, items: Iterable[bytes]) -> int:
  """Writes `items` to an ArrayRecord file (`group_size:1`) so that it appears complete or not at all."""
  tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}-{os.getpid()}")
  count = 0
  try:
    writer = ArrayRecordWriter(tmp, "group_size:1")
    try:
      for item in items:
        writer.write(item)
        count += 1
    finally:
      writer.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return count


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _read_previous(output_dir: str) -> dict[str, tuple[str, int]]:
  """Studies in the output folder's current manifest: key → (shard path, index)."""
  if not os.path.exists(os.path.join(output_dir, records.MANIFEST)):
    return {}
  try:
    manifest = records.read_manifest(output_dir)
  except (UserError, ValueError) as e:
    raise UserError(f"--output {output_dir}: holds a manifest.json that is not a petfm dataset ({e}); "
                    "choose an empty or petfm output folder") from None
  found = {}
  for study in manifest.get("studies", []):
    shard = os.path.join(output_dir, study["shard"])
    if study.get("key") and os.path.exists(shard):
      found[study["key"]] = (shard, study["index"])
  return found


def _pack(output_dir: str, layout: str, jobs: Sequence[Job], previous: dict[str, tuple[str, int]],
          errors: Sequence[str], config: ml_collections.ConfigDict,
          organ_labels: dict[str, str] | None = None) -> dict[str, Any]:
  """Writes the shards of every split into a new `records-<id>/` folder, then the manifest; cleans up."""
  by_split = {split: sorted((j for j in jobs if j.split == split), key=lambda j: j.study.study_id)
              for split in SPLITS}
  per_shard = config.records_per_shard
  layout_id = json.dumps([[s, [j.key for j in js], per_shard] for s, js in by_split.items()])
  records_dir = "records-" + hashlib.sha256(layout_id.encode()).hexdigest()[:12]
  staging = os.path.join(output_dir, STAGING)
  readers: dict[str, ArrayRecordReader] = {}

  def record_bytes(job: Job) -> bytes:
    staged = _staged_path(staging, job.key)
    if os.path.exists(staged):
      path, index = staged, 0
    else:
      path, index = previous[job.key]
    if path not in readers:
      readers[path] = ArrayRecordReader(path)
    return readers[path].read([index])[0]

  tmp_dir = os.path.join(output_dir, f".tmp-{records_dir}")
  shutil.rmtree(tmp_dir, ignore_errors=True)
  os.makedirs(tmp_dir)
  splits, studies = {}, []
  try:
    for split, split_jobs in by_split.items():
      num_shards = math.ceil(len(split_jobs) / per_shard)
      shards = []
      for shard_index in range(num_shards):
        name = f"{split}-{shard_index:05d}-of-{num_shards:05d}.array_record"
        chunk = split_jobs[shard_index * per_shard:(shard_index + 1) * per_shard]
        data = [record_bytes(job) for job in chunk]
        write_array_record(os.path.join(tmp_dir, name), data)
        shards.append(f"{records_dir}/{name}")
        for index, (job, item) in enumerate(zip(chunk, data)):
          studies.append(_manifest_entry(job, item, shards[-1], index))
      num_bytes = sum(os.path.getsize(os.path.join(tmp_dir, os.path.basename(s))) for s in shards)
      splits[split] = {"shards": shards, "num_records": len(split_jobs), "num_bytes": num_bytes}
  finally:
    for reader in readers.values():
      reader.close()
  _fsync_dir(tmp_dir)
  final_dir = os.path.join(output_dir, records_dir)
  if os.path.exists(final_dir):  # same studies as the current manifest, or left over from a crash
    shutil.rmtree(final_dir)
  os.replace(tmp_dir, final_dir)
  _fsync_dir(output_dir)
  manifest = {
      "format": "petfm-records", "version": records.FORMAT_VERSION, "layout": layout,
      "spacing": [float(s) for s in np.broadcast_to(config.spacing, (3,))], "records_dir": records_dir,
      "splits": splits, "studies": studies, "prompts": sorted({j.text for j in jobs}),
      "config": config.to_dict(), "errors": list(errors), "organ_labels": organ_labels or {}}
  records.write_atomic(os.path.join(output_dir, records.MANIFEST), json.dumps(manifest, indent=1))
  for name in os.listdir(output_dir):
    if (name.startswith("records-") and name != records_dir) or name.startswith(".tmp-") or name == STAGING:
      path = os.path.join(output_dir, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  return manifest


def _manifest_entry(job: Job, item: bytes, shard: str, index: int) -> dict[str, Any]:
  record = records.decode(item, fields=("label", "spacing", "targets"))
  targets = record["targets"]
  return {
      "study_id": job.study.study_id, "patient_id": job.study.patient_id, "split": job.split, "shard": shard,
      "index": index, "shape": list(record["label"].shape), "spacing": record["spacing"].tolist(),
      "tracer": job.tracer, "stage": job.stage, "has_label": os.path.exists(job.study.label),
      "lesions": targets[targets[:, 0] == records.TARGET_LESION][:, 1:3].tolist(),
      "organs": targets[targets[:, 0] == records.TARGET_ORGAN][:, 1:3].tolist(),
      "text": job.text, "source": job.study.source, "key": job.key}


# -------------------------------------------------------------------------------------------------- CLI
def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("input", None, "folder of NIfTI studies (autoPET, nnU-Net or HECKTOR layout) or DICOM",
                      flag_values=fv)
  flags.DEFINE_string("output", None, "folder for the ArrayRecord shards and manifest.json", flag_values=fv)
  flags.DEFINE_integer("workers", None, "parallel processes (default: the number of CPUs)", flag_values=fv)


def main(argv: Sequence[str]) -> int:
  """`petfm prepare`: returns 0 when every study converted, 1 when some failed (UserError → exit 2)."""
  argv = list(argv)
  if not any(a in ("--config", "-config") or a.startswith(("--config=", "-config=")) for a in argv):
    argv = ["--config", DEFAULT_CONFIG, *argv]
  fv = parse_command_line(argv, "prepare", _define_flags)
  for name in ("input", "output"):
    if not fv[name].value:
      raise UserError(f"--{name} DIR is required")
  workers = fv.workers if fv.workers is not None else len(os.sched_getaffinity(0))
  if workers < 1:
    raise UserError(f"--workers={workers}: must be ≥ 1")
  summary = convert(fv.input, fv.output, fv.config, workers=workers)
  print(summary)
  return 1 if summary.errors else 0


if __name__ == "__main__":
  from petfm.cli import main as cli_main

  sys.exit(cli_main(["prepare", *sys.argv[1:]]))
