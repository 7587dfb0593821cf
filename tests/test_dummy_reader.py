"""Readers hand out only the slice asked for (issue #21): DummyReader draws the tiles a TP slice
overlaps, never the full tensor; FP8 row-parallel weights are quantised a block of whole rows
at a time.

Oracles: the full tensor of the same reader (a slice must equal the full tensor's rows or
columns, at every TP size: the equality-across-TP tests rely on it), the whole-tensor FP8
quantisation of before (``quantize_rowwise`` on the full tensor, then the column slice), and
the shapes the reader materialises, recorded by wrapping ``torch.randn``.
"""

from __future__ import annotations

import pytest
import torch

from cp_megatron.model import fp8, weights
from cp_megatron.model.config import get_preset
from cp_megatron.model.weights import TILE_COLS, TILE_ROWS, DummyReader

# A config whose tensors span several tiles in both dims (hidden 1024 > TILE_COLS, FFN 2816).
WIDE = get_preset("tiny").with_(hidden_size=1024, intermediate_size=2816, num_heads=16, num_kv_heads=8,
                                head_dim=64, num_layers=1, vocab_size=384)


class _Drawn:
    """Records the shape of every ``torch.randn`` the reader calls."""

    def __init__(self, monkeypatch) -> None:
        self.shapes: list[tuple[int, ...]] = []
        real = torch.randn

        def randn(shape, *args, **kwargs):
            self.shapes.append(tuple(shape))
            return real(shape, *args, **kwargs)

        monkeypatch.setattr(weights.torch, "randn", randn)

    @property
    def elements(self) -> int:
        return sum(a * b for a, b in self.shapes)


@pytest.mark.unit
@pytest.mark.parametrize("name, dim", [("model.layers.0.mlp.down_proj.weight", 1),
                                       ("model.layers.0.mlp.up_proj.weight", 0),
                                       ("model.layers.0.self_attn.o_proj.weight", 1),
                                       ("model.embed_tokens.weight", 0)])
def test_dummy_slices_equal_the_full_tensor_at_every_tp_size(name, dim):
    reader = DummyReader(WIDE, seed=4)
    full = reader.read(name)
    assert full.std().item() == pytest.approx(0.02, rel=0.1)
    for tp in (1, 2, 4, 8):
        parts = [reader.read(name, shard_dim=dim, tp_rank=r, tp_size=tp) for r in range(tp)]
        assert torch.equal(torch.cat(parts, dim=dim), full), tp
    block = reader.read_block(name, (3, 200), (5, 300) if full.dim() == 2 else None)
    assert torch.equal(block, full[3:200, 5:300])
    assert not torch.equal(DummyReader(WIDE, seed=5).read(name), full)      # the seed matters


@pytest.mark.unit
def test_dummy_read_materialises_only_the_tiles_of_the_slice(monkeypatch):
    reader = DummyReader(WIDE, seed=0)
    name = "model.layers.0.mlp.down_proj.weight"             # [1024, 2816], row-parallel
    drawn = _Drawn(monkeypatch)
    part = reader.read(name, shard_dim=1, tp_rank=1, tp_size=4)   # columns 704..1408
    assert part.shape == (1024, 704)
    # tiles: 8 row blocks x the column tiles overlapping [704, 1408): 0..1023 and 1024..2047
    assert len(drawn.shapes) == 8 * 2 and set(drawn.shapes) == {(TILE_ROWS, TILE_COLS)}
    assert drawn.elements < 1024 * 2816                       # never the full tensor
    drawn.shapes.clear()
    part = reader.read(name, shard_dim=1, tp_rank=0, tp_size=8)   # columns 0..352: one tile column
    assert drawn.elements == 1024 * TILE_COLS and part.shape == (1024, 352)
    drawn.shapes.clear()
    reader.read("model.layers.0.mlp.up_proj.weight", shard_dim=0, tp_rank=3, tp_size=8)  # rows 1056..1408
    assert drawn.elements <= (352 + 2 * TILE_ROWS) * 1024


@pytest.mark.unit
def test_405b_layer_slice_draws_its_eighth_not_the_full_layer():
    """The issue's case: a TP8 rank of a 405B layer used to draw ~12 GB of float32 (every full
    tensor, then sliced); it now draws the tiles its slices overlap (counted with the reader's
    own tile spans, not allocated)."""
    reader = DummyReader(get_preset("llama3.1-405b"), seed=0)
    full = slice_elements = drawn = 0
    for suffix, dim in (("self_attn.q_proj", 0), ("self_attn.k_proj", 0), ("self_attn.v_proj", 0),
                        ("self_attn.o_proj", 1), ("mlp.gate_proj", 0), ("mlp.up_proj", 0), ("mlp.down_proj", 1)):
        rows, cols = reader.shape(f"model.layers.3.{suffix}.weight")
        full += rows * cols
        for rank in (0, 5):
            bounds = [(0, rows), (rank * cols // 8, (rank + 1) * cols // 8)] if dim else \
                     [(rank * rows // 8, (rank + 1) * rows // 8), (0, cols)]
            slice_elements += rows * cols // 8
            drawn += sum((b - a) * (d - c) for _, _, (a, b), (c, d) in weights.tile_spans((rows, cols), bounds))
    assert full * 4 > 12e9                                   # ~12 GB of float32 per full layer
    assert slice_elements <= drawn <= 1.1 * slice_elements   # two ranks' slices, edge tiles included


@pytest.mark.unit
def test_fp8_row_parallel_quantised_in_row_blocks_equals_whole_tensor_quantisation(monkeypatch):
    reader = DummyReader(WIDE, seed=2)
    name = "model.layers.0.mlp.down_proj.weight"
    full_q, full_scale = fp8.quantize_rowwise(reader.read(name))
    blocks: list[tuple[int, int]] = []
    real = reader.read_block
    monkeypatch.setattr(reader, "read_block", lambda n, rows, cols=None, dtype=torch.float32:
                        blocks.append(rows) or real(n, rows, cols, dtype))
    monkeypatch.setattr(reader, "read", None)                # the whole tensor is never read
    monkeypatch.setattr(fp8, "QUANT_CHUNK_BYTES", 100 * 2816 * 4)   # 100 rows per block
    for tp in (1, 2, 4):
        for rank in range(tp):
            blocks.clear()
            q, scale = fp8.read_quantized(reader, name, 1, rank, tp)
            want = full_q.chunk(tp, dim=1)[rank]
            assert q.shape == want.shape and torch.equal(q.view(torch.uint8), want.view(torch.uint8))
            assert torch.equal(scale, full_scale)
            assert blocks[0] == (0, 100) and len(blocks) == 11 and all(b - a <= 100 for a, b in blocks)


@pytest.mark.unit
def test_checkpoint_read_block_equals_the_full_read(tmp_path):
    from cp_megatron.checkpoint import open_checkpoint
    from cp_megatron.checkpoint.convert import convert_reader

    dummy = DummyReader(get_preset("tiny"), seed=0)
    convert_reader(dummy, "hf", tmp_path / "hf", progress=False)
    reader = open_checkpoint("hf", tmp_path / "hf")
    for name in ("model.layers.1.self_attn.o_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        full = reader.read(name)
        assert torch.equal(reader.read_block(name, (5, 20)), full[5:20])
        assert torch.equal(reader.read_block(name, (5, 20), (3, 9)), full[5:20, 3:9])
        assert torch.equal(full, dummy.read(name))
    with pytest.raises(ValueError, match="outside"):
        reader.read_block("model.layers.1.self_attn.o_proj.weight", (0, 10**6))
