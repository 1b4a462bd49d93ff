"""Where an image's tokens sit in the expanded sequence, and how they form grids.

An image contributes one contiguous *span* of positions to the expanded sequence (after the
placeholder has been replaced by the image embeddings).  Inside the span lie one or more
*grids*: the base (global) grid of LLaVA-style anyres models, the high-resolution grid whose
every row ends with a learned newline token, a Qwen2-VL-style merged grid, or a VQ token grid.
A :class:`Grid` names its first token (relative to the span start), its rows and columns, and its
row stride in the sequence (``cols + 1`` when a newline column follows every row; that column is
dropped, never reshaped into the map -- the released reference code's shear bug).

>>> g = Grid("hires", offset=4, rows=2, cols=3, row_stride=4)
>>> g.positions(span_start=10).tolist()
[[14, 15, 16], [18, 19, 20]]
>>> lay = ImageLayout(span_start=10, span_length=12,
...                   grids=(Grid("base", 0, 2, 2, 2), g))
>>> lay.check()
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["Grid", "ImageLayout", "anyres_layout", "merged_layout", "single_grid_layout"]


@dataclass(frozen=True)
class Grid:
    """One grid of image tokens inside an image span."""

    name: str
    offset: int        # first token of the grid, relative to the span start
    rows: int
    cols: int
    row_stride: int    # sequence positions per row: cols, or cols + 1 with a newline column

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"grid {self.name!r}: rows and cols must be >= 1, got "
                             f"{self.rows}x{self.cols}")
        if self.row_stride < self.cols:
            raise ValueError(f"grid {self.name!r}: row_stride {self.row_stride} < cols {self.cols}")
        if self.offset < 0:
            raise ValueError(f"grid {self.name!r}: offset must be >= 0")

    @property
    def length(self) -> int:
        """Number of sequence positions the grid occupies (newline tokens included)."""
        return self.rows * self.row_stride

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def positions(self, span_start: int) -> np.ndarray:
        """(rows, cols) absolute sequence positions of the grid's cells (newlines skipped)."""
        r = np.arange(self.rows)[:, None] * self.row_stride
        c = np.arange(self.cols)[None, :]
        return span_start + self.offset + r + c


@dataclass(frozen=True)
class ImageLayout:
    """One image's span in the expanded sequence and the grids inside it."""

    span_start: int
    span_length: int
    grids: tuple = field(default_factory=tuple)
    image_index: int = 0

    def check(self) -> None:
        """Raise ValueError when a grid runs past the span."""
        if not self.grids:
            raise ValueError("an ImageLayout needs at least one grid")
        for g in self.grids:
            if g.offset + g.length > self.span_length:
                raise ValueError(f"grid {g.name!r} ends at {g.offset + g.length} but the image span "
                                 f"has {self.span_length} tokens")

    @property
    def span_end(self) -> int:
        return self.span_start + self.span_length

    def grid(self, name: str) -> Grid:
        for g in self.grids:
            if g.name == name:
                return g
        raise KeyError(f"no grid {name!r}; this image has {[g.name for g in self.grids]}")

    def to_dict(self) -> dict:
        return {"span_start": self.span_start, "span_length": self.span_length,
                "image_index": self.image_index, "grids": [asdict(g) for g in self.grids]}

    @classmethod
    def from_dict(cls, d: dict) -> "ImageLayout":
        return cls(d["span_start"], d["span_length"], tuple(Grid(**g) for g in d["grids"]),
                   d.get("image_index", 0))


def single_grid_layout(span_start: int, rows: int, cols: int, name: str = "base",
                       image_index: int = 0) -> ImageLayout:
    """A span that is exactly one rows x cols grid (VQ tokens, a plain ViT grid).

    >>> single_grid_layout(5, 2, 3).span_length
    6
    """
    lay = ImageLayout(span_start, rows * cols, (Grid(name, 0, rows, cols, cols),), image_index)
    lay.check()
    return lay


def anyres_layout(span_start: int, base: tuple[int, int], hires: tuple[int, int] | None,
                  image_index: int = 0) -> ImageLayout:
    """LLaVA anyres packing: a base grid, then an h x (w + 1) grid whose last column is the
    learned newline token.

    >>> lay = anyres_layout(3, (2, 2), (3, 4))
    >>> lay.span_length, lay.grid("hires").positions(3)[1].tolist()
    (19, [12, 13, 14, 15])
    """
    grids = [Grid("base", 0, base[0], base[1], base[1])]
    length = base[0] * base[1]
    if hires is not None:
        h, w = hires
        grids.append(Grid("hires", length, h, w, w + 1))
        length += h * (w + 1)
    lay = ImageLayout(span_start, length, tuple(grids), image_index)
    lay.check()
    return lay


def merged_layout(span_start: int, patch_rows: int, patch_cols: int, merge: int = 2,
                  image_index: int = 0) -> ImageLayout:
    """Qwen2-VL-style packing: the patch grid merged merge x merge into one token each.

    >>> merged_layout(7, 8, 6).grids[0].shape
    (4, 3)
    """
    if patch_rows % merge or patch_cols % merge:
        raise ValueError(f"a {patch_rows}x{patch_cols} patch grid is not divisible by merge={merge}")
    rows, cols = patch_rows // merge, patch_cols // merge
    return single_grid_layout(span_start, rows, cols, "merged", image_index)
