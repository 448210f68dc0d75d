"""Where a run's numbers go: WORKDIR/metrics.jsonl, TensorBoard events, a progress line.

metrics.jsonl has one JSON object per logged step: always `step`, `train/loss` and
`train/ce`; `eval/ce` on evaluation steps; vector metrics (per-expert load) as lists.
A resumed run first drops rows past its checkpoint, so the file reads as one run.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np


def to_python(value):
  array = np.asarray(value)
  return array.item() if array.ndim == 0 else array.tolist()


class MetricsWriter:
  """Appends rows to metrics.jsonl and TensorBoard; only the lead process writes."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def truncate_after(self, step: int) -> None:
    """Drops rows with a step past `step` (written after the checkpoint we resume from)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip()]
    kept = [line for line in rows if json.loads(line)['step'] <= step]
    if len(kept) != len(rows):
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(kept)
      os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {'step': step, **{k: to_python(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    for name, value in row.items():
      if name == 'step':
        continue
      values = np.atleast_1d(np.asarray(value, dtype=np.float64))
      if values.size == 1:
        self._tb.add_scalar(name, values[0], step)
      else:
        for i, v in enumerate(values):
          self._tb.add_scalar(f'{name}/{i}', v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def progress_line(step: int, steps: int, metrics: dict, tokens_per_s: float,
                  eta_s: float) -> str:
  parts = [f'step {step}/{steps}', f"loss {metrics['train/loss']:.4f}",
           f"ce {metrics['train/ce']:.4f}", f'{tokens_per_s:,.0f} tok/s']
  if 'train/mfu' in metrics:
    parts.append(f"mfu {100 * metrics['train/mfu']:.1f}%")
  if 'train/dropped' in metrics:
    parts.append(f"dropped {100 * metrics['train/dropped']:.1f}%")
  parts.append(f'eta {format_duration(eta_s)}')
  return ' | '.join(parts)
