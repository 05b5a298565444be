"""An independent structured-pruning baseline for bench/quality.py: Torch-Pruning (PyPI `torch-pruning`,
VainF/Torch-Pruning), run by the recipe of its LLM example (examples/LLMs/prune_llm.py) and measured by vtrans's own
evaluation (the same held-out split and cross-domain sets as every other row).

The recipe: a dependency-graph pruner (`BasePruner`) with one channel-pruning ratio for every layer (no global
ranking) over the hidden width and the FFN neurons, head dimensions kept (RoPE untouched), the LM head's vocabulary
outputs ignored, widths rounded to multiples of 4, and L2 group-magnitude importance
(`GroupMagnitudeImportance(p=2, group_reduction="mean")`), which needs no data. The example takes the ratio as given;
here it is the smallest ratio whose pruned model meets the parameter budget (bisection, same count as vtrans:
embeddings counted unless budget.count_embeddings=false). `importance="taylor"` swaps in the library's first-order
Taylor importance (`GroupTaylorImportance`), fed gradients of the next-token loss on the same calibration sequences
the vtrans baselines score on (mask.calibration_blocks).

Two departures, both forced by Torch-Pruning 1.6.1 on transformers 5 with grouped-query attention, and both known
upstream: building the pruner of a LLaMA-family model hangs (VainF/Torch-Pruning#527; here the graph is traced with
RoPE as the identity, which fixes it, see _rope_untraced), and pruning GQA heads fails on a shape error
(VainF/Torch-Pruning#516: the group importance of q with its shared k / v has k / v's length); so the example's head
pruning (`prune_num_heads=True`) is off and every head is kept: the budget is met by the hidden width and FFN."""
from __future__ import annotations

import contextlib
import copy
import logging
import sys
import time
import warnings

import torch

from vtrans import pipeline as P
from vtrans.accounting import model_numel
from vtrans.config import Config
from vtrans.objectives import lm_loss

log = logging.getLogger("vtrans")
IMPORTANCES = ("magnitude", "taylor")


def prune_llama(model, ratio: float, importance: str = "magnitude", calibration: list[dict] | None = None):
    """`model` (a LLaMA-family causal LM, modified in place) pruned by Torch-Pruning at channel / head ratio
    `ratio`; its config and attention modules updated to the new widths, tied embeddings kept tied."""
    import torch_pruning as tp

    cfg = model.config
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    # attention heads stay whole (see the module docstring): q / k / v are no pruning roots, so only their input
    # channels (the hidden width) are cut, with every other reader and writer of the residual stream
    attention = [getattr(layer.self_attn, name) for layer in model.model.layers for name in ("q_proj", "k_proj", "v_proj")]
    if importance == "magnitude":
        scorer = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    elif importance == "taylor":
        scorer = tp.importance.GroupTaylorImportance()
    else:
        raise ValueError(f"importance={importance!r} is not accepted; choose one of {list(IMPORTANCES)}")
    example = torch.tensor([[cfg.bos_token_id or 0, 1, 2, 3]], device=model.device)
    with _rope_untraced(model), warnings.catch_warnings():
        # RMSNorm weights are "unwrapped parameters" to the library, pruned along their only dimension: as intended
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = tp.pruner.BasePruner(
            model, example_inputs=example, importance=scorer, global_pruning=False, pruning_ratio=ratio,
            output_transform=lambda out: out.logits, ignored_layers=[model.lm_head, *attention],
            prune_head_dims=False, round_to=4)
    if importance == "taylor":  # the library's Taylor importance reads the gradients of the loss
        model.zero_grad()
        for batch in calibration or []:
            ids = batch["input_ids"].to(model.device)
            (lm_loss(model(input_ids=ids).logits, ids) / len(calibration)).backward()
    for group in pruner.step(interactive=True):
        group.prune()
    model.zero_grad(set_to_none=True)
    if tied:  # both sides were sliced alike into separate tensors: share one again
        assert torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
        model.lm_head.weight = model.get_input_embeddings().weight
    _update_config(model)
    return model


@contextlib.contextmanager
def _rope_untraced(model):
    """Trace the dependency graph with rotary embeddings as the identity. With transformers 5, RoPE's rotate_half
    (slice + concat over the head dimension) sends Torch-Pruning 1.6's group search round an endless loop
    (VainF/Torch-Pruning#527: it hangs building the pruner of any LLaMA-family model). RoPE acts inside each head and
    the recipe keeps head dimensions whole (prune_head_dims=False), so the graph's head / channel groups are the same
    without it; the pruned model runs with RoPE as before."""
    module = sys.modules[type(model).__module__]
    original = getattr(module, "apply_rotary_pos_emb", None)
    if original is not None:
        module.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
    try:
        yield
    finally:
        if original is not None:
            module.apply_rotary_pos_emb = original


def _update_config(model) -> None:
    """Record the pruned widths where transformers reads them (the example's post-processing)."""
    cfg = model.config
    attn = model.model.layers[0].self_attn
    head_dim = attn.head_dim
    cfg.hidden_size = model.lm_head.in_features
    cfg.num_attention_heads = attn.q_proj.out_features // head_dim
    cfg.num_key_value_heads = attn.k_proj.out_features // head_dim
    cfg.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
    cfg.head_dim = head_dim
    for layer in model.model.layers:
        a = layer.self_attn
        a.num_key_value_groups = (a.q_proj.out_features // head_dim) // (a.k_proj.out_features // head_dim)


def fit_ratio(model, target: float, embeddings: bool, tolerance: float = 1e-3) -> tuple[float, int]:
    """(ratio, counted parameters): the smallest channel ratio whose Torch-Pruning model has at most `target`
    counted parameters, by bisection on magnitude-pruned copies (the count depends on the ratio alone)."""
    lo, hi = 0.0, 0.95
    best = None
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        n = model_numel(prune_llama(copy.deepcopy(model), mid), embeddings=embeddings)
        if n <= target:
            hi, best = mid, n
        else:
            lo = mid
    if best is None:
        raise RuntimeError(f"no ratio up to {hi} meets the budget of {target:,.0f} parameters")
    return hi, best


def run(cfg: Config) -> dict:
    """A prune job's metrics for the Torch-Pruning baseline (same keys as vtrans's prune job where they apply)."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.optim.seed)
    importance = cfg.mask.method if cfg.mask.method in IMPORTANCES else "magnitude"
    model, tokenizer = P.load(cfg.model)
    data = P.prepare_data(cfg, tokenizer, dense=lambda: (model, tokenizer))
    domains = P.domain_data(cfg, tokenizer)
    metrics = {f"{k}_dense": v for k, v in P.evaluate_dense(model, tokenizer, cfg, data.held, "dense", False).items()
               if not k.startswith("eval_")}
    metrics.update(P.evaluate_domains(model, cfg, domains, "dense", dense=True))
    embeddings = cfg.budget.count_embeddings
    dense_params = model_numel(model, embeddings=embeddings)
    target = cfg.budget.target * dense_params if cfg.budget.kind == "params_ratio" else cfg.budget.target
    t_prune = time.perf_counter()
    ratio, _ = fit_ratio(model, target, embeddings)
    pruned = prune_llama(copy.deepcopy(model), ratio, importance, P.calibration(data.train, cfg)).eval()
    prune_time = time.perf_counter() - t_prune
    for k, v in P.evaluate(pruned, tokenizer, cfg, data.held, "pruned", False).items():
        if not k.startswith("eval_"):
            metrics[f"{k}_pruned"] = v
    metrics.update(P.evaluate_domains(pruned, cfg, domains, "pruned"))
    metrics.update(P.ratio_metrics(metrics, list(domains), "pruned", "dense"))
    metrics.update({
        "method": f"torch_pruning_{importance}", "channel_ratio": ratio, "params_dense": model_numel(model),
        "params_pruned": model_numel(pruned), "param_reduction": 1 - model_numel(pruned) / model_numel(model),
        "budget_target_size": target, "hidden_pruned": pruned.config.hidden_size,
        "intermediate_pruned": pruned.config.intermediate_size, "train_time_s": prune_time,
        "flops_dense": P.size_metrics(model, cfg.budget.flops_seq_len)["flops"],
        "flops_pruned": P.size_metrics(pruned, cfg.budget.flops_seq_len)["flops"], "wall_time_s": time.perf_counter() - t0,
        "eval_domains": dict(cfg.eval.domains), "train_sources": data.sources})
    if model_numel(pruned, embeddings=embeddings) > target:
        raise RuntimeError(f"torch-pruning model over budget: {model_numel(pruned, embeddings=embeddings):,} > "
                           f"{target:,.0f}")
    log.info("torch-pruning (%s): ratio %.3f, hidden %d, FFN %d, ppl %.2f -> %.2f", importance, ratio,
             pruned.config.hidden_size, pruned.config.intermediate_size, metrics["ppl_dense"], metrics["ppl_pruned"])
    return metrics
