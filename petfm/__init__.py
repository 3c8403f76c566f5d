"""petfm: JAX/Flax foundation models for whole-body PET/CT (FratMAE, SegAnyPET)."""

__version__ = "0.1.0"
