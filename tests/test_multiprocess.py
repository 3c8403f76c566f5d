"""Pretraining in two processes on this machine (4 CPU devices each, gloo collectives) against one process
with 8 devices: per-host reads, global batch assembly, cross-topology checkpoints, a dead peer."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from petfm import config as config_lib, rundir
from petfm.train import common, pretrain
from tests import fixtures_records
from tests.test_pretrain import SMALL, random_batch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")
CONFIG = os.path.join(os.path.dirname(WORKER), os.pardir, "experiments", "fratmae.py")
TRAIN_STUDIES = 8
# Global batch 8 = 4 studies × 2 slabs: one epoch of the 8 training studies every 2 steps. The plain MAE of
# the tiny variant (smaller still) keeps the compile short; the multi-process code path does not depend on it.
OVERRIDES = {**SMALL, "method": "mae", "model.depth": 1, "data.samples_per_read": 2, "data.body_hu": -2000.0,
             "total_steps": 4, "checkpoint.every_steps": 2, "checkpoint.keep": 3, "log_every_steps": 1,
             "cluster.heartbeat_timeout_s": 10}
HEARTBEAT_S = OVERRIDES["cluster.heartbeat_timeout_s"]
KILL_BOUND_S = HEARTBEAT_S + 30   # heartbeat timeout + error polling + process exit, on a loaded machine


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, processes: int, cache, reads_steps: int = 0, **overrides) -> list[subprocess.Popen]:
  """`processes` workers on 8 CPU devices in all (8 / processes each), joined through a local coordinator;
  compiled programs are shared through the persistent cache `cache`. Output goes to WORKDIR.log.<process>."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}",
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES=str(processes),
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  args = json.dumps({**OVERRIDES, **overrides, "distributed": processes > 1})
  procs = []
  for p in range(processes):
    command = [sys.executable, WORKER, str(workdir), args, str(reads_steps)]
    with open(f"{workdir}.log.{p}", "w") as log:
      procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                    env={**env, "JAX_PROCESS_ID": str(p)}))
    procs[-1].log = log.name
  return procs


def output(proc: subprocess.Popen) -> str:
  with open(proc.log) as f:
    return f.read()


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
  """Waits for `procs` (each must succeed); their output."""
  for p in procs:
    p.wait(timeout=timeout)
    assert p.returncode == 0, output(p)[-3000:]
  return [output(p) for p in procs]


def params_at(workdir, step: int):
  """The params of `workdir`'s checkpoint at `step`, restored onto one device of this process."""
  config = config_lib.load_config(f"{CONFIG}:tiny", {**OVERRIDES, "distributed": False})
  mesh = common.create_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)], jax.devices()[:1])
  setup = pretrain.build(config, mesh, random_batch(config))
  ckpt = rundir.Checkpointer(os.path.join(workdir, "checkpoints"), 2, 3)
  state = ckpt.restore(step, rundir.abstract_with_shardings(setup.abstract_state, setup.state_shardings))
  ckpt.close()
  return jax.device_get(state["params"])


def losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f)}


def max_diff(a, b) -> float:
  """Largest |a - b| over the params, attention key biases left out: their exact gradient is zero (a key
  bias shifts all logits of a query alike), so both runs hold Adam-normalised rounding noise there (≈ lr)."""
  diffs = jax.tree_util.tree_map_with_path(
      lambda path, x, y: 0.0 if jax.tree_util.keystr(path).endswith("['key']['bias']")
      else float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
  return max(jax.tree.leaves(diffs))


def resumable_copy(src, dst, step: int):
  """A copy of the run `src` as it was after its checkpoint `step` (later checkpoints removed)."""
  shutil.copytree(src, dst)
  for later in (dst / "checkpoints").iterdir():
    if later.name.isdigit() and int(later.name) > step:
      shutil.rmtree(later)


@pytest.mark.slow
def test_two_processes_equal_one_cross_topology_resume_and_dead_peer(tmp_path):
  """Wave 1: 2 processes × 4 devices and 1 process × 8 devices train 4 steps at once. Each process reads a
  disjoint half of the studies per epoch; losses and params agree. Wave 2: each run's step-2 checkpoint
  resumes on the other topology to step 4 and matches the straight runs; and a third 2-process run, whose
  process 1 is killed while training, must end process 0 with jax's "another task died" error within
  KILL_BOUND_S instead of hanging."""
  records = fixtures_records.make_cohort(str(tmp_path / "data"), {"train": TRAIN_STUDIES, "val": 1,
                                                                  "test": 1}, shape=(16, 12, 20))
  cache, one, two = tmp_path / "jax_cache", tmp_path / "one", tmp_path / "two"
  finish(launch(one, 1, cache, data_dir=records) + launch(two, 2, cache, reads_steps=2, data_dir=records))

  reads = [json.load(open(two / f"reads_{p}.json")) for p in range(2)]       # 2 steps = one epoch
  studies = [{i for step in r for i in step} for r in reads]
  assert not studies[0] & studies[1]
  assert studies[0] | studies[1] == set(range(TRAIN_STUDIES))
  single_losses, pair_losses = losses(one), losses(two)
  for step in range(1, 5):
    assert abs(single_losses[step] - pair_losses[step]) <= 1e-5, (step, single_losses, pair_losses)
  straight = params_at(one, 4)
  assert max_diff(straight, params_at(two, 4)) <= 1e-5

  one_from_two, two_from_one = tmp_path / "one_from_two", tmp_path / "two_from_one"
  resumable_copy(two, one_from_two, 2)
  resumable_copy(one, two_from_one, 2)
  resumed = (launch(one_from_two, 1, cache, data_dir=records)
             + launch(two_from_one, 2, cache, data_dir=records))
  survivor, victim = launch(tmp_path / "killed", 2, cache, data_dir=records,
                            **{"total_steps": 100_000, "checkpoint.every_steps": 100_000})
  metrics = tmp_path / "killed" / "metrics.jsonl"
  deadline = time.monotonic() + 400
  while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
    assert survivor.poll() is None and victim.poll() is None, output(survivor)[-3000:]
    time.sleep(0.2)
  victim.kill()
  killed = time.monotonic()
  try:
    survivor.wait(timeout=KILL_BOUND_S)
  except subprocess.TimeoutExpired:
    survivor.kill()
    pytest.fail(f"the surviving process still ran {KILL_BOUND_S} s after its peer died")
  print(f"process 0 stopped {time.monotonic() - killed:.1f} s after process 1 was killed")
  victim.wait()
  assert survivor.returncode != 0 and "another task died" in output(survivor), output(survivor)[-3000:]

  outputs = finish(resumed)
  for run, text in ((one_from_two, outputs[0]), (two_from_one, outputs[1])):
    assert "resuming from the checkpoint at step 2" in text
    assert abs(losses(run)[4] - single_losses[4]) <= 1e-5, run       # the same batches after the restore
    assert max_diff(params_at(run, 4), straight) <= 1e-5, run
