"""Golden files for petfm.models.timm_weights: a tiny timm VisionTransformer and one forward pass.

Run once in a venv with timm (never in CI):
  python -m venv /work/venv-timm && /work/venv-timm/bin/pip install torch==2.14.1 torchvision==0.29.1 timm
  /work/venv-timm/bin/python tests/golden/make_timm_vit.py
Writes to tests/golden/:
  timm_vit_tiny.pth      `torch.save` of the bare state dict (img 32, patch 8, width 48, depth 2, 4 heads,
                         CLS, learned posemb); every param is perturbed away from timm's init so that biases,
                         norms and the CLS slot all matter;
  timm_vit_tiny_mae.pth  the same weights in the official-MAE layout `{'model': state dict}` plus
                         `mask_token` and `decoder_*` entries (which a loader must ignore);
  timm_vit_tiny_io.npz   `image` (2, 32, 32, 3) NHWC float32 and `features` = forward_features (2, 17, 48).
"""

import pathlib

import numpy as np
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

OUT = pathlib.Path(__file__).parent


def main() -> None:
  torch.manual_seed(0)
  model = VisionTransformer(img_size=32, patch_size=8, in_chans=3, num_classes=0, embed_dim=48, depth=2,
                            num_heads=4, mlp_ratio=4.0, qkv_bias=True, class_token=True, global_pool="token")
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.eval()
  state = {k: v.detach().clone() for k, v in model.state_dict().items()}
  torch.save(state, OUT / "timm_vit_tiny.pth")
  mae_state = dict(state, mask_token=torch.randn(1, 1, 32), **{
      "decoder_embed.weight": torch.randn(32, 48), "decoder_embed.bias": torch.randn(32),
      "decoder_pos_embed": torch.randn(1, 17, 32), "decoder_norm.weight": torch.randn(32)})
  torch.save({"model": mae_state, "epoch": 1}, OUT / "timm_vit_tiny_mae.pth")
  image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    features = model.forward_features(image)
  np.savez(OUT / "timm_vit_tiny_io.npz", image=image.permute(0, 2, 3, 1).numpy(), features=features.numpy())
  print(f"wrote {OUT}: features {tuple(features.shape)}; timm {timm.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
  main()
