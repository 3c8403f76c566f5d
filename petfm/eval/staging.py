"""Ann Arbor stage by rule from a lesion map and the organ / lymph-node station label map.

Each connected lesion component (18-connected) is assigned the most frequent nonzero organ label under it
(components lying only in unlabelled tissue, or smaller than `min_voxels`, are ignored). The involved sites
then give the stage (Ann Arbor, as the synthetic cohort assigns it):

  IV   an extranodal organ is involved (liver, lungs, bone, spine: `EXTRANODAL`)
  III  nodal stations on both sides of the diaphragm
  II   ≥ 2 nodal stations on one side
  I    one nodal station (also the answer when no site is involved: the rule never abstains)

Label names come from the dataset manifest's `organ_labels` (id → name, written by `petfm prepare` from the
input's `organs.json`). Nodal stations are the labels named `nodes_<region>[_<side>]`; the region gives the
side of the diaphragm (`NODAL_REGIONS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from petfm.errors import UserError
from petfm.eval import metrics as metrics_lib

NODAL_REGIONS = {"cervical": "above", "supraclavicular": "above", "axillary": "above", "mediastinal": "above",
                 "hilar": "above", "paraaortic": "below", "mesenteric": "below", "iliac": "below",
                 "inguinal": "below", "femoral": "below"}
EXTRANODAL = ("liver", "lungs", "bone", "spine")
CONNECTIVITY = ndimage.generate_binary_structure(3, 2)


def station_table(organ_labels: Mapping[str, str]) -> dict[int, str]:
  """{label id: "above" | "below" | "extranodal"} for the nodal stations and extranodal organs among
  `organ_labels` (manifest form, {"20": "nodes_cervical_right", …}); other labels are left out."""
  table = {}
  for key, name in organ_labels.items():
    parts = name.split("_")
    if parts[0] == "nodes" and len(parts) > 1:
      if parts[1] not in NODAL_REGIONS:
        raise UserError(f"organ label {key} {name!r}: unknown nodal region {parts[1]!r}; known: "
                        f"{', '.join(NODAL_REGIONS)}")
      table[int(key)] = NODAL_REGIONS[parts[1]]
    elif name in EXTRANODAL:
      table[int(key)] = "extranodal"
  return table


def involved_sites(lesions: np.ndarray, organs: np.ndarray, min_voxels: int = 1) -> set[int]:
  """Organ label ids involved by lesions: the majority nonzero label of each component of `lesions` with ≥
  `min_voxels` voxels. lesions (bool or int), organs (X, Y, Z) of equal shape."""
  components, count = ndimage.label(np.asarray(lesions) > 0, structure=CONNECTIVITY)
  if count == 0:
    return set()
  inside = (components > 0) & (organs > 0)
  pairs = np.stack([components[inside], organs[inside]], 1).astype(np.int64)
  sizes = np.bincount(components.ravel(), minlength=count + 1)
  sites = set()
  if len(pairs):
    ids, votes = np.unique(pairs, axis=0, return_counts=True)
    best: dict[int, tuple[int, int]] = {}
    for (component, organ), n in zip(ids.tolist(), votes.tolist()):
      if n > best.get(component, (0, 0))[0]:
        best[component] = (n, organ)
    sites = {organ for component, (_, organ) in best.items() if sizes[component] >= min_voxels}
  return sites


def stage_from_sites(sites: set[int], table: Mapping[int, str]) -> int:
  """Ann Arbor stage 1–4 of the involved label ids (module docstring); `table` from `station_table`."""
  kinds = [table[s] for s in sites if s in table]
  if "extranodal" in kinds:
    return 4
  if {"above", "below"} <= set(kinds):
    return 3
  return 2 if len(kinds) >= 2 else 1


def stage_from_lesions(lesions: np.ndarray, organs: np.ndarray, organ_labels: Mapping[str, str],
                       min_voxels: int = 1) -> int:
  """Ann Arbor stage 1–4 of a lesion map (X, Y, Z) over the organ label map `organs` (X, Y, Z)."""
  table = station_table(organ_labels)
  if not table:
    raise UserError("staging rule: the organ labels name no lymph-node station nor extranodal organ; convert "
                    "the cohort with its organs.json (`petfm prepare` stores it in manifest.json)")
  return stage_from_sites(involved_sites(lesions, organs, min_voxels), table)


def rule_accuracy(true_stages: Sequence[int], by_rule: Mapping[str, Sequence[int]]) -> dict[str, Any]:
  """Classification metrics (`petfm.eval.metrics.classification_metrics`) of stages 1–4 given by rule, per
  source of the lesion map: {"n": N, "from_truth": {...}, "from_prediction": {...}} for `by_rule` = {"from_truth":
  [stage per study], ...}."""
  labels = np.asarray(true_stages) - 1
  return {"n": len(labels), **{name: metrics_lib.classification_metrics(np.eye(4)[np.asarray(stages) - 1], labels)
                               for name, stages in by_rule.items()}}
