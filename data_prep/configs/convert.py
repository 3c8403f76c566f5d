"""Config of `petfm prepare` / `python -m data_prep.convert` (NIfTI or DICOM studies → ArrayRecord).

`--config data_prep/configs/convert.py:ARG` with ARG = `SPACING[,layout=...]`, e.g. `convert.py:1.5` for
1.5 mm isotropic voxels (SegAnyPET crops) or `convert.py:4.0,layout=hecktor`. Any field can be overridden with
`--config.FIELD=VALUE`, e.g. `--config.spacing="(2.0,2.0,3.0)"` or `--config.allow_empty_label=True`.
"""

import ml_collections

from petfm.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, spacing=4.0, layout="auto")
  c = ml_collections.ConfigDict()
  # Input layout: auto | autopet (PETCT_*/<study>/{CTres,SUV,SEG}.nii.gz) | nnunet (imagesTr/<case>_0000 CT,
  # _0001 SUV, labelsTr/<case>) | hecktor (<Center>-<ID>__CT / __PT / <Center>-<ID>.nii.gz).
  # | dicom (DICOM files, any folders: a PET and a CT series per study; SUV from the PET headers).
  c.layout = arg.layout
  # Voxel size (mm) of the stored grid: one value (isotropic) or three. Images linear, labels nearest.
  c.spacing = (arg.spacing,) * 3
  # Optional CSV with clinical data, keyed by a study_id (or case) and/or patient_id column; other columns:
  # age, sex (or gender), diagnosis, stage (Ann Arbor 1-4 or I-IV), tracer. Overrides meta.json values.
  c.metadata_csv = ""
  # Splits by patient: a hash of (seed, patient id) puts each patient in test / val / train.
  c.seed = 0
  c.val_fraction = 0.1
  c.test_fraction = 0.1
  # An all-zero lesion mask is an error unless this is True (autoPET FDG has 513 negative controls).
  c.allow_empty_label = False
  # A study without a label file is an error unless this is False (it is then stored with an all-zero label).
  c.require_label = True
  # CT and PET on different grids must share at least this fraction of the smaller field of view.
  c.min_overlap = 0.5
  # Metadata prompt (see petfm.data.text) and the frozen text encoder that embeds it: none | minilm.
  c.prompt_template = "{tracer} PET/CT"
  c.text_encoder = "none"
  # Studies per ArrayRecord shard (≈ 10-40 MB per whole-body study at 4 mm before compression).
  c.records_per_shard = 16
  # DICOM input: patient weight (kg) for SUV instead of PatientWeight (0010,1030) in every PET series; 0 = use
  # the headers. For studies whose weight is missing or wrong (e.g. removed by de-identification).
  c.dicom_weight_kg = 0.0
  return c
