"""A uniform export serves in vLLM (marked gpu: skipped without CUDA, and skipped naming the reason when vLLM is not
installed; vLLM is imported inside the test only). The prune job with export_uniform=true writes stock
LlamaForCausalLM classes; vLLM loads that directory and its greedy tokens equal transformers' on the same GPU."""
from __future__ import annotations

import pytest
import torch

from tests.tiny import bpe_tokenizer, tiny_config

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def uniform_export(tmp_path_factory):
    """A tiny LLaMA (GQA) with a real byte-level BPE tokenizer, pruned uniformly by the prune job."""
    from transformers import LlamaForCausalLM

    from tests.test_jobs import compose_cfg
    from vtrans.jobs import run

    root = tmp_path_factory.mktemp("vllm")
    tok = bpe_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama", vocab_size=len(tok), max_position_embeddings=256,
                                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    with torch.no_grad():  # peaked next-token distributions, as trained models have: no near-ties to flip
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    model.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    text = root / "lee.txt"
    from gensim.test.utils import datapath

    text.write_text("".join(line for line in open(datapath("lee_background.cor")) if line.strip()))
    m = run(compose_cfg(["model.package=", f"model.name_or_path={root / 'dense'}", "model.gguf_file=",
                         f"data.source={text}", "data.seq_len=32", "data.max_eval_blocks=4", "optim.steps=2",
                         "budget.target=0.6", "budget.count_embeddings=false", "export_uniform=true",
                         f"output_dir={root / 'out'}", "progress=false"]))
    return root / "out" / "model", m


def test_uniform_export_serves_in_vllm_with_transformers_greedy_tokens(uniform_export):
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm on a CUDA machine)")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir, metrics = uniform_export
    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "llama" and not getattr(config, "auto_map", None)  # stock classes
    assert metrics["params_pruned"] < metrics["params_dense"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = ["The government said on Tuesday", "Police in Sydney"]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    want = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids.cuda()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                              do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
        want.append(out[0, ids.shape[1]:].tolist())
    del hf
    torch.cuda.empty_cache()
    llm = vllm.LLM(model=str(model_dir), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2,
                   max_model_len=128, seed=0)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert [list(g) for g in got] == want
