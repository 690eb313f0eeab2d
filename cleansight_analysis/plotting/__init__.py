"""Plotting: functions that only read tidy tables and draw them (no model calls here)."""

from .style import save_figure, set_style
from .attention import plot_group_share_heatmap, plot_group_shares, plot_image_attention

__all__ = ["save_figure", "set_style", "plot_group_share_heatmap", "plot_group_shares", "plot_image_attention"]
