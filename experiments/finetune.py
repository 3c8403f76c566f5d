r"""Downstream fine-tuning: lesion segmentation and Ann Arbor staging on top of FratMAE / MAE encoders.

COMMAND (tiny model on the synthetic cohort, CPU):
  petfm finetune --config experiments/finetune.py:tiny,task=lesions,protocol=finetune --workdir runs/seg \
      --config.data_dir=demo_out/records --config.init_from=runs/fratmae_tiny

ARG is a variant optionally followed by comma-separated settings:
  variant   tiny | S | B | L
  task      lesions | staging                               (default lesions)
  protocol  linear (frozen encoders) | finetune (layer-wise lr decay) | scratch (random init)
                                                            (default finetune)
  method    mae | mae_ca | fratmae_noca | fratmae           (backbone when not initialised from a
                                                             pretraining run)
  view      coronal | axial
  fraction  labelled share of the training patients: 0.1, 0.25, 0.5, 1.0   (default 1.0)
  patients  labelled training patients as a count, e.g. 1, 3, 10 (default 0: use `fraction`); for one
            seed the subsets are nested
  head      unetr | linear                                  (segmentation head, default unetr)

With `--config.init_from=PRETRAIN_WORKDIR` the backbone config (method, sizes, patch) and the data view,
depth and normalisation come from that run's config.json and its latest encoder params are loaded.
"""

import ml_collections

from experiments import common
from petfm.config import parse_arg
from petfm.data import pipelines
from petfm.models import fratmae

VARIANT = {
    "tiny": dict(plane_size=(64, 64), depth=4, batch_size=8, total_steps=1400, warmup_steps=20, lr=3e-3,
                 features=16, max_slabs=8, staging_batch=4, staging_steps=900),
    "S": dict(plane_size=(224, 224), depth=8, batch_size=32, total_steps=5_000, warmup_steps=250, lr=5e-4,
              features=32, max_slabs=32, staging_batch=8, staging_steps=5_000),
    "B": dict(plane_size=(224, 224), depth=8, batch_size=32, total_steps=10_000, warmup_steps=500, lr=5e-4,
              features=32, max_slabs=32, staging_batch=8, staging_steps=10_000),
    "L": dict(plane_size=(224, 224), depth=8, batch_size=32, total_steps=10_000, warmup_steps=500, lr=2.5e-4,
              features=32, max_slabs=32, staging_batch=8, staging_steps=10_000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, variant="tiny", task="lesions", protocol="finetune", method="fratmae", view="coronal",
                   fraction=1.0, patients=0, head="unetr")
  if args.variant not in VARIANT:
    raise ValueError(f"unknown variant {args.variant!r}; known: {', '.join(VARIANT)}")
  sizes = VARIANT[args.variant]
  c = common.base(total_steps=sizes["total_steps"] if args.task == "lesions" else sizes["staging_steps"],
                  batch_size=sizes["batch_size"] if args.task == "lesions" else sizes["staging_batch"],
                  lr=sizes["lr"], warmup_steps=sizes["warmup_steps"])
  c.optim.update(min_lr_ratio=0.01, layer_decay=0.75)   # layer_decay: protocol=finetune only
  c.checkpoint.update(every_steps=200, keep=2, async_save=False)
  c.variant = args.variant
  c.task = args.task                                   # lesions | staging
  c.protocol = args.protocol                           # linear | finetune | scratch
  c.label_fraction = args.fraction                     # of the training patients (seeded, nested subsets)
  c.label_patients = args.patients                     # or a count of training patients (0 = use fraction)
  c.init_from = ""                                     # pretraining workdir ('' = random init)
  # Training slabs: a share holds a lesion voxel, a share a non-lesion voxel of SUV ≥ hard_negative_suv (hot
  # organs, spill-over: where whole-volume false positives arise), the rest lie anywhere. Without the hard
  # negatives a whole-body evaluation drowns in false positives (demo cohort, 250-500 steps: FPV 40-50 mL,
  # Dice < 0.1; with them Dice 0.29, FPV 7 mL after 300 steps). Both kinds are drawn per connected region, so
  # a salivary gland (0.7 % of the hot voxels) is drawn as often as the liver (28 %): FPV 5.4 → 2.8 mL.
  c.foreground_fraction = 0.4
  c.hard_negative_fraction = 0.3
  c.hard_negative_suv = 2.5

  c.data = pipelines.default_slab_config()
  c.data.view = args.view
  c.data.plane_size = sizes["plane_size"]
  c.data.depth = sizes["depth"]

  c.model = fratmae.default_config(args.variant, args.method)
  # prior: lesion probability of the untrained head (final bias = logit(prior), RetinaNet-style); 0.5 = zero
  # bias. From 0.5, short CPU runs label large background regions as lesion (Adam moves the bias ~lr/step).
  # norm: of the UNETR conv blocks. `layer` (LayerNorm over a pixel's channels) rescales every pixel's feature
  # vector to unit variance, so a pixel of SUV 4 and one of SUV 8 with the same neighbourhood pattern look
  # alike; `instance` (each channel over the slab) keeps that contrast (demo cohort, 800 steps: Dice 0.40 →
  # 0.45). features 16 (tiny; was 8): the full-resolution level has 16 channels for the 4 slices of a slab:
  # Dice 0.45 → 0.59, FPV 2.7 → 1.2 mL, at ≈ 1.6× the CPU per step.
  c.head = ml_collections.ConfigDict(dict(kind=args.head, features=sizes["features"], prior=0.01,
                                          layers=ml_collections.config_dict.placeholder(tuple),
                                          norm="instance"))
  # Staging reads one native-resolution slab per lesion (at most max_slabs, the largest) plus where it lies in
  # the body, summed over the lesions (Deep Sets: the count of lesions matters for stages I/II). Training uses
  # the true lesions plus up to `distractors` slabs of physiological uptake (what false positives look like);
  # evaluation the lesions of the lesion fine-tune `lesions_from` ('' = the true lesion map: staging with
  # perfect lesion detection).
  c.staging = ml_collections.ConfigDict(dict(classes="ann_arbor", aggregation="sum", hidden=64,
                                             max_slabs=sizes["max_slabs"], lesions_from="", distractors=0))

  # Lesions: the probability threshold is chosen after training on `threshold_from` (a held-out split; ''
  # keeps `threshold`): the tiny model's probabilities are soft at lesion borders, so 0.5 under-segments
  # (demo cohort, 800 steps, test split: Dice 0.58 at 0.5, 0.61-0.62 at 0.35-0.4; the 2 val studies chose 0.25:
  # 0.595; at 1400 steps they chose 0.40-0.45 over 3 seeds). `overlap` of the sliding windows along every axis:
  # 0.5 averages 8 windows per voxel (a 1600-step model: test Dice 0.69 against 0.60 at 0.25 and 0.47 at 0).
  c.eval = ml_collections.ConfigDict(dict(split="test", overlap=0.5, threshold=0.5, threshold_from="val",
                                          batch_size=8, max_studies=0))          # max_studies 0 = all
  return c
