"""The promptable model as training, click evaluation and the segment CLI see it: spec, inputs, loading.

A `ModelSpec` says which backbone (`sam3d`: SAM-Med3D, PET only; `fratmae_twin`: `TwinSam3D`, PET + CT),
its sizes, and how a crop is made: voxel spacing (mm, canonical RAS+ axes), channels and intensities. Images
arrive normalised as `pipelines.normalize` does (the data config's `ct_clip`, `suv_clip`, `suv_scale`); with
`pet_norm="znorm"` the PET channel is then z-normalised over its voxels with SUV > 0 (mean and Bessel std),
which for a linear SUV scale is exactly SAM-Med3D's official `ZNormalization(x > 0)` (up to the SUV clip).

`ClickModel.load(DIR)` reads a `petfm train-seganypet` workdir (`model.json` + the latest checkpoint of
`checkpoints/`) or a `petfm convert-sam-med3d` directory (`config.json` + `variables/`; spec: official
1.5 mm, PET only, z-normalised).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from petfm import rundir
from petfm.data import pipelines, records
from petfm.errors import UserError
from petfm.models import sam3d, sam3d_twin
from petfm.seganypet import convert, preprocess, segmenter

BACKBONES = ("sam3d", "fratmae_twin")
PET_NORMS = ("znorm", "none")
# Official checkpoints see SUV z-normalised: a linear SUV scale with a clip far above any real SUV.
OFFICIAL_INTENSITIES = dict(ct_clip=(-1000.0, 1000.0), suv_clip=1000.0, suv_scale="linear")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  backbone: str
  sam: sam3d.Sam3DConfig
  encoder: tuple[tuple[str, int], ...] = ()          # twin encoder sizes (width, depth, num_heads, mlp_dim)
  spacing: tuple[float, float, float] = (preprocess.SPACING,) * 3
  channels: tuple[str, ...] = ("pet",)
  pet_norm: str = "znorm"
  ct_clip: tuple[float, float] = OFFICIAL_INTENSITIES["ct_clip"]
  suv_clip: float = OFFICIAL_INTENSITIES["suv_clip"]
  suv_scale: str = OFFICIAL_INTENSITIES["suv_scale"]

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)

  @classmethod
  def from_json(cls, text: str, source: str) -> ModelSpec:
    try:
      fields = json.loads(text)
      sam = dict(fields.pop("sam"))
      sam["global_attn_indexes"] = tuple(sam["global_attn_indexes"])
      fields["encoder"] = tuple(tuple(p) for p in fields["encoder"])
      for key in ("spacing", "channels", "ct_clip"):
        fields[key] = tuple(fields[key])
      spec = cls(sam=sam3d.Sam3DConfig(**sam), **fields)
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f"{source}: not a valid model spec ({e})") from None
    sam3d.check_config(spec.sam)
    return spec

  @property
  def intensities(self) -> ml_collections.ConfigDict:
    """The fields `pipelines.normalize` reads."""
    return ml_collections.ConfigDict(dict(ct_clip=self.ct_clip, suv_clip=self.suv_clip,
                                          suv_scale=self.suv_scale))


def build_model(spec: ModelSpec) -> sam3d.Sam3D:
  if spec.backbone == "sam3d":
    return sam3d.Sam3D(spec.sam)
  if spec.backbone == "fratmae_twin":
    return sam3d_twin.TwinSam3D(spec.sam, encoder=spec.encoder)
  raise UserError(f"backbone: {spec.backbone!r} is not one of {list(BACKBONES)}")


def init_variables(spec: ModelSpec, rng: jax.Array) -> dict[str, Any]:
  """Random boxed {'params', 'buffers'} of the spec's model."""
  if spec.backbone == "sam3d":
    return sam3d.init_variables(spec.sam, rng)
  return sam3d_twin.init_variables(build_model(spec), rng)


def model_input(image: jax.Array, spec: ModelSpec) -> jax.Array:
  """(B, S, S, S, C) pipeline-normalised crops → what `embed` reads: (B, S, S, S) PET for `sam3d`,
  (B, S, S, S, 2) for the twin; PET z-normalised over SUV > 0 when `pet_norm="znorm"` (see module doc)."""
  pet = image[..., 0]
  if spec.pet_norm == "znorm":
    inside = pet > -1.0 + 1e-6                       # SUV > 0 (normalize maps SUV 0 and padding to -1)
    axes = (1, 2, 3)
    n = jnp.maximum(inside.sum(axes, keepdims=True), 2)
    mean = jnp.where(inside, pet, 0).sum(axes, keepdims=True) / n
    var = jnp.where(inside, (pet - mean) ** 2, 0).sum(axes, keepdims=True) / (n - 1)
    pet = (pet - mean) / jnp.sqrt(jnp.maximum(var, 1e-12))
  if spec.backbone == "sam3d":
    return pet
  return jnp.concatenate([pet[..., None], image[..., 1:2]], axis=-1)


def embed(model: sam3d.Sam3D, variables: Any, image: jax.Array, spec: ModelSpec) -> jax.Array:
  """(B, S, S, S, C) pipeline-normalised crops → (B, g, g, g, C') image embeddings."""
  return model.apply(variables, model_input(image, spec), method="embed")


# Jitted with the model (a hashable flax module) and spec static: models of equal spec share compilations.
_embed = jax.jit(embed, static_argnums=(0, 3))
_prompt_and_decode = jax.jit(segmenter.prompt_and_decode, static_argnums=0)


class ClickModel:
  """A promptable model with its variables and jitted embed / prompt+decode (see module doc); instances of
  equal spec share the compiled steps."""

  def __init__(self, spec: ModelSpec, variables: Any):
    self.spec, self.variables = spec, variables
    self.model = build_model(spec)
    self._prompt_variables, self._image_pe = segmenter.decode_inputs(self.model, variables)

  @classmethod
  def load(cls, directory: str) -> ClickModel:
    if not os.path.isdir(directory):
      raise UserError(f"--checkpoint {directory}: no such directory")
    if os.path.isfile(os.path.join(directory, "model.json")):
      return cls(*load_trained(directory))
    if (os.path.isfile(os.path.join(directory, "config.json"))
        and os.path.isdir(os.path.join(directory, "variables"))):
      config, variables = convert.load(directory)
      return cls(ModelSpec("sam3d", config), variables)
    raise UserError(f"--checkpoint {directory}: neither a `petfm train-seganypet` workdir (model.json) nor a "
                    "`petfm convert-sam-med3d` directory (config.json + variables/)")

  @property
  def size(self) -> int:
    return self.spec.sam.img_size

  def embed(self, image: np.ndarray) -> jax.Array:
    """(S, S, S, C) pipeline-normalised crop → (g, g, g, C') embedding."""
    return _embed(self.model, self.variables, jnp.asarray(image, jnp.float32)[None], self.spec)[0]

  def predict(self, embedding: jax.Array, points: Sequence[Sequence[int]], labels: Sequence[int],
              mask_input: jax.Array | None = None) -> jax.Array:
    """embedding (g, g, g, C'), points (N, 3) crop voxels, labels (N,), mask_input (m, m, m) previous
    low-res logits or None (zeros) → low-res logits (m, m, m). Compiles once per `segmenter.capacity`."""
    m = self.spec.sam.mask_size
    mask = jnp.zeros((m, m, m)) if mask_input is None else mask_input
    points, labels = segmenter.pad_points(np.asarray(points, np.float32)[None],
                                          np.asarray(labels, np.int32)[None])
    logits, _ = _prompt_and_decode(self.model, self._prompt_variables, embedding[None], jnp.asarray(points),
                                   jnp.asarray(labels), mask[None], self._image_pe)
    return logits[0]

  def upsample(self, logits: jax.Array) -> np.ndarray:
    """Low-res logits (m, m, m) → (S, S, S) float32 logits on the crop."""
    return np.asarray(sam3d.upsample_logits(logits[None], self.size)[0])

  def session(self, image: np.ndarray) -> Callable[[Sequence, Sequence], np.ndarray]:
    """(S, S, S, C) crop → function of all clicks so far (points (N, 3), labels (N,)) → mask (S, S, S) bool
    (sigmoid > 0.5); the embedding is computed once and the previous low-res logits are the mask prompt."""
    embedding, low = self.embed(image), None

    def click(points: Sequence, labels: Sequence) -> np.ndarray:
      nonlocal low
      low = self.predict(embedding, points, labels, low)
      return self.upsample(low) > 0
    return click


def load_trained(workdir: str) -> tuple[ModelSpec, Any]:
  """(spec, {'params', 'buffers'}) of the latest checkpoint of a `petfm train-seganypet` workdir."""
  with open(os.path.join(workdir, "model.json")) as f:
    spec = ModelSpec.from_json(f.read(), os.path.join(workdir, "model.json"))
  abstract = nn.unbox(jax.eval_shape(lambda r: init_variables(spec, r), jax.random.key(0)))
  state = rundir.restore_latest(workdir, "--checkpoint")
  variables = {"params": state["params"], "buffers": state["buffers"]}
  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
  if shapes(abstract) != shapes(variables):
    raise UserError(f"{workdir}: the checkpoint does not match model.json")
  return spec, variables


def spec_spacing(data_dir: str, zoom: float) -> tuple[float, float, float]:
  """Crop voxel size (mm) of the crop pipeline over `data_dir` at `zoom`."""
  spacing = records.read_manifest(data_dir).get("spacing")
  if spacing is None:
    raise UserError(f"{data_dir}: manifest.json has no spacing")
  return tuple(float(s) * zoom for s in spacing)


def data_config_for(spec: ModelSpec, data_dir: str) -> Any:
  """A crop-pipeline config (eval) that cuts crops of this model from the records in `data_dir`: crop size,
  channels, intensities; the zoom maps the records' spacing onto the model's (must be one factor)."""
  stored = np.asarray(records.read_manifest(data_dir)["spacing"], np.float64)
  zooms = np.asarray(spec.spacing) / stored
  if not np.allclose(zooms, zooms[0], rtol=1e-3):
    raise UserError(f"{data_dir}: records spacing {tuple(stored)} cannot be zoomed to the model's "
                    f"{spec.spacing} with one factor")
  cfg = pipelines.default_crop_config()
  cfg.crop_size = (spec.sam.img_size,) * 3
  cfg.zoom = float(zooms[0])
  cfg.channels = spec.channels
  cfg.ct_clip, cfg.suv_clip, cfg.suv_scale = spec.ct_clip, spec.suv_clip, spec.suv_scale
  return cfg
