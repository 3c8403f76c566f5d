r"""The downstream comparison table (spec §6c) on the synthetic cohort: tiny models, CPU, 3 seeds.

COMMAND (writes WORKDIR/paper_table.md, .json and .png; rerunning resumes: finished runs are skipped, partial
ones continue from their checkpoints):
  PYTHONPATH=. python experiments/paper_table.py --workdir runs/paper_table [--data_dir demo_out/records] \
      [--size full|reduced]

Rows: from scratch, MAE, MAE + ContextAlign, FratMAE w/o ContextAlign, FratMAE, FratMAE axial. Each pretrained
row pretrains once (seed 0) and is fine-tuned with `protocol=finetune` (layer-wise lr decay); the scratch row
uses `protocol=scratch`. The table starts with rows that need no training (`paper_table.reference_rows`):
the classical lesion rules of `petfm.eval.baselines` (staged by the Ann Arbor rule on their masks) and the
staging rule on the true lesion maps. Columns: lesion Dice, FPV, FNV (test split, whole volumes) and staging
accuracy and macro AUC, each at 10 % and 100 % of the training patients; mean ± std over the fine-tuning seeds
(which also draw the labelled-patient subset).

Sizes (`full`, ≈ 45 min on an idle 2-core CPU, see the README): 5 pretraining runs of 300 steps (batch 8,
64 × 64 × 4 slabs, ViT tiny width 64 depth 4, patch 8), 72 fine-tuning runs (6 rows × 2 fractions × 3 seeds ×
2 tasks): lesions 200 steps of batch 8 (evaluated on all test studies, whole volumes), staging 30 steps of batch
8 studies × 4 slabs (evaluated on all test studies). `reduced` (the end-to-end check): 1 seed, 20 pretraining /
15 lesion / 6 staging steps.
A missing `--data_dir` is generated: `data_prep.synthetic` (40 patients) converted at 4 mm.
"""

import os
import sys

import ml_collections

ROWS = (("from scratch", "scratch", "fratmae", "coronal"), ("MAE", "pretrained", "mae", "coronal"),
        ("MAE + ContextAlign", "pretrained", "mae_ca", "coronal"),
        ("FratMAE w/o ContextAlign", "pretrained", "fratmae_noca", "coronal"),
        ("FratMAE", "pretrained", "fratmae", "coronal"), ("FratMAE axial", "pretrained", "fratmae", "axial"))

SIZES = {
    "full": dict(seeds=(0, 1, 2), pretrain_steps=300, lesion_steps=200, staging_steps=30, cohort=40,
                 lesion_eval_studies=0),
    "reduced": dict(seeds=(0,), pretrain_steps=20, lesion_steps=15, staging_steps=6, cohort=12,
                    lesion_eval_studies=2),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size = arg or "full"
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
  s = SIZES[size]
  c = ml_collections.ConfigDict()
  c.size = size
  c.rows = ROWS
  c.seeds = s["seeds"]
  c.fractions = (0.1, 1.0)
  c.cohort_patients = s["cohort"]
  # Dotted-name overrides, as (name, value) pairs: of experiments/fratmae.py:tiny for the pretraining runs,
  # and of experiments/finetune.py:tiny per task.
  c.pretrain = (("total_steps", s["pretrain_steps"]), ("batch_size", 8), ("data.plane_size", (64, 64)),
                ("checkpoint.every_steps", max(10, s["pretrain_steps"] // 2)), ("image_every_steps", 0),
                ("optim.warmup_steps", min(10, s["pretrain_steps"] // 2)))
  c.lesions = (("total_steps", s["lesion_steps"]), ("batch_size", 8), ("eval.overlap", 0.25),
               ("eval.max_studies", s["lesion_eval_studies"]),
               ("optim.warmup_steps", min(5, s["lesion_steps"] // 2)), ("checkpoint.every_steps", 30))
  c.staging = (("total_steps", s["staging_steps"]), ("batch_size", 8), ("staging.max_slabs", 4),
               ("optim.warmup_steps", min(5, s["staging_steps"] // 2)), ("checkpoint.every_steps", 30))
  return c


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from petfm.downstream import paper_table
  sys.exit(paper_table.cli(sys.argv[1:]))
