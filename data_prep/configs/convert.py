"""Config of `petfm prepare` / `python -m data_prep.convert` (NIfTI or DICOM studies → ArrayRecord).

`--config data_prep/configs/convert.py:ARG` with ARG = `SPACING[,layout=...]`, e.g. `convert.py:1.5` for
1.5 mm isotropic voxels (SegAnyPET crops) or `convert.py:4.0,layout=hecktor`. Any field can be overridden with
`--config.FIELD=VALUE`, e.g. `--config.spacing="(2.0,2.0,3.0)"` or `--config.allow_empty_label=True`.
The fields, their defaults and what each one does are defined once, in `petfm.data.studies.get_config`
(`petfm predict-lesions` converts a study with the same defaults).
"""

from petfm.data.studies import get_config

__all__ = ["get_config"]
