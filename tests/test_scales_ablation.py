"""bench/scales_ablation.py on a tiny Faster-VTrans run: the learned-scale setting reproduces the job's own
perplexities from its checkpoint, the unit-scale setting is the same decision without them, and other runs are
refused by name."""
import pytest
from transformers import AutoConfig

from bench.scales_ablation import ablate, mask_states, run_config
from tests.test_prune_job import _cfg, text_file, tiny_llama_dir  # noqa: F401  (fixtures)
from vtrans.jobs import run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("gains", [False, True])
def test_the_learned_scales_reproduce_the_job_and_unit_scales_change_only_the_scales(tiny_llama_dir, text_file,
                                                                                      tmp_path, gains):
    out = tmp_path / "run"
    cfg = _cfg(tiny_llama_dir, out, source=str(text_file), budget__count_embeddings=False, mask__gains=gains)
    cfg.eval.domains = {"other": "gensim:mini_newsgroup"}
    cfg.eval.domain_blocks = 4
    metrics = run(cfg)
    rows = ablate(out)
    learned, unit = rows["learned"], rows["unit"]
    assert learned["ppl"] == pytest.approx(metrics["ppl_pruned"], rel=1e-3)
    assert learned["ratio_other"] == pytest.approx(metrics["ppl_ratio_other"], rel=1e-3)
    assert unit["params"] == learned["params"] == metrics["params_pruned"]  # the same decision
    assert unit["ppl"] != pytest.approx(learned["ppl"], rel=1e-4)  # without the scales another model
    assert set(rows) == {"learned", "unit"} and "ratio_dev_mean" in unit
    gain_states = mask_states(out, run_config(out), "gain.")
    if gains:  # trained: every block's gains moved from 1, and the job's model holds them (reproduced above)
        layers = AutoConfig.from_pretrained(tiny_llama_dir).num_hidden_layers
        assert set(gain_states) == {f"layers.{i}.{k}_gain" for i in range(layers) for k in ("attention", "ffn")}
        for name, state in gain_states.items():
            assert (state["scale"] - 1).abs().max() > 1e-3, name
    else:
        assert gain_states == {}


def test_only_a_faster_vtrans_run_is_accepted(tiny_llama_dir, text_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="run.json not found"):
        run_config(tmp_path)
    out = tmp_path / "taylor"
    cfg = _cfg(tiny_llama_dir, out, source=str(text_file), mask__method="taylor", budget__count_embeddings=False)
    run(cfg)
    with pytest.raises(ValueError, match=r"mask.method=taylor .*accepted: a Faster-VTrans prune run"):
        run_config(out)
