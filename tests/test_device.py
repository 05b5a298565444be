"""Devices and processes: `device=auto|cpu|cuda` (a missing CUDA is a config error), the rank shares that split
evaluation, bf16 autocast in the plain engine, activation checkpointing with the mask hooks (equal gradients), and
the GPU tier (marked `gpu`: skipped without CUDA, see conftest.py): the jobs on cuda, masks float32 under a bf16
DeepSpeed engine, collectives on the GPU."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.tiny import make_tiny
from vtrans.engine import Engine, Processes, resolve_device
from vtrans.evaluation import rank_share
from vtrans.masks.attach import MaskInit, attach_masks
from vtrans.masks.decide import Budget
from vtrans.pipeline import enable_activation_checkpointing
from vtrans.pruning import PruningModule

pytestmark = pytest.mark.usefixtures("one_thread")
KL = {"hidden": 4.0, "heads": 64.0, "attention": 64.0, "neurons": 1.0, "ffn": 64.0}


def test_device_cuda_without_cuda_fails_at_validation_naming_the_key():
    from hydra import compose, initialize_config_dir

    from tests.test_jobs import CONF
    from vtrans.config import load_config

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["device=cuda"])
    if torch.cuda.is_available():
        assert load_config(cfg).device == "cuda"
        return
    with pytest.raises(ValueError, match=r"device=cuda but no CUDA device is available.*device=auto or device=cpu"):
        load_config(cfg)
    with pytest.raises(ValueError, match=r"device='tpu' is not accepted; choose one of \['auto', 'cpu', 'cuda'\]"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            load_config(compose(config_name="config", overrides=["device=tpu"]))


def test_auto_device_is_the_local_gpu_or_the_cpu():
    expected = torch.device("cuda", 1 % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto", local_rank=1) == expected
    assert resolve_device("cpu", local_rank=1) == torch.device("cpu")


@pytest.mark.parametrize("n,world", [(7, 2), (8, 2), (2, 3), (10, 4)])
def test_rank_shares_cover_every_item_once_in_order(n, world):
    items = list(range(n))
    shares = [rank_share(items, Processes(torch.device("cpu"), r, world)) for r in range(world)]
    assert [i for share in shares for i, counted in share if counted] == items
    locked = [rank_share(items, Processes(torch.device("cpu"), r, world), lockstep=True) for r in range(world)]
    assert len({len(share) for share in locked}) == 1  # as many forwards on every rank
    assert [i for share in locked for i, counted in share if counted] == items


def _module(train_weights: bool, seed: int = 0):
    model = make_tiny("llama").train()
    torch.manual_seed(seed)
    mm = attach_masks(model, init=MaskInit(log_sigma2=-4.0))
    teacher = copy.deepcopy(model) if train_weights else None
    module = PruningModule(mm, Budget("params_ratio", 0.6), beta=1e-5, kl_weights=KL, task_weight=1.0,
                           logit_weight=1.0, temperature=2.0, layer_weight=0.0, layer_every=1, warmup_steps=2,
                           train_weights=train_weights, teacher=teacher)
    return model, mm, module


@pytest.mark.parametrize("train_weights", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(train_weights):
    """transformers' own (non-reentrant) checkpointing recomputes each layer in backward: the mask hooks run again
    with the same VIB noise (the RNG state is restored), so masks and weights get the gradients they get without."""
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model, mm, module = _module(train_weights)
        if checkpointing:
            enable_activation_checkpointing(model)
            assert model.model.gradient_checkpointing
        torch.manual_seed(1)  # the same VIB noise in both runs
        loss, _ = module({"input_ids": ids}, step=1)
        loss.backward()
        params = mm.mask_parameters() + ([p for p in model.parameters() if p.requires_grad] if train_weights else [])
        grads.append([p.grad.clone() for p in params])
    assert len(grads[0]) > 10
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_plain_engine_bf16_autocast_keeps_masks_float32():
    model, mm, module = _module(train_weights=False)
    engine = Engine(module, module.param_groups(0.05, 0.0, 0.1, 0.0), bf16_autocast=True)
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in mm.mask_parameters()]
    stats = engine.train_step([{"input_ids": ids}], step=0)
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert {p.dtype for p in mm.mask_parameters()} == {torch.float32}
    assert any(not torch.equal(a, b) for a, b in zip(before, mm.mask_parameters()))  # the masks trained


# ------------------------------------------------------------------------------------------------------ GPU tier


@pytest.mark.gpu
def test_prune_and_evaluate_jobs_run_on_the_gpu(tmp_path):
    """A tiny LLaMA pruned with device=cuda: masks and batches on the GPU; the pruned model evaluated there."""
    from gensim.test.utils import datapath

    from tests.test_jobs import compose_cfg, lm_overrides, make_model, minilm_tokenizer
    from vtrans.jobs import run

    assets = tmp_path  # what lm_overrides reads: a tiny LLaMA in llama/ and real text in lee.txt
    tok = minilm_tokenizer()
    make_model("llama", "lm", tok).save_pretrained(assets / "llama")
    tok.save_pretrained(assets / "llama")
    (assets / "lee.txt").write_text("".join(open(datapath("lee_background.cor")).readlines()[:60]))
    m = run(compose_cfg(lm_overrides(assets, tmp_path / "prune", "device=cuda", "optim.bf16_autocast=true")))
    assert m["ppl_pruned"] > 1 and m["params_pruned"] < m["params_dense"]
    e = run(compose_cfg(lm_overrides(assets, tmp_path / "eval", "job=evaluate", "device=cuda",
                                     f"model_dir={tmp_path / 'prune' / 'model'}")))
    assert e["ppl"] == pytest.approx(m["ppl_pruned"], rel=1e-4)


@pytest.mark.gpu
def test_collectives_and_the_engine_run_on_the_gpu():
    from vtrans.engine import processes

    procs = processes("cuda")
    assert procs.device.type == "cuda"
    model, mm, module = _module(train_weights=True)
    module.to(procs.device)
    engine = Engine(module, module.param_groups(0.05, 1e-4, 0.1, 0.0), procs=procs, bf16_autocast=True)
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    stats = engine.train_step([{"input_ids": ids}], step=0)  # CPU batches are moved to the GPU
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in mm.mask_parameters())
    assert procs.mean({"a": 2.0}) == {"a": 2.0} and procs.any(True) == (True,)


@pytest.mark.gpu
def test_masks_stay_float32_under_a_bf16_deepspeed_engine_on_the_gpu():
    pytest.importorskip("deepspeed")
    from vtrans.engine import DeepSpeedEngine

    model, mm, module = _module(train_weights=False)
    spread = torch.linspace(-12.0, -6.0, sum(m.n for m in mm.masks().values()))
    with torch.no_grad():
        start = 0
        for m in mm.masks().values():
            m.log_sigma2.copy_(spread[start:start + m.n])
            start += m.n
    distinct = torch.cat([m.log_alpha().detach().flatten() for m in mm.masks().values()]).unique().numel()
    engine = DeepSpeedEngine(module, module.param_groups(0.05, 0.0, 0.1, 0.0), stage=3, bf16=True)
    assert engine.device.type == "cuda"
    after = torch.cat([m.log_alpha().detach().flatten() for m in mm.masks().values()]).unique().numel()
    assert after == distinct > 500
    ids = torch.randint(3, 90, (4, 12), generator=torch.Generator().manual_seed(0))
    stats = engine.train_step([{"input_ids": ids}], step=0)
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert {p.dtype for p in mm.mask_parameters()} == {torch.float32}
