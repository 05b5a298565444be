"""Data-free calibration: `teacher:N` sources are N sequences sampled from the dense model itself (as LLM-QAT did
for quantisation), seeded and cached on disk, so that a rerun reads them instead of sampling again.

Each sequence starts from the tokenizer's BOS token (else its EOS token, as GPT-2 starts a document, else SEP), or with
data.teacher_start=random from a token drawn uniformly from the vocabulary (special tokens excepted), as LLM-QAT
does, which spreads the samples over more of what the model knows, and samples `length` tokens at `temperature`
(no top-k cut; with `top_p` < 1 only the smallest set of tokens holding that share of the tempered distribution; the
end-of-sequence token is suppressed so every sequence is full length). The samples become ordinary text documents
(special tokens dropped), so they split, mix, tokenise and batch like any other source."""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cache
from .data import TEACHER_PREFIX, Corpus, Document

log = logging.getLogger("vtrans")
SAMPLER_VERSION = 1  # part of the cache key: bump when the sampling procedure changes
WAIT_TIMEOUT_S = 3 * 3600  # a non-main rank waits this long for the main rank's samples
_SOURCE = re.compile(r"^teacher:(\d+)$")
STARTS = ("bos", "random")


def is_teacher(source: str) -> bool:
    return source.startswith(TEACHER_PREFIX)


def parse(source: str) -> int:
    """N of a `teacher:N` source; a clear error for anything else."""
    m = _SOURCE.match(source)
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"bad teacher source {source!r}: expected teacher:N with N >= 1 sequences sampled from the "
                         "dense model, e.g. teacher:256")
    return int(m.group(1))


@dataclass(frozen=True)
class Sampling:
    """What a set of samples depends on (the cache key holds all of it)."""
    model: str  # the dense model's identity (vtrans.cache.model_identity)
    n: int
    length: int
    temperature: float
    seed: int
    batch_size: int
    start: str = "bos"  # first token: "bos" (the tokenizer's BOS, else EOS, else SEP) | "random" (LLM-QAT)
    top_p: float = 1.0  # nucleus cut after the temperature (1.0: none)

    def record(self) -> dict:
        rec = {**self.__dict__, "version": SAMPLER_VERSION}
        if self.top_p == 1.0:  # samples drawn before top_p existed keep their cache entries
            del rec["top_p"]
        return rec


def documents(source: str, sampling: Sampling, cache_dir: str, dense: Callable[[], tuple], is_main: bool = True,
              progress: bool = False) -> Corpus:
    """The documents of a `teacher:N` source: read from the cache, else sampled from `dense()` (a callable giving
    the dense (model, tokenizer), called only on a cache miss) and written to the cache (by the main process; the
    others wait for its file)."""
    path = cache.entry(cache_dir, "teacher", sampling.record())
    if not path.is_file() and not is_main:
        _wait_for(path)
    texts = cache.read(path, sampling.record())
    if texts is not None:
        log.info("%s: %d cached teacher samples from %s", source, len(texts), path)
        return Corpus([Document(t) for t in texts], source)
    model, tokenizer = dense()
    t0 = time.perf_counter()
    texts = sample(model, tokenizer, sampling, progress=progress)
    log.info("%s: sampled %d sequences of %d tokens from the dense model in %.0f s; cached in %s", source,
             sampling.n, sampling.length, time.perf_counter() - t0, path)
    cache.write(path, sampling.record(), texts)
    return Corpus([Document(t) for t in texts], source)


def _wait_for(path: Path) -> None:
    t0 = time.monotonic()
    while not path.is_file():
        if time.monotonic() - t0 > WAIT_TIMEOUT_S:
            raise TimeoutError(f"waited {WAIT_TIMEOUT_S} s for the main process's teacher samples in {path}; is "
                               "data.cache_dir on a filesystem every node shares?")
        time.sleep(2)


@torch.no_grad()
def sample(model, tokenizer, sampling: Sampling, progress: bool = False) -> list[str]:
    """N sequences of `length` new tokens sampled from `model`, decoded without special tokens. Batch b is drawn
    from seed (sampling.seed, b) inside a forked RNG, so the caller's random state is left as it was."""
    from tqdm.auto import tqdm

    start = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id)
                  if t is not None), None)
    if start is None:
        raise ValueError(f"teacher sampling needs a BOS, EOS or SEP token to start from; {type(tokenizer).__name__} "
                         "has none")
    if sampling.start not in STARTS:
        raise ValueError(f"teacher start={sampling.start!r} is not accepted; choose one of {list(STARTS)}")
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    vocabulary = min(len(tokenizer), model.get_input_embeddings().num_embeddings)
    ordinary = torch.ones(vocabulary, dtype=torch.bool)
    ordinary[special[special < vocabulary]] = False
    ordinary = ordinary.nonzero().flatten()  # the tokens a random start is drawn from
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    was_training = model.training
    model.eval()
    texts: list[str] = []
    batches = range(0, sampling.n, sampling.batch_size)
    try:
        with torch.random.fork_rng(devices=devices):
            for b in tqdm(batches, desc="teacher samples", unit="batch", disable=not progress):
                rows = min(sampling.batch_size, sampling.n - b)
                torch.manual_seed(sampling.seed * 1_000_003 + b)
                if sampling.start == "random":
                    ids = ordinary[torch.randint(0, ordinary.numel(), (rows, 1))].to(device)
                else:
                    ids = torch.full((rows, 1), start, dtype=torch.long, device=device)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=sampling.temperature, top_k=0, top_p=sampling.top_p,
                                     max_new_tokens=sampling.length, min_new_tokens=sampling.length,
                                     pad_token_id=pad)
                first = 0 if sampling.start == "random" else 1  # a random first token is part of the sample
                texts += tokenizer.batch_decode(out[:, first:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [t.strip() or " " for t in texts]
