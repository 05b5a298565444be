"""Memory of materialisation, measured (bench/memory.py's code, a ~55M LLaMA shape, one process): building the pruned
model adds at most the pruned model plus 1.5 dense layers to the memory it starts from (each dense tensor is read,
sliced and dropped; the pruned model is filled in place, never copied). The ZeRO-3 figures and the ~1B shape are in
bench/results/memory_cpu_*.md."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def memory():
    spec = importlib.util.spec_from_file_location("bench_memory", REPO / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(600)
@pytest.mark.parametrize("page_out", [False, True], ids=["resident", "checkpoint-paged-out"])
def test_materialise_adds_the_pruned_model_and_about_one_layer(memory, tmp_path, page_out):
    """Materialise in one process allocates the pruned model and about one dense layer beyond where it starts, also
    when the kernel has dropped the memory-mapped checkpoint's pages (memory pressure from other work: materialise's
    reads then fault them back in, which total RSS counts and what materialise allocates does not)."""
    model_dir = memory.save_random_model("small", tmp_path)
    single = memory.run_single(model_dir, tmp_path / "single", page_out=page_out)
    rise = memory.materialise_rise(single)
    bound = single["pruned_bytes"] + 1.5 * single["dense_layer_bytes"]
    assert single["pruned_bytes"] > 0.3 * single["params"] * 4  # a real pruned model was built (50 % budget)
    assert rise <= bound, (rise / 2 ** 20, bound / 2 ** 20)
    assert set(single["peaks"]) == set(single["peaks_anon"]) == set(memory.STAGES)
    if page_out:
        if not single["paged_out"]:
            pytest.skip("this kernel refuses madvise(MADV_PAGEOUT)")
        rss_rise = single["peaks"]["materialise"] - single["starts"]["materialise"]
        assert rss_rise > bound, rss_rise / 2 ** 20  # the failure mode this guards against: re-read pages in RSS


def test_the_memory_model_counts_zero3_shards(memory):
    one = memory.memory_model(6.74e9, 32, 4096, world=8, stage=3, variant="faster")
    two = memory.memory_model(6.74e9, 32, 4096, world=8, stage=2, variant="faster")
    assert one["gpu"] < two["gpu"]  # ZeRO-3 shards the frozen weights, ZeRO-2 keeps them whole on every rank
    vtrans = memory.memory_model(6.74e9, 32, 4096, world=8, stage=3, variant="vtrans")
    offload = memory.memory_model(6.74e9, 32, 4096, world=8, stage=3, variant="vtrans", offload=True)
    assert vtrans["gpu"] > one["gpu"] and offload["gpu"] < vtrans["gpu"] and offload["host"] > vtrans["host"]
    # 7B Faster-VTrans on 8 GPUs under ZeRO-3: the bf16 weights' eighth plus one gathered layer, about 2 GiB
    assert 1.5 < one["gpu"] / 2 ** 30 < 2.5
    table = memory.model_table()
    assert "| 7B | Faster, ZeRO-2 / 3 | 12.6 / 2.4 | 12.6 / 1.2 | 12.6 / 1.0 |" in table
    assert "| 70B | VTrans, ZeRO-3 + offload |" in table


def _probe(code: str, *args: str) -> list[str]:
    """Run `code` in a fresh interpreter (a long-lived test process has heap memory already resident); its output
    words."""
    import subprocess

    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                          check=True).stdout.split()


_HEAP_PROBE = """
import sys, torch
from vtrans import hostmem
if sys.argv[1] == "cap":
    assert hostmem.cap_heap(1 << 20)
big = torch.ones(16 << 18)  # 16 MiB freed: glibc raises its mmap threshold to it (the growing default)
del big
start = hostmem.rss_bytes()
blocks = [torch.ones(1 << 20) for _ in range(100)]  # 100 x 4 MiB, the last one kept
last = blocks.pop()
del blocks
print((hostmem.rss_bytes() - start) / 2 ** 20)
"""


@pytest.mark.parametrize("mode", ["cap", "default"])
def test_capped_heap_returns_freed_blocks(mode):
    """vtrans.hostmem.cap_heap (every DeepSpeed job calls it first): after a large block is freed, glibc's own
    threshold serves 4 MiB blocks from the heap and keeps them resident when they are freed under a live one; with
    the cap each is its own mapping, returned when freed."""
    retained = float(_probe(_HEAP_PROBE, mode)[-1])
    if mode == "cap":
        assert retained < 40, retained  # the one live block and change
    else:
        assert retained > 200, retained  # glibc's default keeps the freed 396 MiB: what the cap is for


_ANON_PROBE = """
import mmap, sys, torch
from vtrans import hostmem
path = sys.argv[1]
anon, rss = hostmem.anon_bytes(), hostmem.rss_bytes()
with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    assert sum(m[i] for i in range(0, len(m), 4096)) == len(m) // 4096  # every page read
    print((hostmem.rss_bytes() - rss) / 2 ** 20, (hostmem.anon_bytes() - anon) / 2 ** 20)
block = torch.ones(16 << 20)  # 64 MiB, written
print((hostmem.anon_bytes() - anon) / 2 ** 20)
"""


def test_anonymous_memory_counts_allocations_not_mapped_files(tmp_path):
    """vtrans.hostmem.anon_bytes (materialise's bound is on it) rises with a written allocation and not with reading
    a memory-mapped file, which rss_bytes counts. In a fresh process: a long-lived one may serve the allocation from
    heap memory that is already resident."""
    path = tmp_path / "blob"
    path.write_bytes(b"\1" * (64 << 20))
    rss_read, anon_read, anon_alloc = (float(x) for x in _probe(_ANON_PROBE, str(path))[-3:])
    assert rss_read > 48 and anon_read < 16, (rss_read, anon_read)
    assert anon_alloc > 56, anon_alloc
