"""TPU (Mosaic) Pallas kernels for the tiled grouped matmul: gmm and tgmm.

Shape letters as in grouped.py: P padded rows, Tr row tile, M = P / Tr tiles,
Kd contraction width, Nd output width, E experts; tk, tn the column blocks.

The layout (routed/model/dropless.py) pads every expert's rows to whole tiles, so
a row tile never straddles two experts: the kernels need only each tile's expert
and valid-row count, passed as scalar-prefetch operands (in SMEM) that the
BlockSpec index maps read to pick the expert's weight block. Compared with a
ragged layout (megablox), this trades up to Tr - 1 padding rows per expert for
kernels with no group-boundary logic.

  gmm   grid (M, Nd / tn, Kd / tk), the contraction innermost; an f32 VMEM
        accumulator per output block. Tiles past `used` skip the MXU and their
        input index maps repeat the last used tile, so they cost no DMA.
  tgmm  grid (Kd / tk, Nd / tn, M), the tiles innermost: consecutive tiles of one
        expert accumulate into the same output block, stored when the expert
        changes. An expert with no tile is never visited; the wrapper zeroes it.

Blocks: tk, tn are the largest of 512, 256, 128 that divide the width, else the
whole width (a block equal to the array dimension is always legal). The row gather
is not fused here: a row is only D * 4 bytes, and per-row DMAs that small run far
below HBM bandwidth, which XLA's gather already reaches.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from routed.kernels.grouped import Tiles

ROW_TILE = 128             # largest Tr on TPU: one MXU pass of rows (the MXU is 128 wide)
INTERPRET_ROW_TILE = 8     # Tr in the interpreter (CPU tests): small, still sublane-aligned


def column_block(width: int, largest: int = 512) -> int:
  """The largest of largest, largest / 2, ..., 128 that divides width, else width."""
  block = largest
  while block >= 128:
    if width % block == 0:
      return block
    block //= 2
  return width


def _scalars(tiles: Tiles):
  return (tiles.tile_expert.astype(jnp.int32), tiles.tile_rows.astype(jnp.int32),
          jnp.reshape(tiles.used, (1,)).astype(jnp.int32))


def _masked(ref, rows_valid):
  x = ref[...]
  valid = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0) < rows_valid
  return jnp.where(valid, x, jnp.zeros((), x.dtype))


@dataclasses.dataclass(frozen=True)
class TpuGmm:
  """gmm / tgmm for grouped.grouped_matmul on TPU (or in the Pallas interpreter).

  tile: Tr, a multiple of 8. max_block: the largest column block (a power of two
  >= 128; tests lower it to exercise several blocks). interpret: run in the Pallas interpreter (any
  platform). nan_scratch: with interpret, use the TPU interpreter, in which
  uninitialised kernel memory (outputs, VMEM scratch) reads as NaN, so a test sees
  whether anything unwritten leaks (slower than the generic interpreter).
  """
  tile: int = ROW_TILE
  max_block: int = 512
  interpret: bool = False
  nan_scratch: bool = False

  def _interpret(self):
    if self.interpret and self.nan_scratch:
      return pltpu.InterpretParams(uninitialized_memory='nan')
    return self.interpret

  def gmm(self, lhs, rhs, tiles: Tiles, *, transpose_rhs: bool = False):
    p, kd = lhs.shape
    nd = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tr, tk, tn = self.tile, column_block(kd, self.max_block), column_block(nd, self.max_block)
    m, nk = p // tr, kd // tk

    def kernel(expert_ref, rows_ref, used_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
      i, k = pl.program_id(0), pl.program_id(2)
      active = i < used_ref[0]

      @pl.when(k == 0)
      def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

      @pl.when(active)
      def _():
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        acc_ref[...] += jax.lax.dot_general(_masked(lhs_ref, rows_ref[i]), rhs_ref[...], dims,
                                            preferred_element_type=jnp.float32)

      @pl.when(active & (k == nk - 1))
      def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)

    def lhs_map(i, j, k, expert, rows, used):
      del j, expert, rows
      return jnp.minimum(i, jnp.maximum(used[0] - 1, 0)), k

    if transpose_rhs:
      rhs_spec = pl.BlockSpec((None, tn, tk), lambda i, j, k, e, r, u: (e[i], j, k))
    else:
      rhs_spec = pl.BlockSpec((None, tk, tn), lambda i, j, k, e, r, u: (e[i], k, j))
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((p, nd), lhs.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(m, nd // tn, nk),
            in_specs=[pl.BlockSpec((tr, tk), lhs_map), rhs_spec],
            out_specs=pl.BlockSpec((tr, tn), lambda i, j, k, e, r, u: (i, j)),
            scratch_shapes=[pltpu.VMEM((tr, tn), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=('parallel', 'parallel', 'arbitrary')),
        cost_estimate=pl.CostEstimate(flops=2 * p * kd * nd, transcendentals=0,
                                      bytes_accessed=(p * kd * (nd // tn) + m * kd * nd
                                                      + p * nd) * lhs.dtype.itemsize),
        interpret=self._interpret(),
        name='routed_gmm_tpu')
    return call(*_scalars(tiles), lhs, rhs)

  def tgmm(self, lhs, dout, tiles: Tiles, num_experts: int):
    p, kd = lhs.shape
    nd = dout.shape[1]
    tr, tk, tn = self.tile, column_block(kd, self.max_block), column_block(nd, self.max_block)
    m = p // tr

    def kernel(expert_ref, rows_ref, used_ref, lhs_ref, dout_ref, out_ref, acc_ref):
      i = pl.program_id(2)
      used = used_ref[0]
      active = i < used
      e = expert_ref[i]
      first = (i == 0) | (expert_ref[jnp.maximum(i - 1, 0)] != e)
      last = (i == used - 1) | (expert_ref[jnp.minimum(i + 1, m - 1)] != e)

      @pl.when(active & first)
      def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

      @pl.when(active)
      def _():
        x = _masked(lhs_ref, rows_ref[i]).astype(jnp.float32)
        g = _masked(dout_ref, rows_ref[i]).astype(jnp.float32)
        acc_ref[...] += jax.lax.dot(x.swapaxes(0, 1), g, preferred_element_type=jnp.float32)

      @pl.when(active & last)
      def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)

    def row_map(col):
      def index(a, b, i, expert, rows, used):
        del expert, rows
        return jnp.minimum(i, jnp.maximum(used[0] - 1, 0)), (a if col == 0 else b)
      return index

    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_experts, kd, nd), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(kd // tk, nd // tn, m),
            in_specs=[pl.BlockSpec((tr, tk), row_map(0)), pl.BlockSpec((tr, tn), row_map(1))],
            out_specs=pl.BlockSpec((None, tk, tn), lambda a, b, i, e, r, u: (e[i], a, b)),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=('parallel', 'parallel', 'arbitrary')),
        cost_estimate=pl.CostEstimate(flops=2 * p * kd * nd, transcendentals=0,
                                      bytes_accessed=(p * kd * (nd // tn) + p * nd * (kd // tk)
                                                      ) * lhs.dtype.itemsize
                                      + num_experts * kd * nd * 4),
        interpret=self._interpret(),
        name='routed_tgmm_tpu')
    out = call(*_scalars(tiles), lhs, dout)
    # Experts with no rows own no tile, so the kernel never wrote their block.
    ids = jnp.arange(tiles.tile_expert.shape[0])
    has_rows = jnp.zeros((num_experts,), bool).at[tiles.tile_expert].max(ids < tiles.used)
    return jnp.where(has_rows[:, None, None], out, 0.0)
