"""SegAnyPET / SAM-Med3D: `Segmenter` API, checkpoint converter (`convert`), crop preprocessing
(`preprocess`)."""

from petfm.models.sam3d import NEGATIVE, PADDING, POSITIVE
from petfm.seganypet.segmenter import Segmenter, embed, prompt_and_decode

__all__ = ["NEGATIVE", "PADDING", "POSITIVE", "Segmenter", "embed", "prompt_and_decode"]
