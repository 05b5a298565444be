"""Evaluation split over 2 processes (gloo on CPU): held-out perplexity (blocks and sliding window, shares that do not
divide evenly), classification, regression and SQuAD metrics reduce to the numbers one process computes; lm-eval runs
on rank 0 alone and every rank gets its result; only rank 0 writes. Through the real evaluate job."""
from __future__ import annotations

import pytest

from tests.test_distributed import spawn
from tests.test_jobs import assets, bert_overrides, compose_cfg, lm_overrides, write_tiny_mc_task  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _cases(assets, tasks) -> dict[str, list[str]]:
    return {
        "blocks": lm_overrides(assets, None, "job=evaluate", "data.max_eval_blocks=7", "eval.batch_size=2",
                               "eval.lm_eval_tasks=[vtrans_tiny_mc]", f"eval.lm_eval_include_path={tasks}"),
        "window": lm_overrides(assets, None, "job=evaluate", "data.eval_window=24", "data.eval_stride=8",
                               "eval.batch_size=3"),
        "cls": bert_overrides(assets, "bert_cls", "polarity.jsonl", None, "job=evaluate", "model.num_labels=2",
                              "eval.batch_size=7"),
        "reg": bert_overrides(assets, "bert_reg", "similarity.jsonl", None, "job=evaluate", "model.num_labels=1",
                              "data.text_field='sentence1,sentence2'", "eval.batch_size=3"),
        "qa": bert_overrides(assets, "bert_qa", "squad.jsonl", None, "job=evaluate", "model.task=question_answering",
                             "data.seq_len=64", "eval.qa_doc_stride=16", "eval.batch_size=3"),
    }


def _evaluate(rank: int, cases: dict, out: str) -> dict:
    from vtrans.jobs import run

    results = {}
    for name, overrides in cases.items():
        overrides = [o if not o.startswith("output_dir=") else f"output_dir={out}/{name}/rank{rank}" for o in overrides]
        results[name] = run(compose_cfg(overrides))
    return results


KEYS = {"blocks": ("ppl", "nll", "eval_tokens", "lm_eval_vtrans_tiny_mc_acc"), "window": ("ppl", "nll", "eval_tokens"),
        "cls": ("accuracy", "f1", "matthews_corrcoef", "n"), "reg": ("pearson", "spearman", "n"),
        "qa": ("exact_match", "f1", "n")}


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_two_ranks_evaluate_as_one_process_and_only_rank_0_writes(assets, tmp_path):
    cases = _cases(assets, write_tiny_mc_task(tmp_path / "tasks"))
    one = _evaluate(0, cases, str(tmp_path / "one"))
    two = spawn(_evaluate, tmp_path / "spawn", cases, str(tmp_path / "two"))
    for name, keys in KEYS.items():
        for key in keys:
            ref = one[name][key]
            for rank, result in enumerate(two):
                assert result[name][key] == pytest.approx(ref, rel=1e-6, abs=1e-9), (name, key, rank)
        assert (tmp_path / "two" / name / "rank0" / "metrics.json").is_file()
        assert not (tmp_path / "two" / name / "rank1").exists()  # rank 1 wrote nothing: no metrics, no structure
