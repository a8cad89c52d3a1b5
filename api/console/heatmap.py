"""The expert map as a server-side SVG heatmap: one row per MoE layer, one column per routed
expert, colour = attribution score (a perceptually ordered ramp, low = light, high = dark),
selected experts outlined. No script and no image file: the page stays readable without
JavaScript, prints, and needs no matplotlib in the API process."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

# A light-to-dark ramp (viridis stops, reversed so that high scores are dark and the
# outline of a selected expert stands out on any cell).
RAMP = ((253, 231, 37), (94, 201, 98), (33, 145, 140), (59, 82, 139), (68, 1, 84))
OUTLINE = "#d6006f"
CELL = 32
MIN_WIDTH = 480
LEFT = 64
TOP = 30
MAX_CELLS = 65_536  # a bigger map is drawn as a table only (the page stays small)


@dataclass(frozen=True)
class Cell:
    layer: int
    expert: int
    score: float
    selected: bool


def _colour(t: float) -> str:
    t = min(max(t, 0.0), 1.0) * (len(RAMP) - 1)
    i = min(int(t), len(RAMP) - 2)
    f = t - i
    a, b = RAMP[i], RAMP[i + 1]
    r, g, bl = (round(a[k] + (b[k] - a[k]) * f) for k in range(3))
    return f"#{r:02x}{g:02x}{bl:02x}"


def svg(cells: Sequence[Cell], method: str | None) -> str | None:
    """The heatmap as an inline <svg> element (escaped text); None when there is nothing to
    draw or it is too big to draw."""
    if not cells or len(cells) > MAX_CELLS:
        return None
    layers = sorted({c.layer for c in cells})
    n_exp = max(c.expert for c in cells) + 1
    lo = min(c.score for c in cells)
    hi = max(c.score for c in cells)
    span = hi - lo or 1.0
    width = LEFT + max(n_exp * CELL, 120) + 10
    height = TOP + len(layers) * CELL + 44
    # Small maps are drawn at least MIN_WIDTH px wide (scaled up; CSS scales down to fit).
    shown_w = max(width, MIN_WIDTH)
    shown_h = round(height * shown_w / width)
    selected = [c for c in cells if c.selected]
    sel_text = ", ".join(f"layer {c.layer} expert {c.expert}" for c in selected) or "none"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{shown_w}" height="{shown_h}" role="img" aria-labelledby="hm-title hm-desc" '
        'class="heatmap">',
        f'<title id="hm-title">Expert attribution ({escape(method or "unknown")}): '
        f"{len(layers)} layers by {n_exp} experts</title>",
        f'<desc id="hm-desc">Darker is a higher score (from {lo:.3g} to {hi:.3g}). '
        f"Selected, outlined: {escape(sel_text)}.</desc>",
        f'<text x="{LEFT}" y="16" class="axis">routed expert</text>',
    ]
    for e in range(n_exp):
        parts.append(
            f'<text x="{LEFT + e * CELL + CELL / 2}" y="{TOP - 4}" text-anchor="middle" '
            f'class="tick">{e}</text>'
        )
    row_of = {layer: i for i, layer in enumerate(layers)}
    for i, layer in enumerate(layers):
        parts.append(
            f'<text x="{LEFT - 6}" y="{TOP + i * CELL + CELL * 0.65}" text-anchor="end" '
            f'class="tick">layer {layer}</text>'
        )
    for c in cells:
        x = LEFT + c.expert * CELL
        y = TOP + row_of[c.layer] * CELL
        label = f"layer {c.layer}, expert {c.expert}: {c.score:.4g}"
        label += " (selected)" if c.selected else ""
        parts.append(
            f'<rect x="{x}" y="{y}" width="{CELL}" height="{CELL}" '
            f'fill="{_colour((c.score - lo) / span)}"><title>{escape(label)}</title></rect>'
        )
    for c in selected:  # drawn last, so no neighbour paints over the outline
        x = LEFT + c.expert * CELL
        y = TOP + row_of[c.layer] * CELL
        parts.append(
            f'<rect x="{x + 2}" y="{y + 2}" width="{CELL - 4}" height="{CELL - 4}" fill="none" '
            f'stroke="{OUTLINE}" stroke-width="3" class="selected"/>'
        )
    # Legend: the ramp from low to high.
    ly = TOP + len(layers) * CELL + 14
    steps = 20
    lw = max(n_exp * CELL, 120) / steps
    for k in range(steps):
        parts.append(
            f'<rect x="{LEFT + k * lw:.1f}" y="{ly}" width="{lw + 0.5:.1f}" height="10" '
            f'fill="{_colour(k / (steps - 1))}"/>'
        )
    parts.append(f'<text x="{LEFT}" y="{ly + 24}" class="tick">{lo:.3g}</text>')
    parts.append(
        f'<text x="{LEFT + steps * lw}" y="{ly + 24}" text-anchor="end" class="tick">'
        f"{hi:.3g}</text>"
    )
    parts.append("</svg>")
    return "".join(parts)
