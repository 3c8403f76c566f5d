"""The downstream comparison table runner: finished runs are not redone, and the table aggregates their
per-seed results into mean ± std (Markdown), per-seed lists (JSON) and a plot."""

import json
import os

import numpy as np

from petfm import config as config_lib
from petfm.data import records
from petfm.downstream import paper_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finished_runs(table, workdir):
  """Writes done.json / results.json for every run of `table`; lesion Dice = 0.1·(row index) + 0.01·seed,
  staging accuracy = 0.5 at 10 % and 1.0 at 100 % labels. Returns the Dice per row at 100 %."""
  dice = {}
  for r, (name, kind, method, view) in enumerate(table.rows):
    if kind == "pretrained":
      folder = os.path.join(workdir, "pretrain", f"{method}_{view}")
      os.makedirs(folder)
      records.write_atomic(os.path.join(folder, "done.json"), "{}")
    for fraction in table.fractions:
      for seed in table.seeds:
        lesion = {"dice": 0.1 * r + 0.01 * seed, "fpv_ml": 1.0, "fnv_ml": 2.0}
        staging = {"accuracy": 0.5 if fraction < 1 else 1.0, "macro_auc": 0.75}
        for task, out in (("lesions", lesion), ("staging", staging)):
          folder = os.path.join(workdir, "finetune", paper_table._slug(name), f"{task}_f{fraction:g}_s{seed}")
          os.makedirs(folder)
          records.write_atomic(os.path.join(folder, "results.json"), json.dumps(out))
        if fraction == 1.0:
          dice.setdefault(name, []).append(lesion["dice"])
  return dice


def test_rerun_skips_finished_runs_and_aggregates_seeds(tmp_path, monkeypatch):
  table = config_lib.load_module(os.path.join(REPO, "experiments", "paper_table.py")).get_config("full")
  assert len(table.rows) == 6 and tuple(table.seeds) == (0, 1, 2) and tuple(table.fractions) == (0.1, 1.0)
  data_dir, workdir = tmp_path / "records", str(tmp_path / "table")
  data_dir.mkdir()
  (data_dir / records.MANIFEST).write_text("{}")         # a cohort is there: nothing is generated
  dice = _finished_runs(table, workdir)
  reference = {"suv>4 (no learning)": {f"lesions/dice@{f:g}": [0.25] for f in table.fractions}}
  monkeypatch.setattr(paper_table, "reference_rows", lambda *args: dict(reference))

  results = paper_table.run_table(table, str(data_dir), workdir)          # would train if anything were missing

  assert list(results) == [*reference, *(row[0] for row in table.rows)]
  for name, values in dice.items():
    assert results[name]["lesions/dice@1"] == values
  stored = json.loads(open(os.path.join(workdir, "paper_table.json")).read())
  assert stored == results
  lines = open(os.path.join(workdir, "paper_table.md")).read().splitlines()
  assert "3 seed(s)" in lines[0]
  header = [c.strip() for c in lines[2].strip("|").split("|")]
  assert header[:6] == ["Pre-training", "Dice @10 %", "FPV mL @10 %", "FNV mL @10 %", "stage acc. @10 %",
                        "stage AUC @10 %"]
  rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[4:])}
  assert rows["suv>4 (no learning)"][header.index("Dice @100 %")] == "0.25"
  assert rows["suv>4 (no learning)"][header.index("stage acc. @100 %")] == "n/a"   # no staging values
  mae = rows["MAE"]
  std = np.std([0.1, 0.11, 0.12], ddof=1)                # the sample std over the 3 seeds
  assert mae[header.index("Dice @100 %")] == f"{0.11:.3g} ± {std:.2g}"
  assert mae[header.index("stage acc. @10 %")] == "0.5 ± 0"
  assert mae[header.index("stage acc. @100 %")] == "1 ± 0"
  assert os.path.getsize(os.path.join(workdir, "paper_table.png")) > 10_000
