"""Latency of SAM-Med3D vit_b_ori (random weights) on this machine, through the public API users call:
`Segmenter.embed_prepared` on one 128³ crop, and `Segmenter.predict` (one prompt-encode + decode step, points
padded to the capacity 1 or 8) with 1 click (zero mask prompt, the first click) and with 5 clicks plus the
previous logits as mask prompt. Prints a table
(median and min wall-clock time, and the median process CPU time, which other programs on the machine disturb
less; up to 2 × wall time when both cores work) and writes JSON.

  PYTHONPATH=. python benchmarks/seganypet.py [--runs 7] [--dtype float32] [--out benchmarks/seganypet.json]

Reference (official PyTorch code on the same 2-core CPU, from the issue): encoder ≈ 11.8 s, ≈ 21 ms per click.
"""

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from petfm.models import sam3d
from petfm.seganypet import Segmenter, promptable


def _times_ms(fn, runs: int) -> tuple[list[float], list[float]]:
  """Wall-clock and process CPU time (all threads) per call, in ms, after one compile/warm-up call."""
  jax.block_until_ready(fn())
  wall, cpu = [], []
  for _ in range(runs):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    wall.append((time.perf_counter() - start) * 1e3)
    cpu.append((time.process_time() - start_cpu) * 1e3)
  return wall, cpu


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--runs", type=int, default=7)
  parser.add_argument("--dtype", default="float32", choices=list(sam3d.DTYPES))
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "seganypet.json"))
  args = parser.parse_args()
  config = sam3d.get_config("vit_b_ori", dtype=args.dtype)
  variables = jax.jit(lambda rng: sam3d.init_variables(config, rng))(jax.random.key(0))
  seg = Segmenter(promptable.ModelSpec("sam3d", config), variables)
  rng = np.random.default_rng(0)
  crop = rng.standard_normal((128, 128, 128)).astype(np.float32)
  embedding = seg.embed_prepared(crop)
  points = rng.integers(0, 128, (5, 3)).astype(np.float32)
  labels = np.array([1, 0, 1, 1, 0], np.int32)
  prev, _ = seg.predict(embedding, points[:1], labels[:1])
  cases = {
      "encoder (128³ crop)": lambda: seg.embed_prepared(crop),
      "predict, 1 click": lambda: seg.predict(embedding, points[:1], labels[:1]),
      "predict, 5 clicks + mask": lambda: seg.predict(embedding, points, labels, prev),
  }
  results = {}
  print(f"SAM-Med3D vit_b_ori, {args.dtype}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"median of {args.runs}")
  print(f"{'case':34s} {'median ms':>10s} {'min ms':>8s} {'CPU ms':>8s}")
  for name, fn in cases.items():
    wall, cpu = _times_ms(fn, args.runs)
    results[name] = {"median_ms": float(np.median(wall)), "min_ms": min(wall),
                     "median_cpu_ms": float(np.median(cpu)), "runs_ms": wall}
    print(f"{name:34s} {np.median(wall):10.1f} {min(wall):8.1f} {np.median(cpu):8.1f}")
  with open(args.out + ".tmp", "w") as f:
    json.dump({"dtype": args.dtype, "platform": jax.devices()[0].platform, "machine": platform.processor(),
               "cpus": os.cpu_count(), "results": results}, f, indent=1)
  os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
  main()
