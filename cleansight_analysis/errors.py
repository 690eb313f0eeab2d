"""Exceptions raised by cleansight-analysis.

Every error the package raises on bad input derives from :class:`CleanSightError` (itself a
``ValueError``), so callers can catch the whole family at once, and every message names the
offending value and what would have been accepted.
"""

from __future__ import annotations


class CleanSightError(ValueError):
    """Base class of every input/configuration error raised by cleansight-analysis."""


class UnsupportedModelError(CleanSightError):
    """The model's architecture has no adapter in this package (see ``SUPPORTED_ARCHITECTURES``)."""


class ModelSourceError(CleanSightError):
    """A model source (registry name, folder or object) cannot be loaded."""


class InputError(CleanSightError):
    """An image, prompt or batch handed to the model is malformed."""


class LayerIndexError(CleanSightError, IndexError):
    """A layer (or head) index is outside the model's range."""


class DatasetError(CleanSightError):
    """A dataset folder on disk is missing, incomplete or not in the expected format."""


class AttackError(CleanSightError):
    """An attack name, preset or setting is unknown or unavailable (see ``cleansight_analysis.attacks``)."""


class CalibrationError(InputError):
    """A saved calibration (CleanSight ``fit``) is malformed, out of range or fitted on another model."""


class OutputExistsError(CleanSightError):
    """An output folder or file already exists and the caller did not ask to overwrite or resume it."""


class NumericalError(CleanSightError):
    """A forward pass produced non-finite values (NaN / inf logits or attention rows); names the layer."""


class CardError(ModelSourceError):
    """A model card (``card.json``) is malformed, shadows a built-in name or has a cyclic ``base`` chain."""
