"""Cloud storage paths: petfm's path layer against a non-local backend, fsspec's in-memory filesystem
registered as `gs://` (so the exact code path of a real bucket runs, minus gcsfs' network calls)."""

import json
import os

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from petfm import paths, viz
from petfm.data import pipelines, records
from petfm.errors import UserError
from petfm.train import common
from tests.fixtures_records import make_cohort


class FakeGCS(MemoryFileSystem):
  """An in-memory bucket store answering gs:// URLs."""
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    return "/" + str(path).removeprefix("gs://").removeprefix("gcs://").strip("/")


@pytest.fixture(autouse=True)
def bucket(tmp_path, monkeypatch):
  for name in FakeGCS.protocol:
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  monkeypatch.setenv("PETFM_CACHE", str(tmp_path / "cache"))
  return "gs://bucket"


def test_files_round_trip_and_remote_copies_are_cached(bucket, tmp_path):
  url = f"{bucket}/run/config.json"
  records.write_atomic(url, json.dumps({"a": 1}))
  assert paths.exists(url) and paths.isdir(f"{bucket}/run") and not paths.isfile(f"{bucket}/run")
  assert json.loads(paths.read_text(url)) == {"a": 1}
  assert not os.path.exists("gs:") and not os.path.exists(tmp_path / "gs:")      # no local folder "gs:"
  local = paths.local_copy(url)
  assert local.startswith(str(tmp_path / "cache")) and open(local).read() == '{"a": 1}'
  os.utime(local, (0, 0))
  assert paths.local_copy(url) == local and os.path.getmtime(local) == 0          # not downloaded again
  records.write_atomic(url, json.dumps({"a": 22}))
  assert json.loads(open(paths.local_copy(url)).read()) == {"a": 22}              # changed: downloaded
  assert paths.absolute("run") == os.path.abspath("run") and paths.absolute(url) == url
  assert paths.join(bucket, "run", "x") == f"{bucket}/run/x"


def test_converted_records_on_the_bucket_feed_the_pipeline_like_local_ones(bucket, tmp_path):
  """`petfm prepare --output gs://...` (convert in the local mirror, upload, manifest last); the manifest
  and pipelines read the bucket (shards through the cache) and yield what the local records yield."""
  counts = {"train": 2, "val": 1, "test": 0}
  local = make_cohort(str(tmp_path / "local"), counts, shape=(12, 10, 14))
  remote = make_cohort(str(tmp_path / "remote"), counts, shape=(12, 10, 14), output=f"{bucket}/records")
  manifest = records.read_manifest(remote)
  brief = lambda m: [(e["study_id"], e["split"], e["shape"]) for e in m["studies"]]  # noqa: E731
  assert brief(manifest) == brief(records.read_manifest(local))
  for shard in manifest["splits"]["train"]["shards"]:
    assert FakeGCS.store[f"/bucket/records/{shard}"].size > 0
  cfg = pipelines.default_slab_config()
  cfg.update(plane_size=(16, 8), depth=2, samples_per_read=1, read_threads=0, fit="resize")
  batches = [list(pipelines.slab_dataset(d, "train", cfg, seed=0, train=False, batch_size=2)) for d in
             (local, remote)]
  for a, b in zip(*batches):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(UserError, match="no manifest.json"):
    records.read_manifest(f"{bucket}/nothing")


def test_metrics_images_and_resume_on_the_bucket(bucket):
  """A trainer's metrics.jsonl, TensorBoard events and PNGs land in a gs:// workdir; a resumed run appends."""
  workdir = f"{bucket}/run"
  logger = common.MetricsLogger(workdir, total_steps=4, enabled=True)
  logger.write(1, {"loss": 2.0})
  logger.sync()
  lines = paths.read_text(f"{workdir}/metrics.jsonl").splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1]
  png = viz.line_plot({"loss": ([1, 2], [2.0, 1.0])}, f"{workdir}/images/loss.png", "step", "loss", "loss")
  logger.image("loss", png, 2)
  logger.close()
  resumed = common.MetricsLogger(workdir, total_steps=4, start_step=2, enabled=True)
  resumed.write(3, {"loss": 1.0})
  resumed.close()
  lines = paths.read_text(f"{workdir}/metrics.jsonl").splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 3]
  assert paths.path(png).read_bytes()[:4] == b"\x89PNG"
  events = [p for p in paths.path(f"{workdir}/tensorboard").iterdir() if "tfevents" in p.name]
  assert len(events) == 2 and all(p.stat().length > 0 for p in events)
