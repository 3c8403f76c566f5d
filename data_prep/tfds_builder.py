"""TensorFlow-Datasets builder for petfm PET/CT records: versions, `tfds.data_source`, no TensorFlow.

The builder serves the same records as `petfm prepare` (same fields and values, see `petfm.data.records`;
TFDS hands strings back as UTF-8 `bytes`). Its manual folder holds either

* a folder converted with `petfm prepare` (it has `manifest.json`): the records are copied as they are, or
* NIfTI or DICOM studies in any layout `data_prep.convert` reads: each study goes through the same
  `petfm.data.studies.convert_study` (config: `data_prep/configs/convert.py`, see `PetfmRecordsConfig`);
  a bad study is logged as one warning line and left out.

    import tensorflow_datasets as tfds
    from data_prep.tfds_builder import PetfmRecords
    builder = PetfmRecords(data_dir=DATA, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=INPUT))
    train = builder.as_data_source("train")         # random access; train[i] -> dict of numpy arrays
    # later, also from another process: tfds.data_source("petfm_records", data_dir=DATA) after importing
    # this module, or tfds.builder_from_directory(f"{DATA}/petfm_records/default/1.0.0") without it.

Data are written under `DATA/petfm_records/<config>/<version>/` as `petfm_records-<split>.array_record-*`
shards plus `dataset_info.json`; bump `VERSION` (and `RELEASE_NOTES`) when the record content changes, and
readers can pin a version with `tfds.data_source("petfm_records:1.0.0", ...)`. TFDS orders records by a hash
of their key (the study id), not in generation order.

Scaling out with Apache Beam (tens of thousands of studies). Give `download_and_prepare` a Beam runner or
pipeline options and every study is converted in parallel on the runner's workers instead of in this process:

    import apache_beam as beam
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=INPUT,                                             # NIfTI studies, e.g. on GCS
        beam_options=beam.options.pipeline_options.PipelineOptions(
            ["--runner=DataflowRunner", "--project=P", "--region=R", "--temp_location=gs://B/tmp",
             "--requirements_file=reqs.txt"])))      # locally: beam_runner=beam.runners.DirectRunner()

or with the `tfds` command line, which turns `--beam_pipeline_options` into `DownloadConfig.beam_options`:

    tfds build petfm_records --imports=data_prep.tfds_builder --manual_dir=INPUT --data_dir=gs://B/tfds \
        --file_format=array_record --beam_pipeline_options="runner=DataflowRunner,project=P,region=R,..."

With a runner or options set, `_generate_examples` returns a `beam.PTransform` (`beam.Create(studies) |
beam.FlatMap(convert one study)`); TFDS applies it per split inside one `beam.Pipeline` and also shuffles and
writes the ArrayRecord shards with Beam. The workers need petfm installed (`--requirements_file` or
`--setup_file`) and `apache-beam[gcp]`, which is needed for this path only and is not a petfm dependency.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from array_record.python.array_record_module import ArrayRecordReader

from data_prep import convert
from data_prep.configs import convert as convert_configs
from petfm.data import records, studies
from petfm.errors import UserError


@dataclasses.dataclass
class PetfmRecordsConfig(tfds.core.BuilderConfig):
  """How NIfTI input is converted: `convert_arg` is the ARG of `data_prep/configs/convert.py` (e.g. "1.5"
  for 1.5 mm voxels) and `overrides` sets config fields (e.g. {"allow_empty_label": True}). Ignored when the
  manual folder already holds converted records."""
  convert_arg: str = ""
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

  def convert_config(self) -> ml_collections.ConfigDict:
    config = convert_configs.get_config(self.convert_arg or None)
    config.update(self.overrides)
    return config


def features() -> tfds.features.FeaturesDict:
  """TFDS features for `petfm.data.records` fields; arrays stored as raw bytes so every value is exact."""
  def tensor(shape, dtype, encoding="bytes"):
    return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=encoding)
  volume = (None, None, None)
  spec = {name: tensor(volume, records.ARRAY_FIELDS[name], "zlib") for name in records.VOLUME_FIELDS}
  spec.update(targets=tensor((None, 6), np.int32), spacing=tensor((3,), np.float64),
              affine=tensor((4, 4), np.float64), original_affine=tensor((4, 4), np.float64),
              original_shape=tensor((3,), np.int64), text_embedding=tensor((None,), np.float32),
              age=tensor((), np.float64), stage=tensor((), np.int64))
  spec.update({name: tfds.features.Text() for name in records.STR_FIELDS})
  return tfds.features.FeaturesDict(spec)


class PetfmRecords(tfds.core.GeneratorBasedBuilder):
  """Whole-body PET/CT studies (CT HU, SUV, lesion and organ labels, metadata) on a canonical grid."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: petfm record format version 1."}
  BUILDER_CONFIGS = [PetfmRecordsConfig(name="default", description="4 mm isotropic (NIfTI input)")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Set manual_dir to a folder converted with `petfm prepare` (it holds manifest.json), or to a folder of "
      "NIfTI PET/CT studies in the autoPET, nnU-Net or HECKTOR layout, or of DICOM PET/CT.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=features(), description=__doc__.split("\n\n")[0])

  def _download_and_prepare(self, dl_manager, download_config=None):
    self._use_beam = bool(download_config and (download_config.beam_runner or download_config.beam_options))
    return super()._download_and_prepare(dl_manager, download_config)

  def _split_generators(self, dl_manager):
    source = os.fspath(dl_manager.manual_dir)
    if os.path.exists(os.path.join(source, records.MANIFEST)):
      manifest = records.read_manifest(source)
      items = {split: [os.path.join(source, shard) for shard in info["shards"]]
               for split, info in manifest["splits"].items()}
      example_fn: Callable[[Any], Iterator] = _examples_from_shard
    else:
      config = self.builder_config.convert_config()
      convert.check_config(config)
      _, found = studies.find_studies(source, config.layout)
      jobs, errors = studies.plan_jobs(found, config)
      for line in errors:
        logging.warning("%s (left out)", line)
      settings = config.to_dict()
      items = {split: [(job, settings) for job in jobs if job.split == split] for split in studies.SPLITS}
      example_fn = _example_from_nifti
    return {split: self._generate_examples(split_items, example_fn)
            for split, split_items in items.items() if split_items}

  def _generate_examples(self, items, example_fn):
    """(key, example) pairs, or with a Beam runner the `beam.PTransform` that makes them on its workers."""
    if getattr(self, "_use_beam", False):
      beam = tfds.core.lazy_imports.apache_beam
      return beam.Create(items) | beam.FlatMap(example_fn)
    return (example for item in items for example in example_fn(item))


def _examples_from_shard(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  reader = ArrayRecordReader(path)
  try:
    for data in reader.read_all():
      record = records.decode(data)
      yield record["study_id"], record
  finally:
    reader.close()


def _example_from_nifti(item: tuple[studies.Job, dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
  job, settings = item
  try:
    record = studies.convert_study(job, ml_collections.ConfigDict(settings))
  except UserError as e:
    logging.warning("%s (left out)", e)
    return
  yield job.study.study_id, record
