"""GPU (Triton) Pallas kernels for the tiled grouped matmul, with the row gather fused.

Shape letters as in grouped.py: P padded rows, Tr row tile, M = P / Tr tiles, Kd
contraction width, Nd output width, E experts; R rows of the source table (tokens
when the gather is fused, else P); bk, bn the column blocks (powers of two: Triton
tiles must be, so the last block of a width is masked).

  gmm   one program per (row tile, bn-column block). It reads the tile's rows through
        `src` (the source row of each padded row), so the first expert matmul
        takes the tokens straight from x [T, D]: on a GPU a row gather costs no more
        than a contiguous load (each row is D contiguous elements, coalesced), and
        this saves writing and re-reading the sorted [P, D] copy. Tiles past `used`
        return at once.
  tgmm  one program per (expert, bk block, bn block), looping over that expert's
        tiles (contiguous, from `expert_start`): no cross-program accumulation, no
        atomics, and an expert without rows stores zeros.
Padding rows (past tile_rows) are masked to 0 on load, as in the TPU kernels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from routed.kernels.grouped import Tiles

ROW_TILE = 64   # largest Tr on GPU: a tensor-core friendly tile, with little padding


@dataclasses.dataclass(frozen=True)
class Blocks:
  """One kernel's launch shape: bk x bn column blocks (powers of two), Triton warps/stages."""
  k: int = 32
  n: int = 64
  warps: int = 4
  stages: int = 2

  def params(self):
    return pltriton.CompilerParams(num_warps=self.warps, num_stages=self.stages)


# The launch shapes GpuGmm uses unless given others, by the operands' element size in
# bytes (2: bf16/f16, 4: f32): the least total time over E = 8, 32, 128 in
# benchmarks/gpu_gmm_tune.py on an H100 (T 16,384, D 1,024, F 4,096; RESULTS.md, run 4).
# In bf16 they run 1.5-3.7x faster per kernel than Blocks(). The tuning script sets
# these for its own rerun.
DEFAULT_BLOCKS = {
    2: {'gmm': Blocks(64, 512, 8, 3), 'dgmm': Blocks(64, 512, 8, 3), 'tgmm': Blocks(64, 128, 4, 3)},
    4: {'gmm': Blocks(64, 64, 4, 3), 'dgmm': Blocks(64, 256, 8, 3), 'tgmm': Blocks(32, 256, 8, 2)},
}


def _pow2_block(width: int, cap: int) -> int:
  return min(cap, max(16, pl.next_power_of_2(width)))


def _loop(lo, hi, body, init):
  return jax.lax.fori_loop(lo, hi, body, init)


@dataclasses.dataclass(frozen=True)
class GpuGmm:
  """gmm / tgmm (and the gather-fused gmm) for grouped.grouped_matmul on GPU.

  gmm_blocks, dgmm_blocks, tgmm_blocks: the launch shapes of the forward product, of
  the transposed product (the rows' gradient) and of the weight gradient.
  interpret: run in the Pallas interpreter (CPU tests).
  """
  tile: int = ROW_TILE
  gmm_blocks: Blocks | None = None     # None: DEFAULT_BLOCKS for the operands' dtype
  dgmm_blocks: Blocks | None = None
  tgmm_blocks: Blocks | None = None
  interpret: bool = False
  fuses_gather = True

  def _blocks(self, kernel: str, dtype) -> Blocks:
    given = getattr(self, kernel + '_blocks')
    return given or DEFAULT_BLOCKS[4 if jnp.dtype(dtype).itemsize >= 4 else 2][kernel]

  def gmm(self, lhs, rhs, tiles: Tiles, *, transpose_rhs: bool = False, src=None):
    """out[p] = lhs[src[p]] @ rhs[e] (src None: the identity). lhs [R, Kd] -> [P, Nd]."""
    tr = self.tile
    p = tiles.tile_expert.shape[0] * tr
    if src is None:
      src = jnp.arange(p, dtype=jnp.int32)
    kd = lhs.shape[1]
    nd = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    blocks = self._blocks('dgmm' if transpose_rhs else 'gmm', lhs.dtype)
    bk, bn = _pow2_block(kd, blocks.k), _pow2_block(nd, blocks.n)

    def kernel(expert_ref, rows_ref, used_ref, src_ref, lhs_ref, rhs_ref, out_ref):
      i, j = pl.program_id(0), pl.program_id(1)

      @pl.when(i < used_ref[0])
      def _():
        e = expert_ref[i]
        valid = jax.lax.iota(jnp.int32, tr) < rows_ref[i]
        rows = jnp.where(valid, src_ref[pl.ds(i * tr, tr)], 0)
        cols = j * bn + jax.lax.iota(jnp.int32, bn)

        def body(kb, acc):
          ks = kb * bk + jax.lax.iota(jnp.int32, bk)
          a = pltriton.load(lhs_ref.at[rows[:, None], ks[None, :]],
                            mask=valid[:, None] & (ks < kd)[None, :], other=0.0)
          if transpose_rhs:
            w = pltriton.load(rhs_ref.at[e, cols[:, None], ks[None, :]],
                              mask=(cols < nd)[:, None] & (ks < kd)[None, :], other=0.0)
          else:
            w = pltriton.load(rhs_ref.at[e, ks[:, None], cols[None, :]],
                              mask=(ks < kd)[:, None] & (cols < nd)[None, :], other=0.0)
          return acc + pltriton.dot(a, w, trans_b=transpose_rhs).astype(jnp.float32)

        acc = _loop(0, pl.cdiv(kd, bk), body, jnp.zeros((tr, bn), jnp.float32))
        out_rows = i * tr + jax.lax.iota(jnp.int32, tr)
        pltriton.store(out_ref.at[out_rows[:, None], cols[None, :]],
                       acc.astype(out_ref.dtype), mask=(cols < nd)[None, :])

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((p, nd), lhs.dtype),
        grid=(tiles.tile_expert.shape[0], pl.cdiv(nd, bn)),
        compiler_params=blocks.params(), interpret=self.interpret, name='routed_gmm_gpu',
    )(tiles.tile_expert, tiles.tile_rows, jnp.reshape(tiles.used, (1,)), src, lhs, rhs)

  def tgmm(self, lhs, dout, tiles: Tiles, num_experts: int, *, src=None):
    """[E, Kd, Nd]: per expert, sum over its tiles of lhs[src[tile]]^T @ dout[tile]."""
    tr = self.tile
    m = tiles.tile_expert.shape[0]
    if src is None:
      src = jnp.arange(m * tr, dtype=jnp.int32)
    kd, nd = lhs.shape[1], dout.shape[1]
    blocks = self._blocks('tgmm', lhs.dtype)
    bk, bn = _pow2_block(kd, blocks.k), _pow2_block(nd, blocks.n)
    in_use = jnp.arange(m) < tiles.used
    count = jnp.zeros((num_experts,), jnp.int32).at[tiles.tile_expert].add(in_use)
    start = jnp.cumsum(count) - count

    def kernel(start_ref, count_ref, rows_ref, src_ref, lhs_ref, dout_ref, out_ref):
      e, a, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
      ks = a * bk + jax.lax.iota(jnp.int32, bk)
      ns = b * bn + jax.lax.iota(jnp.int32, bn)
      first = start_ref[e]

      def body(t, acc):
        valid = jax.lax.iota(jnp.int32, tr) < rows_ref[t]
        rows = jnp.where(valid, src_ref[pl.ds(t * tr, tr)], 0)
        x = pltriton.load(lhs_ref.at[rows[:, None], ks[None, :]],
                          mask=valid[:, None] & (ks < kd)[None, :], other=0.0)
        g = pltriton.load(dout_ref.at[(t * tr + jax.lax.iota(jnp.int32, tr))[:, None],
                                      ns[None, :]],
                          mask=valid[:, None] & (ns < nd)[None, :], other=0.0)
        return acc + pltriton.dot(x, g, trans_a=True).astype(jnp.float32)

      acc = _loop(first, first + count_ref[e], body, jnp.zeros((bk, bn), jnp.float32))
      pltriton.store(out_ref.at[e, ks[:, None], ns[None, :]],
                     acc.astype(out_ref.dtype), mask=(ks < kd)[:, None] & (ns < nd)[None, :])

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((num_experts, kd, nd), jnp.float32),
        grid=(num_experts, pl.cdiv(kd, bk), pl.cdiv(nd, bn)),
        compiler_params=blocks.params(), interpret=self.interpret,
        name='routed_tgmm_gpu',
    )(start, count, tiles.tile_rows, src, lhs, dout)
