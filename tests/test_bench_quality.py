"""bench/quality.py's prose check: gensim's two Wikipedia-style articles evaluated beside the development domains,
reported as their own mean and kept out of the development and cross-domain means."""
import argparse
import csv
import math

import pytest

from bench.quality import FINAL_TEST, PROSE_CHECK, _write, common, config, row


def _metrics(domains: dict[str, tuple[float, float]]) -> dict:
    m = {"params_pruned": 80, "param_reduction": 0.2, "ppl_dense": 10.0, "ppl_pruned": 15.0,
         "eval_domains": {d: "src" for d in domains}}
    for d, (dense, pruned) in domains.items():
        m[f"ppl_{d}_dense"], m[f"ppl_{d}_pruned"] = dense, pruned
    return m


def _args(tmp_path, **kw) -> argparse.Namespace:
    a = dict(seq_len=128, eval_blocks=0, domain_blocks=64, set=[], vib=[], tuning=True, prose_check=True,
             steps=40, out=str(tmp_path / "runs"), tag="t")
    return argparse.Namespace(**{**a, **kw})


def test_prose_check_is_its_own_mean_outside_the_development_and_cross_domain_means():
    nyc, berlin = PROSE_CHECK
    m = _metrics({"a": (4.0, 8.0), "b": (5.0, 10.0), FINAL_TEST: (3.0, 12.0), nyc: (2.0, 4.0), berlin: (2.0, 8.0)})
    r = row(0.8, "faster", m, 1.0, 2.0)
    assert r["ratio_dev_mean"] == 2.0  # a and b only
    assert r["ratio_cross_domain"] == pytest.approx(round((2 * 2 * 4) ** (1 / 3), 4))  # a, b and the final test
    assert r["ratio_prose_check"] == round(math.sqrt(2 * 4), 4)
    without = row(0.8, "faster", _metrics({"a": (4.0, 8.0), "b": (5.0, 10.0)}), 1.0, 2.0)
    assert "ratio_prose_check" not in without and without["ratio_dev_mean"] == 2.0


def test_prose_check_adds_the_articles_to_every_job_and_the_final_test_stays_out_of_tuning(tmp_path):
    assert all(f"+eval.domains.{d}={src}" in common(_args(tmp_path)) for d, src in PROSE_CHECK.items())
    assert not any("ency" in o for o in common(_args(tmp_path, prose_check=False)))
    cfg = config("faster", 0.8, _args(tmp_path))
    assert {d: cfg.eval.domains[d] for d in PROSE_CHECK} == PROSE_CHECK
    assert FINAL_TEST not in cfg.eval.domains


def test_table_shows_the_prose_check_apart(tmp_path):
    nyc, berlin = PROSE_CHECK
    r = row(0.8, "faster", _metrics({"a": (4.0, 8.0), nyc: (2.0, 4.0), berlin: (2.0, 8.0)}), 1.0, 2.0)
    _write([r], tmp_path, _args(tmp_path), {})
    md = (tmp_path / "quality_t.md").read_text().splitlines()
    assert md[0] == f"| kept | method | reduction | calibration (held-out) | a | dev mean | {nyc} | {berlin} | " \
                    "prose check mean | compression s |"
    assert md[3].split(" | ")[4:8] == ["2.00", "2.00", "2.00", "4.00"]
    with open(tmp_path / "quality_t.csv") as f:
        assert float(next(csv.DictReader(f))["ratio_prose_check"]) == pytest.approx(2.8284)


def test_an_unknown_method_is_refused_before_any_model_loads(tmp_path):
    """`--methods recovery` (recovery follows vtrans; it is no method of its own) fails at argument parsing, naming
    the bad value and the accepted ones, not after the methods before it have run."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "bench/quality.py", "--methods", "vtrans,recovery", "--results", str(tmp_path)],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "--methods recovery not accepted; choose from random,magnitude,activation,taylor" in p.stderr
    assert "vtrans is followed by recovery fine-tuning unless --recovery-steps 0" in p.stderr
    assert not any(tmp_path.iterdir())


def test_a_row_at_a_packaged_budget_is_what_that_budget_group_runs(tmp_path):
    """At 0.5 the bench composes budget=params50 (the mask rate measured best there), at 0.8 params80 (the default
    data's half rate); another share sets the target alone; `--set` still has the last word."""
    half, fifth = config("vtrans", 0.5, _args(tmp_path)), config("vtrans", 0.8, _args(tmp_path))
    assert (half.budget.target, half.optim.scale_lr) == (0.5, 0.0)
    assert (fifth.budget.target, fifth.optim.scale_lr) == (0.8, 0.01)
    other = config("fast", 0.7, _args(tmp_path))
    assert (other.budget.target, other.optim.scale_lr) == (0.7, 0.01)
    assert config("faster", 0.5, _args(tmp_path, set=["optim.scale_lr=0.01"])).optim.scale_lr == 0.01
