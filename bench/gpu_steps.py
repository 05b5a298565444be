"""Training steps and materialisation at LLaMA-2-7B shape on one GPU (part of bench/gpu_check.sh): a random model in
bf16 (32 layers, hidden 4096, FFN 11008, 32 heads), built partitioned under ZeRO-3 with CPU offload, then
Faster-VTrans steps (weights frozen, masks trained; parameters offloaded) and VTrans steps (weights trained too,
optimizer offloaded) at `--seq-len` tokens: tokens/s and peak GPU memory; then a 50 % decision and materialisation
(one layer gathered at a time): seconds, peak GPU and host memory. Prints one JSON line per part.

    python bench/gpu_steps.py --part faster     # or vtrans, materialise; --shape tiny on a CPU to try the script
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000),
}


def host_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(shape: str, variant: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from vtrans.config import Config
    from vtrans.engine import ShardedBuild, make_engine, processes
    from vtrans.masks.attach import attach_masks
    from vtrans.masks.decide import Budget
    from vtrans.pipeline import enable_activation_checkpointing
    from vtrans.pruning import PruningModule

    cfg = Config()
    cfg.device = device
    cfg.deepspeed.enabled, cfg.deepspeed.stage, cfg.deepspeed.bf16 = True, 3, device == "cuda"
    cfg.deepspeed.offload_params = variant == "faster"  # frozen weights wait in host memory
    cfg.deepspeed.offload_optimizer = variant == "vtrans"  # Adam's fp32 states (12 bytes / weight) in host memory
    cfg.model.dtype = "bfloat16" if device == "cuda" else "float32"
    procs = processes(device)
    sharded = ShardedBuild(cfg, procs)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with sharded.init():
        model = LlamaForCausalLM(config)
        teacher = LlamaForCausalLM(config) if variant == "vtrans" else None
    for m in (model, teacher):
        if m is not None:
            sharded.init_random(m)
    enable_activation_checkpointing(model)
    mm = attach_masks(model)
    module = PruningModule(mm, Budget("params_ratio", 0.5), beta=1e-6, kl_weights={}, task_weight=1.0,
                           logit_weight=1.0, temperature=2.0, layer_weight=0.0, layer_every=1, warmup_steps=10,
                           train_weights=variant == "vtrans", teacher=teacher)
    engine = make_engine(module, module.param_groups(0.05, 1e-5, 0.1, 0.0), cfg, procs)
    return mm, engine, config


def steps(args) -> dict:
    mm, engine, config = build(args.shape, args.part, args.device)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    engine.train_step([{"input_ids": ids}], step=0)  # warm-up (DeepSpeed's CPU Adam compiles on first use)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for step in range(args.steps):
        stats = engine.train_step([{"input_ids": ids}], step=step + 1)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"part": args.part, "tokens_per_s": args.steps * args.batch * args.seq_len / seconds,
            "seconds_per_step": seconds / args.steps, "loss": stats["loss"], "batch": args.batch,
            "seq_len": args.seq_len, "peak_gpu_gib": _peak_gpu(args.device), "host_rss_gib": host_rss() / 2 ** 30}


def materialise(args) -> dict:
    from vtrans.masks.decide import Budget, decide
    from vtrans.masks.materialize import materialize

    mm, engine, config = build(args.shape, "faster", args.device)
    engine.release()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start_rss = host_rss()
    t0 = time.perf_counter()
    decision = decide(mm, Budget("params_ratio", 0.5))
    t1 = time.perf_counter()
    pruned = materialize(mm, decision, fetch=engine.fetch)
    t2 = time.perf_counter()
    params = sum(p.numel() for p in pruned.parameters())
    return {"part": "materialise", "decide_s": t1 - t0, "materialise_s": t2 - t1, "pruned_params": params,
            "pruned_gib": sum(p.numel() * p.element_size() for p in pruned.parameters()) / 2 ** 30,
            "host_rss_start_gib": start_rss / 2 ** 30, "host_rss_end_gib": host_rss() / 2 ** 30,
            "peak_gpu_gib": _peak_gpu(args.device), "shape": decision.shape().summary()["hidden"]}


def _peak_gpu(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("faster", "vtrans", "materialise"), required=True)
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    result = materialise(args) if args.part == "materialise" else steps(args)
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
