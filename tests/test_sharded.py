"""Models that no rank holds whole (ZeRO-3 on 2 CPU processes, gloo): built partitioned and filled from the checkpoint
one tensor at a time (every weight equal to the file's, every rank holding half of every tensor), and the whole prune
job on top: the dense evaluation and warm start through the sharded model in lockstep, materialisation one layer at a
time on rank 0, the split evaluation of the saved pruned model, the same metrics on both ranks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_distributed import PARTITION_ALL, spawn
from tests.test_prune_job import _cfg, text_file, tiny_llama_dir  # noqa: F401  (fixtures)


def _zero3_cfg(model_dir, out, **over):
    cfg = _cfg(model_dir, out, **over)
    cfg.deepspeed.enabled, cfg.deepspeed.stage = True, 3
    return cfg


def _load(rank: int, model_dir: str) -> dict:
    from safetensors.torch import load_file

    import deepspeed

    from vtrans.engine import ShardedBuild, processes
    from vtrans.models.load import load_model

    cfg = _zero3_cfg(model_dir, "/tmp/unused")
    build = ShardedBuild(cfg, processes("cpu"))
    build.config = {**build.config, "zero_optimization": {**build.config["zero_optimization"],
                                                          **PARTITION_ALL["zero_optimization"]}}
    model, _ = load_model(cfg.model, sharded=build)
    partition = {n: (p.ds_numel, p.ds_tensor.numel(), p.numel()) for n, p in model.named_parameters()}
    expected = load_file(str(Path(model_dir) / "model.safetensors"))
    diff = 0.0
    for name, p in model.named_parameters():  # the tied LM head is the embedding: not a tensor of its own
        with deepspeed.zero.GatheredParameters([p]):
            diff = max(diff, float((p.data - expected[name]).abs().max()))
    return {"partition": partition, "max_abs_diff": diff}


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_sharded_load_partitions_every_tensor_and_fills_it_from_the_file(tiny_llama_dir, tmp_path):
    for rank, result in enumerate(spawn(_load, tmp_path, str(tiny_llama_dir))):
        assert result["max_abs_diff"] == 0.0, rank
        for name, (full, shard, visible) in result["partition"].items():
            assert shard == -(-full // 2) and visible == 0, (rank, name, full, shard)


def _prune(rank: int, model_dir: str, text: str, out: str, variant: str) -> dict:
    from vtrans.jobs import run

    cfg = _zero3_cfg(model_dir, out, source=text, mask__variant=variant, budget__count_embeddings=False, steps=4)
    cfg.optim.batch_size, cfg.data.max_eval_blocks = 4, 7  # 7 held-out blocks: unequal shares of 2 ranks
    metrics = run(cfg)
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


@pytest.mark.distributed
@pytest.mark.timeout(900)
@pytest.mark.parametrize("variant", ["faster", "vtrans"])
def test_the_prune_job_on_a_sharded_model(tiny_llama_dir, text_file, tmp_path, variant):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from vtrans.evaluation import perplexity

    out = tmp_path / "job"
    ranks = spawn(_prune, tmp_path / "spawn", str(tiny_llama_dir), str(text_file), str(out), variant)
    m = ranks[0]
    assert m["train_steps"] == 4 and m["params_pruned_no_embeddings"] <= m["budget_target_size"]
    assert m["params_pruned"] < m["params_dense"]
    for key in ("ppl_dense", "ppl_pruned", "params_pruned", "nll_pruned"):
        assert ranks[1][key] == pytest.approx(m[key], rel=1e-9), key  # both ranks report the same numbers
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["ppl_pruned"] == pytest.approx(m["ppl_pruned"])
    # the split evaluation gave what one process computes on the saved model
    pruned = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
    from tests.test_prune_job import _cfg as plain_cfg
    from vtrans.pipeline import prepare_data

    cfg = plain_cfg(tiny_llama_dir, tmp_path / "x", source=str(text_file))
    cfg.data.max_eval_blocks = 7
    from transformers import AutoTokenizer

    held = prepare_data(cfg, AutoTokenizer.from_pretrained(tiny_llama_dir)).held
    torch.set_num_threads(1)
    assert perplexity(pruned, held)["ppl"] == pytest.approx(m["ppl_pruned"], rel=1e-5)
