"""Training throughput and peak memory of one model and global batch under DeepSpeed ZeRO-2 / ZeRO-3 on 1 and 2 ranks:
plain fine-tuning, VTrans (weights + masks) and Faster-VTrans (masks only) steps. Random weights of a real shape.

    python bench/throughput.py                                  # tiny LLaMA, CPU, 1 and 2 ranks (gloo)
    python bench/throughput.py --model smollm2 --steps 3        # SmolLM2-135M's shape
    python bench/throughput.py --llama7b-shape --layers 8 --bf16 --ranks 1 2 4 8   # on GPUs (one rank per GPU)

Every configuration runs in fresh processes, so CPU peak memory (max RSS of a rank) is its own; on GPUs the peak is
torch.cuda.max_memory_allocated of the busiest rank.
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import tempfile
import time
from pathlib import Path

import torch


SHAPES = {  # LLaMA configs (hidden, intermediate, layers, heads, kv heads, vocab)
    "tiny": (128, 344, 4, 4, 2, 4096),
    "smollm2": (576, 1536, 30, 9, 3, 49152),
    "llama7b": (4096, 11008, 32, 32, 32, 32000),
}
MODES = ("finetune", "vtrans", "faster")


def build_model(shape: str, layers: int | None, dtype: torch.dtype = torch.float32):
    """Random weights, built directly in `dtype` (a 7B shape in fp32 alone would take 27 GB of host memory before
    ZeRO-3 partitions it and the offloaded optimizer states take their ~81 GB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, n_layers, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers or n_layers, num_attention_heads=heads, num_key_value_heads=kv,
                         max_position_embeddings=4096, tie_word_embeddings=shape != "llama7b")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return LlamaForCausalLM(config).train()
    finally:
        torch.set_default_dtype(previous)


class FineTune(torch.nn.Module):
    """Plain next-token fine-tuning with the engine's (loss, stats) interface."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, step):
        from vtrans.objectives import lm_loss

        loss = lm_loss(self.model(input_ids=batch["input_ids"]).logits, batch["input_ids"])
        return loss, {"loss": loss.detach()}

    def param_groups(self, lr):
        return [{"name": "weights", "params": list(self.model.parameters()), "lr": lr}]


def build_module(mode: str, args):
    from vtrans.masks.attach import attach_masks
    from vtrans.masks.decide import Budget
    from vtrans.pruning import PruningModule

    model = build_model(args.shape, args.layers, torch.bfloat16 if args.bf16 else torch.float32)
    if mode == "finetune":
        module = FineTune(model)
        return module, module.param_groups(1e-5)
    mm = attach_masks(model)
    module = PruningModule(mm, Budget("params_ratio", 0.5), beta=1e-5, kl_weights={}, task_weight=1.0,
                           logit_weight=1.0, temperature=2.0, layer_weight=0.0, layer_every=3, warmup_steps=10,
                           train_weights=mode == "vtrans")
    return module, module.param_groups(0.1, 1e-5, 0.1, 1e-3)


def _worker(rank: int, world: int, port: int, mode: str, stage: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, args.threads))
    from vtrans.engine import DeepSpeedEngine

    module, groups = build_module(mode, args)
    engine = DeepSpeedEngine(module, groups, stage=stage, bf16=args.bf16, offload_optimizer=args.offload,
                             offload_params=args.offload and stage == 3, seed=0)
    vocab = SHAPES[args.shape][5]
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, vocab, (args.batch, args.seq), generator=g)}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup):
        engine.train_step([batch], step)
    engine.barrier()
    t0 = time.perf_counter()
    for step in range(args.steps):
        engine.train_step([batch], args.warmup + step)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    engine.barrier()
    seconds = time.perf_counter() - t0
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens = args.steps * args.batch * args.seq
    Path(f"{out}.{rank}").write_text(f"{tokens / seconds} {peak}")
    engine.close()


def measure(mode: str, stage: int, ranks: int, args) -> tuple[float, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result"
        torch.multiprocessing.start_processes(_worker, args=(ranks, port, mode, stage, args, str(out)),
                                              nprocs=ranks, start_method="spawn")
        results = [tuple(map(float, Path(f"{out}.{r}").read_text().split())) for r in range(ranks)]
    return results[0][0], max(peak for _, peak in results)  # rank 0's clock (after a barrier), the busiest rank


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", dest="shape", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--llama7b-shape", action="store_true", help="a random-weight LLaMA-2-7B-shaped model (GPUs)")
    p.add_argument("--layers", type=int, default=None, help="keep only this many layers of the shape")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences per step), split over the ranks")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--offload", action="store_true", help="optimizer (and ZeRO-3 parameter) offload to CPU")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU")
    args = p.parse_args(argv)
    if args.llama7b_shape:
        args.shape = "llama7b"
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    memory = "peak GPU memory / rank" if torch.cuda.is_available() else "peak RSS / rank"
    hidden, inter, n_layers, heads, kv, vocab = SHAPES[args.shape]
    print(f"{args.shape} LLaMA shape ({args.layers or n_layers} layers, hidden {hidden}), global batch "
          f"{args.batch} x {args.seq} tokens, {'bf16' if args.bf16 else 'fp32'}"
          f"{', offload' if args.offload else ''}, {device}; {args.steps} timed steps after {args.warmup}")
    print(f"| {'step':14s} | {'ZeRO':4s} | {'ranks':5s} | {'tokens/s':>10s} | {memory:>22s} |")
    print(f"|{'-' * 16}|{'-' * 6}|{'-' * 7}|{'-' * 12}|{'-' * 24}|")
    names = {"finetune": "fine-tuning", "vtrans": "VTrans", "faster": "Faster-VTrans"}
    for mode in args.modes:
        for stage in args.stages:
            for ranks in args.ranks:
                tokens_per_s, peak = measure(mode, stage, ranks, args)
                print(f"| {names[mode]:14s} | {stage:4d} | {ranks:5d} | {tokens_per_s:10.1f} | "
                      f"{peak / 2 ** 30:18.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
