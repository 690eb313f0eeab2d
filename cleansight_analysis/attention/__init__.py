"""Attention access: rows of chosen queries and their mass per token group."""

from .rows import AttentionRows, RowRecorder, StopForward

__all__ = ["AttentionRows", "RowRecorder", "StopForward"]
