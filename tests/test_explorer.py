"""explorer.html's data: the encodings the page decodes, and the per-image scores behind it.

The page itself is tested in a real browser against the saved models in tests/test_cli.py
(`test_explorer_in_a_browser_matches_the_saved_models`), on the CLI's smoke run.
"""
import base64
import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import audit, models
from distill_jax.app import _explorer


def _decode(b64: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype=np.dtype(dtype).newbyteorder("<"))


def _inflate(b64: str, dtype) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(b64)), dtype=np.dtype(dtype).newbyteorder("<"))


def test_maps_round_trip_to_within_half_a_level_of_their_own_maximum():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 5, 4, 2))
    maps[2] = 0.0  # an all-zero map keeps maximum 0 and zeros
    enc = _explorer.encode_maps(maps)
    q = _inflate(enc["data"], np.uint8).reshape(3, 5, 4)
    summed = np.abs(maps).sum(-1)
    np.testing.assert_allclose(enc["max"], summed.max(axis=(1, 2)))
    decoded = q / 255 * np.asarray(enc["max"])[:, None, None]
    assert np.all(np.abs(decoded - summed) <= summed.max(axis=(1, 2))[:, None, None] / 510 + 1e-12)
    assert q[2].max() == 0 and enc["max"][2] == 0.0


def test_filters_keep_their_sign_and_each_filter_reaches_127():
    f = np.zeros((2, 2, 2, 1))
    f[0, 0, 0, 0], f[0, 1, 1, 0] = 2.0, -1.0
    f[1, 0, 1, 0] = -0.5
    enc = _explorer.encode_filters(f)
    q = _decode(enc["data"], np.int8).reshape(2, 2, 2)
    assert q[0].tolist() == [[127, 0], [0, -64]] and q[1].tolist() == [[0, -127], [0, 0]]
    assert enc["scale"] == [2.0, 0.5]


def test_display_pixels_stretch_each_image_to_the_full_range():
    x = np.stack([np.linspace(-1, 3, 8).reshape(2, 2, 2), np.full((2, 2, 2), 5.0)])
    out = _explorer.display_pixels(x)
    assert out.dtype == np.uint8 and out[0].min() == 0 and out[0].max() == 255
    assert out[1].max() == 0  # a constant image does not divide by zero


def test_embedded_json_cannot_close_its_script_element():
    text = _explorer.embedded_json({"name": "</script><script>alert(1)</script>"})
    assert "</" not in text and "<" not in text
    assert json.loads(text) == {"name": "</script><script>alert(1)</script>"}


def test_json_values_replace_nan_with_null():
    assert _explorer._rounded(np.array([0.1234567, np.nan, np.inf]), 3) == [0.123, None, None]


def test_softmax_rows_match_jax():
    z = np.random.default_rng(1).normal(size=(4, 6)) * 5
    np.testing.assert_allclose(_explorer.softmax_rows(z), jax.nn.softmax(jnp.asarray(z, jnp.float32)), rtol=1e-5)


@pytest.fixture(scope="module")
def small_cnn():
    model = models.SmallCNN(num_classes=3)
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 8, 8, 1))
    return model, model.init(jax.random.PRNGKey(1), x), x, jnp.asarray([0, 1, 2, 0, 1, 2])


def test_per_image_scores_average_to_the_reported_scores(small_cnn):
    model, variables, x, t = small_cnn
    maps = audit.attribution_maps(model, variables, x, t, methods=("saliency", "grad_x_input"), ig_steps=4,
                                  smoothgrad_samples=2, key=jax.random.PRNGKey(2))
    per, curves = audit.faithfulness_per_image(model, variables, x, t, maps, maps, steps=4)
    means, mean_curves = audit.faithfulness_scores(model, variables, x, t, maps, maps, steps=4)
    assert per["saliency"]["deletion_auc"].shape == (6,)
    assert curves["saliency"]["deletion"].shape == (6, 5)
    for method in maps:
        for metric, values in per[method].items():
            assert means[method][metric] == pytest.approx(float(np.mean(values)))
        np.testing.assert_allclose(mean_curves[method]["insertion"], curves[method]["insertion"].mean(0))
    np.testing.assert_allclose(per["saliency"]["spearman_vs_teacher"], 1.0, atol=1e-6)  # a map against itself
    key = jax.random.PRNGKey(3)
    quality = audit.quality_per_image(model, variables, x, t, maps, key=key, samples=4)
    assert audit.quality_scores(model, variables, x, t, maps, key=key, samples=4) == audit.image_means(quality)
    assert quality["grad_x_input"]["sparseness"].shape == (6,)


def test_tree_routes_are_the_trees_own_routing_and_leaf_probabilities():
    tree = models.SoftDecisionTree(depth=2, num_classes=3)
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 4, 1))
    variables = tree.init(jax.random.PRNGKey(1), x)
    routes = audit.tree_routes(tree, variables, x)
    p = routes["routing"]
    assert p.shape == (5, 3) and routes["path_probs"].shape == (5, 4)
    by_hand = np.stack([(1 - p[:, 0]) * (1 - p[:, 1]), (1 - p[:, 0]) * p[:, 1], p[:, 0] * (1 - p[:, 2]),
                        p[:, 0] * p[:, 2]], -1)  # leaves left to right: left-left, left-right, right-left, right-right
    np.testing.assert_allclose(routes["path_probs"], by_hand, rtol=1e-6)
