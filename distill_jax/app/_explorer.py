"""explorer.html: one self-contained page to explore a run's explained test images in the browser.

The page (template `app/templates/explorer.html` with its script and style inlined) embeds the data built by
`explorer_data` as JSON: no server, no network, it works from `file://`. For a chosen image it shows every
model's prediction, every attribution method's map per model, the explanation scores of that image, each soft
tree drawn in SVG with the image's routing, and each linear student's per-class contributions.

Arrays travel as base64 of little-endian bytes (`_b64`): uint8 images and maps, zlib-compressed first
(`_deflated_b64`, inflated by the browser's DecompressionStream; they are most of the page's bytes; each map is
scaled to its own maximum, which is sent beside it so that the page can put every model's map of a method on one
scale), int8
tree filters, float32 routing probabilities and linear read-outs (exact to float32, so that what the page shows
can be checked against the saved models).
"""
from __future__ import annotations

import base64
import functools
import json
import os
import zlib

import jinja2
import numpy as np

from distill_jax.app._page import verdict_paragraphs
from distill_jax.audit.verdict import of

TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "templates")


def _le_bytes(a: np.ndarray, dtype) -> bytes:
    """`a` cast to `dtype`, C order, little-endian."""
    return np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def _b64(a: np.ndarray, dtype) -> str:
    """`_le_bytes` as base64 text."""
    return base64.b64encode(_le_bytes(a, dtype)).decode()


def _deflated_b64(a: np.ndarray, dtype) -> str:
    """`_le_bytes` zlib-compressed (RFC 1950, what the browser's `DecompressionStream("deflate")` reads), as base64."""
    return base64.b64encode(zlib.compress(_le_bytes(a, dtype), 9)).decode()


def display_pixels(images: np.ndarray) -> np.ndarray:
    """Model inputs [n, h, w, c] to uint8 for display, each image min-max scaled to 0..255."""
    x = np.asarray(images, np.float64)
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    span = np.maximum(x.max(axis=(1, 2, 3), keepdims=True) - lo, 1e-12)
    return np.round(255 * (x - lo) / span).astype(np.uint8)


def encode_maps(maps: np.ndarray) -> dict:
    """Attribution maps [n, h, w, c] as |a| summed over channels, each scaled to 0..255 by its own maximum.

    Returns {"data": zlib-compressed base64 uint8 [n, h, w], "max": [n] the maxima (0 for an all-zero map)}; the page draws
    value * max_i / scale with the scale it chooses (one per method and image, or the map's own).
    """
    m = np.nan_to_num(np.abs(np.asarray(maps, np.float64)).sum(-1), nan=0.0, posinf=0.0)
    peak = m.max(axis=(1, 2))
    scaled = np.where(peak[:, None, None] > 0, m / np.where(peak > 0, peak, 1)[:, None, None], 0.0)
    return {"data": _deflated_b64(np.round(255 * scaled), np.uint8), "max": [float(v) for v in peak]}


def encode_filters(filters: np.ndarray) -> dict:
    """Tree node filters [inner, h, w, c] summed over channels as int8 (-127..127 of each filter's max |w|)."""
    f = np.asarray(filters, np.float64).sum(-1)
    scale = np.abs(f).max(axis=(1, 2))
    return {"data": _b64(np.round(127 * f / np.where(scale > 0, scale, 1)[:, None, None]), np.int8),
            "scale": [float(v) for v in scale]}


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """softmax over the last axis in float64."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _rounded(a: np.ndarray, digits: int = 6) -> list:
    """`a` rounded to `digits` decimals as nested lists, NaN and infinities as None (JSON has no NaN)."""
    a = np.round(np.asarray(a, np.float64), digits)
    return np.where(np.isfinite(a), a, None).tolist()


def model_entries(result: dict, everyone, found) -> list[dict]:
    """Per model (teacher first): name, kind, method, probabilities [n, C] and predicted class [n] on the
    explained images, and its whole-test-set accuracy and agreement from metrics."""
    out = []
    for t in everyone:
        probs = softmax_rows(found.sample_logits[t.name])
        metrics = result["models"].get(t.name, {})
        out.append({"name": t.name, "kind": t.kind, "method": t.method, "probs": _rounded(probs),
                    "predicted": probs.argmax(-1).tolist(), "accuracy": metrics.get("accuracy"),
                    "agreement": metrics.get("agreement")})
    return out


def tree_entries(found) -> dict:
    """Per soft-tree student: depth, node filters, leaf class distributions and the explained images' routing."""
    return {name: {"depth": int(tree["depth"]), "filters": encode_filters(tree["filters"]),
                   "leaf_probs": _rounded(tree["leaf_probs"], 4),
                   "routing": _b64(found.routes[name]["routing"], np.float32)}
            for name, tree in found.trees.items()}


def linear_entries(found, everyone) -> dict:
    """Per linear student: what the page needs to decompose each explained image's logits exactly.

    logit_c = sum_j W_jc z_j + b_c (component contributions) = sum_i T_ci (x_i - mean_i) + b_c (pixel
    contributions, T = W^T P the class templates): sent are W [k, C], b [C], z [n, k], T [C, d] and x - mean [n, d].
    """
    everyone_by_name = {t.name: t for t in everyone}
    out = {}
    for name, lin in found.linear.items():
        weights = everyone_by_name[name].variables["params"]["linear"]["kernel"]
        out[name] = {"k": int(np.shape(weights)[0]), "weights": _b64(np.asarray(weights), np.float32),
                     "bias": _rounded(lin["bias"]), "z": _b64(lin["z"], np.float32),
                     "templates": _b64(np.asarray(lin["templates"]).reshape(len(lin["bias"]), -1), np.float32),
                     "centered": _b64(lin["centred"], np.float32)}
    return out


def explorer_data(result: dict, prep, everyone, found) -> dict:
    """Everything explorer.html shows, JSON-ready.

    Args:
      result: the run's metrics (`metrics.json`'s content, with its verdict).
      prep: the run's `Prepared` data (class names, image shape).
      everyone: the trained models, the teacher first.
      found: the `Audit` of the explained sample.
    """
    n, h, w, c = np.asarray(found.images).shape
    methods = list(dict.fromkeys(m for per in found.maps.values() for m in per))
    return {
        "dataset": result["dataset"], "classes": list(prep.class_names), "image_shape": [h, w, c], "count": n,
        "verdict": verdict_paragraphs(of(result)),
        "images": {"test_index": np.asarray(found.sample_index).tolist(), "labels": np.asarray(found.labels).tolist(),
                   "pixels": _deflated_b64(display_pixels(found.images), np.uint8)},
        "models": model_entries(result, everyone, found),
        "methods": methods,
        "maps": {name: {m: encode_maps(a) for m, a in per.items()} for name, per in found.maps.items()},
        "scores": {name: {m: {k: _rounded(v, 4) for k, v in s.items()} for m, s in per.items()}
                   for name, per in found.per_image.items()},
        "trees": tree_entries(found),
        "linear": linear_entries(found, everyone),
    }


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
                             autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
    return env.get_template("explorer.html")


def embedded_json(data: dict) -> str:
    """`data` as JSON safe inside a <script> element: every '<' escaped as \\u003c (no '</script>' can end it)."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def write_explorer(workdir: str, data: dict) -> str:
    """Writes `workdir/explorer.html` (script, style and data inlined); returns its path."""
    read = lambda name: open(os.path.join(TEMPLATE_DIR, name), encoding="utf-8").read()  # noqa: E731
    page = _template().render(dataset=data["dataset"], data_json=embedded_json(data),
                              script=read("explorer.js"), style=read("explorer.css"))
    path = os.path.join(workdir, "explorer.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
