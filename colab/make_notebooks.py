"""Writes the Colab notebooks in this folder from the cell sources below (the single source of truth).

  python colab/make_notebooks.py            # rewrite colab/*.ipynb
  python colab/make_notebooks.py --check    # exit 1 if a committed notebook differs from this script's output

Edit the cells here, not in the .ipynb files (tests/test_notebooks.py checks that the two agree). Notebooks
are written without outputs and with deterministic cell ids; the parameters cell is tagged `parameters`
(papermill) and reads PETFM_NOTEBOOK_SMOKE=1 (set by the test) to shrink the run to seconds.
`petfm-org` in the URLs is a placeholder for the GitHub organisation that hosts the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import nbformat

ORG = "petfm-org"        # placeholder GitHub organisation
HERE = os.path.dirname(os.path.abspath(__file__))


def badge(name: str) -> str:
  url = f"https://colab.research.google.com/github/{ORG}/petfm/blob/main/colab/{name}"
  return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def md(text: str) -> tuple[str, str]:
  return ("markdown", textwrap.dedent(text).strip())


def code(text: str, parameters: bool = False) -> tuple[str, str]:
  return ("parameters" if parameters else "code", textwrap.dedent(text).strip())


PLACEHOLDER_NOTE = (f"*(`{ORG}` in the links is a placeholder for the GitHub organisation that hosts "
                    "petfm.)* Runtime → Change runtime type picks a CPU, GPU or TPU runtime; the parameters "
                    "cell holds "
                    "tiny defaults that run on a CPU runtime in a few minutes.")

SETUP = code('''
    # Set-up. From a checkout of the repository (local Jupyter, the tests) use that checkout and install
    # nothing; elsewhere (Colab) clone petfm and pip-install it with the JAX build for the runtime's
    # accelerator.
    import importlib.util, os, pathlib, shutil, subprocess, sys

    def find_checkout():
      for folder in (os.environ.get("PETFM_REPO"), ".", "..", "petfm"):
        if folder and (pathlib.Path(folder) / "experiments" / "fratmae.py").is_file():
          return pathlib.Path(folder).resolve()
      return None

    REPO = find_checkout()
    if REPO is None:
      REPO = pathlib.Path("petfm").resolve()
      subprocess.run(["git", "clone", "--depth", "1", "https://github.com/petfm-org/petfm", str(REPO)],
                     check=True)
    if importlib.util.find_spec("petfm") is None:
      if shutil.which("nvidia-smi"):
        jax_build = ["jax[cuda12]"]
      elif list(pathlib.Path("/dev").glob("accel*")) or pathlib.Path("/dev/vfio").exists():
        jax_build = ["jax[tpu]"]
      else:
        jax_build = []
      subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"{REPO}[dev]", *jax_build], check=True)
    sys.path.insert(0, str(REPO))          # the checkout's code first (and its data_prep package)
    print("petfm checkout:", REPO)
''')

# A FratMAE small enough that a smoke run compiles and trains in seconds on a CPU (as tests/test_pretrain.py).
SMOKE_MODEL = '''{
        "data.plane_size": (32, 16), "data.depth": 2, "model.patch_size": (8, 8), "model.width": 32,
        "model.depth": 2, "model.num_heads": 2, "model.mlp_dim": 64, "model.decoder_width": 32,
        "model.decoder_depth": 1, "model.decoder_heads": 2, "model.decoder_mlp_dim": 64,
        "model.ca_proj_dim": 16, "model.text_width": 16, "model.text_heads": 2,
        "checkpoint.async_save": False}'''

DEVICES = code('''
    import jax
    from petfm.train import common

    devices = jax.devices()
    print(f"backend {jax.default_backend()}: {len(devices)} × {devices[0].device_kind}")
    # One mesh axis over all devices (data parallelism); the trainers build the same mesh from config.mesh.
    mesh = common.create_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
    print("mesh:", dict(mesh.shape))
    # The global batch is split over the devices: round it up to a multiple of their number.
    batch_size = -(-BATCH_SIZE // mesh.size) * mesh.size
    print("global batch:", batch_size)
''')

COHORT = code('''
    from data_prep import convert, synthetic
    from data_prep.configs import convert as convert_configs

    nifti_dir, records_dir = os.path.join(DATA_DIR, "nifti"), os.path.join(DATA_DIR, "records")
    synthetic.generate(nifti_dir, n=N_STUDIES, seed=SEED, scale=SCALE)     # skips studies already written
    convert_config = convert_configs.get_config(str(SPACING_MM))
    convert_config.update(val_fraction=0.2, test_fraction=0.2)
    summary = convert.convert(nifti_dir, records_dir, convert_config)     # reuses studies already converted
    print(f"{records_dir}: studies per split {summary.split_counts}, {summary.total_bytes / 1e6:.1f} MB")
''')


# --------------------------------------------------------------------------------------------- 01 quickstart

QUICKSTART = [
    md(f'''
    {badge("01_quickstart_pretraining.ipynb")}

    # petfm quickstart: pretrain a tiny FratMAE on a synthetic PET/CT cohort

    This notebook installs petfm, finds the accelerator and builds a device mesh over all devices, generates
    a small synthetic whole-body PET/CT cohort (NIfTI, autoPET layout), converts it to ArrayRecord shards,
    pretrains a tiny FratMAE (masked autoencoding of PET and CT slabs with cross-modal context alignment),
    and plots the loss and the PET/CT reconstructions.

    {PLACEHOLDER_NOTE}
    '''),
    SETUP,
    md("## Parameters"),
    code(f'''
    import os

    N_STUDIES = 16            # synthetic studies (train/val/test split by patient)
    SCALE = 0.5               # synthetic voxel sizes ÷ SCALE: 0.5 ≈ 8-12 mm voxels (1.0 ≈ 4 mm, full size)
    SPACING_MM = 8.0          # voxel size of the stored records
    VARIANT = "tiny"          # experiments/fratmae.py variant: tiny | S | B | L (e.g. "S" on a GPU/TPU)
    TOTAL_STEPS = 100
    BATCH_SIZE = 16           # global; rounded up to a multiple of the device count
    OVERRIDES = {{}}            # any config field, e.g. {{"mask_ratio": 0.9, "model.depth": 2}}
    DATA_DIR = "petfm_data"
    WORKDIR = "petfm_runs/quickstart"   # rerunning with the same WORKDIR resumes from its last checkpoint
    SEED = 0

    if os.environ.get("PETFM_NOTEBOOK_SMOKE"):  # tests/test_notebooks.py: the same steps in seconds
      N_STUDIES, TOTAL_STEPS, BATCH_SIZE = 8, 4, 4
      OVERRIDES = {SMOKE_MODEL}
    ''', parameters=True),
    md("## Accelerator and device mesh"),
    DEVICES,
    md('''
    ## A synthetic cohort → ArrayRecord

    `data_prep.synthetic` draws head-to-thigh bodies with organs, a tracer (FDG or PSMA), an Ann Arbor stage
    and matching lesions, and writes `CTres/SUV/SEG/ORGANS.nii.gz` per study (`petfm synthetic` on the
    command line). `data_prep.convert` (`petfm prepare`) checks, aligns and resamples each study and packs
    them into ArrayRecord shards with a `manifest.json`.
    '''),
    COHORT,
    code('''
    %matplotlib inline
    import glob
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np

    study = sorted(glob.glob(os.path.join(nifti_dir, "*", "SUV.nii.gz")))[0]
    suv = nib.load(study).get_fdata()
    ct = nib.load(study.replace("SUV", "CTres")).get_fdata()
    fig, axes = plt.subplots(1, 2, figsize=(8, 5))
    axes[0].imshow(np.rot90(suv.max(axis=1)), cmap="gray_r", vmax=np.percentile(suv, 99.5))
    axes[0].set_title("PET (SUV), max. projection", fontsize=10)
    axes[1].imshow(np.rot90(ct[:, ct.shape[1] // 2]), cmap="gray", vmin=-400, vmax=600)
    axes[1].set_title("CT, coronal slice", fontsize=10)
    for ax in axes:
      ax.set_axis_off()
    plt.show()
    '''),
    md('''
    ## Pretraining

    `petfm.train.pretrain.train` is what `petfm pretrain --config experiments/fratmae.py:tiny --workdir DIR`
    runs. It writes checkpoints, `metrics.jsonl`, TensorBoard events and `images/reconstruction_*.png` into
    the work dir.
    '''),
    code('''
    from petfm.config import load_config
    from petfm.train import pretrain

    config = load_config(f"{REPO}/experiments/fratmae.py:{VARIANT}", {
        "data_dir": records_dir, "total_steps": TOTAL_STEPS, "batch_size": batch_size,
        "optim.warmup_steps": max(1, TOTAL_STEPS // 10), "log_every_steps": max(1, TOTAL_STEPS // 25),
        "image_every_steps": TOTAL_STEPS, "seed": SEED, **OVERRIDES})
    last = pretrain.train(config, WORKDIR)
    print({k: round(v, 4) for k, v in last.items() if k in ("loss", "rec_pet", "rec_ct", "examples_per_s")})
    '''),
    md("## Loss"),
    code('''
    %matplotlib inline
    import json

    with open(os.path.join(WORKDIR, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("loss", "rec_pet", "rec_ct"):
      ax.plot(steps, [r[name] for r in rows], marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    plt.show()
    '''),
    md('''
    ## PET/CT reconstructions

    Per sample: the input slab, the masked input (masked patches grey) and the reconstruction of the masked
    patches, for PET and CT (intensities normalised to [-1, 1]).
    '''),
    code('''
    from IPython.display import Image, display

    display(Image(sorted(glob.glob(os.path.join(WORKDIR, "images", "reconstruction_*.png")))[-1]))
    '''),
    md('''
    ## Next steps

    * The same run from a terminal: `petfm synthetic --out petfm_data/nifti --n 40`,
      `petfm prepare --input petfm_data/nifti --output petfm_data/records`,
      `petfm pretrain --config experiments/fratmae.py:tiny --workdir runs/tiny
      --config.data_dir=petfm_data/records`.
    * On a GPU/TPU runtime set `VARIANT = "S"`, `SCALE = 1.0`, `SPACING_MM = 4.0` and a larger
      `TOTAL_STEPS`; the mesh and the batch split follow the devices.
    * `02_masking_ratio_ablation.ipynb` sweeps the masking ratio; `04_throughput.ipynb` measures speed.
    '''),
]


# ------------------------------------------------------------------------------------------ 02 masking ratio

ABLATION = [
    md(f'''
    {badge("02_masking_ratio_ablation.ipynb")}

    # Masking-ratio ablation

    `experiments/fratmae.py` declares the masking-ratio sweep in its `sweep(add)` function: mask ratios
    0.5 / 0.75 / 0.9 / 0.95 × two mask modes (`one_visible`: per patch, one modality stays visible;
    `both_masked`: PET and CT are masked independently), 8 runs. `petfm sweep` (here
    `petfm.train.sweep.run_sweep`) trains each run, scores it (held-out reconstruction loss per modality,
    tracer linear probe on the PET embedding) and writes a table. The parameters below pick a subset and a
    short schedule so that it runs on a CPU runtime in a few minutes.

    {PLACEHOLDER_NOTE}
    '''),
    SETUP,
    md("## Parameters"),
    code(f'''
    import os

    MASK_RATIOS = [0.5, 0.75, 0.95]     # a subset of the declared 0.5, 0.75, 0.9, 0.95 (None = all)
    MASK_MODES = ["one_visible"]        # and/or "both_masked" (None = both)
    VARIANT = "tiny"                    # experiments/fratmae.py variant
    TOTAL_STEPS = 60                    # per run
    BATCH_SIZE = 16                     # global; rounded up to a multiple of the device count
    OVERRIDES = {{}}                      # any config field for every run
    N_STUDIES, SCALE, SPACING_MM = 16, 0.5, 8.0   # the synthetic cohort (see 01_quickstart_pretraining)
    DATA_DIR = "petfm_data"
    WORKDIR = "petfm_runs/sweep"        # finished runs are not retrained when the notebook is rerun
    SEED = 0

    if os.environ.get("PETFM_NOTEBOOK_SMOKE"):  # tests/test_notebooks.py: the same steps in seconds
      MASK_RATIOS, TOTAL_STEPS, BATCH_SIZE, N_STUDIES = [0.75, 0.9], 4, 4, 10
      OVERRIDES = {{**{SMOKE_MODEL}, "eval.max_batches": 2}}
    ''', parameters=True),
    md("## Devices and data"),
    DEVICES,
    COHORT,
    md('''
    ## The sweep

    `only` keeps the declared runs whose values are listed (`petfm sweep ... --only mask_ratio=0.5,0.95
    --only mask_mode=one_visible` on the command line). A run whose work dir already holds its final
    checkpoint is only evaluated.
    '''),
    code('''
    from petfm.config import load_config
    from petfm.train import sweep

    config_path = f"{REPO}/experiments/fratmae.py"
    only = {k: v for k, v in (("mask_ratio", MASK_RATIOS), ("mask_mode", MASK_MODES)) if v is not None}
    for run in sweep.select_runs(sweep.declared_runs(config_path), only):
      print(sweep.run_name(run))
    config = load_config(f"{config_path}:{VARIANT}", {
        "data_dir": records_dir, "total_steps": TOTAL_STEPS, "batch_size": batch_size,
        "optim.warmup_steps": max(1, TOTAL_STEPS // 10), "log_every_steps": max(1, TOTAL_STEPS // 10),
        "image_every_steps": 0, "seed": SEED, **OVERRIDES})
    rows = sweep.run_sweep(config, config_path, WORKDIR, only)
    '''),
    md("## Results"),
    code('''
    from IPython.display import Markdown, display

    with open(os.path.join(WORKDIR, "sweep.md")) as f:
      display(Markdown(f.read()))
    '''),
    code('''
    %matplotlib inline
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode in dict.fromkeys(r["overrides"]["mask_mode"] for r in rows):
      runs = sorted((r for r in rows if r["overrides"]["mask_mode"] == mode),
                    key=lambda r: r["overrides"]["mask_ratio"])
      ratios = [r["overrides"]["mask_ratio"] for r in runs]
      for modality in ("pet", "ct"):
        axes[0].plot(ratios, [r["metrics"][f"rec_{modality}"] for r in runs], marker="o",
                     label=f"{modality.upper()}, {mode}")
      axes[1].plot(ratios, [r["metrics"]["probe_tracer_accuracy"] for r in runs], marker="o", label=mode)
    axes[1].axhline(rows[0]["metrics"]["probe_chance"], color="grey", linestyle="--", label="chance")
    axes[1].set_ylim(0, 1.05)
    axes[0].set_ylabel("held-out reconstruction loss (masked patches)")
    axes[1].set_ylabel("tracer linear-probe accuracy")
    for ax in axes:
      ax.set_xlabel("mask ratio")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
    plt.show()
    '''),
    md('''
    ## The same sweep at full size on a TPU pod

    Tiny runs on a small synthetic cohort only show that the pipeline works; the ablation needs the real
    data and the full schedule (`B`: ViT-B, 448 × 224 × 8 slabs at 4 mm, global batch 512, 100k steps).

    1. Convert the data once onto storage that every host of the pod slice can read (a shared Filestore /
       NFS mount, or a bucket mounted with gcsfuse):
       `petfm prepare --input /data/autopet --output /shared/records`.
    2. Create a pod slice (e.g. `v5p-64`, 8 hosts × 4 chips) and install petfm on every host
       (`pip install "petfm @ git+https://github.com/petfm-org/petfm" "jax[tpu]"`).
    3. Start the same command on every host; with `--config.distributed=True` the hosts find each other
       (`jax.distributed.initialize()`), the mesh spans all chips (`data = -1`) and each host reads its
       share of every global batch:

    ```bash
    gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=all --command "
      cd petfm && petfm sweep --config experiments/fratmae.py:B --workdir /shared/runs/sweep_B \\
        --config.data_dir=/shared/records --config.distributed=True --config.dtype=bfloat16"
    ```

    The 8 runs train one after the other; every run resumes from its last checkpoint if the slice is
    pre-empted (run the command again). To use several slices at once, split the sweep with `--only`, one
    work dir per slice, e.g. `--only mask_mode=one_visible --workdir /shared/runs/sweep_B_one_visible` on one
    and `--only mask_mode=both_masked --workdir /shared/runs/sweep_B_both_masked` on another. Check the
    speed first with `04_throughput.ipynb` or `benchmarks/throughput.py --config experiments/fratmae.py:B`.
    '''),
]


# -------------------------------------------------------------------------------------------- 04 throughput

THROUGHPUT = [
    md(f'''
    {badge("04_throughput.ipynb")}

    # Pretraining throughput on this runtime

    Runs `benchmarks/throughput.py` (the trainer's own jitted step on a mesh over all devices, fed random
    batches) for a few configs and shows examples/s and MFU (model FLOP utilisation: XLA's FLOP count of the
    step ÷ time ÷ peak FLOP/s of the devices; on a CPU the peak is a measured float32 matmul).

    {PLACEHOLDER_NOTE}
    '''),
    SETUP,
    md("## Parameters"),
    code(f'''
    import os

    # experiments/fratmae.py arguments; None = by backend: the tiny model on a CPU, S and B on a GPU/TPU.
    CONFIGS = None
    BATCH_PER_DEVICE = None   # None = 8 on a CPU, 32 on a GPU/TPU
    DTYPE = None              # None = float32 on a CPU, bfloat16 on a GPU/TPU
    STEPS, WARMUP = 5, 2      # timed steps (the median is reported) and untimed steps after compiling
    OVERRIDES = {{}}            # any config field for every config

    if os.environ.get("PETFM_NOTEBOOK_SMOKE"):  # tests/test_notebooks.py: the same steps in seconds
      CONFIGS, BATCH_PER_DEVICE, STEPS, WARMUP = ["tiny,method=mae", "tiny"], 2, 2, 1
      OVERRIDES = {SMOKE_MODEL}
    ''', parameters=True),
    md("## Devices"),
    code('''
    import jax

    backend, devices = jax.default_backend(), jax.devices()
    print(f"backend {backend}: {len(devices)} × {devices[0].device_kind}")
    on_cpu = backend == "cpu"
    configs = CONFIGS or (["tiny,method=mae", "tiny"] if on_cpu else ["S,method=mae", "S", "B"])
    batch_size = (BATCH_PER_DEVICE or (8 if on_cpu else 32)) * len(devices)
    dtype = DTYPE or ("float32" if on_cpu else "bfloat16")
    '''),
    md("## Benchmark"),
    code('''
    from petfm.config import load_config

    spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)

    results = {}
    for name in configs:
      config = load_config(f"{REPO}/experiments/fratmae.py:{name}",
                           {"batch_size": batch_size, "dtype": dtype, **OVERRIDES})
      results[name] = throughput.benchmark_jax(config, STEPS, WARMUP)
      print(f"{name}: {results[name]['examples_per_s']:.1f} examples/s, MFU {results[name]['mfu']:.1%}")
    '''),
    md("## Results"),
    code('''
    from IPython.display import Markdown, display

    columns = ["input", "batch_size", "dtype", "mesh", "step_s", "examples_per_s", "tokens_per_s",
               "gflop_per_step", "tflop_per_s", "mfu"]
    lines = ["| config | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, r in results.items():
      cells = [f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    first = next(iter(results.values()))
    peak = f"{first['peak_tflop_per_s_per_device']:.3g} TFLOP/s per device ({first['peak_source']})"
    display(Markdown("\\n".join(lines) + f"\\n\\n{first['devices']} × {first['device_kind']}; peak {peak}"))
    '''),
    code('''
    %matplotlib inline
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    names = list(results)
    axes[0].bar(names, [results[n]["examples_per_s"] for n in names])
    axes[0].set_ylabel("examples / s")
    axes[1].bar(names, [100 * results[n]["mfu"] for n in names], color="tab:orange")
    axes[1].set_ylabel("MFU (%)")
    for ax in axes:
      ax.tick_params(axis="x", labelrotation=20)
      ax.grid(axis="y", alpha=0.3)
    plt.show()
    '''),
    md('''
    From a terminal: `python benchmarks/throughput.py --config experiments/fratmae.py:S
    --config.batch_size=256 --config.dtype=bfloat16 --json out.json`. Compilation is excluded from the
    figures; the first call of each config takes longer because it compiles.
    '''),
]


# ------------------------------------------------------------------------------- 03 interactive segmentation

# A Sam3D small enough to compile and train in seconds on a CPU (as tests/test_seganypet_clicks.py).
SMOKE_SAM = """{
        "model.width": 32, "model.depth": 2, "model.num_heads": 2, "model.mlp_dim": 64,
        "model.global_attn_indexes": (1,), "model.window_size": 0, "model.prompt_dim": 24,
        "model.decoder_heads": 4, "model.decoder_mlp_dim": 32, "model.iou_hidden": 16,
        "model.mask_in_chans": 8, "clicks.rounds": 2, "checkpoint.async_save": False}"""

SEGMENTATION = [
    md(f'''
    {badge("03_interactive_segmentation.ipynb")}

    # Interactive (promptable) 3-D segmentation of a PET lesion

    Loads a promptable model, either an official SegAnyPET / SAM-Med3D checkpoint (`.pth`, converted here
    with `petfm convert-sam-med3d`) if you have one, or a tiny model trained in this notebook with click
    simulation (`petfm train-seganypet`) on a synthetic cohort. Then clicks points given as voxel
    coordinates of the PET image, shows axial / coronal / sagittal overlays after each click, and saves the
    mask as NIfTI on the image's grid (what `petfm segment --interactive` does in a terminal).

    {PLACEHOLDER_NOTE}
    '''),
    SETUP,
    md("## Parameters"),
    code(f'''
    import os

    CHECKPOINT = ""     # an official SegAnyPET / SAM-Med3D .pth, a `petfm convert-sam-med3d` directory or a
                        # `petfm train-seganypet` workdir; "" = train the tiny model below
    IMAGE = ""          # PET NIfTI in SUV to segment; "" = a held-out study of the synthetic cohort
    CT = ""             # CT NIfTI in HU (PET/CT models: the tiny model, backbone=fratmae_twin)
    CLICKS = None       # [(x, y, z, "+" or "-"), ...] voxel indices of IMAGE, the first one positive;
                        # None = simulated clicks on the synthetic lesion (each on the largest error)
    NUM_CLICKS = 3      # simulated clicks when CLICKS is None
    TRAIN_STEPS = 150   # tiny model: click-simulation training steps
    BATCH_SIZE = 8      # global; rounded up to a multiple of the device count
    TRAIN_OVERRIDES = {{}}                      # any experiments/seganypet.py:tiny field
    N_STUDIES, SCALE, SPACING_MM = 12, 1.0, 4.0  # the synthetic cohort (tiny model: 32³ crops of 4 mm)
    DATA_DIR = "petfm_data_seg"
    WORKDIR = "petfm_runs/seganypet_tiny"
    OUT = "petfm_runs/segmentation/mask.nii.gz"
    SEED = 0

    if os.environ.get("PETFM_NOTEBOOK_SMOKE"):  # tests/test_notebooks.py: the same steps in seconds
      N_STUDIES, SCALE, SPACING_MM, TRAIN_STEPS, BATCH_SIZE, NUM_CLICKS = 6, 0.5, 8.0, 3, 4, 2
      TRAIN_OVERRIDES = {SMOKE_SAM}
    ''', parameters=True),
    md("## Devices and data"),
    DEVICES,
    COHORT,
    md('''
    ## The promptable model

    An official checkpoint is converted once into `<name>_petfm/` (config + Orbax variables); SegAnyPET and
    SAM-Med3D work on 128³ crops of 1.5 mm around the first click. Otherwise the tiny model is trained with
    simulated clicks (each round clicks the largest error of the previous prediction) on 32³ crops around the
    cohort's organs and lesions; rerunning with the same `WORKDIR` resumes or reuses it. The default 150 steps
    only show the mechanics: the masks become useful after a few thousand steps (a GPU/TPU runtime, more
    studies) or with the official weights.
    '''),
    code('''
    from petfm import cli
    from petfm.config import load_config
    from petfm.seganypet import promptable
    from petfm.train import seganypet

    if CHECKPOINT.endswith(".pth"):
      converted = CHECKPOINT[:-len(".pth")] + "_petfm"
      if not os.path.isdir(converted):
        assert cli.main(["convert-sam-med3d", CHECKPOINT, converted]) == 0
      checkpoint = converted
    elif CHECKPOINT:
      checkpoint = CHECKPOINT
    else:
      config = load_config(f"{REPO}/experiments/seganypet.py:tiny", {
          "data_dir": records_dir, "total_steps": TRAIN_STEPS, "batch_size": batch_size,
          "optim.warmup_steps": max(1, TRAIN_STEPS // 10), "log_every_steps": max(1, TRAIN_STEPS // 10),
          "seed": SEED, **TRAIN_OVERRIDES})
      last = seganypet.train(config, WORKDIR)
      print({k: round(v, 4) for k, v in last.items() if k in ("loss", "dice", "examples_per_s")})
      checkpoint = WORKDIR
    model = promptable.Segmenter.load(checkpoint)
    spec = model.spec
    print(f"{spec.backbone}: {model.size}³ crops of {spec.spacing} mm, channels {spec.channels}")
    '''),
    md('''
    ## The image and the clicks

    Clicks are voxel indices `(x, y, z)` of the PET image as stored in its NIfTI file (what a viewer such as
    ITK-SNAP or 3D Slicer shows as voxel coordinates), `+` for "this is the lesion", `-` for "this is not".
    The crop is centred on the first positive click.
    '''),
    code('''
    import glob, json
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    truth = None
    if IMAGE:
      image, ct = nib.load(IMAGE), nib.load(CT) if CT else None
    else:   # the held-out study of the synthetic cohort with the largest lesion; that lesion is the target
      with open(os.path.join(records_dir, "manifest.json")) as f:
        studies = json.load(f)["studies"]
      held_out = [s for s in studies if s["split"] != "train" and s["lesions"]] or studies
      study = max(held_out, key=lambda s: max((size for _, size in s["lesions"]), default=0))["study_id"]
      image = nib.load(os.path.join(nifti_dir, study, "SUV.nii.gz"))
      lesions = np.asarray(nib.load(os.path.join(nifti_dir, study, "SEG.nii.gz")).dataobj) > 0
      components, _ = ndimage.label(lesions)
      truth = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
      print(f"study {study}: target lesion of {int(truth.sum())} voxels")
      ct = nib.load(os.path.join(nifti_dir, study, "CTres.nii.gz"))
    suv = image.get_fdata(dtype=np.float32)
    print("image", suv.shape, "voxel size (mm)", tuple(round(float(v), 2) for v in image.header.get_zooms()))
    '''),
    code('''
    %matplotlib inline
    import matplotlib.pyplot as plt
    from petfm.models.sam3d import NEGATIVE, POSITIVE

    # Display in RAS+ orientation (x → patient left-right, y → anterior, z → superior), voxel aspect kept.
    ornt = nib.orientations.io_orientation(image.affine)
    ras_affine = image.as_reoriented(ornt).affine
    ras = lambda volume: nib.orientations.apply_orientation(np.asarray(volume), ornt)
    zooms = np.sqrt((ras_affine[:3, :3] ** 2).sum(0))
    suv_ras = ras(suv)

    def to_ras(voxel):
      return np.rint(np.linalg.solve(ras_affine, image.affine @ [*voxel, 1.0])[:3]).astype(int)

    def show(mask, clicks, title, field_mm=160.0):
      """Axial, coronal and sagittal slices through the last click, `field_mm` wide: PET, mask (red),
      truth (gold, dashed), clicks (+ positive, x negative)."""
      centre = to_ras(clicks[-1][0])
      mask_ras = ras(mask).astype(np.uint8)
      truth_ras = None if truth is None else ras(truth).astype(np.uint8)
      half = np.ceil(field_mm / 2 / zooms).astype(int)
      lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, suv_ras.shape)
      vmax = np.percentile(suv_ras[suv_ras > 0], 99.5)
      fig, axes = plt.subplots(1, 3, figsize=(13, 4.5))
      for ax, (name, axis, (u, v)) in zip(axes, (("axial", 2, (0, 1)), ("coronal", 1, (0, 2)),
                                                 ("sagittal", 0, (1, 2)))):
        index = [slice(lo[a], hi[a]) for a in range(3)]
        index[axis] = centre[axis]
        index = tuple(index)
        extent = (lo[u] - 0.5, hi[u] - 0.5, lo[v] - 0.5, hi[v] - 0.5)
        ax.imshow(suv_ras[index].T, origin="lower", cmap="gray_r", vmin=0, vmax=vmax, extent=extent,
                  aspect=zooms[v] / zooms[u])
        for volume, style in ((mask_ras, dict(colors="red", linewidths=1.5)),
                              (truth_ras, dict(colors="gold", linewidths=1.2, linestyles="--"))):
          if volume is not None and volume[index].any():
            ax.contour(volume[index].T, levels=[0.5], extent=extent, origin="lower", **style)
        for voxel, label in clicks:
          p = to_ras(voxel)
          ax.plot(p[u], p[v], "+" if label == POSITIVE else "x", color="lime" if label == POSITIVE else "red",
                  markersize=9, markeredgewidth=1.5)
        ax.set_title(f"{name} {centre[axis]}")
        ax.set_axis_off()
      fig.suptitle(title)
      plt.show()
    '''),
    md("## Click, look, click again"),
    code('''
    from petfm.eval import metrics
    from petfm.seganypet import clicks as click_sim, interactive, preprocess

    if CLICKS is not None:
      planned = [(np.array(c[:3]), POSITIVE if c[3] == "+" else NEGATIVE) for c in CLICKS]
    elif truth is not None:
      planned = [click_sim.next_click(np.zeros_like(truth), truth)]   # the lesion's most interior voxel
    else:
      raise ValueError("CLICKS: give the clicks for your IMAGE, e.g. [(120, 98, 143, '+')]")
    first = next(voxel for voxel, label in planned if label == POSITIVE)
    session = interactive.Session(model, image, first, ct)    # crops and embeds once; each click decodes
    in_crop = preprocess.to_original(np.ones((model.size,) * 3, np.uint8), session.geo) > 0
    done = []
    while planned:
      voxel, label = planned.pop(0)
      mask = session.click(voxel, label)
      done.append((voxel, label))
      title = (f"click {len(done)}: {'+' if label == POSITIVE else '-'} {tuple(int(v) for v in voxel)} → "
               f"{int(mask.sum())} voxels")
      if truth is not None:
        title += f", Dice {metrics.dice(mask > 0, truth):.3f}"
      show(mask, done, title)
      if CLICKS is None and len(done) < NUM_CLICKS:   # next simulated click: the largest error in the crop
        correction = click_sim.next_click(mask > 0, truth & in_crop)
        if correction is not None:
          planned.append(correction)
    '''),
    md("## Save the mask"),
    code('''
    interactive.save_mask(mask, image, OUT)
    saved = nib.load(OUT)
    print(f"{OUT}: shape {saved.shape}, {int(np.asarray(saved.dataobj).sum())} voxels, "
          "same grid as the image: "
          f"{saved.shape == image.shape and np.allclose(saved.affine, image.affine)}")
    '''),
    md('''
    The same from a terminal: `petfm segment --image SUV.nii.gz --point x,y,z --point x,y,z:-
    --out mask.nii.gz --checkpoint DIR --interactive` reads further clicks from stdin and rewrites the mask
    after each one.
    `petfm eval-clicks --checkpoint DIR --data_dir RECORDS --out DIR` scores a model over a test split
    (Dice after 1/3/5/10 simulated clicks).
    '''),
]

NOTEBOOKS = {
    "01_quickstart_pretraining.ipynb": QUICKSTART,
    "02_masking_ratio_ablation.ipynb": ABLATION,
    "03_interactive_segmentation.ipynb": SEGMENTATION,
    "04_throughput.ipynb": THROUGHPUT,
}


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
  """A v4 notebook without outputs; cell ids are `<notebook number>-<index>` so that rebuilding is stable."""
  prefix = name.split("_")[0]
  nb_cells = []
  for i, (kind, source) in enumerate(cells):
    cell_id = f"c{prefix}-{i:02d}"
    if kind == "markdown":
      nb_cells.append(nbformat.v4.new_markdown_cell(source, id=cell_id))
    else:
      metadata = {"tags": ["parameters"]} if kind == "parameters" else {}
      nb_cells.append(nbformat.v4.new_code_cell(source, id=cell_id, metadata=metadata))
  nb = nbformat.v4.new_notebook(cells=nb_cells, metadata={
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "colab": {"name": name, "provenance": []},
  })
  nbformat.validate(nb)
  return nb


def render(name: str) -> str:
  return nbformat.writes(build(name, NOTEBOOKS[name])) + "\n"


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true", help="only compare the committed files with the output")
  args = parser.parse_args(argv)
  stale = []
  for name in NOTEBOOKS:
    path = os.path.join(HERE, name)
    text = render(name)
    current = open(path).read() if os.path.exists(path) else None
    if current != text:
      stale.append(name)
      if not args.check:
        with open(path + ".tmp", "w") as f:
          f.write(text)
        os.replace(path + ".tmp", path)
  if args.check and stale:
    print(f"out of date (run python colab/make_notebooks.py): {', '.join(stale)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
