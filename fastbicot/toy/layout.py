"""Where objects go: a 3 x 3 grid of slots on the 8 x 8 token image, and the plan text that names them.

An object is a 2 x 2-token square of one colour in one slot. Slots start at token rows/columns
0, 3 and 6, so squares in different slots never touch (a one-token gap): every object is its own
connected component, which is what the counting reward counts. A plan is the list of objects in
words, e.g. "red square at middle left . green square at middle right"; ``render_tokens`` turns a
layout into the 64 image-token ids, deterministically, so a plan fully determines its image.
"""

from __future__ import annotations

from typing import NamedTuple

from .codebook import COLOR_CODES, GRID, background_code
from .vocab import COLORS, COLS, ROWS

SQUARE = 2  # tokens per square side
SLOT_STARTS = (0, 3, 6)  # first token row / column of the slots
SLOTS = tuple((r, c) for r in range(3) for c in range(3))  # (row, col) indices, row-major
PLAN_SEPARATOR = " . "


class ToyObject(NamedTuple):
    color: str  # a key of COLORS
    row: int  # 0 top, 1 middle, 2 bottom
    col: int  # 0 left, 1 center, 2 right

    def box(self) -> tuple[float, float, float, float]:
        """Normalised (x1, y1, x2, y2) box of the square, y down."""
        y, x = SLOT_STARTS[self.row], SLOT_STARTS[self.col]
        return (x / GRID, y / GRID, (x + SQUARE) / GRID, (y + SQUARE) / GRID)


def render_tokens(objects) -> list[int]:
    """The 64 image-token ids (row-major) of a layout: background everywhere, each square in its slot."""
    grid = [[background_code(y * GRID + x) for x in range(GRID)] for y in range(GRID)]
    seen = set()
    for obj in objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown colour {obj.color!r}; toy colours are {list(COLORS)}")
        if (obj.row, obj.col) not in SLOTS:
            raise ValueError(f"slot (row={obj.row}, col={obj.col}) is outside the 3 x 3 grid")
        if (obj.row, obj.col) in seen:
            raise ValueError(f"two objects in slot {ROWS[obj.row]} {COLS[obj.col]}")
        seen.add((obj.row, obj.col))
        y0, x0 = SLOT_STARTS[obj.row], SLOT_STARTS[obj.col]
        for y in range(y0, y0 + SQUARE):
            for x in range(x0, x0 + SQUARE):
                grid[y][x] = COLOR_CODES[obj.color]
    return [code for row in grid for code in row]


def plan_text(objects) -> str:
    """'red square at middle left . green square at top right' (one clause per object)."""
    return PLAN_SEPARATOR.join(f"{o.color} square at {ROWS[o.row]} {COLS[o.col]}" for o in objects)


def parse_plan(text: str) -> list[ToyObject]:
    """Inverse of ``plan_text`` (whitespace- and case-insensitive); ValueError on any other text."""
    words = text.lower().split()
    clauses, cur = [], []
    for w in words + ["."]:
        if w == ".":
            if cur:
                clauses.append(cur)
            cur = []
        else:
            cur.append(w)
    out = []
    for cl in clauses:
        if len(cl) != 5 or cl[0] not in COLORS or cl[1:3] != ["square", "at"] or cl[3] not in ROWS \
                or cl[4] not in COLS:
            raise ValueError(f"not a plan clause '<colour> square at <row> <col>': {' '.join(cl)!r}")
        out.append(ToyObject(cl[0], ROWS.index(cl[3]), COLS.index(cl[4])))
    return out
