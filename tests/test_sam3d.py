"""SAM-Med3D model and checkpoint converter: parity with the official PyTorch code (golden files made by
tests/golden/make_sam_med3d.py), the full-size name/shape table, and bad checkpoints."""

import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN_DIR
from petfm.errors import UserError
from petfm.models import sam3d
from petfm.seganypet import official_weights

SMALL = sam3d.Sam3DConfig(img_size=32, patch_size=8, width=48, depth=3, num_heads=4, mlp_dim=96,
                          global_attn_indexes=(1,), window_size=6, prompt_dim=48, mask_in_chans=8,
                          decoder_mlp_dim=64, iou_hidden=32)
PTH = str(GOLDEN_DIR / "sam_med3d_small.pth")
CLICKS = [(np.array([[[3, 20, 11]]]), np.array([[1]])),
          (np.array([[[3, 20, 11], [27, 5, 16]]]), np.array([[1, 0]]))]


def _rel(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _run_clicks(config, variables, crop):
  model = sam3d.Sam3D(config)
  embedding = model.apply(variables, crop[None], method=model.embed)
  mask = jnp.zeros((1,) + (config.mask_size,) * 3)
  outputs = []
  for points, labels in CLICKS:
    sparse, dense = model.apply(variables, points, labels, mask, method=model.encode_prompts)
    mask, iou = model.apply(variables, embedding, sparse, dense, method=model.decode)
    outputs.append((mask[0], iou[0]))
  return embedding, outputs


@pytest.fixture(scope="module")
def golden():
  variables = official_weights.variables_from_state_dict(official_weights.read_state_dict(PTH), SMALL, PTH)
  return variables, dict(np.load(GOLDEN_DIR / "sam_med3d_small_io.npz"))


def test_matches_official_pytorch(golden):
  variables, io = golden
  embedding, outputs = _run_clicks(SMALL, variables, io["crop"])
  assert _rel(embedding, io["embedding"].transpose(0, 2, 3, 4, 1)) < 1e-4
  for click, (logits, iou) in enumerate(outputs, 1):
    assert _rel(logits, io[f"low_res_{click}"]) < 1e-4
    assert abs(float(iou) - io[f"iou_{click}"]) <= 1e-4 * abs(io[f"iou_{click}"])


def test_bfloat16_compute_stays_close(golden):
  variables, io = golden
  config = sam3d.Sam3DConfig(**{**SMALL.__dict__, "dtype": "bfloat16"})
  embedding, outputs = _run_clicks(config, variables, io["crop"])
  assert embedding.dtype == jnp.float32
  assert _rel(embedding, io["embedding"].transpose(0, 2, 3, 4, 1)) < 0.05
  assert _rel(outputs[1][0], io["low_res_2"]) < 0.1


def test_vit_b_ori_table_and_shapes():
  config = sam3d.get_config("vit_b_ori")
  table = official_weights.mapping_table(config)
  shapes = {e.key: e.torch_shape for e in table}
  assert len(table) == len(shapes) == 324
  assert sum(int(np.prod(s)) for s in shapes.values()) == 100_509_616
  assert sum(k.startswith("image_encoder.") for k in shapes) == 189
  assert sum(k.startswith("prompt_encoder.") for k in shapes) == 15
  expected = {
      "image_encoder.pos_embed": (1, 8, 8, 8, 768),
      "image_encoder.patch_embed.proj.weight": (768, 1, 16, 16, 16),
      "image_encoder.blocks.0.attn.rel_pos_d": (27, 64), "image_encoder.blocks.2.attn.rel_pos_w": (15, 64),
      "image_encoder.blocks.11.attn.qkv.weight": (2304, 768),
      "image_encoder.blocks.4.mlp.lin1.weight": (3072, 768),
      "image_encoder.neck.2.weight": (384, 384, 3, 3, 3), "image_encoder.neck.3.bias": (384,),
      "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (3, 128),
      "prompt_encoder.point_embeddings.1.weight": (1, 384),
      "prompt_encoder.mask_downscaling.3.weight": (16, 4, 2, 2, 2),
      "prompt_encoder.no_mask_embed.weight": (1, 384),
      "mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight": (384, 192),
      "mask_decoder.transformer.norm_final_attn.bias": (384,), "mask_decoder.mask_tokens.weight": (4, 384),
      "mask_decoder.output_upscaling.0.weight": (384, 96, 2, 2, 2),
      "mask_decoder.output_upscaling.3.weight": (96, 48, 2, 2, 2),
      "mask_decoder.output_hypernetworks_mlps.3.layers.2.weight": (48, 384),
      "mask_decoder.iou_prediction_head.layers.2.bias": (4,),
  }
  assert {k: shapes.get(k) for k in expected} == expected
  model = sam3d.Sam3D(config)
  variables = sam3d.abstract_variables(config)
  crop = jax.ShapeDtypeStruct((2, 128, 128, 128), jnp.float32)
  embedding = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.embed), variables, crop)
  assert embedding.shape == (2, 8, 8, 8, 384)
  prompts = lambda v: model.apply(v, jnp.zeros((2, 5, 3)), jnp.ones((2, 5), jnp.int32),
                                  jnp.zeros((2, 32, 32, 32)), method=model.encode_prompts)
  sparse, dense = jax.eval_shape(prompts, variables)
  assert sparse.shape == (2, 6, 384) and dense.shape == (2, 8, 8, 8, 384)
  logits, iou = jax.eval_shape(lambda v, e, s, d: model.apply(v, e, s, d, method=model.decode),
                               variables, embedding, sparse, dense)
  assert logits.shape == (2, 32, 32, 32) and iou.shape == (2,)


def test_fine_path_and_ct_are_off_for_vit_b_ori_and_the_fine_features_pack_losslessly():
  official = sam3d.get_config("vit_b_ori")
  assert (official.in_chans, official.fine_width, official.mask_size) == (1, 0, 32)
  assert set(sam3d.abstract_variables(official)["params"]) == {"image_encoder", "prompt_encoder", "mask_decoder"}
  config = sam3d.get_config("tiny", img_size=16, patch_size=8, window_size=0, in_chans=2, fine_width=4)
  assert config.mask_size == 16 and sam3d.crop_shape(config) == (16, 16, 16, 2)
  rng = np.random.default_rng(0)
  c = config.prompt_dim
  embedding, fine = (rng.standard_normal(s).astype(np.float32) for s in ((2, 2, 2, 2, c), (2, 16, 16, 16, 4)))
  packed = sam3d.pack_fine(embedding, fine, config)
  assert packed.shape == (2, 2, 2, 2, c + 8 ** 3 * 4)
  np.testing.assert_array_equal(packed[..., :c], embedding)
  np.testing.assert_array_equal(packed[0, 1, 0, 1, c:].reshape(8, 8, 8, 4), fine[0, 8:, :8, 8:])   # cell → voxels
  np.testing.assert_array_equal(sam3d.unpack_fine(packed, config), fine)
  with pytest.raises(UserError, match="fine_width"):
    sam3d.get_config("tiny", img_size=24, patch_size=6, fine_width=4)


def test_click_maps_by_hand():
  features = np.zeros((1, 8, 8, 8, 2), np.float32)
  features[0, :4] = 1.0                              # x < 4 looks like the positive click, x ≥ 4 like the negative
  points = np.array([[[1, 1, 1], [6, 6, 6], [0, 0, 0]]])
  maps = np.asarray(sam3d._click_maps(jnp.asarray(features), jnp.asarray(points),
                                      jnp.array([[sam3d.POSITIVE, sam3d.NEGATIVE, sam3d.ABSENT]])))
  assert maps.shape == (1, 8, 8, 8, 2 + 2 * len(sam3d.CLICK_SIGMAS))   # (positive, negative) × (look, near σ)
  np.testing.assert_allclose(maps[0, :4, ..., 0], 1, atol=1e-6)
  np.testing.assert_allclose(maps[0, 4:, ..., 0], np.exp(-1), atol=1e-6)   # mean squared feature difference 1
  np.testing.assert_allclose(maps[0, 4:, ..., 3], 1, atol=1e-6)
  sigma = sam3d.CLICK_SIGMAS[0]
  assert maps[0, 1, 1, 1, 1] == pytest.approx(1) and maps[0, 6, 6, 6, 4] == pytest.approx(1)
  assert maps[0, 1, 1, 3, 1] == pytest.approx(np.exp(-4 / (2 * sigma ** 2)), rel=1e-5)
  assert maps[0, 0, 0, 0, 4] == pytest.approx(np.exp(-108 / (2 * sigma ** 2)), abs=1e-6)   # the ABSENT slot: unseen
  only_positive = sam3d._click_maps(jnp.asarray(features), jnp.asarray(points[:, :1]), jnp.array([[1]]))
  assert not np.asarray(only_positive)[..., 3:].any()                    # no negative click: zero maps


def test_bad_state_dicts_are_listed(golden):
  state = official_weights.read_state_dict(PTH)
  state.pop("image_encoder.blocks.0.attn.rel_pos_h")
  state["mask_decoder.extra.weight"] = np.zeros(3, np.float32)
  state["mask_decoder.iou_token.weight"] = np.zeros((2, 48), np.float32)
  with pytest.raises(UserError) as e:
    official_weights.variables_from_state_dict(state, SMALL, "x.pth")
  message = str(e.value)
  for part in ("1 missing: image_encoder.blocks.0.attn.rel_pos_h", "1 unexpected: mask_decoder.extra.weight",
               "1 wrong shape: mask_decoder.iou_token.weight (2, 48) (expected (1, 48))"):
    assert part in message
  with pytest.raises(UserError, match="wrong shape"):       # the small model is not vit_b_ori
    official_weights.main([PTH, "/nonexistent/out"])


def test_pickle_asking_for_code_is_refused(tmp_path):
  marker = tmp_path / "executed"

  class Payload:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)

  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("evil/data.pkl", pickle.dumps({"model_state_dict": Payload()}, protocol=2))
  with pytest.raises(UserError, match=r"refusing to load: the pickle asks for '(posix|os)\.system'"):
    official_weights.read_state_dict(str(path))
  assert not marker.exists()


def test_save_load_round_trip(golden, tmp_path):
  variables, _ = golden
  official_weights.save(str(tmp_path / "ckpt"), variables, SMALL)
  config, restored = official_weights.load(str(tmp_path / "ckpt"))
  assert config == SMALL
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(UserError, match="already holds a checkpoint"):
    official_weights.save(str(tmp_path / "ckpt"), variables, SMALL)
