"""Wall time of `petfm synthetic --n N --workers W` (fresh output folder each run); prints runs and median.

  PYTHONPATH=. python benchmarks/synthetic_cohort.py [N] [WORKERS] [RUNS]
"""

import statistics
import subprocess
import sys
import tempfile
import time


def main(n: int = 40, workers: int = 2, runs: int = 3) -> None:
  times = []
  for run in range(runs):
    with tempfile.TemporaryDirectory() as out:
      start = time.perf_counter()
      command = [sys.executable, "-m", "data_prep.synthetic", "--out", out, "--n", str(n), "--seed", str(run),
                 "--workers", str(workers)]
      subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
      times.append(time.perf_counter() - start)
      print(f"run {run}: {n} studies with {workers} workers in {times[-1]:.1f} s", flush=True)
  median = statistics.median(times)
  print(f"median of {runs}: {median:.1f} s ({median / n:.2f} s per study)")


if __name__ == "__main__":
  main(*map(int, sys.argv[1:]))
