"""Promptable PET/CT segmentation on FratMAE-style twin encoders (beyond the papers).

`TwinSam3D` is `Sam3D` with the image encoder replaced: two `vit.ViT` encoders with true 3-D patches
(patch_size³ voxels, one channel each), one over the PET crop and one over the CT crop, as FratMAE's twin
encoders; their final tokens are concatenated per grid cell and projected (Dense + LayerNorm) to the prompt
width, giving the same (B, g, g, g, C) image embedding the SAM-Med3D prompt encoder and mask decoder read.
`encode_prompts` and `decode` are inherited unchanged, so training, click evaluation and the segment CLI
treat both backbones alike; only `embed` takes (B, S, S, S, 2) (PET, CT) instead of (B, S, S, S).

`encoders_from_pretraining` turns a FratMAE pretraining run's 2.5-D encoders (2-D patch ph × pw over D
slices of a view) into 3-D ones: the patch kernel's slice axis becomes the third patch axis (repeated and
scaled by D / patch when patch is a multiple of D, so a volume constant along it gives the same tokens), its
axes are mapped from the view (H, W, D) to the crop's canonical (X, Y, Z) with `pipelines.from_view`, and the
transformer blocks are copied. The fixed sin-cos position embedding is recomputed for the 3-D grid.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from petfm.data import pipelines
from petfm.errors import UserError
from petfm.models import sam3d, vit


class TwinSam3D(sam3d.Sam3D):
  """Sam3D whose image embedding comes from twin PET/CT ViT encoders (sizes `encoder`: width, depth,
  num_heads, mlp_dim); `config.img_size` / `config.patch_size` give the crop and the 3-D patch."""
  encoder: tuple[tuple[str, int], ...] = (("width", 64), ("depth", 4), ("num_heads", 4), ("mlp_dim", 256))

  def setup(self):
    c, sizes = self.config, dict(self.encoder)
    dtype = sam3d.DTYPES[c.dtype]
    make = lambda name: vit.ViT(sizes["width"], sizes["depth"], sizes["num_heads"], sizes["mlp_dim"],
                                (c.patch_size,) * 3, dtype=dtype, name=name)
    self.pet_encoder, self.ct_encoder = make("pet_encoder"), make("ct_encoder")
    self.fuse = vit.dense(c.prompt_dim, ("mlp", "embed"), dtype, jnp.float32, "fuse")
    self.fuse_norm = vit.layer_norm("fuse_norm")
    self.prompt_encoder = sam3d.PromptEncoder3D(c)
    self.mask_decoder = sam3d.MaskDecoder3D(c)

  def embed(self, images: jax.Array) -> jax.Array:
    """(B, S, S, S, 2) PET, CT crops → (B, g, g, g, C) image embeddings (float32)."""
    c = self.config
    if images.ndim != 5 or images.shape[1:] != (c.img_size,) * 3 + (2,):
      raise UserError(f"crop: shape {images.shape[1:]}, expected {(c.img_size,) * 3 + (2,)} (PET, CT)")
    tokens = jnp.concatenate([self.pet_encoder(images[..., :1])["tokens"],
                              self.ct_encoder(images[..., 1:])["tokens"]], axis=-1)
    out = self.fuse_norm(self.fuse(tokens))
    g = c.grid
    return out.reshape(images.shape[0], g, g, g, c.prompt_dim).astype(jnp.float32)

  def __call__(self, images, points, labels, mask_logits):
    return self.decode(self.embed(images), *self.encode_prompts(points, labels, mask_logits))


def init_variables(model: TwinSam3D, rng: jax.Array) -> dict[str, Any]:
  """Random boxed `{'params', 'buffers'}` of a twin model."""
  c = model.config
  s, m = c.img_size, c.mask_size
  return model.init(rng, jnp.zeros((1, s, s, s, 2)), jnp.zeros((1, 1, 3)), jnp.ones((1, 1), jnp.int32),
                    jnp.zeros((1, m, m, m)))


def encoders_from_pretraining(encoders: dict[str, Any], view: str, patch_size: int) -> dict[str, Any]:
  """FratMAE `pet_encoder` / `ct_encoder` params (2-D patch over D slices, see module doc) → params of the
  3-D encoders of `TwinSam3D` (numpy)."""
  out = {}
  for name in ("pet_encoder", "ct_encoder"):
    if name not in encoders:
      raise UserError(f"--config.init_from: the pretraining run has no {name} (use a fratmae/fratmae_noca "
                      "run)")
    tree = jax.tree.map(np.asarray, encoders[name])
    kernel = tree["patch_embed"]["proj"]["kernel"]                      # (ph, pw, D, width)
    ph, pw, depth, width = kernel.shape
    if ph != patch_size or pw != patch_size or patch_size % depth:
      raise UserError(f"--config.init_from: pretrained patch {ph}×{pw} over {depth} slices does not fit the "
                      f"3-D patch {patch_size}³ (needs equal sides and a slice count dividing it)")
    cube = np.repeat(kernel, patch_size // depth, axis=2) * (depth / patch_size)
    tree["patch_embed"]["proj"]["kernel"] = np.ascontiguousarray(
        pipelines.from_view(cube, view)[:, :, :, None])
    out[name] = tree
  return out
