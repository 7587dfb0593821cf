"""CUDA paths against the float64 reference: every block kind, decode, GQA, and a
single-rank NCCL engine run.  They run when ``torch.cuda.is_available()``; on a machine
without a GPU they are skipped with that reason (CI has none; ``benchmarks/gpu_check.py``
runs them on a GPU machine).

Shapes follow Llama 3.1 405B at TP8 per rank: NH 16, NKV 1, DH 128.
"""

from __future__ import annotations

import pytest
import torch

from cp_megatron.attention.blocks import attend_blocks
from cp_megatron.attention.kernels import attention_with_lse, kernel_name, math_attention
from cp_megatron.attention.plan import plan_blocks
from cp_megatron.attention.reference import reference_attention

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NH, NKV, DH = 16, 1, 128
# bf16 has an 8-bit mantissa, fp16 11 bits: relative bounds on the output (unit-variance
# inputs), absolute on the LSE (float32 inside every kernel).
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _inputs(tq, tkv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, NH, DH, generator=g)
    k = torch.randn(tkv, NKV, DH, generator=g)
    v = torch.randn(tkv, NKV, DH, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _check(out, lse, ref_out, ref_lse, dtype):
    tol = TOLERANCE[dtype]
    rel = (out.double().cpu() - ref_out).norm() / ref_out.norm()
    assert rel.item() <= tol, f"relative error {rel.item():.3g} > {tol}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse.cpu()))
    torch.testing.assert_close(lse.double().cpu()[finite], ref_lse[finite], rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["plain", "square-causal", "decode"])
def test_cuda_kernel_block_matches_reference(kind, dtype):
    tq, tkv = {"plain": (300, 1000), "square-causal": (512, 512), "decode": (1, 4096)}[kind]
    q, k, v = _inputs(tq, tkv, dtype)
    causal = kind == "square-causal"
    out, lse = attention_with_lse(q.cuda(), k.cuda(), v.cuda(), scale=DH ** -0.5, is_causal=causal)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == q.shape
    pos_q = torch.arange(tq) if causal else torch.full((tq,), tkv)
    ref_out, ref_lse = reference_attention(q, k, v, pos_q, torch.arange(tkv))
    _check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_planned_blocks_of_a_load_balanced_chunk_pair_match_reference(dtype):
    # Rank 1 of CP2 at 1,000 tokens: chunks [250, 500) and [500, 750) against every key,
    # with the keys gathered by index (two KV runs out of order) and sliced.
    q_pos = torch.cat([torch.arange(250, 500), torch.arange(500, 750)])
    kv_pos = torch.cat([torch.arange(500, 1000), torch.arange(0, 500)])
    zeros = lambda n: torch.zeros(n, dtype=torch.long)  # noqa: E731
    q, k, v = _inputs(len(q_pos), len(kv_pos), dtype, seed=1)
    blocks = plan_blocks(q_pos, zeros(len(q_pos)), kv_pos, zeros(len(kv_pos)))
    assert {b.causal for b in blocks} == {True, False}
    out = torch.zeros(q.shape, dtype=torch.float32, device="cuda")
    lse = torch.full(q.shape[:2], float("-inf"), device="cuda")
    attend_blocks(out, lse, q.cuda(), k.cuda(), v.cuda(), [b.to(torch.device("cuda")) for b in blocks],
                  DH ** -0.5)
    ref_out, ref_lse = reference_attention(q, k, v, q_pos, kv_pos)
    _check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_decode_batch_gather_and_slice_match_reference(dtype):
    # all-gather-Q's whole-batch kernel: 4 rows with scattered slots (one without any), and batch 1 as a view.
    from cp_megatron.attention.decode import attend_decode_batch
    from cp_megatron.attention.plan import Block, build_decode_batch

    q, k, v = _inputs(4, 3000, dtype, seed=2)
    keys = {0: torch.arange(0, 3000, 3), 1: torch.arange(100, 2100), 3: torch.tensor([5, 2999])}
    cuda = torch.device("cuda")
    batch = build_decode_batch([(0, [Block(r, r + 1, i) for r, i in keys.items()])], q_len=4, num_queries=4)
    out, lse = attend_decode_batch(q.cuda(), k.cuda(), v.cuda(), batch.to(cuda), DH ** -0.5)
    for row, idx in keys.items():
        ref_out, ref_lse = reference_attention(q[row:row + 1], k[idx], v[idx], torch.tensor([5000]),
                                               torch.zeros(len(idx), dtype=torch.long))
        _check(out[row:row + 1], lse[row:row + 1], ref_out, ref_lse, dtype)
    assert bool((lse[2] == float("-inf")).all()) and not out[2].abs().any()
    one = build_decode_batch([(0, [Block(0, 1, slice(10, 2010))])], q_len=1, num_queries=1)
    out, lse = attend_decode_batch(q[:1].cuda(), k.cuda(), v.cuda(), one.to(cuda), DH ** -0.5)
    ref_out, ref_lse = reference_attention(q[:1], k[10:2010], v[10:2010], torch.tensor([5000]),
                                           torch.zeros(2000, dtype=torch.long))
    _check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_static_decode_kernels_match_reference(dtype):
    """The static decode step's kernels (#22) on the capacity-long view: rows with their prefix
    lengths (the varlen flash kernel for fp16 / bf16, with the LSE fix-up of a real row without
    keys), and the masked math kernel; a padding row's output is not checked (never read)."""
    from cp_megatron.attention.decode import attend_decode_batch
    from cp_megatron.attention.kernels import decode_kernel_name
    from cp_megatron.attention.plan import DecodeBatch

    cuda = torch.device("cuda")
    q, k, v = _inputs(5, 3000, dtype, seed=4)
    lengths = torch.tensor([2999, 1, 0, 1500, 1], dtype=torch.int32)        # row 2: no key here; row 4 padding
    rows = 5
    kernel = decode_kernel_name("cuda", dtype, DH, "lengths")
    assert kernel == ("math" if dtype == torch.float32 else "aten._flash_attention_forward")
    batch = DecodeBatch("lengths", rows, lengths=lengths.to(cuda), kv_len=3000, kernel=kernel,
                        cu_seqlens_q=torch.arange(rows + 1, dtype=torch.int32, device=cuda),
                        cu_seqlens_k=torch.zeros(rows + 1, dtype=torch.int32, device=cuda))
    batch.hidden = torch.arange(3000, device=cuda)[None, :] >= batch.lengths[:, None]
    batch.empty_rows = batch.lengths == 0
    out, lse = attend_decode_batch(q.cuda(), k.cuda(), v.cuda(), batch, DH ** -0.5)
    for row in (0, 1, 3):
        n = int(lengths[row])
        ref_out, ref_lse = reference_attention(q[row:row + 1], k[:n], v[:n], torch.tensor([5000]),
                                               torch.arange(n))
        _check(out[row:row + 1], lse[row:row + 1], ref_out, ref_lse, dtype)
    assert bool((lse[2] == float("-inf")).all()) and not out[2].abs().any()
    masked = DecodeBatch("masked", rows, kv_len=3000, kernel="math", hidden=batch.hidden)
    out, lse = attend_decode_batch(q.cuda(), k.cuda(), v.cuda(), masked, DH ** -0.5)
    for row in (0, 1, 3):
        n = int(lengths[row])
        ref_out, ref_lse = reference_attention(q[row:row + 1], k[:n], v[:n], torch.tensor([5000]),
                                               torch.arange(n))
        _check(out[row:row + 1], lse[row:row + 1], ref_out, ref_lse, dtype)


def test_cuda_math_attention_matches_reference():
    q, k, v = _inputs(7, 7, torch.float64)
    out, lse = math_attention(q.cuda(), k.cuda(), v.cuda(), scale=DH ** -0.5, is_causal=True)
    ref_out, ref_lse = reference_attention(q, k, v, torch.arange(7), torch.arange(7))
    torch.testing.assert_close(out.cpu(), ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, rtol=1e-5, atol=1e-5)


def test_kernel_names_per_dtype():
    assert kernel_name("cuda", torch.float32, 128) == "aten._scaled_dot_product_efficient_attention"
    assert kernel_name("cuda", torch.float64, 128) == "math_attention"
    assert kernel_name("cuda", torch.bfloat16, 128) in ("flash_attn.flash_attn_func",
                                                         "aten._scaled_dot_product_flash_attention")


def _nccl_engine_job(device: str, implementation: str = "native") -> list[int]:
    import dataclasses

    from cp_megatron import parallel_state
    from cp_megatron.engine import SamplingParams, generate
    from cp_megatron.factory import build_engine
    from cp_megatron.model.config import get_preset
    from cp_megatron.model.weights import DummyReader

    topo = parallel_state.initialize(1, 1, 1)
    config = dataclasses.replace(get_preset("tiny"), num_layers=2)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    engine = build_engine(DummyReader(config, seed=5), topo, dtype=torch.float32, device=dev, kv_capacity=300,
                          implementation=implementation)
    prompt = torch.randint(0, config.vocab_size, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    gens, _ = generate(engine, {0: prompt}, SamplingParams(max_new_tokens=8))
    return gens[0].token_ids


@pytest.mark.timeout(300)
def test_single_rank_nccl_engine_matches_cpu_gloo():
    from cp_megatron.launcher import spawn

    on_gpu = spawn(_nccl_engine_job, 1, ("cuda",), backend="nccl", timeout_s=240)[0]
    on_cpu = spawn(_nccl_engine_job, 1, ("cpu",), backend="gloo", timeout_s=240)[0]
    assert len(on_gpu) == 8 and on_gpu == on_cpu



@pytest.mark.timeout(300)
def test_megatron_core_gpt_on_cuda_matches_llama_stage_on_cpu():
    # megatron-core GPTModel (local spec, RingCoreAttention) built on the GPU (no CPU init)
    from cp_megatron.launcher import spawn

    on_gpu = spawn(_nccl_engine_job, 1, ("cuda", "megatron-core"), backend="nccl", timeout_s=240)[0]
    on_cpu = spawn(_nccl_engine_job, 1, ("cpu",), backend="gloo", timeout_s=240)[0]
    assert len(on_gpu) == 8 and on_gpu == on_cpu


def _graph_job(dtype_name: str) -> dict:
    """Greedy tokens of a tiny model on one GPU, eager decode against CUDA-graph decode: batch 1
    (one sequence in the cache: varlen flash in bf16, math in float32), then batch 3 (three
    sequences interleaved: the masked math kernel)."""
    import dataclasses

    from cp_megatron import parallel_state
    from cp_megatron.engine import SamplingParams, generate
    from cp_megatron.factory import build_engine
    from cp_megatron.model.config import get_preset
    from cp_megatron.model.weights import DummyReader

    topo = parallel_state.initialize(1, 1, 1)
    config = dataclasses.replace(get_preset("tiny"), num_layers=2)
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (40, 33, 7, 21)]
    out = {}
    for graphs in (False, True):
        engine = build_engine(DummyReader(config, seed=5), topo, dtype=getattr(torch, dtype_name), device=dev,
                              kv_capacity=300, cuda_graphs=graphs)
        one, _ = generate(engine, {0: prompts[0]}, SamplingParams(max_new_tokens=8))
        engine.reset()
        three, _ = generate(engine, {1: prompts[1], 2: prompts[2], 3: prompts[3]}, SamplingParams(max_new_tokens=8))
        counts = (engine.graphs.captures, engine.graphs.replays) if graphs else None
        out[graphs] = ({s: x.token_ids for s, x in {**one, **three}.items()}, counts)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_cuda_graph_replay_gives_the_eager_greedy_tokens_batch_1_and_3(dtype_name):
    """#22: runtime.cuda_graphs captures the static decode step once per key and replays it; the
    tokens equal eager decode's (same kernels, same inputs).  8 new tokens: a prefill, then 7
    decode rounds per batch, the first of each key captured, 6 replayed."""
    from cp_megatron.launcher import spawn

    got = spawn(_graph_job, 1, (dtype_name,), backend="nccl", timeout_s=240)[0]
    eager, (graph, counts) = got[False][0], got[True]
    assert all(len(t) == 8 for t in eager.values()) and graph == eager
    assert counts == (2, 12), counts


def test_cuda_host_tier_round_trip_is_pinned_async_and_exact():
    """The host tier on CUDA: pinned host buffers, copies on the side stream, the cache
    compacted and overwritten meanwhile; the restored slots equal the exported ones."""
    from cp_megatron.model.kv_cache import KVCache
    from cp_megatron.model.kv_offload import HostKVStore

    dev = torch.device("cuda", torch.cuda.current_device())
    cache = KVCache(4, NKV, DH, dtype=torch.bfloat16, device=dev, capacity=4096)
    seqs = torch.arange(3000) % 3                                   # three interleaved sequences
    cache.begin_round(torch.arange(3000) // 3, seqs)
    for layer in range(4):
        cache.store(layer, torch.randn(3000, NKV, DH, device=dev).bfloat16(),
                    torch.randn(3000, NKV, DH, device=dev).bfloat16())
    sel = seqs == 1
    want = [(cache.layer(i)[0][sel.to(dev)].clone(), cache.layer(i)[1][sel.to(dev)].clone()) for i in range(4)]
    store = HostKVStore(dev)
    positions, k, v = cache.export_sequence(1)
    entry = store.put(1, [positions], k, v, length=1000)
    assert store.stream.asynchronous and entry.k.is_pinned() and entry.v.is_pinned()
    del k, v
    cache.truncate(1, 0)                                            # compacts while the copy may run
    cache.begin_round(torch.arange(1000, 2000), torch.full((1000,), 2))   # and overwrites the freed slots
    for layer in range(4):
        cache.store(layer, torch.zeros(1000, NKV, DH, device=dev).bfloat16(),
                    torch.zeros(1000, NKV, DH, device=dev).bfloat16())
    store.restore(1, cache, 0, 1, length=1000)
    torch.cuda.synchronize()
    got = cache.layout.seq_ids == 1
    assert torch.equal(cache.layout.positions[got], positions)
    for i in range(4):
        assert torch.equal(cache.layer(i)[0][got.to(dev)], want[i][0])
        assert torch.equal(cache.layer(i)[1][got.to(dev)], want[i][1])
    assert store.restore_seconds > 0
