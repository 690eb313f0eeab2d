"""Inputs: image validation, prompt rendering, batches and their token groups."""

from .batch import Batch, prepare_batch
from .groups import GENERATED, GROUP_NAMES, GridView, ImageTokens, TokenGroups
from .images import to_rgb_image
from .templates import LLAVA_CHAT_TEMPLATE, LLAVA_SYSTEM_PROMPT, RenderedPrompt, render_prompt

__all__ = [
    "Batch", "prepare_batch", "GENERATED", "GROUP_NAMES", "GridView", "ImageTokens", "TokenGroups",
    "to_rgb_image", "LLAVA_CHAT_TEMPLATE", "LLAVA_SYSTEM_PROMPT", "RenderedPrompt", "render_prompt",
]
