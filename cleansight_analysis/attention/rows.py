"""Attention rows, re-exported for the analyses of this package.

:class:`AttentionRows`, :class:`RowRecorder` and :class:`StopForward` are part of the model core and
live in :mod:`cleansight_analysis.models.rows` (``HookedLVLM.attention_rows`` returns them); importing
them from here keeps working.
"""

from ..models.hooknames import HookSpec
from ..models.rows import AttentionRows, RowRecorder, StopForward

__all__ = ["AttentionRows", "HookSpec", "RowRecorder", "StopForward"]
