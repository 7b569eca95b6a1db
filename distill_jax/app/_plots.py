"""Drawing primitives of the report: overlays, labelled image mosaics and attribution grids.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402


def _heat(a: np.ndarray) -> np.ndarray:
    """Attribution [h, w, c] -> [h, w] magnitude normalised to [0, 1] per image."""
    m = np.abs(a).sum(-1)
    top = m.max()
    return m / top if top > 0 else np.zeros_like(m)


def _gray(x: np.ndarray) -> np.ndarray:
    """Image [h, w, c] -> grey [h, w] in [0, 1]: the channel mean, min-max scaled per image (constant -> 0)."""
    g = np.asarray(x, np.float64).mean(-1)
    lo, hi = g.min(), g.max()
    return (g - lo) / (hi - lo) if hi > lo else np.zeros_like(g)


def overlay(image: np.ndarray, attribution: np.ndarray, *, alpha: float = 0.7, cmap: str = "inferno") -> np.ndarray:
    """An attribution map laid over its image: grey image, colour layer whose opacity grows with |attribution|.

    out = (1 - a) * gray + a * colour, per pixel, with heat = sum_c |attribution| / max (in [0, 1]),
    a = alpha * heat, colour = cmap(heat)[:3] and gray = `_gray(image)` repeated over RGB, so pixels the
    map ignores show the plain image and the most attributed ones `alpha` of the colour.

    Args:
      image: [h, w, c] one image (any scale). attribution: [h, w, c'] its map.
      alpha: opacity of the colour layer where the map is largest, in [0, 1].
      cmap: a matplotlib colormap name.
    Returns:
      [h, w, 3] RGB in [0, 1].
    """
    if image.shape[:2] != attribution.shape[:2]:
        raise ValueError(f"overlay: image {image.shape} and attribution {attribution.shape} differ in height/width")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha must be in [0, 1], got {alpha}")
    heat = _heat(np.asarray(attribution, np.float64))
    colour = plt.get_cmap(cmap)(heat)[..., :3]
    a = (alpha * heat)[..., None]
    return (1.0 - a) * _gray(image)[..., None] + a * colour


def one_per_class(labels: Sequence[int], *, limit: int | None = None) -> np.ndarray:
    """Indices of the first example of each class in `labels`, in increasing class order (at most `limit` classes).

    The explained sample is class-stratified (`app._audit.test_sample`), so it holds one example per class
    before any repeats; this drops the repeats, and keeps every image when the sample is smaller than the
    number of classes.
    """
    labels = np.asarray(labels).reshape(-1)
    classes, first = np.unique(labels, return_index=True)
    return first[:limit].astype(np.int64) if limit is not None else first.astype(np.int64)


MAX_EXAMPLES = 10  # rows of an attribution figure: one test image per class, at most this many classes


DPI = 110


class Panel(NamedTuple):
    """One image of a mosaic: its place on the grid, its pixels and the title drawn above it ("": none).

    `col` may be a half-integer (a soft-tree node centred over its two children).
    """

    row: int
    col: float
    image: np.ndarray  # [h, w, 3] RGB or [h, w, 4] RGBA in [0, 1]
    title: str = ""


def _corners(panels: Sequence[Panel], gap: tuple[int, int]) -> list[tuple[int, int]]:
    """Top-left pixel (y, x) of each panel on the canvas: (row * (h + gap[0]), round(col * (w + gap[1])))."""
    h, w = panels[0].image.shape[:2]
    return [(p.row * (h + gap[0]), round(p.col * (w + gap[1]))) for p in panels]


def mosaic(panels: Sequence[Panel], *, gap: tuple[int, int]) -> np.ndarray:
    """Panels of one size placed on a white canvas at `_corners`.

    Args:
      panels: images [h, w, 3 or 4] in [0, 1], all of one height and width.
      gap: (between rows, between columns) in pixels.
    Returns:
      [H, W, 4] RGBA canvas just large enough: H = (last row + 1) * (h + gap[0]) - gap[0], likewise W.
    """
    h, w = panels[0].image.shape[:2]
    corners = _corners(panels, gap)
    canvas = np.ones((max(y for y, _ in corners) + h, max(x for _, x in corners) + w, 4))
    for p, (y, x) in zip(panels, corners):
        canvas[y:y + h, x:x + w, :p.image.shape[-1]] = p.image
    return canvas


def _text_inches(fontsize: float) -> float:
    """Height of one line of text at `fontsize` points, with a little room around it, in inches."""
    return 1.6 * fontsize / 72


def _text_width(text: str, fontsize: float) -> float:
    """Generous width of one line of `text` at `fontsize` points, in inches (0.6 em a character), for margins
    set without a layout pass."""
    return len(text) * fontsize * 0.6 / 72


def _grid(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, *, left: float, right: float, top: float,
          bottom: float, wspace: float = 0.0, hspace: float = 0.0) -> dict:
    """`gridspec_kw` for `plt.subplots` with margins and gaps between Axes given in inches.

    A layout fixed up front replaces tight_layout / constrained layout / bbox_inches="tight", each of which
    measures every text of the figure once more (the last draws the whole figure twice).
    """
    w, h = figsize
    ax_w = (w - left - right - (ncols - 1) * wspace) / ncols
    ax_h = (h - top - bottom - (nrows - 1) * hspace) / nrows
    return dict(left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h, wspace=wspace / ax_w,
                hspace=hspace / ax_h)


def _title(ax, text: str, **style) -> None:
    """An Axes title at the usual height; fixing y spares matplotlib from measuring every y tick label once
    more per draw to keep the title clear of them (our layouts put nothing above an Axes)."""
    ax.set_title(text, y=1.0, **style)


def _boxes(ax, boxes, **style) -> None:
    """Rectangles [n, 4] (x, y, width, height in data coordinates) drawn as one artist (thin black frames
    by default); hundreds of separate patches would each cost a transform per draw."""
    x, y, bw, bh = np.asarray(boxes, float).reshape(-1, 4).T
    corners = np.stack([np.stack([x, y], -1), np.stack([x + bw, y], -1), np.stack([x + bw, y + bh], -1),
                        np.stack([x, y + bh], -1)], 1)
    ax.add_collection(PolyCollection(corners, **{"facecolor": "none", "edgecolor": "k", "linewidth": 0.8, **style}),
                      autolim=False)


def labelled_mosaic(panels: Sequence[Panel], title: str, *, row_labels: Sequence[str] = (), gap: int | None = None,
                    inches: float = 1.1, frame: bool = True, fontsize: float = 7, label_fontsize: float = 8,
                    bottom: float = 0.1):
    """A figure of many small images drawn as one: the `mosaic` shown by a single imshow, plus text labels.

    Each panel's title goes above it, `row_labels[r]` left of row r, `title` (if any) on top. One image
    instead of one Axes per panel draws a figure of ~100 panels in a fraction of a second; the figure is
    sized from the grid (each panel `inches` wide, wider where panel titles need it), so it needs no
    layout pass (tight_layout).

    Args:
      panels: `Panel`s of one size. title: the figure's title ("" for none).
      row_labels: one per row, drawn rotated left of the row (may be empty).
      gap: pixels between panels; default an eighth of the panel width, at least 1. When rows below the
        first carry titles, rows are as far apart as a title needs instead.
      frame: a thin black frame around each panel.
      bottom: inches left free below the mosaic (for the caller's own Axes).
    Returns:
      (figure, Axes of the mosaic in canvas pixel coordinates: x right, y down).
    """
    h, w = panels[0].image.shape[:2]
    gap = max(1, w // 8) if gap is None else gap
    widest = max(_text_width(p.title, fontsize) for p in panels)
    inches = max(inches, (widest + 0.05) * w / (w + gap))  # panel titles stay apart
    scale = inches / w  # inches per canvas pixel
    titled_rows = any(p.title and p.row > 0 for p in panels)
    gap = (max(gap, int(np.ceil((_text_inches(fontsize) + 0.06) / scale))) if titled_rows else gap, gap)
    canvas, corners = mosaic(panels, gap=gap), _corners(panels, gap)
    width, height = canvas.shape[1] * scale, canvas.shape[0] * scale
    label_w = _text_inches(label_fontsize) if row_labels else 0.0
    top = 0.1 + (_text_inches(9) if title else 0.0) + (_text_inches(fontsize) if any(p.title for p in panels) else 0.0)
    fig_w = max(label_w + width + 0.3, _text_width(title, 9) + 0.4)  # wide enough for the title
    fig_h = top + height + bottom
    left = label_w + (fig_w - label_w - width) / 2  # mosaic centred in what the row labels leave
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=DPI)
    ax = fig.add_axes((left / fig_w, bottom / fig_h, width / fig_w, height / fig_h))
    ax.imshow(np.round(canvas * 255).astype(np.uint8), interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    pad = 0.03 / scale  # 0.03 inch between a panel and its labels, in canvas pixels
    for p, (y, x) in zip(panels, corners):
        if p.title:
            ax.text(x - 0.5 + w / 2, y - 0.5 - pad, p.title, ha="center", va="bottom", fontsize=fontsize)
    for r, label in enumerate(row_labels):
        ax.text(-0.5 - pad, r * (h + gap[0]) + h / 2 - 0.5, label, ha="right", va="center", rotation=90,
                fontsize=label_fontsize)
    if frame:
        _boxes(ax, [(x - 0.5, y - 0.5, w, h) for y, x in corners])
    if title:
        fig.text((left + width / 2) / fig_w, 1 - 0.1 / fig_h, title, ha="center", va="top", fontsize=9)
    return fig, ax


def save_figure(fig, path: str) -> str:
    """Saves a figure laid out up front (`_grid`, `labelled_mosaic`: no layout pass, one draw) and closes it.

    PNGs at compress_level 1 (zlib's fastest): quicker to write than the default 6, files somewhat larger.
    """
    fig.savefig(path, dpi=DPI, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    return path


def _grey_rgb(image: np.ndarray) -> np.ndarray:
    """Image [h, w, c] -> [h, w, 3]: `_gray` repeated over RGB (what `overlay` shows where a map is 0)."""
    return np.repeat(_gray(image)[..., None], 3, -1)


def _signed_rgba(m: np.ndarray) -> np.ndarray:
    """Signed map [h, w] -> RGBA with RdBu_r on a symmetric scale per map: -max|m| blue, 0 white, +max|m| red."""
    lim = np.abs(m).max() + 1e-12
    return plt.get_cmap("RdBu_r")((m + lim) / (2 * lim))


def attribution_grid(path: str, images: np.ndarray, maps: dict[str, np.ndarray], labels: Sequence[str],
                     title: str, *, alpha: float = 0.7) -> str:
    """Rows: images; columns: the input in grey, then each model's map laid over it (`overlay`). Saves a PNG."""
    names = list(maps)
    panels = []
    for i, image in enumerate(images):
        panels.append(Panel(i, 0, _grey_rgb(image), "input" if i == 0 else ""))
        panels += [Panel(i, j, overlay(image, maps[name][i], alpha=alpha), name if i == 0 else "")
                   for j, name in enumerate(names, start=1)]
    fig, _ = labelled_mosaic(panels, title, row_labels=labels)
    return save_figure(fig, path)
