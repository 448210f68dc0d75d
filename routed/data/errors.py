"""The one exception the data pipeline raises for problems a user can fix.

`DataError` messages are a single line that names the config key or path at
fault and says what to do, so the trainer (and `routed.validate`) can print
them as-is instead of a traceback from deep inside TFDS or SentencePiece.
"""

from __future__ import annotations


class DataError(Exception):
  """A data config/path problem the user can fix; `str(e)` is one line."""

  def __init__(self, message: str):
    # Collapse to one line: wrapped library errors often span several.
    super().__init__(' '.join(str(message).split()))


def first_line(exc: BaseException) -> str:
  """The first non-empty line of an exception's message (for wrapping)."""
  for line in str(exc).splitlines():
    if line.strip():
      return line.strip()
  return type(exc).__name__
