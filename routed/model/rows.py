"""Row gathers whose transpose is also a gather: the data movement of index dispatch.

Shape letters: M rows of the source table, R rows gathered, J rows a source row
feeds at most, D row width.

Dispatch moves token rows into expert buffers and back. Written as `table[index]`,
JAX transposes a gather into a scatter-add, which XLA on CPU runs as a serial loop
and on TPU/GPU as atomics or a sort. Every map here is injective (a buffer row holds
at most one token choice, a choice sits in at most one buffer row), so its transpose
is again a gather through the inverse map, which the caller already has. This
module gives that pair one custom VJP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def gather_rows(table, index, inverse):
  """out[r] = table[index[r]], or 0 where index[r] is out of range [0, M).

  table   [M, D]  float
  index   [R]     int32: source row of each output row; >= M means none (row is 0)
  inverse [M, J]  int32: the output rows each source row feeds, >= R for none.
                  Must be the exact inverse of `index` (index[inverse[m, j]] == m for
                  every valid entry, and every r with index[r] == m is listed), or
                  the gradient is wrong.
  Returns [R, D]. Gradient wrt table: dtable[m] = sum_j dout[inverse[m, j]].
  """
  return _take(table, index)


def _take(table, index):
  # mode='fill' makes the out-of-range sentinel a zero row instead of a clamp.
  return jnp.take(table, index, axis=0, mode='fill', fill_value=0)


def _fwd(table, index, inverse):
  return _take(table, index), inverse


def _bwd(inverse, dout):
  dtable = jnp.sum(_take(dout, inverse.reshape(-1)).reshape(*inverse.shape, dout.shape[-1]),
                   axis=1)
  return dtable, None, None


gather_rows.defvjp(_fwd, _bwd)


def combine_rows(rows, dest, source, weight):
  """y[t] = sum_k weight[t, k] * rows[dest[t, k]]: each token's weighted outputs.

  rows   [R, D]  expert outputs, one row per buffer row
  dest   [T, K]  int32: the buffer row of each of a token's K choices, >= R for a
                 choice that has none (dropped or inactive: contributes 0)
  source [R]     int32: the inverse, choice id t * K + k of each buffer row, >= T * K
                 for a row no choice owns (its content is never read)
  weight [T, K]  combine weights
  Returns [T, D] in rows.dtype.
  """
  t, k = dest.shape
  picked = gather_rows(rows, dest.reshape(-1), source[:, None]).reshape(t, k, -1)
  return jnp.einsum('tkd,tk->td', picked, weight.astype(rows.dtype))
