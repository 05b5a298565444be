"""Generalisation beyond the calibration data: the offline text domains (newsgroups, Python's reference, package
docs, a MediaWiki dump), cross-domain evaluation (eval.domains) in the jobs, teacher samples (teacher:N: seeded,
cached), training mixtures (data.mix) and their config checks; on tiny models with the real MiniLM tokenizer."""
from __future__ import annotations

import bz2
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.tiny import save_tiny_with_tokenizer, tokenizer_dir
from vtrans import cache, data as D, teacher
from vtrans.config import load_config
from vtrans.jobs import run

CONF = Path(__file__).resolve().parents[1] / "conf"
pytestmark = pytest.mark.usefixtures("one_thread")


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir())


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny LLaMA saved with the real tokenizer, 60 Lee documents and 40 other news documents as .txt files."""
    from gensim.test.utils import datapath

    root = tmp_path_factory.mktemp("xdomain")
    save_tiny_with_tokenizer(root / "llama", "llama")
    lee = [line.strip() for line in open(datapath("lee_background.cor")) if line.strip()]
    (root / "lee.txt").write_text("\n".join(lee[:60]) + "\n")
    (root / "other.txt").write_text("\n".join(lee[200:240]) + "\n")
    return root


def lm(assets, out, *extra):
    return ["model.package=", f"model.name_or_path={assets / 'llama'}", "model.gguf_file=",
            f"data.source={assets / 'lee.txt'}", "data.seq_len=32", "data.max_eval_blocks=4",
            "budget.count_embeddings=false", "optim.steps=2", "optim.log_every=1", f"output_dir={out}",
            "progress=false", f"data.cache_dir={assets / 'cache'}", "eval=none", *extra]


# ------------------------------------------------------------------------------------------- config


def test_the_default_job_evaluates_four_offline_domains_with_wiki_among_them():
    cfg = load_config(compose_cfg([]))
    assert set(cfg.eval.domains) == {"newsgroups", "pydoc", "sklearn_docs", "wiki"}
    assert cfg.eval.domains["wiki"].startswith("gensim:enwiki") and cfg.eval.domain_blocks >= 16
    assert cfg.data.source not in cfg.eval.domains.values()
    assert load_config(compose_cfg(["eval=none"])).eval.domains == {}


def test_mix_and_teacher_keys_compose_from_the_command_line():
    cfg = load_config(compose_cfg(["data.mix=[{source:'gensim:lee_background.cor',weight:1},"
                                   "{source:'teacher:64',weight:3}]", "data.teacher_temperature=0.8",
                                   "data.teacher_length=96", "data.teacher_top_p=0.9", "+eval.domains.poems=poems.txt"]))
    assert [(m.source, m.weight) for m in cfg.data.mix] == [("gensim:lee_background.cor", 1.0), ("teacher:64", 3.0)]
    assert cfg.data.training_sources() == ["gensim:lee_background.cor", "teacher:64"]
    assert cfg.data.teacher_temperature == 0.8 and cfg.data.teacher_length == 96 and cfg.data.teacher_top_p == 0.9
    assert cfg.eval.domains["poems"] == "poems.txt"


@pytest.mark.parametrize("values,match", [
    ({"data": {"source": "teacher:0"}}, r"data.source='teacher:0' is not accepted: a teacher source is teacher:N"),
    ({"data": {"source": "teacher:many"}}, r"data.source='teacher:many' is not accepted"),
    ({"data": {"mix": [{"source": "teacher:1.5"}]}}, r"data.mix\[0\].source='teacher:1.5' is not accepted"),
    ({"data": {"mix": [{"source": "a.txt", "weight": 0}]}}, r"data.mix\[0\].weight=0.0 must be > 0"),
    ({"data": {"mix": [{"source": "a.txt", "weight": -1}]}}, r"data.mix\[0\].weight=-1.0 must be > 0"),
    ({"data": {"mix": [{"source": ""}]}}, r"data.mix\[0\].source is empty; accepted sources: gensim"),
    ({"data": {"mix": [{"source": "a.txt"}, {"source": "a.txt"}]}}, r"data.mix\[1\].source='a.txt' is listed twice"),
    ({"data": {"teacher_temperature": 0}}, r"data.teacher_temperature=0.0 must be > 0"),
    ({"data": {"teacher_length": -1}}, r"data.teacher_length=-1 must be >= 0"),
    ({"data": {"teacher_top_p": 0}}, r"data.teacher_top_p=0.0 must be in \(0, 1\]"),
    ({"data": {"teacher_top_p": 1.5}}, r"data.teacher_top_p=1.5 must be in \(0, 1\]"),
    ({"data": {"teacher_batch_size": 0}}, r"data.teacher_batch_size=0 must be >= 1"),
    ({"data": {"teacher_start": "eos"}}, r"data.teacher_start='eos' is not accepted; choose one of \['bos', 'random'\]"),
    ({"data": {"eval_source": "teacher:8"}}, r"data.eval_source='teacher:8' is not accepted: evaluation needs real"),
    ({"eval": {"domains": {"Wiki": "w.txt"}}}, r"eval.domains key 'Wiki' is not accepted: a domain name is lower"),
    ({"eval": {"domains": {"cross_domain": "w.txt"}}}, r"eval.domains key 'cross_domain' is reserved"),
    ({"eval": {"domains": {"w": ""}}}, r"eval.domains.w is empty; accepted sources"),
    ({"eval": {"domains": {"w": "teacher:9"}}}, r"eval.domains.w='teacher:9' is not accepted: evaluation needs real"),
    ({"eval": {"domains": {"w": "gensim:lee_background.cor"}}},
     r"eval.domains.w='gensim:lee_background.cor' is also data.source.*never used for calibration or training"),
    ({"data": {"mix": [{"source": "w.txt"}]}, "eval": {"domains": {"w": "w.txt"}}},
     r"eval.domains.w='w.txt' is also data.source, data.eval_source, a data.mix source, mask.compensate_source or "
     r"mask.init_source"),
    ({"mask": {"compensate_source": "w.txt"}, "eval": {"domains": {"w": "w.txt"}}},
     r"eval.domains.w='w.txt' is also .*mask.compensate_source"),
    ({"mask": {"compensate_source": "teacher:0"}}, r"mask.compensate_source='teacher:0' is not accepted: a teacher"),
    ({"model": {"task": "sequence_classification"}, "data": {"mix": []}, "mask": {"compensate_source": "a.txt"}},
     r"mask.compensate_source='a.txt' cuts a source into token blocks for a causal LM"),
    ({"mask": {"init_source": "w.txt"}, "eval": {"domains": {"w": "w.txt"}}},
     r"eval.domains.w='w.txt' is also .*mask.init_source: a cross-domain evaluation"),
    ({"mask": {"init_source": "teacher:x"}}, r"mask.init_source='teacher:x' is not accepted: a teacher"),
    ({"mask": {"init_source": "teacher:64", "init_from": ""}},
     r"mask.init_source='teacher:64' is what the warm start scores on, but mask.init_from='' turns"),
    ({"model": {"task": "sequence_classification"}, "data": {"mix": []}, "mask": {"init_source": "a.txt"}},
     r"mask.init_source='a.txt' cuts a source into token blocks for a causal LM.*set mask.init_source=''"),
    ({"mask": {"fisher_labels": "teacher"}}, r"mask.fisher_labels='teacher' is not accepted; choose one of"),
    ({"model": {"task": "sequence_classification"}, "data": {"mix": []}, "mask": {"fisher_labels": "model"}},
     r"mask.fisher_labels='model' draws next tokens from a causal LM's predictions.*set mask.fisher_labels=data"),
    ({"eval": {"domain_blocks": -1}}, r"eval.domain_blocks=-1 must be >= 0"),
    ({"distill": {"task_weight": 0, "logit_weight": 0}}, r"distill.task_weight, distill.logit_weight and "
                                                         r"distill.layer_weight are all 0: training would have nothing"),
    ({"model": {"task": "sequence_classification"}, "data": {"mix": [{"source": "a.txt"}]}},
     r"data.mix needs a causal LM"),
    ({"model": {"task": "sequence_classification"}, "data": {"source": "teacher:4"}},
     r"'teacher:4' \(teacher samples\) needs a causal LM"),
])
def test_bad_mix_teacher_and_domain_values_name_the_value_and_what_is_accepted(values, match):
    with pytest.raises(ValueError, match=match):
        load_config(OmegaConf.create(values))


def test_a_classifier_composes_with_the_default_domains_and_skips_them():
    cfg = load_config(compose_cfg(["model=minilm", "data=polarity"]))
    assert cfg.eval.domains  # the default group stays; perplexity domains do not apply to a classifier
    from vtrans.pipeline import domain_data
    assert domain_data(cfg, tokenizer=None) == {}


# ------------------------------------------------------------------------------------------- sources


def test_offline_domains_load_as_real_english_documents():
    news = D.load_documents("gensim:mini_newsgroup")
    assert len(news) == 200 and not any(d.text.startswith(("From:", "Newsgroups:")) for d in news)
    assert sum("space" in d.text.lower() for d in news) > 20
    ref = D.load_documents("pydoc:topics")
    assert len(ref) > 50 and any(d.text.startswith('The "assert" statement') for d in ref)
    docs = D.load_documents("package:sklearn/datasets/descr/*.rst")
    assert len(docs) >= 10 and any("Iris" in d.text for d in docs)
    with pytest.raises(ValueError, match="accepted pydoc source is pydoc:topics"):
        D.load_documents("pydoc:modules")
    with pytest.raises(ValueError, match=r"no installed package is imported as 'no_such_pkg'"):
        D.load_documents("package:no_such_pkg/*.rst")
    with pytest.raises(FileNotFoundError, match=r"no file in .* matches '\*.nothing'"):
        D.load_documents("package:sklearn/*.nothing")
    with pytest.raises(ValueError, match="expected package:<import name>/<glob>"):
        D.load_documents("package:sklearn")
    with pytest.raises(ValueError, match="sampled from the dense model by the job"):
        D.load_documents("teacher:8")


def _page(title, text):
    return (f"<page><title>{title}</title><ns>0</ns><id>1</id><revision><id>2</id><text xml:space=\"preserve\">"
            f"{text}</text></revision></page>")


def test_a_mediawiki_dump_gives_plain_text_articles(tmp_path):
    xml = ("<mediawiki xmlns=\"http://www.mediawiki.org/xml/export-0.10/\">"
           + _page("Aardvark", "'''Aardvark''' is a [[mammal|burrowing mammal]].\n\n==Diet==\nIt eats ''ants''.")
           + _page("Old name", "#REDIRECT [[Aardvark]]")
           + _page("Talk:Aardvark", "a discussion page")
           + "</mediawiki>")
    path = tmp_path / "wiki.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode()))
    docs = D.load_documents(str(path))
    assert [d.text for d in docs] == ["Aardvark is a burrowing mammal.\n\nDiet\nIt eats ants."]
    (tmp_path / "bad.bz2").write_bytes(b"not bzip2")
    with pytest.raises(ValueError, match="is not a bzip2-compressed MediaWiki XML dump"):
        D.load_documents(str(tmp_path / "bad.bz2"))


def test_gensims_wikipedia_dump_loads():
    wiki = D.load_documents("gensim:enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    assert len(wiki) > 100 and any(d.text.startswith("Anarchism is a political philosophy") for d in wiki)
    assert not any("'''" in d.text or "#REDIRECT" in d.text.upper() for d in wiki)


def test_spread_blocks_cover_the_corpus_evenly():
    blocks = torch.arange(100).view(100, 1)
    assert D.spread_blocks(blocks, 5).flatten().tolist() == [0, 25, 50, 74, 99]
    assert D.spread_blocks(blocks, 0) is blocks and D.spread_blocks(blocks, 500) is blocks


def test_mix_blocks_give_each_source_its_share_and_use_every_block():
    a = torch.arange(0, 40).view(20, 2)  # 20 blocks
    b = torch.arange(1000, 1012).view(6, 2)  # 6 blocks
    mixed = D.mix_blocks([a, b], [1.0, 1.0], seed=0)
    from_b = (mixed[:, 0] >= 1000)
    assert mixed.shape[0] == 40 and int(from_b.sum()) == 20  # b is repeated to its half
    assert {tuple(r) for r in a.tolist()} <= {tuple(r) for r in mixed.tolist()}
    assert {tuple(r) for r in b.tolist()} <= {tuple(r) for r in mixed.tolist()}
    assert torch.equal(mixed, D.mix_blocks([a, b], [1.0, 1.0], seed=0))
    assert not torch.equal(mixed, D.mix_blocks([a, b], [1.0, 1.0], seed=1))
    small = D.mix_blocks([a, b], [3.0, 1.0], seed=0, total=8)  # a capped total: a seeded subset of each
    assert small.shape[0] == 8 and int((small[:, 0] >= 1000).sum()) == 2
    assert len({tuple(r) for r in small[small[:, 0] < 1000].tolist()}) == 6
    with pytest.raises(ValueError, match="same block length"):
        D.mix_blocks([a, torch.zeros(3, 5, dtype=torch.long)], [1, 1], seed=0)
    with pytest.raises(ValueError, match="weights must be > 0"):
        D.mix_blocks([a, b], [1, 0], seed=0)


# ------------------------------------------------------------------------------------------- teacher samples


def _sampling(**over):
    s = dict(model="tiny", n=5, length=12, temperature=1.0, seed=0, batch_size=2)
    s.update(over)
    return teacher.Sampling(**s)


@pytest.fixture(scope="module")
def tiny_lm(assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(assets / "llama"), AutoTokenizer.from_pretrained(assets / "llama")


def test_teacher_samples_are_seeded_full_length_and_leave_the_rng_alone(tiny_lm):
    model, tok = tiny_lm
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = teacher.sample(model, tok, _sampling())
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is unchanged
    assert len(first) == 5 and all(t.strip() for t in first)
    assert len(set(first)) == 5  # sampled, not greedy: five different sequences
    assert teacher.sample(model, tok, _sampling()) == first
    assert teacher.sample(model, tok, _sampling(seed=1)) != first
    lengths = [len(ids) for ids in tok(first, add_special_tokens=False)["input_ids"]]
    assert min(lengths) >= 6  # 12 sampled tokens each (WordPiece pieces may merge when re-tokenised)


def test_a_random_first_token_is_drawn_from_ordinary_tokens_and_kept(tiny_lm, monkeypatch):
    model, tok = tiny_lm
    starts = []
    generate = type(model).generate

    def spy(self, input_ids=None, **kwargs):
        starts.append(input_ids[:, 0].clone())
        return generate(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    texts = teacher.sample(model, tok, _sampling(start="random", n=6, batch_size=3))
    first = torch.cat(starts)
    assert len(texts) == 6 and len(set(first.tolist())) > 1  # a different start per sequence
    assert not set(first.tolist()) & set(tok.all_special_ids)
    assert texts != teacher.sample(model, tok, _sampling(n=6, batch_size=3))  # not the BOS-start samples
    with pytest.raises(ValueError, match=r"teacher start='middle' is not accepted; choose one of \['bos', 'random'\]"):
        teacher.sample(model, tok, _sampling(start="middle"))


def test_teacher_samples_are_cached_and_the_key_covers_every_setting(tiny_lm, tmp_path):
    model, tok = tiny_lm
    calls = []

    def dense():
        calls.append(1)
        return model, tok

    docs = teacher.documents("teacher:5", _sampling(), str(tmp_path), dense)
    assert len(calls) == 1 and len(docs) == 5 and docs.source == "teacher:5"
    cached = list((tmp_path / "teacher").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["record"]["n"] == 5

    def no_model():
        raise AssertionError("a cached sample set must not need the model")

    again = teacher.documents("teacher:5", _sampling(), str(tmp_path), no_model)
    assert [d.text for d in again] == [d.text for d in docs]
    for over in ({"temperature": 0.7}, {"length": 8}, {"seed": 3}, {"n": 4}, {"model": "other"},
                 {"batch_size": 5}, {"start": "random"}, {"top_p": 0.9}):
        assert cache.entry("c", "teacher", _sampling(**over).record()) != \
            cache.entry("c", "teacher", _sampling().record()), over
    teacher.documents("teacher:5", _sampling(temperature=0.7), str(tmp_path), dense)
    assert len(calls) == 2 and len(list((tmp_path / "teacher").glob("*.json"))) == 2


def test_top_p_one_keeps_the_cache_key_samples_had_before_it_existed():
    assert set(_sampling().record()) == {"model", "n", "length", "temperature", "seed", "batch_size", "start",
                                         "version"}
    assert _sampling(top_p=0.5).record()["top_p"] == 0.5


def test_a_nucleus_cut_samples_only_tokens_inside_it(tiny_lm):
    """With top_p below 1 every sampled token lies in the smallest set holding top_p of the model's tempered
    next-token distribution at that position; without the cut some do not."""
    model, tok = tiny_lm

    def outside(texts_ids, top_p, temperature):
        with torch.no_grad():
            logits = model(input_ids=texts_ids).logits[:, :-1].float() / temperature
        probs = logits.softmax(-1)
        ordered, order = probs.sort(-1, descending=True)
        before = ordered.cumsum(-1) - ordered  # mass ahead of each token in the ordering
        inside = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < top_p)
        chosen = texts_ids[:, 1:]
        return int((~inside.gather(-1, chosen.unsqueeze(-1))).sum())

    def ids(top_p):
        generate, seen = type(model).generate, []

        def keep(self, **kwargs):
            out = generate(self, **kwargs)
            seen.append(out)
            return out
        type(model).generate = keep
        try:
            teacher.sample(model, tok, _sampling(n=8, batch_size=8, length=24, temperature=1.5, top_p=top_p))
        finally:
            type(model).generate = generate
        return torch.cat(seen)

    assert outside(ids(0.5), 0.5, 1.5) == 0
    assert outside(ids(1.0), 0.5, 1.5) > 0


def test_cache_dir_defaults_to_the_environment_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "env"))
    assert cache.cache_root("") == tmp_path / "env"
    assert cache.cache_root(str(tmp_path / "set")) == tmp_path / "set"
    monkeypatch.delenv(cache.CACHE_ENV)
    assert cache.cache_root("") == Path.home() / ".cache" / "vtrans"


def test_a_cache_entry_made_for_another_record_is_refused(tmp_path):
    path = cache.entry(str(tmp_path), "teacher", {"n": 1})
    cache.write(path, {"n": 2}, ["x"])  # as if hand-edited or colliding
    with pytest.raises(ValueError, match="was made for .*'n': 2.*remove it"):
        cache.read(path, {"n": 1})


def test_the_model_identity_is_its_content_not_its_place(assets, tmp_path):
    """Two installs of the same model (two clones' virtual environments) share the caches' entries; a model changed
    in place does not; file digests are memoised under (path, size, mtime) and a GGUF folder counts its one file."""
    import os
    import shutil

    from vtrans.config import ModelConfig

    def ident(folder, **over):
        fields = {"name_or_path": str(folder), "package": "", "gguf_file": "", **over}
        return cache.model_identity(ModelConfig(**fields), str(tmp_path / "cache"))

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(assets / "llama", a)
    shutil.copytree(assets / "llama", b)  # another place, other modification times
    (b / "__init__.py").write_text("# a package's own code is not the model\n")
    first = ident(a)
    assert ident(b) == first and ident(a, dtype="bfloat16") != first
    assert len(list((tmp_path / "cache" / "digests").glob("*.json"))) == len(json.loads(first)["files"]) * 2
    weights = next(p for p in sorted(a.iterdir()) if p.suffix in (".safetensors", ".bin"))
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ident(a) == first  # same path, size and mtime: the memo answers without reading
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert ident(a) != first  # replaced in place: read again
    (a / "extra.gguf").write_bytes(b"GGUF")
    (a / "other.gguf").write_bytes(b"GGUF other")
    one = ident(a, gguf_file="extra.gguf")
    assert [name for name, _ in json.loads(one)["files"]] == ["extra.gguf"]
    assert "hub-org/model" in cache.model_identity(ModelConfig(name_or_path="hub-org/model", package="",
                                                               gguf_file=""), str(tmp_path / "cache"))


def _identity_on_a_rank(rank: int, folder: str, cache_dir: str) -> tuple[str, list[str]]:
    """P.model_identity on one of 2 ranks; returns it and the model files this rank read for their digests."""
    import builtins
    from dataclasses import replace

    from vtrans import pipeline as P
    from vtrans.config import Config
    from vtrans.engine import processes

    cfg = Config()
    cfg = replace(cfg, model=replace(cfg.model, name_or_path=folder, package="", gguf_file=""),
                  data=replace(cfg.data, cache_dir=cache_dir))
    reads = []

    def counting_open(path, mode="r", *args, **kwargs):
        if "b" in mode and "r" in mode and str(path).startswith(folder):
            reads.append(Path(path).name)
        return builtins.open(path, mode, *args, **kwargs)

    cache.open = counting_open  # module globals come before builtins: file_digest's reads are counted
    return P.model_identity(cfg, processes("cpu")), reads


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_one_process_per_machine_reads_the_model_files_for_their_digests(assets, tmp_path):
    """Under DeepSpeed every rank needs the model's identity (the caches' key); LOCAL_RANK 0 reads the files while
    the others wait at a barrier, then they take its memoised digests: a 7B checkpoint is read once, not per rank."""
    import shutil

    from tests.test_distributed import spawn

    folder = tmp_path / "model"
    shutil.copytree(assets / "llama", folder)
    (first, reads0), (second, reads1) = spawn(_identity_on_a_rank, tmp_path / "spawn", str(folder),
                                              str(tmp_path / "cache"))
    assert first == second
    assert sorted(reads0) == sorted(name for name, _ in json.loads(first)["files"]) and reads1 == []


def test_a_non_main_process_waits_for_the_main_process_samples(tiny_lm, tmp_path, monkeypatch):
    model, tok = tiny_lm
    monkeypatch.setattr(teacher, "WAIT_TIMEOUT_S", 0.01)
    with pytest.raises(TimeoutError, match="waited 0.01 s for the main process's teacher samples"):
        teacher.documents("teacher:5", _sampling(), str(tmp_path), lambda: (model, tok), is_main=False)
    teacher.documents("teacher:5", _sampling(), str(tmp_path), lambda: (model, tok))
    got = teacher.documents("teacher:5", _sampling(), str(tmp_path), lambda: 1 / 0, is_main=False)
    assert len(got) == 5


# ------------------------------------------------------------------------------------------- jobs


def test_prune_reports_every_domain_and_the_ratios(assets, tmp_path):
    m = run(compose_cfg(lm(assets, tmp_path, f"+eval.domains.other={assets / 'other.txt'}",
                           "+eval.domains.python=pydoc:topics", "eval.domain_blocks=5")))
    for d in ("other", "python"):
        assert m[f"ppl_{d}_dense"] > 1 and m[f"ppl_{d}_pruned"] > 1 and m[f"eval_tokens_{d}"] == 5 * 31
        assert m[f"ppl_ratio_{d}"] == pytest.approx(m[f"ppl_{d}_pruned"] / m[f"ppl_{d}_dense"])
    assert m["ppl_ratio_cross_domain"] == pytest.approx(math.sqrt(m["ppl_ratio_other"] * m["ppl_ratio_python"]))
    assert m["ppl_ratio_calibration_domain"] == pytest.approx(m["ppl_pruned"] / m["ppl_dense"])
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["ppl_ratio_cross_domain"] == pytest.approx(m["ppl_ratio_cross_domain"])
    assert written["eval_domains"] == {"other": str(assets / "other.txt"), "python": "pydoc:topics"}


def test_dense_perplexities_are_cached_and_reused(assets, tmp_path, monkeypatch):
    extra = (f"+eval.domains.other={assets / 'other.txt'}", "eval.domain_blocks=3",
             f"data.cache_dir={tmp_path / 'cache'}")
    first = run(compose_cfg(lm(assets, tmp_path / "a", *extra)))
    assert len(list((tmp_path / "cache" / "perplexity").glob("*.json"))) == 2  # held-out split and one domain
    from vtrans import pipeline

    evaluate = pipeline.evaluate

    def no_dense(model, tokenizer, cfg, data, desc="evaluate", lm_eval=True, **kw):
        assert not desc.startswith("dense"), f"{desc}: the dense perplexity must come from the cache"
        return evaluate(model, tokenizer, cfg, data, desc, lm_eval, **kw)

    monkeypatch.setattr(pipeline, "evaluate", no_dense)
    second = run(compose_cfg(lm(assets, tmp_path / "b", *extra, "budget.target=0.6")))
    assert second["ppl_dense"] == first["ppl_dense"] and second["ppl_other_dense"] == first["ppl_other_dense"]
    assert second["ppl_pruned"] != first["ppl_pruned"]
    with pytest.raises(AssertionError, match="must come from the cache"):  # switched off: evaluated again
        run(compose_cfg(lm(assets, tmp_path / "c", *extra, "eval.cache_dense=false")))


def test_prune_summary_prints_both_ratios(assets, tmp_path, capsys):
    run(compose_cfg(lm(assets, tmp_path, f"+eval.domains.other={assets / 'other.txt'}", "eval.domain_blocks=3")))
    printed = capsys.readouterr().out
    assert "other perplexity" in printed
    assert "ppl ratio, calibration domain (held-out)" in printed and "ppl ratio, cross-domain (geo-mean of 1)" in printed


def test_prune_on_a_teacher_mixture_samples_once_then_reads_the_cache(assets, tmp_path, monkeypatch):
    mix = f"data.mix=[{{source:'{assets / 'lee.txt'}',weight:1}},{{source:'teacher:6',weight:3}}]"
    overrides = lm(assets, tmp_path / "a", mix, "data.cache_dir=" + str(tmp_path / "cache"))
    m = run(compose_cfg(overrides))
    lee, samples = m["train_sources"]
    assert lee["source"] == str(assets / "lee.txt") and samples["source"] == "teacher:6"
    assert samples["documents"] == 6 and samples["sequences"] == 3 * lee["sequences"]
    assert lee["documents"] == m["heldout_documents"] * 9  # data.source's training split only: 54 of 60
    assert len(list((tmp_path / "cache" / "teacher").glob("*.json"))) == 1

    def resample(*a, **k):
        raise AssertionError("the rerun must read the cached samples")

    monkeypatch.setattr(teacher, "sample", resample)
    again = run(compose_cfg(lm(assets, tmp_path / "b", mix, "data.cache_dir=" + str(tmp_path / "cache"))))
    assert again["ppl_pruned"] == pytest.approx(m["ppl_pruned"])  # same data, same run


def test_fast_vtrans_takes_its_share_of_every_mixture_source(assets, tmp_path):
    mix = f"data.mix=[{{source:'{assets / 'lee.txt'}',weight:1}},{{source:'teacher:40',weight:1}}]"
    m = run(compose_cfg(lm(assets, tmp_path, mix, "mask=fast", "mask.calibration_blocks=8")))
    for src in m["train_sources"]:
        assert src["documents"] < src["documents_available"] and src["blocks"] >= 4  # 3 %, grown to 8 / 2 blocks


def test_teacher_only_training_keeps_the_source_held_out_split(assets, tmp_path):
    m = run(compose_cfg(lm(assets, tmp_path, "data.mix=[{source:'teacher:6',weight:1}]",
                           "data.teacher_length=40")))
    (only,) = m["train_sources"]
    assert only["source"] == "teacher:6" and m["heldout_documents"] == 6 and m["ppl_dense"] > 1


def test_finetune_on_a_mixture_reports_domains_before_after_and_dense(assets, tmp_path):
    pruned = run(compose_cfg(lm(assets, tmp_path / "p", "budget.target=0.6")))
    mix = f"data.mix=[{{source:'{assets / 'lee.txt'}',weight:1}},{{source:'teacher:6',weight:1}}]"
    m = run(compose_cfg(lm(assets, tmp_path / "f", "job=finetune", f"model_dir={pruned['model_dir']}",
                           "finetune.steps=2", mix, "+eval.domains.python=pydoc:topics", "eval.domain_blocks=3")))
    for suffix in ("before", "after", "dense"):
        assert m[f"ppl_python_{suffix}"] > 1
    assert m["ppl_ratio_python"] == pytest.approx(m["ppl_python_after"] / m["ppl_python_dense"])
    assert m["ppl_ratio_cross_domain_before"] == pytest.approx(m["ppl_python_before"] / m["ppl_python_dense"])
    assert m["ppl_ratio_calibration_domain"] == pytest.approx(m["ppl_after"] / m["ppl_dense"])
    assert [s["source"] for s in m["train_sources"]] == [str(assets / "lee.txt"), "teacher:6"]


def test_evaluate_reports_each_domain(assets, tmp_path):
    m = run(compose_cfg(lm(assets, tmp_path, "job=evaluate", "+eval.domains.python=pydoc:topics",
                           "eval.domain_blocks=2")))
    assert m["ppl_python"] > 1 and m["eval_tokens_python"] == 2 * 31


def test_a_stop_while_teacher_samples_are_drawn_ends_the_job_at_once(assets, tmp_path, monkeypatch):
    """SIGTERM while sampling (minutes for a real model): the job ends with 143 at once, nothing is cached."""
    import os
    import signal
    import time

    from vtrans import checkpoint as ckpt

    def sample(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        pytest.fail("the stop did not interrupt teacher sampling")

    monkeypatch.setattr(teacher, "sample", sample)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    mix = f"data.mix=[{{source:'{assets / 'lee.txt'}',weight:1}},{{source:'teacher:6',weight:1}}]"
    try:
        ckpt.install_signal_handlers()
        with pytest.raises(ckpt.Stopped) as stopped:
            run(compose_cfg(lm(assets, tmp_path / "out", mix, f"data.cache_dir={tmp_path / 'cache'}")))
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        ckpt.clear_requests()
    assert stopped.value.code == 143
    assert not list((tmp_path / "cache").glob("teacher/*.json"))
