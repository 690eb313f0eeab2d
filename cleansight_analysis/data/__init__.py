"""Datasets: the shared ``Sample`` type, the synthetic scene world and loaders for the paper's data."""

from .base import CAPTION_PROMPT, VQA_SUFFIX, Sample

__all__ = ["CAPTION_PROMPT", "VQA_SUFFIX", "Sample"]
