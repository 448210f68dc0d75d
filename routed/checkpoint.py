"""Orbax checkpoints of a training run: params, optimizer state, routing state, step,
data position.

Layout: WORKDIR/checkpoints/<step>/{state,meta}. `state` holds the pytrees (params,
opt_state and, when a routing option keeps one, the routing state of
routed/routing_state.py),
`meta` a small JSON record. Training batches are a pure function of (seed, step), so
the step (plus init.data_offset) is the data position; meta records both so a reader
need not know that.
WORKDIR may be local or gs:// (paths go through etils.epath, which Orbax uses).

Nothing already written is ever lost:
  * Orbax writes each checkpoint to a temporary directory and renames it when
    complete, so a run killed mid-save leaves the previous checkpoint as the latest.
  * A latest checkpoint that cannot be read back (a truncated or corrupted file) is
    reported in one line, moved aside to checkpoints/corrupt-<step>-<time>, and the
    one before it is restored (`restore_latest`).
  * A save that fails (disk full, workdir no longer writable) raises `SaveError`
    naming the step and the reason; earlier checkpoints are untouched.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
import traceback

import jax
import orbax.checkpoint as ocp
from etils import epath


class SaveError(RuntimeError):
  """A checkpoint could not be written; the message is one line."""


class _OrbaxErrors(logging.Filter):
  """Drops error records about Orbax's background work (its own, and asyncio's "Task
  exception was never retrieved" for its tasks), tracebacks included: a failed save
  reaches the user as one SaveError line instead."""

  def filter(self, record):
    if record.levelno < logging.ERROR:
      return True
    exc = record.exc_info[1] if record.exc_info else None
    where = record.pathname + record.getMessage()
    if exc is not None:
      where += ''.join(traceback.format_tb(exc.__traceback__))
    return 'orbax' not in where


def _quiet_background_failures() -> None:
  for name in ('absl', 'asyncio'):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OrbaxErrors) for f in logger.filters):
      logger.addFilter(_OrbaxErrors())
  previous = sys.unraisablehook

  def hook(unraisable):
    # After a failed asynchronous save, TensorStore's callbacks still try to reach
    # Orbax's finished event loop; nothing is lost, so say nothing.
    if isinstance(unraisable.exc_value, RuntimeError) and 'Event loop is closed' in str(
        unraisable.exc_value):
      return
    previous(unraisable)

  if not getattr(previous, 'routed_quiet', False):
    hook.routed_quiet = True
    sys.unraisablehook = hook


def workdir_path(workdir: str) -> epath.Path:
  """WORKDIR as an epath (local paths made absolute; gs:// kept)."""
  path = epath.Path(workdir)
  return path if '://' in workdir else epath.Path(path.resolve())


def one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:300]


@contextlib.contextmanager
def quiet_abandoned_reads():
  """Silences what a failed restore leaves behind: when one array of a checkpoint cannot
  be read, Orbax abandons its other reads, and Python reports each abandoned coroutine
  with a traceback as it is collected ("Exception ignored in: <coroutine ...>", 0-10 per
  failed restore) although the failure was already reported in one line. Other
  unraisable errors still reach the previous hook."""
  previous = sys.unraisablehook

  def hook(unraisable):
    code = getattr(unraisable.object, 'cr_code', None)
    if code is not None and 'orbax' in code.co_filename:
      return
    previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    gc.collect()   # collect the abandoned reads while the hook is still ours
    sys.unraisablehook = previous


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run; saves asynchronously if asked."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool):
    self.directory = workdir_path(workdir) / 'checkpoints'
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending = None
    _quiet_background_failures()  # step of a save that may still be in flight

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, params, opt_state, meta: dict, routing=None) -> None:
    state = {'params': params, 'opt_state': opt_state}
    if routing:
      state['routing'] = routing
    meta = {'step': step, 'data_position': step, **meta}
    try:
      # Raises, too, the error of an earlier asynchronous save that failed.
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # pylint: disable=broad-except
      raise SaveError(f'could not save checkpoint {self._pending or step} in '
                      f'{self.directory}: {one_line(e)}; earlier checkpoints are intact') from e
    self._pending = step

  def restore(self, step: int, params_like, opt_state_like, routing_like=None):
    """Restores (params, opt_state, meta, routing) shaped (and sharded) like the given
    pytrees; routing is {} when routing_like is empty."""
    like = {'params': params_like, 'opt_state': opt_state_like}
    if routing_like:
      like['routing'] = routing_like
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    state = restored.state
    return state['params'], state['opt_state'], dict(restored.meta), state.get('routing', {})

  def restore_latest(self, params_like, opt_state_like, log, routing_like=None):
    """(step, params, opt_state, routing) of the newest checkpoint that reads back, or
    None. Unreadable ones, newest first, are reported through log(line) and moved aside.
    """
    with quiet_abandoned_reads():
      return self._restore_latest(params_like, opt_state_like, log, routing_like)

  def _restore_latest(self, params_like, opt_state_like, log, routing_like):
    for step in sorted(self.all_steps(), reverse=True):
      try:
        params, opt_state, _, routing = self.restore(step, params_like, opt_state_like,
                                                     routing_like)
        return step, params, opt_state, routing
      except Exception as e:  # pylint: disable=broad-except
        moved = self._set_aside(step)
        log(f'checkpoint {step} is unreadable ({one_line(e)}); moved it to {moved} and '
            'trying the one before')
    return None

  def _set_aside(self, step: int) -> epath.Path:
    target = self.directory / f'corrupt-{step}-{time.strftime("%Y%m%d-%H%M%S")}'
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'routed_set_aside_{step}')
    self._manager.reload()
    return target

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise SaveError(f'could not save checkpoint {self._pending} in {self.directory}: '
                      f'{one_line(e)}; earlier checkpoints are intact') from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()
