"""Figures written during training and evaluation (matplotlib, headless)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure  # object-oriented API: no global backend switch, works headless


def _slab_image(x: np.ndarray) -> np.ndarray:
  """(H, W, D) slab → (H, W) image: the mean over the slab's slices."""
  return np.asarray(x, np.float32).mean(axis=-1)


def reconstruction_figure(batch: Mapping[str, np.ndarray], aux: Mapping[str, np.ndarray], path: str,
                          num_samples: int = 4) -> str:
  """Rows = samples; for PET and CT: input, masked input (masked patches grey), reconstruction.

  `batch` holds `pet`, `ct` `(B, H, W, D)` normalised to [-1, 1] (`pipelines.normalize`); `aux` holds
  `pred_pet`, `pred_ct` `(B, H, W, D)` (NaN or absent where a modality was not reconstructed) and `mask_pet`,
  `mask_ct` `(B, H, W)` (1 = masked).
  """
  n = min(num_samples, batch["pet"].shape[0])
  fig = Figure(figsize=(12, 2.5 * n))
  axes = fig.subplots(n, 6, squeeze=False)
  for i in range(n):
    for j, modality in enumerate(("pet", "ct")):
      image = _slab_image(batch[modality][i])
      mask = np.asarray(aux.get(f"mask_{modality}", np.zeros_like(image)[None]))[i] > 0
      pred = aux.get(f"pred_{modality}")
      recon = _slab_image(pred[i]) if pred is not None else np.full_like(image, np.nan)
      panels = (image, np.where(mask, 0.0, image), np.where(mask, recon, image))
      titles = ("input", f"masked ({mask.mean():.0%})", "reconstruction")
      for k, (panel, title) in enumerate(zip(panels, titles)):
        ax = axes[i, 3 * j + k]
        ax.imshow(panel, cmap="gray_r" if modality == "pet" else "gray", vmin=-1, vmax=1,
                  interpolation="nearest")
        ax.set_axis_off()
        if i == 0:
          ax.set_title(f"{modality.upper()} {title}", fontsize=8)
  return save_figure(fig, path)


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str, xlabel: str,
              ylabel: str, title: str = "", errors: Mapping[str, Sequence[float]] | None = None) -> str:
  """One line per named (x, y) series, optional error bars."""
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for name, (x, y) in series.items():
    err = None if errors is None else errors.get(name)
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return save_figure(fig, path)


def save_figure(fig: Figure, path: str) -> str:
  """Writes `fig` as PNG atomically to a local path or URL (`petfm.paths.write_atomic`)."""
  from petfm import paths
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, dpi=100, format="png")
  paths.write_atomic(path, buf.getvalue())
  return path
