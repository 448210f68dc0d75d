"""Knowing when to stop early: preemption (SIGTERM) and non-finite steps.

Preemptible TPU slices and SLURM jobs get SIGTERM some seconds to minutes before
they are killed. The trainer asks `StopRequest.requested(step)` after every step;
once it says yes, the trainer saves a checkpoint and exits 0, and the same command
resumes later. In a single process a SIGTERM handler sets a flag (a second SIGTERM,
which SLURM's requeue path sends, changes nothing). With several processes every
one must stop at the same step or their collective save would hang, so they use
JAX's preemption sync point: jax.distributed catches the signal on any process and
all of them agree on the first step at which to stop.

A train step whose loss or gradients are not finite is never applied (routed/step.py
keeps the old state and reports `skipped`). `NonFiniteWatch` reads that flag one
step late, so the host never waits for the step it just dispatched.
"""

from __future__ import annotations

import signal

import jax
import numpy as np


class NonFiniteError(RuntimeError):
  """A step had a non-finite loss or gradient and train.nonfinite is 'stop'."""

  def __init__(self, step: int):
    super().__init__(f'step {step} had a non-finite loss or gradient, so it was not applied; '
                     'stopped without saving anything after it (train.nonfinite=stop; '
                     'set it to skip to go on past such steps)')
    self.step = step


class StopRequest:
  """Use as a context manager around the training loop."""

  def __init__(self):
    self._signalled = False
    self._previous = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    self._signalled = True

  def requested(self, step: int) -> bool:
    """Whether to stop after `step` (the same answer on every process)."""
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled


class NonFiniteWatch:
  """Checks the `skipped` flags of finished steps; raises or counts per train.nonfinite."""

  def __init__(self, mode: str, log):
    self.mode, self.log = mode, log
    self._pending = []  # (step, skipped flag as a device scalar)

  def add(self, step: int, skipped) -> None:
    self._pending.append((step, skipped))
    if len(self._pending) > 1:
      self.check(keep_last=True)

  def check(self, keep_last: bool = False) -> None:
    """Reads the flags (all, or all but the newest, which may still be running)."""
    ready = self._pending[:-1] if keep_last else self._pending
    self._pending = self._pending[len(ready):]
    for step, skipped in ready:
      if float(np.asarray(skipped)) > 0:
        if self.mode == 'stop':
          raise NonFiniteError(step)
        self.log(f'step {step}: non-finite loss or gradient; the step was skipped '
                 '(train.nonfinite=skip)')
