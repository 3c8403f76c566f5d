"""SegAnyPET / SAM-Med3D: the `Segmenter` inference API (`promptable`), the official-weights converter
(`official_weights`), official crop preprocessing (`preprocess`), click simulation and evaluation."""

from petfm.models.sam3d import NEGATIVE, PADDING, POSITIVE
from petfm.seganypet.promptable import Segmenter, prompt_and_decode

__all__ = ["NEGATIVE", "PADDING", "POSITIVE", "Segmenter", "prompt_and_decode"]
