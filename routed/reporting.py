"""Where a run's numbers go: WORKDIR/metrics.jsonl, TensorBoard events, a progress line.

metrics.jsonl has one JSON object per logged step: always `step`, `train/loss` and
`train/ce`; `eval/ce` on evaluation steps; vector metrics (per-expert load) as lists.
A resumed run first drops rows past its checkpoint, so the file reads as one run.
WORKDIR may be gs://: object stores cannot append, so there each write rewrites the
file (small: one row per log line).

TensorBoard events go to WORKDIR/tensorboard through clu's metric writers
(clu.metric_writers.SummaryWriter, on TensorFlow's file system: local or gs://):
numbers as scalars, vectors (a layer's per-expert load, its selection bias or
thresholds) as one histogram each rather than E scalars.
"""

from __future__ import annotations

import json
import math

import numpy as np

from routed.checkpoint import workdir_path


def to_python(value):
  array = np.asarray(value)
  return array.item() if array.ndim == 0 else array.tolist()


class MetricsWriter:
  """Appends rows to metrics.jsonl and TensorBoard; only the lead process writes."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = workdir_path(workdir) / 'metrics.jsonl'
    self.remote = '://' in workdir
    self._tb = None
    if enabled:
      from routed.data.tf_env import import_tf  # pylint: disable=g-import-not-at-top
      import_tf()   # quietly: clu's writer runs on TensorFlow's summary ops
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      self._tb = metric_writers.SummaryWriter(str(workdir_path(workdir) / 'tensorboard'))

  def truncate_after(self, step: int) -> int:
    """Drops rows with a step past `step` (written after the checkpoint we resume from),
    and rows that do not parse: what a process killed in the middle of a write leaves
    at the end of the file. Returns how many rows did not parse."""
    if not self.enabled or not self.path.exists():
      return 0
    rows = [line + '\n' for line in self.path.read_text().splitlines() if line.strip()]
    parsed = [_row_step(line) for line in rows]
    kept = [line for line, s in zip(rows, parsed) if s is not None and s <= step]
    if len(kept) != len(rows):
      tmp = self.path.parent / (self.path.name + '.tmp')
      tmp.write_text(''.join(kept))
      tmp.replace(self.path)
    return sum(s is None for s in parsed)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {'step': step, **{k: to_python(v) for k, v in metrics.items()}}
    line = json.dumps(row) + '\n'
    if self.remote:
      self.path.write_text((self.path.read_text() if self.path.exists() else '') + line)
    else:
      with self.path.open('a') as f:
        f.write(line)
    scalars, histograms = {}, {}
    for name, value in row.items():
      values = np.asarray(value, dtype=np.float64)
      if name != 'step':
        (scalars if values.size == 1 else histograms)[name] = values.reshape(-1)
    self._tb.write_scalars(step, {k: float(v[0]) for k, v in scalars.items()})
    if histograms:
      self._tb.write_histograms(step, histograms)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _row_step(line: str) -> int | None:
  """A metrics.jsonl row's step, or None when the row is torn (not a whole JSON row)."""
  try:
    row = json.loads(line)
    return int(row['step'])
  except (ValueError, KeyError, TypeError):
    return None


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
