"""The pre-training comparison driver (experiments/paper_table.py): the paired statistic against a hand
computation, and a tiny real table (1 seed, 2 label regimes, a few steps): each pretraining and run is trained
once and reused on a rerun, a removed row alone is redone, a changed config is refused, run locks."""

import json
import os

import numpy as np
import pytest
from conftest import REPO

from petfm import config as config_lib
from petfm.errors import UserError
from petfm.eval import metrics
from petfm.train import finetune, pretrain

table_lib = config_lib.load_module(os.path.join(REPO, "experiments", "paper_table.py"))
MODEL = {"model.patch_size": (8, 8), "model.width": 32, "model.depth": 2, "model.num_heads": 2,
         "model.mlp_dim": 64}
PRETRAIN = {**MODEL, "data.plane_size": (32, 16), "data.depth": 2, "model.decoder_width": 32,
            "model.decoder_depth": 1, "model.decoder_heads": 2, "model.decoder_mlp_dim": 64,
            "model.ca_proj_dim": 16, "model.text_width": 16, "model.text_heads": 2, "batch_size": 8,
            "total_steps": 4, "optim.warmup_steps": 1, "checkpoint.async_save": False}
FINETUNE = {**MODEL, "data.plane_size": (32, 16), "data.depth": 2, "head.features": 4, "total_steps": 4,
            "optim.warmup_steps": 1, "eval.batch_size": 16, "checkpoint.every_steps": 2}


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


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  """Six synthetic patients (real anatomy, organ map, stages) at 8 mm: ≥ 2 training, ≥ 1 test."""
  from data_prep import convert, synthetic
  from data_prep.configs import convert as convert_configs
  root = tmp_path_factory.mktemp("synthetic")
  synthetic.generate(str(root / "nifti"), n=6, seed=0, workers=1, scale=0.5, progress=False)
  config = convert_configs.get_config("8.0")
  config.update(val_fraction=0.0, test_fraction=0.3, seed=0)
  summary = convert.convert(str(root / "nifti"), str(root / "records"), config, progress=False)
  assert summary.failed == 0 and summary.split_counts["train"] >= 2 and summary.split_counts["test"] >= 1
  return str(root / "records")


def tiny_table():
  table = table_lib.get_config("smoke")
  table.label_patients = (1, 2)
  table.pretrain = tuple({**dict(table.pretrain), **PRETRAIN}.items())
  table.finetune = tuple({**dict(table.finetune), **FINETUNE}.items())
  return table


def test_table_trains_each_run_once_reuses_it_and_pairs_by_seed(records_dir, tmp_path, monkeypatch):
  workdir, table = str(tmp_path / "table"), tiny_table()
  calls = []
  real_pretrain, real_finetune = pretrain.train, finetune.train
  monkeypatch.setattr(pretrain, "train", lambda c, w: calls.append(w) or real_pretrain(c, w))
  monkeypatch.setattr(finetune, "train", lambda c, w: calls.append(w) or real_finetune(c, w))

  results = table_lib.run_table(table, records_dir, workdir, poll_s=0.01)

  assert [os.path.relpath(c, workdir) for c in calls] == [
      "runs/scratch_n1_s0", "pretrain/fratmae", "runs/fratmae_n1_s0", "runs/scratch_n2_s0",
      "runs/fratmae_n2_s0"]
  runs = results["runs"]
  assert set(runs) == {f"{m}_n{n}_s0" for m in ("scratch", "fratmae") for n in (1, 2)}
  paired = {p["patients"]: p for p in results["paired"]}
  expected = metrics.paired_difference([runs["fratmae_n1_s0"]["dice"], runs["fratmae_n2_s0"]["dice"]],
                                       [runs["scratch_n1_s0"]["dice"], runs["scratch_n2_s0"]["dice"]])
  assert paired["all"]["dice"] == pytest.approx(expected, nan_ok=True) and paired["all"]["dice"]["n"] == 2
  one = runs["fratmae_n1_s0"]["dice"] - runs["scratch_n1_s0"]["dice"]
  assert paired[1]["dice"]["mean"] == pytest.approx(one)
  assert all(0 <= runs[k]["stage_accuracy"] <= 1 for k in runs)   # stage by rule from the predicted masks
  assert "suv>3 w/o organs (no learning)" in results["reference"]
  assert json.loads(open(os.path.join(workdir, "paper_table.json")).read()) == json.loads(json.dumps(results))
  markdown = open(os.path.join(workdir, "paper_table.md")).read()
  assert "| fratmae | all | " in markdown and "| scratch | 2 | " in markdown
  assert os.path.getsize(os.path.join(workdir, "paper_table.png")) > 10_000

  # A rerun trains nothing; without one row's JSON only that run is redone (from its finished checkpoint).
  calls.clear()
  assert table_lib.run_table(table, records_dir, workdir)["runs"] == runs and calls == []
  os.remove(os.path.join(workdir, "rows", "fratmae_n2_s0.json"))
  assert table_lib.run_table(table, records_dir, workdir)["runs"] == runs
  assert [os.path.relpath(c, workdir) for c in calls] == ["runs/fratmae_n2_s0"]

  # Cached rows made with another fine-tune config are refused, not mixed in.
  table.finetune = tuple({**dict(table.finetune), "total_steps": 6}.items())
  with pytest.raises(UserError, match=r"scratch_n1_s0.json: run scratch_n1_s0 was made with another config "
                                      r"\(differs in total_steps\)"):
    table_lib.run_table(table, records_dir, workdir)


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
