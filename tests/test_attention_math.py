"""Pure pieces of the attention core: LSE merge, sharding, decode placement, heuristic,
and the local block planner against the float64 reference (single process)."""

from __future__ import annotations

import math

import pytest
import torch

from cp_megatron.attention.blocks import attend_blocks
from cp_megatron.attention.kernels import attention_with_lse, math_attention
from cp_megatron.attention.plan import build_plan, plan_blocks
from cp_megatron.attention.heuristic import PASS_KV, PASS_Q, choose_strategy
from cp_megatron.attention.merge import merge_into, merge_partials
from cp_megatron.attention.reference import reference_attention
from cp_megatron.sharding import chunk_bounds, decode_owner, load_balanced_ranges, shard_new_tokens

pytestmark = pytest.mark.unit


# -- merge (Eq. 4) -------------------------------------------------------------------------
def test_merge_of_split_keys_matches_reference_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(6, 2, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    pos_q, pos_kv = torch.full((6,), 100), torch.arange(20)
    parts = [reference_attention(q, k[a:b], v[a:b], pos_q, pos_kv[a:b]) for a, b in ((0, 7), (7, 20))]
    out, lse = merge_partials(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    ref_out, ref_lse = reference_attention(q, k, v, pos_q, pos_kv)
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e-6)   # float32 accumulation
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32


def test_merge_fully_masked_rows_give_zero_and_minus_inf_without_nan():
    outs = torch.randn(3, 4, 5)
    lses = torch.full((3, 4), float("-inf"))
    lses[1, 2] = 0.5                      # row 2 has one real partial
    out, lse = merge_partials(outs.masked_fill(torch.isinf(lses)[..., None], 0.0), lses)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[[0, 1, 3]], torch.zeros(3, 5))
    assert torch.isneginf(lse[[0, 1, 3]]).all()
    torch.testing.assert_close(out[2], outs[1, 2])
    assert lse[2].item() == 0.5


def test_merge_never_overflows_on_large_lse():
    outs = torch.ones(2, 1, 3)
    lses = torch.tensor([[1e4], [1e4 - 1.0]])
    out, lse = merge_partials(outs, lses)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert abs(lse.item() - (1e4 + math.log1p(math.exp(-1.0)))) < 1e-2


def test_merge_into_empty_accumulator_equals_partial():
    acc_out, acc_lse = torch.zeros(3, 2, 4), torch.full((3, 2), float("-inf"))
    out, lse = torch.randn(3, 2, 4), torch.randn(3, 2)
    merge_into(acc_out, acc_lse, out, lse)
    torch.testing.assert_close(acc_out, out)
    torch.testing.assert_close(acc_lse, lse)


# -- sharding (§3.3, §3.5) -------------------------------------------------------------------
@pytest.mark.parametrize("cp_size", [1, 2, 3, 4, 5, 8])
def test_load_balanced_split_covers_every_length_once(cp_size):
    for length in list(range(0, 40)) + [97, 1000, 4099]:
        owned = []
        for r in range(cp_size):
            (a, b), (c, d) = load_balanced_ranges(length, cp_size, r)
            owned += list(range(a, b)) + list(range(c, d))
        assert sorted(owned) == list(range(length)), (length, cp_size)
        sizes = [b - a for a, b in chunk_bounds(length, 2 * cp_size)]
        assert max(sizes) - min(sizes) <= 1
        # rank r owns chunks r and 2N-1-r
        chunks = chunk_bounds(length, 2 * cp_size)
        assert load_balanced_ranges(length, cp_size, 0) == [chunks[0], chunks[-1]]


def test_shard_new_tokens_partial_prefill_positions_and_ids():
    shard = shard_new_tokens([4, 6], cp_size=2, cp_rank=1, cached_lengths=[10, 0], seq_ids=[7, 9])
    # seq 7: 4 new tokens in 4 chunks of 1 -> rank 1 gets chunks 1 and 2 -> positions 11, 12
    # seq 9: 6 new tokens, chunks [0,1) [1,3) [3,4) [4,6)... -> rank 1 gets [1,3) and [3,4)
    assert shard.positions.tolist() == [11, 12, 1, 2, 3]
    assert shard.seq_ids.tolist() == [7, 7, 9, 9, 9]
    assert shard.index.tolist() == [1, 2, 5, 6, 7]


def test_decode_owner_round_robin_offsets_each_step():
    n = 4
    for seq_id in range(3):
        owners = [decode_owner(step, seq_id, n) for step in range(8)]
        assert owners[: n] == [(seq_id + s) % n for s in range(n)]
        assert sorted(owners[:n]) == list(range(n))  # every rank once per N steps
    assert len({decode_owner(0, b, n) for b in range(n)}) == n  # a batch spreads at each step


def test_sharding_rejects_bad_input():
    with pytest.raises(ValueError, match="cp_rank"):
        load_balanced_ranges(10, 2, 2)
    with pytest.raises(ValueError, match="token counts"):
        shard_new_tokens([-1], 2, 0)


# -- heuristic (Alg. 1, Alg. 5) ----------------------------------------------------------
H100 = dict(bytes_per_element=2, attn_flops_per_s=540e12, bandwidth_bytes_per_s=50e9)


def test_heuristic_full_prefill_gqa_picks_pass_kv():
    d = choose_strategy(128000, 0, 16, 128, 8, **H100)
    assert d.strategy == PASS_KV and d.miss_rate == 1.0
    # threshold value of Alg. 1: N*C*NKV*e / (2*NH*BW)
    assert d.kv_hidden_threshold_tokens == pytest.approx(16 * 540e12 * 8 * 2 / (2 * 128 * 50e9))


def test_heuristic_decode_and_low_miss_rate_pick_pass_q():
    assert choose_strategy(1, 128000, 4, 128, 8, **H100).strategy == PASS_Q
    assert choose_strategy(64, 127936, 4, 128, 8, **H100).strategy == PASS_Q
    d = choose_strategy(64, 127936, 4, 128, 8, **H100)
    assert d.miss_rate_threshold == pytest.approx(2 * 8 / 128 - 4 * 64 * 50e9 / (4 * 540e12 * 2))


def test_heuristic_high_miss_rate_picks_pass_kv_and_force_overrides():
    assert choose_strategy(12800, 115200, 4, 128, 8, **H100).strategy == PASS_KV  # 10% miss
    d = choose_strategy(12800, 115200, 4, 128, 8, force=PASS_Q, **H100)
    assert d.strategy == PASS_Q and d.forced
    with pytest.raises(ValueError, match="strategy"):
        choose_strategy(1, 1, 2, 8, 2, force="ring", **H100)


# -- local block planner -------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "two-chunks", "decode", "strided-diag", "padding"])
def test_local_attention_plan_matches_reference(layout):
    torch.manual_seed(1)
    seqs = {
        "contiguous": (list(range(200)), [0] * 200, list(range(200)), [0] * 200),
        "two-chunks": (list(range(20, 60)) + list(range(160, 200)), [0] * 80, list(range(200)), [0] * 200),
        "decode": ([50, 70], [0, 1], list(range(60)) + list(range(80)), [0] * 60 + [1] * 80),
        "strided-diag": (list(range(100, 140)), [0] * 40, list(range(0, 200, 3)), [0] * 67),
        "padding": (list(range(30)), [0] * 30, list(range(30)) + [0] * 5, [0] * 30 + [-1] * 5),
    }
    qp, qs, kp, ks = (torch.tensor(x) for x in seqs[layout])
    q, k, v = torch.randn(len(qp), 4, 16), torch.randn(len(kp), 2, 16), torch.randn(len(kp), 2, 16)
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full(q.shape[:2], float("-inf"))
    half = len(kp) // 2
    for a, b in ((0, half), (half, len(kp))):   # two KV blocks, as two ring steps would
        blocks = plan_blocks(qp, qs, kp[a:b], ks[a:b])
        assert not any(blk.causal and (blk.q1 - blk.q0) != _slots(blk) for blk in blocks)
        attend_blocks(out, lse, q, k[a:b], v[a:b], blocks, 0.25)
    ref_out, ref_lse = reference_attention(q, k, v, qp, kp, qs, ks, softmax_scale=0.25)
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e-5)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=0, atol=1e-5)


def _slots(block) -> int:
    return block.kv.stop - block.kv.start if isinstance(block.kv, slice) else block.kv.numel()


def test_plan_uses_views_and_few_blocks_for_load_balanced_prefill():
    # Rank 0 of CP2, 400 tokens: chunks [0, 100) and [300, 400); every block's KV is a slice.
    qp = torch.cat([torch.arange(0, 100), torch.arange(300, 400)])
    kv = [(qp, torch.zeros(200, dtype=torch.long)),
          (torch.arange(100, 300), torch.zeros(200, dtype=torch.long))]
    plan = build_plan("pass-kv", 0, [kv[0], kv[1]], kv)
    assert plan.kv_len == 200 and plan.num_queries == 200
    # step 0 (own KV): chunk 0 causal; chunk 3 sees chunk 0 fully and is causal on itself.
    assert [(b.q0, b.q1, b.causal) for b in plan.steps[0]] == [(0, 100, True), (100, 200, False),
                                                              (100, 200, True)]
    # step 1 (rank 1's chunks 1 and 2): chunk 0 sees nothing, chunk 3 sees both.
    assert [(b.q0, b.q1, b.kv, b.causal) for b in plan.steps[1]] == [(100, 200, slice(0, 200), False)]
    assert all(isinstance(b.kv, slice) for step in plan.steps for b in step)
    # The first block to write its rows copies; later ones merge (one accumulator over steps).
    assert [b.first for step in plan.steps for b in step] == [True, True, False, False]
    # Pass-Q: every step fills another rank's partials, so each step starts afresh.
    plan_q = build_plan("pass-q", 0, [kv[0], kv[1]], kv)
    assert [[b.first for b in step] for step in plan_q.steps] == [[True, True, False], [True]]


def test_decode_query_is_one_plain_block_over_its_sequence():
    # Two sequences interleaved in the cache; the decode token of sequence 1 at position 7.
    kv_pos = torch.tensor([0, 0, 1, 1, 2, 2, 3, 7])
    kv_seq = torch.tensor([0, 1, 0, 1, 0, 1, 1, 1])
    blocks = plan_blocks(torch.tensor([7]), torch.tensor([1]), kv_pos, kv_seq)
    assert len(blocks) == 1 and not blocks[0].causal
    assert blocks[0].kv.tolist() == [1, 3, 5, 6, 7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_math_attention_matches_reference_gqa(dtype, causal):
    torch.manual_seed(2)
    t = 9
    q, k, v = torch.randn(t, 8, 16), torch.randn(t, 2, 16), torch.randn(t, 2, 16)
    pos = torch.arange(t) if causal else torch.zeros(t, dtype=torch.long)
    out, lse = math_attention(q.to(dtype), k.to(dtype), v.to(dtype), scale=0.25, is_causal=causal)
    ref_out, ref_lse = reference_attention(q.to(dtype), k.to(dtype), v.to(dtype), pos, pos, softmax_scale=0.25)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5   # bf16 inputs and output rounding
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_kernel_refuses_a_non_square_causal_block():
    q, k = torch.randn(3, 2, 8), torch.randn(5, 2, 8)
    with pytest.raises(ValueError, match="must be square"):
        attention_with_lse(q, k, k, scale=0.3, is_causal=True)


# -- the batched decode kernel (all-gather-Q, CP 1) ------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_decode_attention_matches_reference_gqa_with_empty_and_padded_rows(dtype):
    from cp_megatron.attention.plan import DecodeBatch, build_decode_batch
    from cp_megatron.attention.decode import attend_decode_batch

    torch.manual_seed(3)
    nh, nkv, dh, slots = 6, 2, 16, 40
    q, k, v = torch.randn(5, nh, dh, dtype=dtype), torch.randn(slots, nkv, dh, dtype=dtype), \
        torch.randn(slots, nkv, dh, dtype=dtype)
    # rows 0, 1, 3 see scattered slots of their own; row 2 none; row 4 is padding (no block)
    keys = {0: torch.tensor([3, 9, 10, 11, 30]), 1: torch.arange(12, 30), 3: torch.tensor([0, 39])}
    from cp_megatron.attention.plan import Block
    blocks = [Block(r, r + 1, idx) for r, idx in keys.items()]
    batch = build_decode_batch([(0, blocks)], q_len=5, num_queries=4)
    assert batch.mode == "gather" and batch.rows == 5 and batch.lengths.tolist() == [5, 18, 0, 2, 0]
    out, lse = attend_decode_batch(q, k, v, batch, scale=dh ** -0.5)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = dict(rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)   # float32 accumulation
    for row in range(5):
        if row not in keys:
            assert torch.equal(out[row], torch.zeros_like(out[row])) and bool((lse[row] == float("-inf")).all())
            continue
        idx = keys[row]
        ref_out, ref_lse = reference_attention(q[row:row + 1], k[idx], v[idx], torch.tensor([100]),
                                               torch.zeros(len(idx), dtype=torch.long))
        torch.testing.assert_close(out[row:row + 1].double(), ref_out, **tol)
        torch.testing.assert_close(lse[row:row + 1].double(), ref_lse, **tol)


def test_decode_batch_of_one_sequence_is_a_view_and_of_none_is_empty():
    from cp_megatron.attention.plan import Block, build_decode_batch

    one = build_decode_batch([(0, []), (1, [Block(0, 1, slice(4, 9))])], q_len=1, num_queries=1)
    assert one.mode == "slice" and one.kv == slice(4, 9) and one.rows == 2
    assert build_decode_batch([(0, []), (1, [])], q_len=2, num_queries=3).mode == "empty"
    assert build_decode_batch([(0, [Block(0, 2, slice(0, 4))])], q_len=2, num_queries=2) is None   # prefill


# -- the static decode step (issue #22): its plan and its math kernel -------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_decode_attention_matches_reference_on_an_interleaved_cache(dtype):
    """The static step's math kernel over the whole KV view, the mask made as the step makes it
    (same sequence, position <= the row's, free slots hidden); a padding row sees nothing."""
    from cp_megatron.attention.kernels import masked_decode_attention

    torch.manual_seed(4)
    nh, nkv, dh, view = 6, 2, 16, 48
    k, v = torch.randn(view, nkv, dh, dtype=dtype), torch.randn(view, nkv, dh, dtype=dtype)
    slot_seq = torch.full((view,), -1, dtype=torch.long)
    slot_pos = torch.zeros(view, dtype=torch.long)
    slot_seq[:40] = torch.tensor([0, 1] * 20)                  # two sequences interleaved, 8 free slots
    slot_pos[:40] = torch.arange(40) // 2
    q_seq, q_pos = torch.tensor([1, 0, -2, 0]), torch.tensor([19, 19, 0, 7])   # row 2 padding, 3 older
    q = torch.randn(4, nh, dh, dtype=dtype)
    hidden = (slot_seq[None, :] != q_seq[:, None]) | (slot_pos[None, :] > q_pos[:, None])
    out, lse = masked_decode_attention(q, k, v, hidden, scale=dh ** -0.5)
    tol = dict(rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)   # float32 accumulation
    for row in (0, 1, 3):
        ref_out, ref_lse = reference_attention(q[row:row + 1], k, v, q_pos[row:row + 1], slot_pos,
                                               q_seq[row:row + 1], slot_seq)
        torch.testing.assert_close(out[row:row + 1].double(), ref_out, **tol)
        torch.testing.assert_close(lse[row:row + 1].double(), ref_lse, **tol)
    assert not out[2].abs().any() and bool((lse[2] == float("-inf")).all())


def test_static_decode_plan_pads_rows_writes_a_scratch_slot_and_keeps_its_key_step_to_step():
    """CP 2, a batch of 3 sequences (ids 0, 1, 2) after their prefill: rank 0 owns 2 of the 3 new
    tokens at this step, so every rank runs 2 rows; the padding row writes the first free slot;
    the next step (owners shifted by one) has the same key."""
    from cp_megatron.decode_step import kv_bucket, plan_static_decode, rows_bucket
    from cp_megatron.model.kv_cache import KVCache

    assert [rows_bucket(n) for n in (0, 1, 2, 3, 5, 8, 9)] == [1, 1, 2, 4, 8, 8, 16]
    assert kv_bucket(10) == 256 and kv_bucket(257) == 512 and kv_bucket(62_630) == 65_536
    cache = KVCache(1, 1, 4, dtype=torch.float32, capacity=300, growth_slots=64)
    cache.begin_round(torch.tensor([0, 1, 0, 0]), torch.tensor([0, 0, 1, 2]))   # rank 0's prefill slots
    keys = []
    for step in range(2):
        owners = [decode_owner(step, s, 2) for s in (0, 1, 2)]
        st = plan_static_decode(tokens=[11, 12, 13], seq_ids=[0, 1, 2], cached=[2 + step] * 3, owners=owners,
                                cp_rank=0, cp_size=2, kv_cache=cache, head_dim=4)
        r, g = st.key.rows_per_rank, st.key.num_rows
        assert (r, g, st.key.mode, st.key.kernel, st.key.kv_len) == (2, 4, "masked", "math", 256)
        mine = st.owned[0]
        n = cache.num_tokens
        ids, pos, slots, seq, out_rows = (st.meta64[j * r:(j + 1) * r].tolist() for j in range(5))
        want_slots = [n + i for i in range(len(mine))] + [n + len(mine)] * (r - len(mine))
        assert slots == want_slots and st.min_capacity == n + len(mine) + 1
        assert seq == [s for s in mine] + [-1] * (r - len(mine)) and out_rows == mine + [3] * (r - len(mine))
        assert ids == [[11, 12, 13][b] for b in mine] + [0] * (r - len(mine))
        q_seq = st.meta64[5 * r:5 * r + g].tolist()
        assert sorted(s for s in q_seq if s >= 0) == [0, 1, 2] and q_seq.count(-2) == 1
        keys.append(st.key)
        cache.begin_round(torch.tensor([2 + step] * len(mine)), torch.tensor(mine))
    assert keys[0] == keys[1]


def test_static_decode_plan_of_one_sequence_uses_lengths_and_flags_rows_without_keys():
    """One sequence in the cache: mode "lengths", each row's length its sequence's slots here
    (the new token included), padding rows 1; on CUDA bf16 the varlen flash kernel, whose empty
    real rows need the LSE fix-up."""
    from cp_megatron.decode_step import plan_static_decode
    from cp_megatron.model.kv_cache import KVCache

    cache = KVCache(1, 1, 8, dtype=torch.float32, capacity=64)
    cache.begin_round(torch.arange(5), torch.zeros(5, dtype=torch.long))
    st = plan_static_decode(tokens=[9], seq_ids=[0], cached=[10], owners=[1], cp_rank=0, cp_size=4,
                            kv_cache=cache, head_dim=8)
    g = st.key.num_rows
    assert (st.key.rows_per_rank, g, st.key.mode, st.key.kernel, st.key.fixup) == (1, 4, "lengths", "math", False)
    assert st.meta32[:g + 1].tolist() == [0, 1, 2, 3, 4] and st.meta32[g + 1:2 * g + 2].tolist() == [0] * 5
    assert st.meta32[2 * g + 2:].tolist() == [1, 5, 1, 1]      # rank 1's row: the 5 slots here
    empty = KVCache(1, 1, 8, dtype=torch.bfloat16, capacity=64)
    empty.device = torch.device("cuda")                          # host planning only: no tensor is made there
    st = plan_static_decode(tokens=[9], seq_ids=[0], cached=[10], owners=[1], cp_rank=0, cp_size=4,
                            kv_cache=empty, head_dim=8)
    assert (st.key.kernel, st.key.fixup) == ("aten._flash_attention_forward", True)
    assert st.meta32[2 * g + 2:].tolist() == [1, 0, 1, 1]
