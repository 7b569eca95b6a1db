"""A run with a private model attacks every model's membership (the loss attack) and reports it beside epsilon."""
import numpy as np
import pytest

from distill_jax import parallel, train
from distill_jax.app import _audit, _fit, _page, _prepare, config
from distill_jax.distill import privacy


@pytest.fixture(scope="module")
def smoke_teacher():
    c = config.apply_smoke(config.default_config())
    c.teacher.kind = "mlp"
    c.teacher.dp_noise_multiplier = 1.1
    prep = _prepare.prepare_data(c)
    return c, prep, _fit.train_teacher(prep, c, parallel.make_mesh(), None, show_progress=False)


def test_the_membership_attack_scores_training_against_test_images(smoke_teacher):
    c, prep, teacher = smoke_teacher
    mesh = parallel.make_mesh()
    got = _audit.membership_attack(teacher, prep, c, mesh, images=100)
    n = min(100, len(prep.y_test))
    members = train.predict(_fit.make_host_predict_fn(teacher.model, prep, mesh), teacher.variables,
                            prep.x_train[:n], batch_size=c.eval_batch_size, mesh=mesh)
    want = privacy.attack_metrics(
        privacy.loss_attack_scores(np.concatenate([members, teacher.test_logits[:n]]),
                                   np.concatenate([prep.y_train[:n], prep.y_test[:n]])),
        np.arange(2 * n) < n)
    assert got["attack"] == "loss" and got["members"] == got["non_members"] == n
    assert got["auc"] == pytest.approx(want["auc"], abs=1e-4)
    assert got["tpr_at_fpr_0.01"] == pytest.approx(want["tpr_at_fpr_0.01"], abs=1e-4)


def test_the_privacy_cell_puts_the_measured_leak_beside_the_bound(smoke_teacher):
    _, _, teacher = smoke_teacher
    attack = {"attack": "loss", "auc": 0.5123, "tpr_at_fpr_0.01": 0.012}
    cell = _page.privacy_text({"privacy": teacher.settings["privacy"], "membership": attack})
    assert cell.startswith("DP-SGD epsilon") and cell.endswith("membership loss attack AUC 0.512, TPR at 1% FPR 0.012")
    assert _page.privacy_text({"membership": attack}) == "not private; membership loss attack AUC 0.512, TPR at 1% FPR 0.012"
    assert _page.privacy_text({}) == "-"
