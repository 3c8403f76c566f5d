"""What every experiment config shares (big_vision's `configs/common.py`): one superset of the run fields.

`base(...)` holds the fields every trainer reads: seed, data, steps and batch, distributed set-up, compute
dtype, device mesh and sharding rules, checkpointing, logging and the optimizer. An experiment file
(`fratmae.py`, `finetune.py`, `seganypet.py`) starts from it, overrides values and adds its own sections;
`petfm.config.check_run` validates these shared fields once for every trainer.

Sharding rules: one list for every model, logical axis name → mesh axis (None = replicated). Params are
sharded over `fsdp` (embed) and `tensor` (mlp, heads); activations over `data` and `fsdp` (batch). Every
logical name any model uses is listed (`tests/test_architecture.py` checks it), since a name missing from
the rules would silently stay unsharded.
"""

import ml_collections

from petfm.config import cluster_config

# Device mesh (data, fsdp, tensor); one size may be -1 = all remaining devices.
MESH = (("data", -1), ("fsdp", 1), ("tensor", 1))
SHARDING_RULES = (
    ("act_batch", ("data", "fsdp")), ("act_len", None), ("act_embed", None), ("act_mlp", "tensor"),
    ("act_heads", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv", None),
    ("patch", None), ("norm", None), ("classes", None), ("vocab", None), ("conv_in", None),
    ("conv_out", None),
)


def base(*, total_steps: int, batch_size: int, lr: float, warmup_steps: int) -> ml_collections.ConfigDict:
  """The shared fields with their defaults; steps, global batch and learning-rate schedule are per
  experiment."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data_dir = "demo_out/records"
  c.total_steps = total_steps
  c.batch_size = batch_size                          # global, over all processes and devices
  c.distributed = False                              # jax.distributed.initialize() for multi-host runs
  c.cluster = cluster_config()                       # peers of a distributed run (else JAX_* env vars)
  c.dtype = "float32"                                # compute dtype: float32 or bfloat16 (params float32)
  c.mesh = MESH
  c.sharding_rules = list(SHARDING_RULES)
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=100, keep=3, async_save=True))
  c.log_every_steps = 10
  # AdamW with linear warm-up and cosine decay to lr·min_lr_ratio; accum_steps micro-batches per step.
  c.optim = ml_collections.ConfigDict(dict(
      lr=lr, warmup_steps=warmup_steps, min_lr_ratio=0.0, weight_decay=0.05, b1=0.9, b2=0.999,
      grad_clip=1.0, accum_steps=1))
  return c
