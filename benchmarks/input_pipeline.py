"""Input pipeline throughput: samples/s of each grain view (median of several runs).

  PYTHONPATH=. python benchmarks/input_pipeline.py --data_dir DIR [--split train] [--worker_count 0]
  PYTHONPATH=. python benchmarks/input_pipeline.py --make_cohort /tmp/bench_cohort   # phantom cohort first

Each run builds a fresh training iterator, takes one warm-up batch, then times `--batches` batches.
Sizes follow experiments/fratmae.py (variant S: 448 × 224 × 8 slabs) and SegAnyPET crops (128³ at 1.5 mm;
here 64³ to suit CPU runs unless --crop_size says otherwise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from petfm.data import pipelines  # noqa: E402


def views(args) -> dict[str, tuple]:
  """name → (dataset function, config)."""
  out = {}
  for view in ("coronal", "axial"):
    cfg = pipelines.default_slab_config()
    cfg.view = view
    cfg.plane_size = (448, 224) if view == "coronal" else (224, 224)
    out[f"slab {view} {cfg.plane_size[0]}x{cfg.plane_size[1]}x{cfg.depth}"] = (pipelines.slab_dataset, cfg)
  cfg = pipelines.default_crop_config()
  cfg.crop_size = (args.crop_size,) * 3
  cfg.channels = ("pet", "ct")
  out[f"crop {args.crop_size}^3 pet+ct"] = (pipelines.crop_dataset, cfg)
  cfg = pipelines.default_study_config()
  out[f"study {cfg.max_slabs}x{cfg.plane_size[0]}x{cfg.plane_size[1]}x{cfg.depth}"] = (pipelines.study_dataset,
                                                                                      cfg)
  for _, cfg in out.values():
    cfg.worker_count = args.worker_count
    cfg.read_threads = args.read_threads
  return out


def measure(fn, cfg, args) -> float:
  """samples/s over `args.batches` batches after one warm-up batch."""
  it = iter(fn(args.data_dir, args.split, cfg, seed=0, train=True, batch_size=args.batch_size,
               shard_index=0, shard_count=1))
  try:
    next(it)
    start = time.perf_counter()
    for _ in range(args.batches):
      next(it)
    return args.batches * args.batch_size / (time.perf_counter() - start)
  finally:
    if hasattr(it, "close"):
      it.close()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", help="converted records folder (manifest.json)")
  parser.add_argument("--make_cohort", help="convert a phantom cohort into this folder first and use it")
  parser.add_argument("--cohort_shape", default="96,64,224", help="phantom study shape X,Y,Z (2×2×3 mm voxels)")
  parser.add_argument("--cohort_studies", type=int, default=8, help="phantom training studies")
  parser.add_argument("--split", default="train")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--worker_count", type=int, default=0)
  parser.add_argument("--read_threads", type=int, default=2)
  parser.add_argument("--crop_size", type=int, default=64)
  args = parser.parse_args()
  if args.make_cohort:
    from tests.fixtures_records import make_cohort
    shape = tuple(int(s) for s in args.cohort_shape.split(","))
    args.data_dir = make_cohort(args.make_cohort, {"train": args.cohort_studies, "val": 1}, shape=shape)
  if not args.data_dir:
    parser.error("--data_dir or --make_cohort is required")
  print(f"{args.data_dir} split {args.split}: batch {args.batch_size}, {args.batches} batches per run, "
        f"median of {args.runs} runs, worker_count={args.worker_count}, read_threads={args.read_threads}")
  for name, (fn, cfg) in views(args).items():
    rates = [measure(fn, cfg, args) for _ in range(args.runs)]
    print(f"  {name:32s} {statistics.median(rates):8.1f} samples/s  (runs: "
          f"{', '.join(f'{r:.1f}' for r in rates)})", flush=True)


if __name__ == "__main__":
  main()
