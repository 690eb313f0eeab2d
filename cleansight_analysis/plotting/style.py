"""One figure style for the whole suite, and saving as PNG + PDF."""

from __future__ import annotations

from ..results import pdf_content, save_figure  # noqa: F401 - the figure writer lives with the table writer

#: Colours of the token groups, used by every figure.
GROUP_COLORS = {"system": "#8c8c8c", "image": "#d1495b", "prompt": "#00798c", "template_tail": "#edae49",
                "generated": "#66a182"}
GROUP_LABELS = {"system": "system", "image": "image", "prompt": "prompt", "template_tail": "template tail",
                "generated": "generated"}


def set_style() -> None:
    """Seaborn ``ticks`` style with readable sizes (call once per notebook)."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context="notebook", style="ticks", font_scale=1.0)
    mpl.rcParams.update({"figure.dpi": 110, "savefig.dpi": 200, "savefig.bbox": "tight",
                         "axes.spines.top": False, "axes.spines.right": False, "axes.titleweight": "bold",
                         "pdf.fonttype": 42})
