"""One process of the multi-process pretraining test (`test_multiprocess.py`), run as a script:

  python tests/multiprocess_worker.py WORKDIR OVERRIDES_JSON READS_STEPS

Loads experiments/fratmae.py:tiny with the overrides, joins the run (config.distributed, peers from the
JAX_* environment variables), writes the study indices this process's training pipeline yields in its first
READS_STEPS steps to WORKDIR/reads_<process>.json, then trains and prints the last metrics as JSON.
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402

from petfm import config as config_lib  # noqa: E402
from petfm.train import common, pretrain  # noqa: E402


def main(workdir: str, overrides: str, reads_steps: str) -> None:
  config = config_lib.load_config(os.path.join(REPO, "experiments", "fratmae.py:tiny"), json.loads(overrides))
  common.initialize_distributed(config)
  batches = pretrain.train_batches(config)
  reads = [[int(i) for i in next(batches)["index"]] for _ in range(int(reads_steps))]
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, f"reads_{jax.process_index()}.json"), "w") as f:
    json.dump(reads, f)
  print(json.dumps(pretrain.train(config, workdir)), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
