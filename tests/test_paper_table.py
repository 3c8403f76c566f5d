"""The pre-training comparison driver (experiments/paper_table.py): the paired statistic against a hand
computation; on a tiny cohort, with stand-in trainers: runs paired by seed, an interrupted table resumes, each
pretraining and run is trained once and reused, a removed row alone is redone, a changed config is refused;
run locks. (`--size smoke` runs the real trainers end to end: see the module docstring.)"""

import json
import os

import numpy as np
import pytest
from conftest import REPO
from fixtures_records import make_cohort

from petfm import config as config_lib
from petfm.errors import UserError
from petfm.eval import metrics
from petfm.train import finetune, pretrain

table_lib = config_lib.load_module(os.path.join(REPO, "experiments", "paper_table.py"))
def test_paired_difference_matches_a_hand_computed_t_interval():
  treated, control = [0.30, 0.50, 0.40, np.nan], [0.10, 0.20, 0.35, 0.30]
  out = metrics.paired_difference(treated, control)
  # Differences 0.20, 0.30, 0.05 (the pair with a NaN is left out): mean 0.55 / 3, squared deviations sum to
  # 0.095 / 3, so sd = sqrt(0.095 / 6); t quantile 0.975 with 2 degrees of freedom from a t table.
  sd = np.sqrt(0.095 / 6)
  half = 4.302652729911275 * sd / np.sqrt(3)
  assert out["n"] == 3
  np.testing.assert_allclose([out["mean"], out["sd"], out["low"], out["high"]],
                             [0.55 / 3, sd, 0.55 / 3 - half, 0.55 / 3 + half], rtol=1e-9)
  one = metrics.paired_difference([0.5], [0.25])
  assert one["mean"] == 0.25 and np.isnan(one["low"]) and np.isnan(one["high"])


@pytest.fixture
def trainers(monkeypatch):
  """Stand-ins for the two trainers (each has its own tests), so that the driver's logic runs in seconds: a
  pretraining writes its config.json; a fine-tune returns Dice 0.1·patients + 0.01·seed, + 0.02·patients +
  0.01·seed when initialised from a pretraining (so the paired differences are known), and stage accuracy
  0.5. Returns the list of workdirs trained, in order."""
  calls = []

  def fake_pretrain(config, workdir):
    calls.append(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(table_lib._plain(config), f)
    return {"loss": 1.0}

  def fake_finetune(config, workdir):
    calls.append(workdir)
    n, seed = config.label_patients, config.seed
    dice = 0.1 * n + 0.01 * seed + (0.02 * n + 0.01 * seed if config.init_from else 0.0)
    rule = {"from_prediction": {"accuracy": 0.5}}
    return {"dice": dice, "fpv_ml": 1.0, "fnv_ml": 2.0, "staging_by_rule": rule}

  monkeypatch.setattr(pretrain, "train", fake_pretrain)
  monkeypatch.setattr(finetune, "train", fake_finetune)
  return calls


def tiny_table():
  table = table_lib.get_config("smoke")
  table.label_patients, table.seeds = (1, 3), (0, 1)
  return table


def test_table_pairs_runs_by_seed_caches_rows_and_resumes(tmp_path, trainers):
  data_dir = make_cohort(str(tmp_path / "cohort"), {"train": 2, "test": 1}, shape=(12, 10, 14))
  workdir, table = str(tmp_path / "table"), tiny_table()
  relative = lambda calls: [os.path.relpath(c, workdir) for c in calls]  # noqa: E731

  # Interrupted as the fourth training starts: the table on disk holds the runs finished so far.
  real_finetune = finetune.train
  def interrupted(config, folder):
    if len(trainers) == 3:
      raise KeyboardInterrupt
    return real_finetune(config, folder)
  finetune.train = interrupted
  with pytest.raises(KeyboardInterrupt):
    table_lib.run_table(table, data_dir, workdir)
  assert relative(trainers) == ["runs/scratch_n1_s0", "pretrain/fratmae", "runs/fratmae_n1_s0"]
  stored = json.loads(open(os.path.join(workdir, "paper_table.json")).read())
  assert set(stored["runs"]) == {"scratch_n1_s0", "fratmae_n1_s0"}
  assert not [f for f in os.listdir(os.path.join(workdir, "runs")) if f.endswith(".lock")]   # released

  # The rerun trains only what is missing; the pretraining is reused.
  finetune.train = real_finetune
  trainers.clear()
  results = table_lib.run_table(table, data_dir, workdir)
  assert relative(trainers) == ["runs/scratch_n3_s0", "runs/fratmae_n3_s0", "runs/scratch_n1_s1",
                                "runs/fratmae_n1_s1", "runs/scratch_n3_s1", "runs/fratmae_n3_s1"]
  runs = results["runs"]
  assert runs["fratmae_n3_s1"] == {"dice": pytest.approx(0.31 + 0.07), "fpv_ml": 1.0, "fnv_ml": 2.0,
                                   "stage_accuracy": 0.5, "seconds": pytest.approx(0.0, abs=1.0)}
  # Paired differences 0.02·n + 0.01·seed = 0.02, 0.03, 0.06, 0.07: mean 0.045, squared deviations sum to
  # 0.0017, sd = sqrt(0.0017 / 3), t quantile 0.975 with 3 degrees of freedom from a t table.
  paired = {p["patients"]: p for p in results["paired"]}
  half = 3.182446305284263 * np.sqrt(0.0017 / 3) / 2
  assert paired["all"]["dice"] == pytest.approx({"mean": 0.045, "low": 0.045 - half, "high": 0.045 + half,
                                                 "sd": np.sqrt(0.0017 / 3), "n": 4})
  assert paired[3]["dice"]["n"] == 2 and paired[3]["dice"]["mean"] == pytest.approx(0.065)
  assert paired["all"]["stage_accuracy"]["mean"] == 0
  assert "suv>3 w/o organs (no learning)" in results["reference"]          # the classical rules, computed
  assert json.loads(open(os.path.join(workdir, "paper_table.json")).read()) == json.loads(json.dumps(results))
  cells, differences = open(os.path.join(workdir, "paper_table.md")).read().split("Paired difference")
  assert (f"| fratmae | 3 | {np.mean([0.36, 0.38]):.3g} ± {np.std([0.36, 0.38], ddof=1):.2g} | 1 ± 0 | 2 ± 0 "
          "| 0.5 ± 0 | 2 |") in cells
  assert f"| fratmae | all | +0.045 [{0.045 - half:+.3f}, {0.045 + half:+.3f}] |" in differences
  assert os.path.getsize(os.path.join(workdir, "paper_table.png")) > 10_000

  # A rerun trains nothing; without one row's JSON only that run is redone.
  trainers.clear()
  assert table_lib.run_table(table, data_dir, workdir)["runs"] == runs and trainers == []
  os.remove(os.path.join(workdir, "rows", "fratmae_n3_s0.json"))
  table_lib.run_table(table, data_dir, workdir)
  assert relative(trainers) == ["runs/fratmae_n3_s0"]

  # Cached rows made with another fine-tune config are refused, not mixed in.
  table.finetune = tuple({**dict(table.finetune), "total_steps": 6}.items())
  with pytest.raises(UserError, match=r"scratch_n1_s0.json: run scratch_n1_s0 was made with another config "
                                      r"\(differs in total_steps\)"):
    table_lib.run_table(table, data_dir, workdir)


def test_run_locks_of_live_processes_hold_and_stale_ones_are_taken_over(tmp_path):
  folder = str(tmp_path / "runs" / "x")
  os.makedirs(tmp_path / "runs")
  (tmp_path / "runs" / "x.lock").write_text(str(os.getppid()))      # a live process holds it
  with table_lib._claim(folder) as mine:
    assert not mine
  (tmp_path / "runs" / "x.lock").write_text("999999999")             # no such process
  with table_lib._claim(folder) as mine:
    assert mine and (tmp_path / "runs" / "x.lock").read_text() == str(os.getpid())
  assert not (tmp_path / "runs" / "x.lock").exists()


@pytest.mark.parametrize("field,value,message", [
    ("methods", ("fratmae", "scratch"), "must start with 'scratch'"),
    ("methods", ("scratch", "simclr"), "'simclr' is not one of"),
    ("label_patients", (1, 0), "must be positive integers"),
    ("seeds", (0, 0), "must be distinct")])
def test_bad_table_settings_give_one_clear_error(field, value, message):
  table = table_lib.get_config("full")
  table[field] = value
  with pytest.raises(UserError, match=f"config.{field}: .*{message}"):
    table_lib.validate(table)
