r"""SegAnyPET click-simulation training (SAM-Med3D architecture, or the FratMAE twin-encoder variant).

COMMAND (tiny model on the synthetic cohort, CPU):
  petfm train-seganypet --config experiments/seganypet.py:tiny --workdir runs/seganypet_tiny \
      --config.data_dir=demo_out/records

ARG is a variant optionally followed by comma-separated settings:
  variant   tiny | vit_b_ori                      (tiny: 32³ crops at 4 mm, tiny Sam3D reading PET and CT
                                                   (soft-tissue CT window) with 8³ patches and the
                                                   crop-resolution path (`fine_width`, petfm/models/sam3d.py),
                                                   half the crops around lesions; vit_b_ori: the official
                                                   128³ PET-only model)
  backbone  sam3d | fratmae_twin                  (default sam3d; fratmae_twin: PET + CT twin ViTs, no fine
                                                   path)
  cpcl      False | True                          (cross-prompting confident learning, see
                                                   petfm/train/seganypet.py)
e.g. `tiny`, `tiny,backbone=fratmae_twin`, `vit_b_ori,cpcl=True`. `--config.init_from=DIR` starts from a
`petfm convert-sam-med3d` directory (sam3d) or a `petfm pretrain` workdir (fratmae_twin encoders).
"""

import dataclasses

import ml_collections

from experiments import common
from petfm.config import parse_arg
from petfm.data import pipelines
from petfm.models import sam3d
from petfm.seganypet import promptable

VARIANTS = {
    # crop side, Sam3D config name + overrides (sam3d backbone), twin ViT sizes, batch, steps, lr, click
    # rounds, zoom, CT window (HU; sam3d backbone)
    "tiny": dict(crop=32, sam="tiny", sam_overrides=dict(patch_size=8, window_size=0, in_chans=2, fine_width=16),
                 encoder=dict(width=64, depth=2, num_heads=4, mlp_dim=128), batch_size=8, total_steps=1000,
                 lr=2e-3, warmup_steps=20, rounds=3, zoom=1.0, balance_kinds=True, samples_per_read=4,
                 ct_clip=(-200.0, 200.0)),
    "vit_b_ori": dict(crop=128, sam="vit_b_ori", sam_overrides={}, encoder=dict(width=768, depth=12,
                      num_heads=12, mlp_dim=3072), batch_size=12, total_steps=100_000, lr=8e-5,
                      warmup_steps=1_000, rounds=11, zoom=1.0, balance_kinds=False, samples_per_read=2,
                      ct_clip=promptable.OFFICIAL_INTENSITIES["ct_clip"]),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, variant="tiny", backbone="sam3d", cpcl=False)
  if args.variant not in VARIANTS:
    raise ValueError(f"unknown variant {args.variant!r}; known: {', '.join(VARIANTS)}")
  v = VARIANTS[args.variant]
  c = common.base(total_steps=v["total_steps"], batch_size=v["batch_size"], lr=v["lr"],
                  warmup_steps=v["warmup_steps"])
  c.optim.update(min_lr_ratio=0.01, weight_decay=0.1)
  c.variant, c.backbone = args.variant, args.backbone
  c.init_from = ""                                   # convert-sam-med3d dir (sam3d) / pretrain workdir (twin)

  # Every Sam3DConfig field of the named config (img_size = the crop side), overridable one by one.
  # The twin reads PET and CT with its own encoders; the crop-resolution path is Sam3D's.
  overrides = v["sam_overrides"] if args.backbone == "sam3d" else dict(
      v["sam_overrides"], in_chans=1, fine_width=0)
  sizes = dataclasses.asdict(sam3d.get_config(v["sam"], img_size=v["crop"], **overrides))
  sizes.pop("dtype")
  c.model = ml_collections.ConfigDict(dict(sam=v["sam"], **sizes))
  c.model.encoder = ml_collections.ConfigDict(v["encoder"])   # twin ViT sizes (fratmae_twin only)
  # PET input: "znorm" = SAM-Med3D's z-normalisation over SUV > 0 (needs suv_scale="linear"), or "none"
  # (the pipeline's [-1, 1] scaling, as FratMAE pretraining sees it).
  c.pet_norm = "znorm" if args.backbone == "sam3d" else "none"

  c.data = pipelines.default_crop_config()
  c.data.crop_size = (v["crop"],) * 3
  c.data.zoom = v["zoom"]
  c.data.channels = ("pet", "ct")[:sizes["in_chans"]] if args.backbone == "sam3d" else ("pet", "ct")
  c.data.samples_per_read = v["samples_per_read"]     # crops cut from one decoded study
  c.data.balance_kinds = v["balance_kinds"]           # half the crops around lesions (see pipelines)
  if args.backbone == "sam3d":
    c.data.suv_scale = "linear"
    c.data.suv_clip = promptable.OFFICIAL_INTENSITIES["suv_clip"]
    c.data.ct_clip = v["ct_clip"]                     # tiny: a soft-tissue window (organs differ by 10-40 HU)
    c.data.augment.intensity_scale = 0.0             # removed by the z-normalisation anyway
    c.data.augment.intensity_shift = 0.0
  c.data.augment.flips = ("lr", "ap", "si")          # SAM-Med3D flips all three axes

  c.clicks = ml_collections.ConfigDict(dict(rounds=v["rounds"]))   # click rounds per sample (loss summed)
  c.cpcl = ml_collections.ConfigDict(dict(enabled=args.cpcl, start_step=0))
  return c
