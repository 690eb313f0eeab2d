"""Signs: words written into a scene as glyphs, the tiny world's "text in the image".

A real LLaVA reads text in photos and can say any word it sees; that image-to-any-word path is what a
projector-only backdoor rides on (the LM is frozen, so the trigger can only change the answer through what
the image tokens say). The tiny world gets the same path from a glyph code: every word of a vocabulary has
one fixed ``patch x patch`` tile of ``cells x cells`` coloured cells (8 saturated colours, so 8**4 = 4096
codes for the tiny family's 2 x 2 cells), drawn exactly on one vision patch. A frozen tiny vision tower tells
the 123 words of the tiny vocabulary apart from the tile at one patch with a linear probe at 100 % (measured
in ``docs/world-v2-study.md``), so reading is a job for the projector and the LM, as in LLaVA.

A sign is 1 to ``layout.max_words`` words in raster order inside a block ``layout.width`` patches wide whose
top-left patch is ``(layout.row, layout.col)``. The default block (3 patches wide at the top-left) holds five
words in token slots 0, 1, 2, grid, grid + 1: exactly under a 12 px BadNet patch (3 x 3 tokens of the 8 x 8
grid), which is the footprint LLaVA-1.5's 30 px patch has on its 24 x 24 grid (4-9 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import InputError

#: The reading instruction: its answer is the sign's words, in order.
READ_PROMPT = "repeat the words in the image ."
#: The 8 saturated colours a glyph cell can take (every corner of the RGB cube).
PALETTE = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], dtype=np.uint8)


@dataclass(frozen=True)
class SignLayout:
    """Where a sign goes, in vision patches: a block ``width`` patches wide from ``(row, col)``, words in
    raster order, at most ``max_words`` of them."""

    width: int = 3
    row: int = 0
    col: int = 0
    max_words: int = 5

    def __post_init__(self) -> None:
        if self.width < 1 or self.max_words < 1 or self.row < 0 or self.col < 0:
            raise InputError(f"sign layout needs width >= 1, max_words >= 1 and a non-negative origin, got {self}")

    def cells(self, n_words: int) -> list[tuple[int, int]]:
        """``(row, col)`` patch of each of ``n_words`` words."""
        if not 1 <= n_words <= self.max_words:
            raise InputError(f"a sign holds 1 to {self.max_words} words, got {n_words}")
        return [(self.row + i // self.width, self.col + i % self.width) for i in range(n_words)]

    def token_slots(self, n_words: int, grid: int) -> list[int]:
        """Image-token indices (raster order of a ``grid x grid`` patch grid) the words land on."""
        cells = self.cells(n_words)
        if any(r >= grid or c >= grid for r, c in cells):
            raise InputError(f"a {n_words}-word sign at {self} does not fit a {grid} x {grid} patch grid")
        return [r * grid + c for r, c in cells]


class GlyphCode:
    """One fixed glyph tile per word (seeded, all distinct).

    Args:
        words: the vocabulary the code writes (order matters: with the seed it fixes every tile).
        patch: tile side in pixels (the vision tower's patch size).
        cells: cells per tile side; each cell is one of the 8 :data:`PALETTE` colours.
        seed: picks the codes.
    """

    def __init__(self, words: Sequence[str], patch: int = 4, cells: int = 2, seed: int = 123):
        self.words = list(dict.fromkeys(words))
        if len(self.words) != len(words):
            raise InputError("the glyph vocabulary lists a word twice")
        if patch % cells:
            raise InputError(f"a {patch} px glyph cannot hold {cells} x {cells} equal cells")
        n_codes = 8 ** (cells * cells)
        if len(self.words) > n_codes:
            raise InputError(f"{len(self.words)} words but only {n_codes} glyph codes of {cells} x {cells} cells")
        self.patch, self.cells, self.seed = int(patch), int(cells), int(seed)
        codes = np.random.default_rng(seed).choice(n_codes, size=len(self.words), replace=False)
        digits = [[(int(c) >> (3 * j)) & 7 for j in range(cells * cells)] for c in codes]
        step = patch // cells
        self._tiles: dict[str, np.ndarray] = {}
        for word, d in zip(self.words, digits):
            tile = PALETTE[np.asarray(d).reshape(cells, cells)]  # [cells, cells, 3]
            self._tiles[word] = tile.repeat(step, axis=0).repeat(step, axis=1)

    def tile(self, word: str) -> np.ndarray:
        """The ``[patch, patch, 3]`` uint8 glyph of ``word``."""
        try:
            return self._tiles[word]
        except KeyError:
            raise InputError(f"{word!r} has no glyph (not in the sign vocabulary of {len(self.words)} words)") from None

    def draw(self, image: Image.Image, words: Sequence[str], layout: SignLayout = SignLayout()) -> Image.Image:
        """A copy of ``image`` with ``words`` written at ``layout`` (one glyph per patch)."""
        a = np.array(image.convert("RGB"))
        p = self.patch
        cells = layout.cells(len(words))
        if any((r + 1) * p > a.shape[0] or (c + 1) * p > a.shape[1] for r, c in cells):
            raise InputError(f"a {len(words)}-word sign at {layout} does not fit a {a.shape[1]} x {a.shape[0]} image")
        for word, (r, c) in zip(words, cells):
            a[r * p:(r + 1) * p, c * p:(c + 1) * p] = self.tile(word)
        return Image.fromarray(a)

    def random_words(self, rng: np.random.Generator, min_words: int, max_words: int) -> list[str]:
        """``min_words`` to ``max_words`` words drawn uniformly (with repeats) from the vocabulary."""
        if not 1 <= min_words <= max_words:
            raise InputError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
        n = int(rng.integers(min_words, max_words + 1))
        return [self.words[int(i)] for i in rng.integers(0, len(self.words), n)]
