"""The verdict of a run: which readable student to trust, and which explanation of it, with the numbers.

Pure functions of the JSON result a run writes (`metrics.json`): `decide(result)` returns a JSON-ready
dict, `as_text(verdict)` the two paragraphs the CLI prints and the report opens with. Each choice
states its rule (`STUDENT_RULE`, `METHOD_RULE`); a missing piece (no student, no explanation ranking,
no sanity check) gives a sentence, never an error.
"""

from __future__ import annotations

import math

import numpy as np

from distill_jax.metrics._specs import METRICS, metric_names

__all__ = [
    "is_finite_number",
    "student_kind",
    "rank_students",
    "sanity_results",
    "choose_method",
    "decide",
    "of",
    "as_text",
]


FAITHFULNESS_KEYS = metric_names("faithfulness") + metric_names("teacher_agreement")


QUALITY_KEYS = metric_names("quality")


READABLE_KINDS = ("tree", "linear")  # students one reads directly: a soft tree's filters and leaves, linear templates


KIND_NAMES = {"tree": "soft decision tree", "linear": "linear model over PCA", "mlp": "MLP", "cnn": "small CNN"}


SANITY_RHO_MAX = 0.5


STUDENT_RULE = ("among the soft-tree and linear students, the highest agreement with the teacher's top-1 class on the "
                "test set wins; equal agreement goes to the lower KL(teacher || student)")


METHOD_RULE = ("the lowest mean rank (1 = best) over the explanation-quality metrics of the method ranking, among "
               "methods that do not fail the randomisation sanity check on the teacher (Spearman rho of the maps "
               "after every layer is randomised below {rho_max:g}); equal mean rank goes to the lower deletion AUC")


def is_finite_number(v) -> bool:
    """A finite int or float (not a bool): a score that can be compared."""
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and math.isfinite(v)


def student_kind(name: str) -> str:
    """A student's kind from its name, as `config.parse_students` reads it: "tree-kd" -> "tree"."""
    return name.partition("-")[0]


def rank_students(result: dict) -> list[dict]:
    """Every model with an agreement score (the students), most faithful first: agreement down, then KL up, then name.

    Returns [{name, kind, readable, agreement, kl, accuracy, params[, depth]}] (depth for trees, from the config).
    """
    depth = (result.get("config") or {}).get("tree", {}).get("depth")
    out = []
    for name, m in result.get("models", {}).items():
        if not is_finite_number(m.get("agreement")):
            continue
        kind = student_kind(name)
        s = {"name": name, "kind": kind, "readable": kind in READABLE_KINDS, "agreement": float(m["agreement"]),
             "kl": float(m["kl"]) if is_finite_number(m.get("kl")) else None,
             "accuracy": float(m["accuracy"]) if is_finite_number(m.get("accuracy")) else None,
             "params": int(m["params"]) if is_finite_number(m.get("params")) else None}
        if kind == "tree" and depth is not None:
            s["depth"] = int(depth)
        out.append(s)
    return sorted(out, key=lambda s: (-s["agreement"], s["kl"] if s["kl"] is not None else math.inf, s["name"]))


def sanity_results(result: dict, *, rho_max: float = SANITY_RHO_MAX) -> dict[str, dict]:
    """method -> {layer, rho, passed} from the teacher's cascading randomisation check, after its last layer.

    passed: |rho| < rho_max, i.e. the maps of a fully randomised network no longer look like the trained
    network's (Adebayo et al. 2018). Methods the check did not cover are absent.
    """
    out = {}
    for method, steps in ((result.get("analysis") or {}).get("randomization") or {}).items():
        if steps and is_finite_number(steps[-1][1]):
            rho = float(steps[-1][1])
            out[method] = {"layer": str(steps[-1][0]), "rho": rho, "passed": abs(rho) < rho_max}
    return out


def choose_method(result: dict, model: str, *, rho_max: float = SANITY_RHO_MAX) -> dict | None:
    """The attribution method to trust for `model` by `METHOD_RULE`, with its numbers; None without a ranking.

    Returns {name, model, mean_rank, metrics, best_on, scores, sanity, failed_sanity, all_failed_sanity,
    checked, runner_up}: `metrics` the ranked metric names, `best_on` how many of them rank it first,
    `scores` its faithfulness and quality values, `sanity` its randomisation result (None if not checked),
    `failed_sanity` method -> rho of those set aside, `checked` the methods the sanity check covered,
    `runner_up` {name, mean_rank, deletion_auc} of the next method. When every ranked method fails the
    check, the best of them is named and `all_failed_sanity` is True.
    """
    ranking = {m: r for m, r in ((result.get("explanation_ranking") or {}).get(model) or {}).items()
               if is_finite_number(r.get("mean_rank"))}
    if not ranking:
        return None
    scores = (result.get("explanations") or {}).get(model) or {}
    sanity = sanity_results(result, rho_max=rho_max)
    failed = {m: sanity[m]["rho"] for m in ranking if m in sanity and not sanity[m]["passed"]}
    candidates = [m for m in ranking if m not in failed] or list(ranking)

    def deletion(m):
        d = (scores.get(m) or {}).get("deletion_auc")
        return float(d) if is_finite_number(d) else None

    order = sorted(candidates, key=lambda m: (ranking[m]["mean_rank"], deletion(m) is None, deletion(m) or 0.0, m))
    best = order[0]
    ranks = ranking[best].get("ranks", {})
    values = scores.get(best) or {}
    return {"name": best, "model": model, "mean_rank": float(ranking[best]["mean_rank"]), "metrics": list(ranks),
            "best_on": int(sum(r == 1 for r in ranks.values())),
            "scores": {k: float(values[k]) for k in (*FAITHFULNESS_KEYS, *QUALITY_KEYS) if is_finite_number(values.get(k))},
            "sanity": sanity.get(best), "failed_sanity": failed, "all_failed_sanity": len(failed) == len(ranking),
            "checked": sorted(sanity), "runner_up": None if len(order) < 2 else {
                "name": order[1], "mean_rank": float(ranking[order[1]]["mean_rank"]),
                "deletion_auc": deletion(order[1])}}


def decide(result: dict, *, rho_max: float = SANITY_RHO_MAX) -> dict:
    """Which readable student to trust and which explanation of it, with the numbers behind both (JSON-ready).

    Student rule (`STUDENT_RULE`): among the tree and linear students, the highest agreement with the
    teacher, ties by the lower KL; without such a student, the most faithful of the others (readable: False).
    Method rule (`METHOD_RULE`, `choose_method`) for the chosen student, or for the teacher when there is
    no student. Missing pieces give None and a note, never an error.

    Returns:
      {rules: {student, method}, student, runner_up, least_readable, teacher_accuracy, method, notes}:
      student / runner_up / least_readable as `rank_students` entries (least_readable: the most faithful
      cnn or mlp student, for comparison), method as `choose_method` returns it.
    """
    ranked = rank_students(result)
    readable = [s for s in ranked if s["readable"]]
    others = [s for s in ranked if not s["readable"]]
    student = (readable or others or [None])[0]
    pool = readable if readable else others
    notes = []
    if student is None:
        notes.append("no student with an agreement score")
    elif not readable:
        notes.append("no tree or linear student in this run")
    model = student["name"] if student else ("teacher" if "teacher" in (result.get("models") or {}) else None)
    method = choose_method(result, model, rho_max=rho_max) if model else None
    if method is None:
        notes.append(f"no explanation ranking for {model}" if model else "no model to explain")
    teacher_acc = (result.get("models") or {}).get("teacher", {}).get("accuracy")
    return {"rules": {"student": STUDENT_RULE, "method": METHOD_RULE.format(rho_max=rho_max)},
            "student": student, "runner_up": pool[1] if len(pool) > 1 else None,
            "least_readable": others[0] if readable and others else None,
            "teacher_accuracy": float(teacher_acc) if is_finite_number(teacher_acc) else None,
            "explained_model": model, "method": method, "notes": notes,
            "distillation": distillation_outcomes(result)}


def distillation_outcomes(result: dict) -> list[dict]:
    """Every distilled student's paired comparison with its labels twin (`models[name]["vs_labels"]`), with an
    outcome: "helped" (agreement with the teacher higher, the 95 % interval above 0), "hurt" (below 0),
    "lower KL only" (agreement the same within the interval, KL lower) or "no clear difference"."""
    out = []
    for name, m in (result.get("models") or {}).items():
        g = m.get("vs_labels")
        if not g:
            continue
        (a_lo, a_hi), (_, kl_hi) = g["agreement"]["ci95"], g["kl"]["ci95"]
        outcome = ("helped" if a_lo > 0 else "hurt" if a_hi < 0 else
                   "lower KL only" if kl_hi < 0 else "no clear difference")
        out.append({"name": name, "twin": g["twin"], "outcome": outcome,
                    **{k: g[k] for k in ("agreement", "accuracy", "kl")}})
    return out


def _num(v, fmt: str = ".4f") -> str:
    return format(v, fmt) if is_finite_number(v) else "n/a"


def _points(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"95% CI {100 * lo:+.1f} to {100 * hi:+.1f}"


def _gain_sentence(g: dict) -> str:
    """One plain sentence on a distilled student against its labels twin (differences in points of test images)."""
    a, acc, kl = g["agreement"], g["accuracy"], g["kl"]
    more = lambda d, word: f"{abs(100 * d['difference']):.1f} points {word[0] if d['difference'] >= 0 else word[1]}"  # noqa: E731
    kl_lo, kl_hi = kl["ci95"]
    kl_text = (f"its KL(teacher || student) is {'lower' if kl['difference'] < 0 else 'higher'} by "
               f"{abs(kl['difference']):.3f} (95% CI {kl_lo:+.3f} to {kl_hi:+.3f})")
    return (f"{g['name']} against {g['twin']}: {g['outcome']}. It agrees with the teacher on "
            f"{more(a, ('more', 'fewer'))} test images ({_points(a)}), is {more(acc, ('more', 'less'))} accurate "
            f"({_points(acc)}), and {kl_text}.")


def _distillation_text(outcomes: list[dict]) -> str:
    """The verdict's paragraph on whether distillation helped each distilled student, or "" without one."""
    if not outcomes:
        return ""
    return ("Did distillation help (each distilled student against the same kind trained on labels, on the same "
            "test images): " + " ".join(_gain_sentence(g) for g in outcomes))


def _quoted_score(name: str, value, *, with_direction: bool) -> str:
    spec = METRICS[name]
    return f"{spec.label} {_num(value)}" + (f" ({spec.better} is better)" if with_direction else "")


def _describe(s: dict) -> str:
    """`tree-kd (soft decision tree, depth 3, 536 parameters)`."""
    parts = [KIND_NAMES.get(s["kind"], s["kind"])]
    if "depth" in s:
        parts.append(f"depth {s['depth']}")
    if s.get("params") is not None:
        parts.append(f"{s['params']:,} parameters")
    return f"{s['name']} ({', '.join(parts)})"


def of(result: dict) -> dict:
    """The verdict a run stored in its result (`result["verdict"]`), or `decide(result)` when it has none."""
    return result.get("verdict") or decide(result)


def as_text(v: dict) -> str:
    """The verdict as two plain-text paragraphs (student, then explanation method), each stating its rule."""
    s = v.get("student")
    if s is None:
        first = ("Student: none to recommend: no student in this run has an agreement score with the teacher "
                 "(name some in `students`, e.g. students=tree-kd,linear-kd).")
    else:
        teacher = f"; teacher accuracy {_num(v['teacher_accuracy'])}" if v.get("teacher_accuracy") is not None else ""
        head = ("Most faithful readable student" if s["readable"] else
                "No tree or linear student in this run; the most faithful student")
        first = (f"{head}: {_describe(s)}. It agrees with the teacher's top-1 class on {s['agreement']:.1%} of test "
                 f"images (agreement {_num(s['agreement'])}, KL {_num(s['kl'])}, accuracy {_num(s['accuracy'])}"
                 f"{teacher}).")
        if v.get("runner_up"):
            r = v["runner_up"]
            first += f" Next: {r['name']} (agreement {_num(r['agreement'])}, KL {_num(r['kl'])})."
        if v.get("least_readable"):
            c = v["least_readable"]
            first += (f" For comparison, the most faithful less readable student, {_describe(c)}, agrees on "
                      f"{c['agreement']:.1%} (KL {_num(c['kl'])}).")
        first += f" Rule: {v['rules']['student']}."
    first = "\n\n".join(p for p in (first, _distillation_text(v.get("distillation") or [])) if p)
    m = v.get("method")
    if m is None:
        model = v.get("explained_model")
        second = (f"Explanation: none to recommend: this run has no explanation-method ranking for {model} (the "
                  f"explanation stage did not score its attribution methods)." if model else
                  "Explanation: none to recommend: there is no model to explain.")
        return f"{first}\n\n{second}"
    sc = m["scores"]
    quoted = ("deletion_auc", "insertion_auc", "faithfulness_correlation")
    second = (f"Explanation to trust for {m['model']}: {m['name']}, mean rank {m['mean_rank']:.2f} over "
              f"{len(m['metrics'])} quality metrics (first on {m['best_on']} of {len(m['metrics'])}); "
              + ", ".join(_quoted_score(k, sc.get(k), with_direction=k != "faithfulness_correlation") for k in quoted)
              + ".")
    if m["sanity"] is not None:
        second += (f" Sanity check on the teacher: after every layer is randomised its maps correlate with the "
                   f"trained ones at rho {m['sanity']['rho']:.2f} "
                   f"({'passed' if m['sanity']['passed'] else 'failed'}).")
    else:
        covered = f" (it ran for {', '.join(m['checked'])})" if m["checked"] else ""
        second += f" The randomisation sanity check did not cover it{covered}."
    if m["failed_sanity"]:
        failed = ", ".join(f"{k} (rho {r:.2f})" for k, r in m["failed_sanity"].items())
        second += (f" Every ranked method failed the sanity check ({failed}): trust none of them fully."
                   if m["all_failed_sanity"] else f" Set aside for failing the sanity check: {failed}.")
    if m["runner_up"]:
        r = m["runner_up"]
        second += (f" Next: {r['name']} (mean rank {r['mean_rank']:.2f}, deletion AUC {_num(r['deletion_auc'])}).")
    second += f" Rule: {v['rules']['method']}."
    return f"{first}\n\n{second}"
