"""Packing tokenized documents into fixed-length rows, with document boundaries.

Documents are joined in order, each followed by EOS, and the stream is cut into
rows of exactly L + 1 = seq_len + 1 tokens. Nothing is truncated or dropped: a
document longer than the rest of a row continues in the next row, and only the
last row of a part is padded (token 0, segment 0, position 0). So every token of
every document appears exactly once in a part's rows, in order.

Per row, `segment_ids` number the documents (or pieces of them) 1, 2, ... and
`positions` give each token's offset in its document, counted from the
document's first token even when that token is in an earlier row.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from routed.data.vocab import EOS_ID


class Packer:
  """Feed documents with `add`, take full rows; `finish` pads the last one.

  Rows come back as three int64 arrays [n, row_len]: tokens, segment_ids,
  positions. Memory is bounded by one batch of documents plus one row.
  """

  def __init__(self, row_len: int):
    self.row_len = row_len
    self._tokens = np.zeros([0], np.int64)
    self._docs = np.zeros([0], np.int64)     # document ordinal of each token
    self._positions = np.zeros([0], np.int64)
    self._next_doc = 0
    self.documents = 0
    self.tokens = 0

  def add(self, documents: Iterable[list[int]]) -> tuple[np.ndarray, ...]:
    """Appends documents (token id lists, without EOS); returns the full rows."""
    documents = [d for d in documents]
    if documents:
      lengths = np.array([len(d) + 1 for d in documents], np.int64)
      flat = np.fromiter((t for d in documents for t in (*d, EOS_ID)), np.int64,
                         int(lengths.sum()))
      starts = np.cumsum(lengths) - lengths
      doc_ids = np.repeat(np.arange(len(documents), dtype=np.int64) + self._next_doc,
                          lengths)
      positions = np.arange(len(flat), dtype=np.int64) - np.repeat(starts, lengths)
      self._tokens = np.concatenate([self._tokens, flat])
      self._docs = np.concatenate([self._docs, doc_ids])
      self._positions = np.concatenate([self._positions, positions])
      self._next_doc += len(documents)
      self.documents += len(documents)
      self.tokens += len(flat)
    n = len(self._tokens) // self.row_len
    rows = self._take(n * self.row_len)
    return rows

  def finish(self) -> tuple[np.ndarray, ...]:
    """The last, partial row padded to row_len (none if nothing is left)."""
    left = len(self._tokens)
    if not left:
      return self._take(0)
    tokens, segments, positions = self._take(left)
    pad = self.row_len - left
    return (np.pad(tokens, [(0, 0), (0, pad)]), np.pad(segments, [(0, 0), (0, pad)]),
            np.pad(positions, [(0, 0), (0, pad)]))

  def _take(self, count: int) -> tuple[np.ndarray, ...]:
    width = min(self.row_len, count) if count else self.row_len
    tokens = self._tokens[:count].reshape(-1, width)
    docs = self._docs[:count].reshape(-1, width)
    positions = self._positions[:count].reshape(-1, width)
    self._tokens, self._docs = self._tokens[count:], self._docs[count:]
    self._positions = self._positions[count:]
    # Documents are contiguous and in order, so a row's segments are its document
    # ordinals shifted to start at 1.
    segments = docs - docs[:, :1] + 1
    return tokens, segments, positions
