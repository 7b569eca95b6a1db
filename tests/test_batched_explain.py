"""The audit's batched methods equal the library's reference functions (same draws, float rounding)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import attr, metrics, models, robust
from distill_jax.audit import ModelQueries, _batched
from distill_jax.audit._queries import _programs
from distill_jax.robust import _attacks

B, SIDE = 3, 8


@pytest.fixture(scope="module")
def setup():
    model = models.SmallCNN(num_classes=10)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (B, SIDE, SIDE, 1)), np.float32)
    variables = model.init(jax.random.PRNGKey(1), x[:1])
    target = np.array([1, 4, 7], np.int32)
    q = ModelQueries(model, variables)
    f = lambda z: models.for_attribution(model).apply(variables, z)
    return q, f, x, target


def close(a, b, tol=1e-4):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


def test_queries_answer_like_the_model_whatever_the_chunk(setup):
    q, f, x, target = setup
    many = np.concatenate([x] * 23)  # 69 points: two full chunks of 32 and a padded one
    close(q.logits(many), f(jnp.asarray(many)))
    grads = jax.grad(lambda z: jnp.sum(jnp.take_along_axis(f(z), jnp.tile(target, 23)[:, None], 1)))(many)
    close(q.gradients(many, np.tile(target, 23)), grads)


def test_cross_entropy_gradients_are_the_attack_objective(setup):
    q, f, x, target = setup
    close(q.gradients(x, target, cross_entropy=True), _attacks._loss_grad(f, jnp.asarray(x), jnp.asarray(target)))


def test_gradient_maps(setup):
    q, f, x, target = setup
    close(_batched.saliency(q, x, target), attr.saliency(f, x, target))
    close(_batched.grad_x_input(q, x, target), attr.grad_x_input(f, x, target))
    close(_batched.integrated_gradients(q, x, target, steps=16), attr.integrated_gradients(f, x, target, steps=16))
    key = jax.random.PRNGKey(5)
    close(_batched.smoothgrad(q, x, target, key=key, samples=6),
          attr.smoothgrad(attr.saliency, f, x, target, key=key, samples=6))


def test_occlusion(setup):
    q, f, x, target = setup
    close(_batched.occlusion(q, x, target, patch=2, stride=1), attr.occlusion(f, x, target, patch=2, stride=1))


def test_scores_of_a_map(setup):
    q, f, x, target = setup
    a = np.asarray(attr.integrated_gradients(f, x, target, steps=16))
    d_auc, i_auc, d_curve, i_curve = _batched.deletion_insertion(q, x, a, target, steps=8)
    ref_d = metrics.deletion_auc(f, x, a, target, steps=8, return_curve=True)
    ref_i = metrics.insertion_auc(f, x, a, target, steps=8, return_curve=True)
    close(d_auc, ref_d[0]), close(d_curve, ref_d[1]), close(i_auc, ref_i[0]), close(i_curve, ref_i[1])
    key = jax.random.PRNGKey(9)
    close(_batched.faithfulness_correlation(q, x, a, target, key=key, subset_size=6, samples=5),
          metrics.faithfulness_correlation(f, x, a, target, key=key, subset_size=6, samples=5))
    close(_batched.infidelity(q, x, a, target, key=key, samples=5),
          metrics.infidelity(f, x, a, target, key=key, samples=5, normalize=True))
    close(_batched.ig_completeness_error(q, x, a, target), metrics.ig_completeness_error(f, x, a, target))


def test_max_sensitivity(setup):
    q, f, x, target = setup
    key = jax.random.PRNGKey(3)
    ref = metrics.max_sensitivity(lambda z, t: attr.saliency(f, z, t), x, target, key=key, radius=0.1, samples=4)
    close(_batched.max_sensitivity(q, x, target, key=key, radius=0.1, samples=4), ref)


def test_attacks(setup):
    q, f, x, target = setup
    x2, y2 = np.concatenate([x] * 4), np.tile(target, 4)
    key = jax.random.PRNGKey(2)
    for attack, kw in (("fgsm", {}), ("pgd", dict(step_size=0.1, steps=3, key=key))):
        ref = robust.adversarial_accuracy(f, x2, y2, attack=attack, epsilon=0.3, **kw)
        assert _batched.adversarial_accuracy(q, x2, y2, attack=attack, epsilon=0.3, **kw) == pytest.approx(float(ref))
    with pytest.raises(ValueError, match="attack must be"):
        _batched.adversarial_accuracy(q, x, target, attack="cw", epsilon=0.3)


def test_students_of_one_architecture_share_the_programs(setup):
    q, _, x, target = setup
    other = ModelQueries(q.model, q.model.init(jax.random.PRNGKey(7), x[:1]))
    _batched.saliency(other, x, target)
    logits_fn, grads_fn = _programs(q.model)
    assert grads_fn._cache_size() == 1 and _programs(models.SmallCNN(num_classes=10)) is _programs(q.model)
