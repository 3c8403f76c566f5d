"""The promptable model as training, click evaluation and the segment CLI see it: spec, inputs, loading.

A `ModelSpec` says which backbone (`sam3d`: SAM-Med3D, PET only; `fratmae_twin`: `TwinSam3D`, PET + CT),
its sizes, and how a crop is made: voxel spacing (mm, canonical RAS+ axes), channels and intensities. Images
arrive normalised as `pipelines.normalize` does (the data config's `ct_clip`, `suv_clip`, `suv_scale`); with
`pet_norm="znorm"` the PET channel is then z-normalised over its voxels with SUV > 0 (mean and Bessel std),
which for a linear SUV scale is exactly SAM-Med3D's official `ZNormalization(x > 0)` (up to the SUV clip).

`Segmenter` is the one inference wrapper of both backbones (the `segment` and `eval-clicks` commands, the
notebooks and the Python API use it): `Segmenter.load(DIR)` reads a `petfm train-seganypet` workdir
(`model.json` + the latest checkpoint of `checkpoints/`) or a `petfm convert-sam-med3d` directory
(`config.json` + `variables/`; spec: official 1.5 mm, PET only, z-normalised). The jitted steps are shared by
every `Segmenter` of equal config; `prompt_and_decode` is also the click loop of training.
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
from petfm.models.sam3d import ABSENT, NEGATIVE, POSITIVE
from petfm.seganypet import official_weights, preprocess

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
    if spec.sam.in_chans != 1 or spec.sam.fine_width:
      raise UserError("backbone fratmae_twin: model.in_chans must be 1 and model.fine_width 0 (its twin "
                      "encoders read PET and CT; the fine path is Sam3D's)")
    return sam3d_twin.TwinSam3D(spec.sam, encoder=spec.encoder)
  raise UserError(f"backbone: {spec.backbone!r} is not one of {list(BACKBONES)}")


def init_variables(spec: ModelSpec, rng: jax.Array) -> dict[str, Any]:
  """Random boxed {'params', 'buffers'} of the spec's model."""
  if spec.backbone == "sam3d":
    return sam3d.init_variables(spec.sam, rng)
  return sam3d_twin.init_variables(build_model(spec), rng)


def model_input(image: jax.Array, spec: ModelSpec) -> jax.Array:
  """(B, S, S, S, C) pipeline-normalised crops → what `embed` reads: (B, S, S, S) PET for a one-channel
  `sam3d`, (B, S, S, S, 2) PET and CT for the twin and a two-channel `sam3d` (`in_chans` 2); PET
  z-normalised over SUV > 0 when `pet_norm="znorm"` (see module doc)."""
  pet = image[..., 0]
  if spec.pet_norm == "znorm":
    inside = pet > -1.0 + 1e-6                       # SUV > 0 (normalize maps SUV 0 and padding to -1)
    axes = (1, 2, 3)
    n = jnp.maximum(inside.sum(axes, keepdims=True), 2)
    mean = jnp.where(inside, pet, 0).sum(axes, keepdims=True) / n
    var = jnp.where(inside, (pet - mean) ** 2, 0).sum(axes, keepdims=True) / (n - 1)
    pet = (pet - mean) / jnp.sqrt(jnp.maximum(var, 1e-12))
  if spec.backbone == "sam3d" and spec.sam.in_chans == 1:
    return pet
  return jnp.concatenate([pet[..., None], image[..., 1:2]], axis=-1)


def encode(model: sam3d.Sam3D, variables: Any, crops: jax.Array) -> jax.Array:
  """Model input (`model_input`: (B, S, S, S) or (B, S, S, S, 2)) → (B, g, g, g, C) image embeddings (more
  channels with Sam3D's fine path, `Sam3D.embed`)."""
  return model.apply(variables, crops, method="embed")


def embed(model: sam3d.Sam3D, variables: Any, image: jax.Array, spec: ModelSpec) -> jax.Array:
  """(B, S, S, S, C) pipeline-normalised crops → (B, g, g, g, C') image embeddings."""
  return encode(model, variables, model_input(image, spec))


def prompt_and_decode(model: sam3d.Sam3D, variables: Any, embeddings: jax.Array, points: jax.Array | None,
                      labels: jax.Array | None, mask_logits: jax.Array, image_pe: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  """embeddings (B, g, g, g, C), points (B, N, 3) / labels (B, N) or None, mask_logits (B, m, m, m),
  optional precomputed `Sam3D.dense_pe` (g, g, g, C) → (logits (B, m, m, m), IoU prediction (B,)), m =
  `mask_size` (4g, or the crop side S with the fine path, whose `Sam3D.refine` then turns the decoder's 4g³
  logits into S³ ones). Points labelled ABSENT (capacity padding, see `pad_points`) change nothing. Also the
  click loop of training (`petfm.train.seganypet`)."""
  sparse, dense = model.apply(variables, points, labels, mask_logits, method=sam3d.Sam3D.encode_prompts)
  mask = None if labels is None else sam3d.token_mask(labels)
  logits, iou = model.apply(variables, embeddings, sparse, dense, image_pe, mask, method=sam3d.Sam3D.decode)
  if model.config.fine_width:
    if points is None:
      points, labels = jnp.zeros((logits.shape[0], 0, 3)), jnp.zeros((logits.shape[0], 0), jnp.int32)
    logits = model.apply(variables, embeddings, logits, points, labels, mask_logits, method=sam3d.Sam3D.refine)
  return logits, iou


def decode_inputs(model: sam3d.Sam3D, variables: Any) -> tuple[Any, jax.Array]:
  """What every click's `prompt_and_decode` reads besides the prompts, made once per model: the variables
  without the image encoder(s) (at vit_b_ori size 135 leaves instead of 324: ≈ 0.8 ms less dispatch per
  click) and the dense PE of the embedding grid (`Sam3D.dense_pe`). Works for Sam3D and TwinSam3D."""
  kept = ("prompt_encoder", "mask_decoder", "fine_head")
  params = {k: v for k, v in variables["params"].items() if k in kept}
  prompt_variables = {**variables, "params": params}
  return prompt_variables, model.apply(prompt_variables, method=sam3d.Sam3D.dense_pe)


def capacity(n: int) -> int:
  """Point capacity for n points: the smallest power of two ≥ n (one compile per capacity)."""
  return 1 << max(n - 1, 0).bit_length()


def pad_points(points: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """points (…, N, 3), labels (…, N) → (…, capacity(N), 3), (…, capacity(N)): the added slots are ABSENT
  points at the origin."""
  extra = capacity(labels.shape[-1]) - labels.shape[-1]
  points = np.concatenate([np.asarray(points, np.float32), np.zeros((*labels.shape[:-1], extra, 3),
                                                                      np.float32)], axis=-2)
  absent = np.full((*labels.shape[:-1], extra), ABSENT, np.int32)
  return points, np.concatenate([np.asarray(labels, np.int32), absent], axis=-1)


def _predict_one(model, variables, embedding, points, labels, mask_logits, image_pe):
  """`prompt_and_decode` of one crop, batched and unbatched inside the jitted call (no extra dispatches)."""
  logits, iou = prompt_and_decode(model, variables, embedding[None], points[None], labels[None],
                                  mask_logits[None], image_pe)
  return logits[0], iou[0]


# Jitted with the model (a hashable flax module) static: models of equal config share the compilations, one
# per point capacity.
_embed = jax.jit(embed, static_argnums=(0, 3))
_encode = jax.jit(encode, static_argnums=0)
_prompt_and_decode = jax.jit(prompt_and_decode, static_argnums=0)
_predict = jax.jit(_predict_one, static_argnums=0)


class Segmenter:
  """A promptable model (either backbone) with its variables ({'params', 'buffers'}) and jitted steps.

    seg = Segmenter.load("runs/seganypet_tiny")     # train-seganypet workdir or convert-sam-med3d directory
    emb = seg.embed(image)                          # (S, S, S, C) pipeline-normalised crop, once per crop
    logits, iou = seg.predict(emb, [[12, 9, 20]], [POSITIVE])                  # first click
    logits, iou = seg.predict(emb, [[12, 9, 20], [3, 4, 5]], [POSITIVE, NEGATIVE], logits)   # refine
    mask = seg.upsample(logits) > 0                 # (S, S, S)

  `embed_prepared` takes a crop already normalised the official way (`preprocess.prepare`). `mask_input=None`
  feeds zero logits through the mask path, as the official loops do on the first click. Points are padded to
  a capacity (1, 2, 4, 8, …) with invisible ABSENT slots (`sam3d.token_mask`), so `predict` compiles once
  per capacity, not once per click; `predict` is the path `benchmarks/seganypet.py` times.
  """

  def __init__(self, spec: ModelSpec, variables: Any):
    sam3d.check_config(spec.sam)
    self.spec, self.variables = spec, variables
    self.model = build_model(spec)
    self._prompt_variables, self._image_pe = decode_inputs(self.model, variables)
    self._no_mask = jnp.zeros((spec.sam.mask_size,) * 3, jnp.float32)

  @classmethod
  def load(cls, directory: str) -> Segmenter:
    """A `petfm train-seganypet` workdir (model.json + checkpoints/) or a `petfm convert-sam-med3d` directory
    (config.json + variables/; spec: official 1.5 mm, PET only, z-normalised)."""
    if not os.path.isdir(directory):
      raise UserError(f"--checkpoint {directory}: no such directory")
    if os.path.isfile(os.path.join(directory, "model.json")):
      return cls(*load_trained(directory))
    if (os.path.isfile(os.path.join(directory, "config.json"))
        and os.path.isdir(os.path.join(directory, "variables"))):
      config, variables = official_weights.load(directory)
      return cls(ModelSpec("sam3d", config), variables)
    raise UserError(f"--checkpoint {directory}: neither a `petfm train-seganypet` workdir (model.json) nor a "
                    "`petfm convert-sam-med3d` directory (config.json + variables/)")

  @property
  def size(self) -> int:
    return self.spec.sam.img_size

  def embed(self, image: np.ndarray) -> jax.Array:
    """(S, S, S, C) pipeline-normalised crop (channels `spec.channels`) → (g, g, g, C') embedding."""
    image = jnp.asarray(image, jnp.float32)
    expected = (self.size,) * 3 + (len(self.spec.channels),)
    if image.shape != expected:
      raise UserError(f"image: shape {image.shape}, expected {expected}")
    return _embed(self.model, self.variables, image[None], self.spec)[0]

  def embed_prepared(self, crops: np.ndarray) -> jax.Array:
    """Crop(s) normalised the official way (`preprocess.prepare`), (S, S, S) or (B, S, S, S), SAM-Med3D only
    → (g, g, g, C) or (B, g, g, g, C)."""
    crops = jnp.asarray(crops, jnp.float32)
    s = self.size
    if (self.spec.backbone != "sam3d" or self.spec.sam.in_chans != 1 or crops.shape[-3:] != (s, s, s)
        or crops.ndim not in (3, 4)):
      raise UserError(f"crop: shape {crops.shape}, expected ({s}, {s}, {s}) or (B, {s}, {s}, {s}) "
                      "for a PET-only SAM-Med3D model")
    one = crops.ndim == 3
    out = _encode(self.model, self.variables, crops[None] if one else crops)
    return out[0] if one else out

  def _prompts(self, points: Any, labels: Any, batch: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Checked and capacity-padded points (*batch, N, 3), labels (*batch, N)."""
    points, labels = np.asarray(points, np.float32), np.asarray(labels)
    shape = (*batch, "N ≥ 1", 3)
    if points.ndim != len(shape) or points.shape[:len(batch)] != batch or points.shape[-1] != 3 \
        or points.shape[-2] < 1:
      raise UserError(f"points: shape {points.shape}, expected {shape}")
    if labels.shape != points.shape[:-1]:
      raise UserError(f"labels: shape {labels.shape}, expected {points.shape[:-1]}")
    if not np.isin(labels, (POSITIVE, NEGATIVE)).all():
      raise UserError(f"labels: only {POSITIVE} (positive) and {NEGATIVE} (negative) are allowed")
    if (points < 0).any() or (points >= self.size).any():
      raise UserError(f"points: coordinates must lie in [0, {self.size})")
    return pad_points(points, labels)

  def _mask(self, mask_input: Any, batch: tuple[int, ...]) -> jax.Array:
    shape = (*batch, *self._no_mask.shape)
    if mask_input is None:
      return jnp.broadcast_to(self._no_mask, shape) if batch else self._no_mask
    if tuple(np.shape(mask_input)) != shape:
      raise UserError(f"mask_input: shape {np.shape(mask_input)}, expected {shape}")
    return jnp.asarray(mask_input, jnp.float32)

  def predict(self, embedding: jax.Array, points: Sequence[Sequence[float]] | np.ndarray,
              labels: Sequence[int] | np.ndarray, mask_input: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """embedding (g, g, g, C), points (N, 3) crop voxel indices, labels (N,) of POSITIVE/NEGATIVE,
    mask_input (m, m, m) previous low-res logits or None → (low-res logits (m, m, m), IoU prediction ())."""
    points, labels = self._prompts(points, labels, ())
    return _predict(self.model, self._prompt_variables, embedding, points, labels, self._mask(mask_input, ()),
                    self._image_pe)

  def predict_batch(self, embeddings: jax.Array, points: np.ndarray, labels: np.ndarray,
                    mask_input: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`predict` of B crops: embeddings (B, g, g, g, C), points (B, N, 3), labels (B, N), mask_input
    (B, m, m, m) or None → (logits (B, m, m, m), IoU (B,))."""
    batch = (embeddings.shape[0],)
    points, labels = self._prompts(points, labels, batch)
    return _prompt_and_decode(self.model, self._prompt_variables, embeddings, points, labels,
                              self._mask(mask_input, batch), self._image_pe)

  def upsample(self, logits: jax.Array) -> jax.Array:
    """Low-res logits (…, m, m, m) → (…, S, S, S), trilinear (align_corners=False, as the official code)."""
    one = logits.ndim == 3
    out = sam3d.upsample_logits(logits[None] if one else logits, self.size)
    return out[0] if one else out

  def session(self, image: np.ndarray) -> Callable[[Sequence, Sequence], np.ndarray]:
    """(S, S, S, C) crop → function of all clicks so far (points (N, 3), labels (N,)) → mask (S, S, S) bool
    (sigmoid > 0.5); the embedding is computed once and the previous low-res logits are the mask prompt."""
    embedding, low = self.embed(image), None

    def click(points: Sequence, labels: Sequence) -> np.ndarray:
      nonlocal low
      low, _ = self.predict(embedding, points, labels, low)
      return np.asarray(self.upsample(low)) > 0
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
