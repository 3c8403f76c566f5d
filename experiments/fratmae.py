r"""FratMAE pretraining and its baselines on whole-body PET/CT slabs.

COMMAND (tiny model on the synthetic cohort, CPU, a few minutes):
  petfm pretrain --config experiments/fratmae.py:tiny --workdir runs/fratmae_tiny \
      --config.data_dir=demo_out/records

ARG is a variant optionally followed by comma-separated settings:
  variant  tiny | S | B | L                               (model and input size)
  method   mae | mae_ca | fratmae_noca | fratmae          (default fratmae)
  view     coronal | axial                                (default coronal)
e.g. `tiny`, `tiny,method=mae`, `S,method=fratmae,view=axial`. Every field below can be overridden with
`--config.FIELD=VALUE`; `mask_ratio` and `mask_mode` are top-level shortcuts for the model fields.

The masking-ratio ablation is declared by `sweep()` at the bottom and run with
  petfm sweep --config experiments/fratmae.py:tiny --workdir runs/sweep
"""

import ml_collections

from experiments import common
from petfm.config import parse_arg
from petfm.data import pipelines
from petfm.models import fratmae

# Input geometry per variant: in-plane (H, W) in record voxels (4 mm records: 448 × 224 ≈ 1.8 m × 0.9 m),
# slab depth D, global batch, steps. `tiny` is sized for CPU tests and the demo: the whole coronal plane
# resized into 128 × 64 (≈ 8.5 mm voxels).
VARIANT_DATA = {
    "tiny": dict(plane_size=(128, 64), fit="resize", depth=4, batch_size=16, total_steps=300, warmup_steps=20,
                 lr=1e-3),
    "S": dict(plane_size=(448, 224), fit="crop", depth=8, batch_size=256, total_steps=50_000,
              warmup_steps=2_500, lr=1.5e-4),
    "B": dict(plane_size=(448, 224), fit="crop", depth=8, batch_size=512, total_steps=100_000,
              warmup_steps=5_000, lr=1.5e-4),
    "L": dict(plane_size=(448, 224), fit="crop", depth=8, batch_size=1024, total_steps=100_000,
              warmup_steps=5_000, lr=1.5e-4),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, variant="tiny", method="fratmae", view="coronal")
  sizes = VARIANT_DATA[args.variant] if args.variant in VARIANT_DATA else None
  if sizes is None:
    raise ValueError(f"unknown variant {args.variant!r}; known: {', '.join(VARIANT_DATA)}")
  c = common.base(total_steps=sizes["total_steps"], batch_size=sizes["batch_size"], lr=sizes["lr"],
                  warmup_steps=sizes["warmup_steps"])
  c.optim.b2 = 0.95
  c.variant, c.method, c.view = args.variant, args.method, args.view

  c.data = pipelines.default_slab_config()
  c.data.view = c.get_ref("view")
  c.data.plane_size = sizes["plane_size"]
  c.data.depth = sizes["depth"]
  c.data.fit = sizes["fit"]

  c.model = fratmae.default_config(args.variant, args.method)
  # Masking: top-level shortcuts (the sweep's axes) for the model fields, with the model's defaults.
  c.mask_ratio, c.mask_mode = c.model.mask_ratio, c.model.mask_mode
  c.model.method = c.get_ref("method")
  c.model.mask_ratio = c.get_ref("mask_ratio")
  c.model.mask_mode = c.get_ref("mask_mode")

  c.image_every_steps = 100                          # reconstruction PNG (0 = never)

  # Evaluation used by the sweep table: reconstruction loss on held-out slabs and a tracer linear probe.
  c.eval = ml_collections.ConfigDict(dict(splits=("val", "test"), probe_split="train", batch_size=16,
                                          max_batches=50))
  return c


def sweep(add):
  """The masking-ratio ablation: ratios × mask modes (each `add` is one run's config overrides)."""
  for mode in ("one_visible", "both_masked"):
    for ratio in (0.5, 0.75, 0.9, 0.95):
      add(mask_mode=mode, mask_ratio=ratio)
