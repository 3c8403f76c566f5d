"""Procedural whole-body anatomy for the synthetic PET/CT cohort: organ labels, HU and SUV tables.

The phantom is built in millimetres in a body frame on a diagonal (scanner-style) voxel grid:
`lat` = world x − body centre (RAS: + towards the patient's right), `ant` = world y − centre (+ anterior),
`depth` = mm below the vertex (+ towards the feet). Every structure is painted inside its own bounding box, so
a whole-body phantom at ~4 mm costs a few tenths of a second.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

# Organ label map written to ORGANS.nii.gz and organs.json (0 = background / unlabelled tissue).
ORGAN_LABELS: dict[int, str] = {
    1: "subcutaneous_fat", 2: "muscle", 3: "bone", 4: "spine", 5: "brain", 6: "salivary_glands", 7: "lungs",
    8: "heart", 9: "blood_pool", 10: "liver", 11: "spleen", 12: "kidneys", 13: "bladder", 14: "bowel",
    15: "other_organs",
    # Lymph-node stations (Ann Arbor nodal regions), above and below the diaphragm.
    20: "nodes_cervical_right", 21: "nodes_cervical_left", 22: "nodes_axillary_right",
    23: "nodes_axillary_left", 24: "nodes_mediastinal", 25: "nodes_paraaortic", 26: "nodes_mesenteric",
    27: "nodes_iliac_right", 28: "nodes_iliac_left", 29: "nodes_inguinal_right", 30: "nodes_inguinal_left",
}
LABEL_IDS: dict[str, int] = {name: i for i, name in ORGAN_LABELS.items()}
# Nodal station id → side of the diaphragm ("above" / "below").
NODAL_STATIONS: dict[int, str] = {i: ("above" if i <= 24 else "below") for i in range(20, 31)}
# Extranodal organs whose involvement makes Ann Arbor stage IV.
EXTRANODAL: tuple[int, ...] = tuple(LABEL_IDS[n] for n in ("liver", "lungs", "bone", "spine"))

# Mean HU per tissue (Gaussian noise is added later). Keys: organ names plus unlabelled tissues.
HU: dict[str, float] = {
    "air": -1000.0, "subcutaneous_fat": -100.0, "muscle": 50.0, "bone": 850.0, "marrow": 250.0,
    "spine": 250.0, "brain": 35.0, "csf": 10.0, "salivary_glands": 15.0, "lungs": -850.0, "heart": 45.0,
    "blood_pool": 40.0, "liver": 60.0, "spleen": 48.0, "kidneys": 32.0, "bladder": 5.0, "bowel": 20.0,
    "other_organs": 35.0, "soft_tissue": 25.0, "mediastinal_fat": -80.0, "nodes": -60.0, "disc": 80.0,
}
for _i in NODAL_STATIONS:
  HU[ORGAN_LABELS[_i]] = HU["nodes"]

# Typical SUV per organ and tracer (docs/data_formats.md §4; PSMA from typical 68Ga/18F-PSMA biodistribution).
# `soft_tissue` is unlabelled body tissue, `nodes` the fat of a lymph-node station without lesion.
_SUV_COMMON = {"FDG": dict(
    subcutaneous_fat=0.3, muscle=0.7, bone=0.6, spine=1.2, brain=8.0, salivary_glands=1.8, lungs=0.4,
    heart=3.0, blood_pool=1.6, liver=2.1, spleen=1.8, kidneys=2.8, bladder=20.0, bowel=1.6, other_organs=1.2,
    soft_tissue=0.6, nodes=0.5), "PSMA": dict(
    subcutaneous_fat=0.2, muscle=0.5, bone=0.5, spine=0.8, brain=0.3, salivary_glands=14.0, lungs=0.3,
    heart=1.0, blood_pool=1.2, liver=6.0, spleen=7.0, kidneys=25.0, bladder=30.0, bowel=4.0, other_organs=1.0,
    soft_tissue=0.4, nodes=0.3)}
SUV_TABLE: dict[str, dict[str, float]] = {
    tracer: {**table, **{ORGAN_LABELS[i]: table["nodes"] for i in NODAL_STATIONS}}
    for tracer, table in _SUV_COMMON.items()}
TRACERS = tuple(SUV_TABLE)


def ann_arbor_stage(sites: list[int] | set[int]) -> int:
  """Ann Arbor stage (1-4) from the involved label ids (nodal stations and extranodal organs)."""
  sites = set(sites)
  if sites & set(EXTRANODAL):
    return 4
  sides = {NODAL_STATIONS[s] for s in sites if s in NODAL_STATIONS}
  if len(sides) == 2:
    return 3
  return 2 if len(sites) >= 2 else 1


# ------------------------------------------------------------------------------------ TotalSegmentator map
def _totalseg_names() -> dict[int, str]:
  """TotalSegmentator v2 "total" class ids → names (`totalsegmentator/map_to_binary.py`)."""
  names = ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
           "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
           "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea",
           "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate",
           "kidney_cyst_left", "kidney_cyst_right", "sacrum", "vertebrae_S1"]
  names += [f"vertebrae_L{i}" for i in range(5, 0, -1)] + [f"vertebrae_T{i}" for i in range(12, 0, -1)]
  names += [f"vertebrae_C{i}" for i in range(7, 0, -1)]
  names += ["heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right",
            "subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left",
            "brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left",
            "superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein", "iliac_artery_left",
            "iliac_artery_right", "iliac_vena_left", "iliac_vena_right", "humerus_left", "humerus_right",
            "scapula_left", "scapula_right", "clavicula_left", "clavicula_right", "femur_left", "femur_right",
            "hip_left", "hip_right", "spinal_cord", "gluteus_maximus_left", "gluteus_maximus_right",
            "gluteus_medius_left", "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right",
            "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain", "skull"]
  names += [f"rib_left_{i}" for i in range(1, 13)] + [f"rib_right_{i}" for i in range(1, 13)]
  names += ["sternum", "costal_cartilages"]
  return dict(enumerate(names, start=1))


TOTALSEG_LABELS: dict[int, str] = _totalseg_names()
_TOTALSEG_RULES = [  # (name pattern, our organ name or None for unlabelled); first match wins
    (r"lung_", "lungs"), (r"vertebrae_|sacrum", "spine"),
    (r"rib_|femur_|hip_|humerus_|scapula_|clavicula_|skull|sternum|costal_cartilages", "bone"),
    (r"gluteus_|autochthon_|iliopsoas_", "muscle"), (r"^heart$", "heart"),
    (r"aorta|vena|vein|artery|trunk|atrial_appendage", "blood_pool"), (r"kidney_(left|right)$", "kidneys"),
    (r"stomach|small_bowel|duodenum|colon|esophagus", "bowel"), (r"urinary_bladder", "bladder"),
    (r"^(liver|spleen|brain)$", None), (r"trachea", None),
    (r"gallbladder|pancreas|adrenal|thyroid|prostate|kidney_cyst|spinal_cord", "other_organs")]


def organ_from_totalseg(name: str) -> int:
  """Our organ label id for a TotalSegmentator class name (0 when it maps to no organ, e.g. trachea)."""
  for pattern, organ in _TOTALSEG_RULES:
    if re.search(pattern, name):
      organ = organ or (name if name in LABEL_IDS else None)
      return LABEL_IDS[organ] if organ else 0
  return 0


# ---------------------------------------------------------------------------------------------- painting
@dataclasses.dataclass
class Canvas:
  """HU and label volumes (X, Y, Z) with per-axis body coordinates in mm (lat (X,), ant (Y,), depth (Z,))."""
  lat: np.ndarray
  ant: np.ndarray
  depth: np.ndarray
  hu: np.ndarray  # float32 (X, Y, Z)
  organs: np.ndarray  # uint8 (X, Y, Z)

  def box(self, centre, radii) -> tuple[tuple[slice, ...], tuple[np.ndarray, ...]] | None:
    """Index box of the axis-aligned box centre ± radii and the normalised coordinates inside it."""
    slices, coords = [], []
    for axis, c, r in zip((self.lat, self.ant, self.depth), centre, radii):
      inside = np.flatnonzero(np.abs(axis - c) <= r)
      if not inside.size:
        return None
      s = slice(inside[0], inside[-1] + 1)
      slices.append(s)
      coords.append((axis[s] - c) / r)
    u, v, w = coords
    return tuple(slices), (u[:, None, None], v[None, :, None], w[None, None, :])

  def ellipsoid(self, centre, radii, hu: float, label: int | None, shell: float = 0.0) -> None:
    """Paints an ellipsoid (or only its outer `shell` mm when shell > 0)."""
    found = self.box(centre, radii)
    if found is None:
      return
    index, (u, v, w) = found
    mask = u ** 2 + v ** 2 + w ** 2 <= 1
    if shell > 0:
      mask &= sum((a * r / max(r - shell, 1e-3)) ** 2 for a, r in zip((u, v, w), radii)) > 1
    self.paint(index, mask, hu, label)

  def cylinder(self, centre, radii, depth_range, hu: float, label: int | None, shell: float = 0.0) -> None:
    """Paints an elliptic cylinder along the body axis from depth_range[0] to depth_range[1] (mm)."""
    mid, half = (depth_range[0] + depth_range[1]) / 2, (depth_range[1] - depth_range[0]) / 2
    found = self.box((centre[0], centre[1], mid), (radii[0], radii[1], half))
    if found is None:
      return
    index, (u, v, _) = found
    mask = u ** 2 + v ** 2 <= 1
    if shell > 0:
      mask &= (u * radii[0] / (radii[0] - shell)) ** 2 + (v * radii[1] / (radii[1] - shell)) ** 2 > 1
    self.paint(index, mask, hu, label)

  def paint(self, index, mask: np.ndarray, hu: float, label: int | None) -> None:
    """Sets HU (and the label unless None) where `mask` (broadcast to the box `index`) holds."""
    mask = np.broadcast_to(mask, self.hu[index].shape)
    self.hu[index][mask] = hu
    if label is not None:
      self.organs[index][mask] = label


def whole_body(rng: np.random.Generator, lat: np.ndarray, ant: np.ndarray, depth: np.ndarray) -> Canvas:
  """A random head-to-thigh body on the grid given by its body coordinates (mm). Returns HU and labels."""
  c = Canvas(lat, ant, depth, np.full((lat.size, ant.size, depth.size), HU["air"], np.float32),
             np.zeros((lat.size, ant.size, depth.size), np.uint8))
  ids = LABEL_IDS
  wf, hf = rng.uniform(0.85, 1.2), rng.uniform(0.92, 1.08)  # body width and height factors
  rx, ry = 160 * wf, 105 * wf
  fat, muscle = rng.uniform(6, 30) * wf ** 2, rng.uniform(10, 18)
  d = lambda mm: mm * hf  # noqa: E731  depth of a landmark for this body height

  # Torso: elliptic cross-section whose radii vary along the body; fat, muscle and visceral layers.
  knots = np.array([d(262), d(300), d(560), d(760), d(880), d(935)])
  trx = np.interp(depth, knots, rx * np.array([0.85, 1.0, 0.95, 0.92, 1.02, 1.0]))
  try_ = np.interp(depth, knots, ry * np.array([0.7, 0.85, 0.95, 1.0, 0.95, 0.9]))
  torso = np.flatnonzero((depth >= d(262)) & (depth <= d(935)))
  if torso.size:
    span = slice(torso[0], torso[-1] + 1)
    lat32, ant32 = lat.astype(np.float32)[:, None, None], ant.astype(np.float32)[None, :, None]
    for extra, hu, label in ((0, HU["subcutaneous_fat"], ids["subcutaneous_fat"]),
                             (-fat, HU["muscle"], ids["muscle"]), (-fat - muscle, HU["soft_tissue"], 0)):
      radii = [(r[span] + extra).astype(np.float32) for r in (trx, try_)]
      mask = (lat32 / radii[0]) ** 2 + (ant32 / radii[1]) ** 2 <= 1
      c.paint((slice(None), slice(None), span), mask, hu, label)
  # Thighs, head and neck.
  for side in (1, -1):
    centre = (side * 0.47 * rx, 0)
    c.cylinder(centre, (0.5 * rx, 0.85 * ry), (d(900), depth.max() + 1), HU["subcutaneous_fat"],
               ids["subcutaneous_fat"])
    c.cylinder(centre, (0.5 * rx - fat, 0.85 * ry - fat), (d(900), depth.max() + 1), HU["muscle"],
               ids["muscle"])
  c.cylinder((0, -5), (58, 60), (d(170), d(275)), HU["subcutaneous_fat"], ids["subcutaneous_fat"])
  c.cylinder((0, -5), (50, 52), (d(170), d(275)), HU["muscle"], ids["muscle"])
  head = ((0, 5, d(105)), (74, 94, d(105)))
  c.ellipsoid(*head, HU["muscle"], ids["muscle"])
  c.ellipsoid((0, 5, d(88)), (70, 90, d(78)), HU["bone"], ids["bone"])  # skull
  c.ellipsoid((0, 5, d(88)), (63, 83, d(71)), HU["csf"], 0)
  c.ellipsoid((0, 5, d(88)), (60, 80, d(68)), HU["brain"], ids["brain"])
  for side in (1, -1):
    c.ellipsoid((side * 50, -8, d(160)), (13, 20, d(22)), HU["salivary_glands"],
                ids["salivary_glands"])  # parotid
    c.ellipsoid((side * 28, 32, d(192)), (11, 11, d(10)), HU["salivary_glands"], ids["salivary_glands"])

  # Thorax: lungs, mediastinum, heart, great vessels, ribs, sternum, clavicles, scapulae.
  inner = rx - fat - muscle
  lung_c, lung_r = d(430), d(145)
  c.ellipsoid((0, 0, lung_c), (0.35 * inner, 0.8 * ry, lung_r), HU["mediastinal_fat"], 0)
  for side in (1, -1):
    c.ellipsoid((side * 0.45 * inner, -5, lung_c), (0.4 * inner, 0.72 * ry, lung_r), HU["lungs"],
                ids["lungs"])
  c.ellipsoid((-22, 18, d(475)), (56, 50, d(58)), HU["heart"], ids["heart"])
  c.ellipsoid((-22, 18, d(475)), (44, 38, d(46)), HU["blood_pool"], ids["blood_pool"])
  spine_ant = lambda mm: float(np.interp(mm, [d(170), d(280), d(450), d(700), d(880)],  # noqa: E731
                                         [-12, -25, -0.55 * ry, -0.45 * ry, -0.6 * ry]))
  c.cylinder((8, 12), (14, 14), (d(360), d(455)), HU["blood_pool"], ids["blood_pool"])  # ascending aorta
  for top in np.arange(d(430), d(830), d(20)):
    c.cylinder((-14, spine_ant(top) + 27), (11, 11), (top, top + d(21)), HU["blood_pool"], ids["blood_pool"])
  for top in np.arange(d(295), d(565), d(24)):
    ring_rx = float(np.interp(top, depth, trx)) - fat - 6
    ring_ry = float(np.interp(top, depth, try_)) - fat - 6
    found = c.box((0, -0.1 * ring_ry, top), (ring_rx, 0.9 * ring_ry, d(5)))
    if found is not None:
      index, (u, v, _) = found
      rho = np.sqrt(u ** 2 + v ** 2)
      c.paint(index, (np.abs(rho - 1) < 8 / ring_rx) & (np.abs(u) > 0.25), HU["bone"], ids["bone"])
  c.ellipsoid((0, ry * 0.8 - fat, d(400)), (14, 7, d(75)), HU["bone"], ids["bone"])  # sternum
  for side in (1, -1):
    c.ellipsoid((side * 65, 0.45 * ry, d(272)), (62, 8, d(8)), HU["bone"], ids["bone"])  # clavicle
    c.ellipsoid((side * 0.65 * rx, -0.8 * ry + fat, d(345)), (42, 7, d(65)), HU["bone"],
                ids["bone"])  # scapula

  # Abdomen and pelvis.
  c.ellipsoid((0, 0.25 * ry, d(760)), (0.62 * inner, 0.5 * ry, d(85)), HU["bowel"], ids["bowel"])
  c.ellipsoid((-0.3 * rx, 0.3 * ry, d(600)), (45, 35, d(42)), HU["bowel"], ids["bowel"])  # stomach
  c.ellipsoid((0.38 * rx, 0, d(600)), (0.5 * rx, 0.72 * ry, d(85)), HU["liver"], ids["liver"])
  c.ellipsoid((-0.55 * rx, -0.4 * ry, d(590)), (30, 45, d(55)), HU["spleen"], ids["spleen"])
  for side in (1, -1):
    c.ellipsoid((side * 0.38 * rx, -0.42 * ry, d(690)), (28, 30, d(52)), HU["kidneys"], ids["kidneys"])
    c.ellipsoid((side * 0.6 * rx, -0.2 * ry, d(830)), (24, 0.5 * ry, d(55)), HU["marrow"],
                ids["bone"])  # ilium
    c.ellipsoid((side * 0.6 * rx, -0.2 * ry, d(830)), (24, 0.5 * ry, d(55)), HU["bone"], ids["bone"], shell=7)
    c.ellipsoid((side * 0.45 * rx, 0, d(905)), (24, 24, 24), HU["bone"], ids["bone"])  # femoral head
    c.cylinder((side * 0.47 * rx, 0), (15, 15), (d(915), depth.max() + 1), HU["bone"], ids["bone"])
    c.cylinder((side * 0.47 * rx, 0), (9, 9), (d(915), depth.max() + 1), HU["marrow"], ids["bone"])
  c.ellipsoid((0, 0.45 * ry, d(890)), (40, 33, d(34)), HU["bladder"], ids["bladder"])

  # Spine: vertebral bodies with cortical rim, discs and spinous processes, from C2 to the sacrum.
  for top in np.arange(d(175), d(880), d(28)):
    ant_c = spine_ant(top + d(14))
    size = 11 if top < d(275) else 16
    c.cylinder((0, ant_c), (size, size), (top, top + d(22)), HU["bone"], ids["spine"])
    c.cylinder((0, ant_c), (size - 3, size - 3), (top + d(2), top + d(20)), HU["spine"], ids["spine"])
    c.cylinder((0, ant_c), (size, size), (top + d(22), top + d(28)), HU["disc"], ids["spine"])
    c.ellipsoid((0, ant_c - size - 14, top + d(12)), (5, 13, d(9)), HU["bone"], ids["spine"])

  # Lymph-node stations: fat regions that hold the nodes, away from each other.
  stations = {
      "nodes_cervical_right": ((36, 12, d(228)), (11, 11, d(30))),
      "nodes_cervical_left": ((-36, 12, d(228)), (11, 11, d(30))),
      "nodes_axillary_right": ((0.8 * inner, -0.1 * ry, d(330)), (16, 20, d(24))),
      "nodes_axillary_left": ((-0.8 * inner, -0.1 * ry, d(330)), (16, 20, d(24))),
      "nodes_mediastinal": ((12, spine_ant(d(390)) + 38, d(390)), (16, 14, d(32))),
      "nodes_paraaortic": ((8, spine_ant(d(700)) + 30, d(700)), (20, 12, d(48))),
      "nodes_mesenteric": ((10, 0.25 * ry, d(745)), (24, 14, d(24))),
      "nodes_iliac_right": ((55, -0.1 * ry, d(845)), (12, 14, d(28))),
      "nodes_iliac_left": ((-55, -0.1 * ry, d(845)), (12, 14, d(28))),
      "nodes_inguinal_right": ((0.35 * rx, 0.72 * ry, d(918)), (15, 10, d(18))),
      "nodes_inguinal_left": ((-0.35 * rx, 0.72 * ry, d(918)), (15, 10, d(18))),
  }
  for name, (centre, radii) in stations.items():
    c.ellipsoid(centre, radii, HU["nodes"], ids[name])
  return c
