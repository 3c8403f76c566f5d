"""Makes the SAM-Med3D golden files for tests/test_sam3d.py with the official PyTorch code (run once, needs
torch).

  /work/venv-torch/bin/python tests/golden/make_sam_med3d.py SAM_MED3D_CHECKOUT [OUT_DIR]

SAM_MED3D_CHECKOUT is a checkout of github.com/uni-medical/SAM-Med3D (read at f3de1fa); its three model files
(`segment_anything/modeling/{image_encoder3D,prompt_encoder3D,mask_decoder3D}.py`) are imported from there,
never copied. The model is `vit_b_ori`'s architecture (same classes and code paths: windowed blocks with
zero-padding, global blocks, decomposed rel-pos, neck, prompt encoder, two-way decoder) at reduced sizes: crop
32³, patch 8 (4³ tokens), width 48, 3 blocks (block 1 global), window 6 (pads 4³ → 6³), prompt dim 48, decoder
MLP 64. All weights, including the zero-initialised rel-pos tables and pos_embed, are drawn at random.

Writes sam_med3d_small.pth: a training-style checkpoint {'epoch', 'model_state_dict' (with the DDP `module.`
prefix), 'args' (argparse.Namespace), 'used_datas' (collections.Counter)}, and sam_med3d_small_io.npz: crop,
image embedding (channel-first, as torch), and for two clicks the low-res logits and IoU prediction (mask 0):
click 1 = one positive point with a zero mask prompt (the official loops), click 2 = that point plus a
negative one with click 1's logits as the mask prompt.
"""

import argparse
import collections
import importlib.util
import os
import sys

import numpy as np
import torch

CONFIG = dict(img_size=32, patch_size=8, width=48, depth=3, num_heads=4, mlp_ratio=2, global_attn_indexes=[1],
              window_size=6, prompt_dim=48, mask_in_chans=8, decoder_mlp_dim=64, iou_hidden=32)
POINTS_1 = [[[3, 20, 11]]]
LABELS_1 = [[1]]
POINTS_2 = [[[3, 20, 11], [27, 5, 16]]]
LABELS_2 = [[1, 0]]


def _module(checkout: str, name: str):
  path = os.path.join(checkout, "segment_anything", "modeling", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"sam_med3d_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("checkout")
  parser.add_argument("out_dir", nargs="?", default=os.path.dirname(os.path.abspath(__file__)))
  args = parser.parse_args()
  names = ("image_encoder3D", "prompt_encoder3D", "mask_decoder3D")
  enc, prm, dec = (_module(args.checkout, n) for n in names)
  c = CONFIG
  torch.manual_seed(0)
  grid = c["img_size"] // c["patch_size"]
  image_encoder = enc.ImageEncoderViT3D(
      img_size=c["img_size"], patch_size=c["patch_size"], embed_dim=c["width"], depth=c["depth"],
      num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"], out_chans=c["prompt_dim"], qkv_bias=True,
      norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6), use_rel_pos=True,
      global_attn_indexes=c["global_attn_indexes"], window_size=c["window_size"])
  prompt_encoder = prm.PromptEncoder3D(embed_dim=c["prompt_dim"], image_embedding_size=(grid,) * 3,
                                       input_image_size=(c["img_size"],) * 3,
                                       mask_in_chans=c["mask_in_chans"])
  mask_decoder = dec.MaskDecoder3D(transformer_dim=c["prompt_dim"], num_multimask_outputs=3, iou_head_depth=3,
                                   iou_head_hidden_dim=c["iou_hidden"])
  # MaskDecoder3D hard-codes a 2-layer, 8-head transformer with MLP 2048; same class, smaller MLP.
  mask_decoder.transformer = dec.TwoWayTransformer3D(depth=2, embedding_dim=c["prompt_dim"], num_heads=8,
                                                     mlp_dim=c["decoder_mlp_dim"])
  model = torch.nn.ModuleDict(dict(image_encoder=image_encoder, prompt_encoder=prompt_encoder,
                                   mask_decoder=mask_decoder)).eval()
  with torch.no_grad():
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
      if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif "rel_pos" in name:
        p.copy_(0.5 * torch.randn_like(p))
      elif "gaussian_matrix" in name:
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / max(1.0, np.sqrt(p[0].numel() if p.ndim > 1 else 1)))
    crop = torch.randn(1, 1, *(c["img_size"],) * 3)
    embedding = image_encoder(crop)
    pe = prompt_encoder.get_dense_pe()
    mask = torch.zeros(1, 1, *(4 * grid,) * 3)
    out = {"crop": crop[0, 0].numpy(), "embedding": embedding.numpy()}
    for click, (points, labels) in enumerate([(POINTS_1, LABELS_1), (POINTS_2, LABELS_2)], 1):
      sparse, dense = prompt_encoder(points=[torch.tensor(points, dtype=torch.float32), torch.tensor(labels)],
                                     boxes=None, masks=mask)
      mask, iou = mask_decoder(image_embeddings=embedding, image_pe=pe, sparse_prompt_embeddings=sparse,
                               dense_prompt_embeddings=dense, multimask_output=False)
      out[f"low_res_{click}"], out[f"iou_{click}"] = mask[0, 0].numpy(), iou[0, 0].numpy()
  state = collections.OrderedDict((f"module.{k}", v) for k, v in model.state_dict().items())
  checkpoint = {"epoch": 3, "model_state_dict": state,
                "args": argparse.Namespace(model_type="vit_b_ori", lr=8e-4, multi_click=False),
                "used_datas": collections.Counter({"ct_liver": 2, "pet_lesion": 1})}
  torch.save(checkpoint, os.path.join(args.out_dir, "sam_med3d_small.pth"))
  np.savez(os.path.join(args.out_dir, "sam_med3d_small_io.npz"), **out)
  print(f"{len(state)} tensors; wrote {args.out_dir}", file=sys.stderr)


if __name__ == "__main__":
  main()
