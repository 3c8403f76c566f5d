"""The sweep runner: which declared runs it trains (`only` / `--only`), their configs, the written table."""

import json
import os

import pytest

from petfm import cli
from petfm import config as config_lib
from petfm.errors import UserError
from petfm.train import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "experiments", "fratmae.py")


def test_declared_masking_sweep_has_every_mode_and_ratio():
  runs = sweep.declared_runs(CONFIG)
  assert len(runs) == 8
  assert {(r["mask_mode"], r["mask_ratio"]) for r in runs} == {
      (m, r) for m in ("one_visible", "both_masked") for r in (0.5, 0.75, 0.9, 0.95)}


@pytest.mark.parametrize("only,expected", [
    (None, 8),
    ({}, 8),
    ({"mask_ratio": [0.5, 0.9]}, 4),
    ({"mask_ratio": ["0.5", "0.90"], "mask_mode": ["one_visible"]}, 2),      # command-line text
    ({"mask_mode": ["both_masked"]}, 4),
])
def test_select_runs_keeps_the_matching_runs_in_declared_order(only, expected):
  runs = sweep.declared_runs(CONFIG)
  kept = sweep.select_runs(runs, only)
  assert len(kept) == expected
  assert kept == [r for r in runs if r in kept]                                # order kept
  for key, values in (only or {}).items():
    assert all(float(r[key]) in {float(v) for v in values} if key == "mask_ratio" else r[key] in values
               for r in kept)


@pytest.mark.parametrize("only,message", [
    ({"mask_ration": [0.5]}, "not a swept field"),
    ({"mask_ratio": [0.6]}, "selects none"),
    ({"mask_ratio": ["half"]}, "selects none"),
])
def test_select_runs_bad_filters(only, message):
  with pytest.raises(UserError, match=message):
    sweep.select_runs(sweep.declared_runs(CONFIG), only)


def test_parse_only():
  assert sweep.parse_only(["mask_ratio=0.5, 0.9", "mask_mode=one_visible", "mask_ratio=0.95"]) == {
      "mask_ratio": ["0.5", "0.9", "0.95"], "mask_mode": ["one_visible"]}
  for bad in ("mask_ratio", "=0.5", "mask_ratio="):
    with pytest.raises(UserError, match="KEY=VALUE"):
      sweep.parse_only([bad])


@pytest.fixture
def fake_training(monkeypatch):
  """Replaces training and evaluation by recorders: (run dir, mask_mode, mask_ratio, total_steps) per run."""
  calls = []

  def train(config, workdir):
    model = config.model
    calls.append((os.path.basename(workdir), model.mask_mode, model.mask_ratio, config.total_steps))
    return {}

  monkeypatch.setattr(sweep.pretrain, "train", train)
  monkeypatch.setattr(sweep.pretrain, "evaluate", lambda config, workdir: {
      "rec_pet": config.mask_ratio, "rec_ct": 1.0 - config.mask_ratio})
  return calls


def test_run_sweep_trains_only_the_selected_runs_and_writes_their_table(tmp_path, fake_training):
  config = config_lib.load_config(f"{CONFIG}:tiny", {"total_steps": 7})
  only = {"mask_ratio": [0.9, 0.5], "mask_mode": ["both_masked"]}
  rows = sweep.run_sweep(config, CONFIG, str(tmp_path), only)
  assert fake_training == [("mask_mode=both_masked,mask_ratio=0.5", "both_masked", 0.5, 7),
                           ("mask_mode=both_masked,mask_ratio=0.9", "both_masked", 0.9, 7)]
  assert json.loads((tmp_path / "sweep.json").read_text()) == rows
  assert [r["metrics"]["rec_pet"] for r in rows] == [0.5, 0.9]
  table = (tmp_path / "sweep.md").read_text().splitlines()
  assert len(table) == 4 and table[2].startswith("| both_masked | 0.5 | 0.5000 | 0.5000 |")


def test_cli_only_flag(tmp_path, fake_training, capsys):
  argv = ["sweep", "--config", f"{CONFIG}:tiny", "--workdir", str(tmp_path), "--only", "mask_ratio=0.75",
          "--only", "mask_mode=one_visible"]
  assert cli.main(argv) == 0
  assert [c[0] for c in fake_training] == ["mask_mode=one_visible,mask_ratio=0.75"]
  assert cli.main([*argv[:5], "--only", "mask_ratio=0.6"]) == 2
  assert "selects none" in capsys.readouterr().err
