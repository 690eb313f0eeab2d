"""One figure style for the whole suite, and saving as PNG + PDF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def save_figure(fig, path_stem: str | Path) -> list[Path]:
    """Save ``fig`` as ``<path_stem>.png`` and ``<path_stem>.pdf``; returns both paths.

    A file whose drawing is unchanged is left as it is on disk, so re-running a notebook on unchanged
    tables leaves the gallery (and ``git status``) untouched: PNGs are compared byte for byte, PDFs by
    their content (:func:`pdf_content`): coordinates at 0.01 pt and the sign of zero ignored, which is
    the float noise that differs between CPUs (FMA / SIMD kernels) in float32 results and in matplotlib's
    transforms.
    """
    import io

    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=p.suffix[1:], metadata={"CreationDate": None} if p.suffix == ".pdf" else None)
        data = buffer.getvalue()
        if p.is_file():
            old = p.read_bytes()
            if old == data or (p.suffix == ".pdf" and pdf_content(old) == pdf_content(data)):
                continue
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(p)
    return paths


def pdf_content(data: bytes) -> list[bytes]:
    """The streams of a PDF (decompressed), decimal numbers rounded to 0.01 and signed zeros written as
    zeros: what a reader draws.

    Args:
        data: the bytes of a PDF file written by matplotlib.
    Returns:
        one entry per stream (page contents, fonts, images), in file order.
    """
    import re
    import zlib

    out = []
    for match in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", data, flags=re.S):
        body = match.group(1)
        try:
            body = zlib.decompress(body)
        except zlib.error:
            pass
        out.append(re.sub(rb"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])", _coarse_number, body))
    return out


def _coarse_number(match: Any) -> bytes:
    """A PDF coordinate at 0.01 pt (1/7200 inch, far below what any viewer draws); ``-0`` -> ``0``."""
    value = round(float(match.group(0)), 2)
    return b"%.2f" % (value + 0.0)  # + 0.0 turns -0.0 into 0.0
