"""Orbax checkpoints of a training run: params, optimizer state, step, data position.

Layout: WORKDIR/checkpoints/<step>/{state,meta}. `state` holds the pytrees,
`meta` a small JSON record. Training batches are a pure function of (seed, step), so
the step is the data position; meta records both so a reader need not know that.
Orbax writes each checkpoint to a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run; saves asynchronously if asked."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, params, opt_state, meta: dict) -> None:
    state = {'params': params, 'opt_state': opt_state}
    meta = {'step': step, 'data_position': step, **meta}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, params_like, opt_state_like):
    """Restores (params, opt_state, meta) shaped like the given (abstract) pytrees."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          {'params': params_like, 'opt_state': opt_state_like})
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return restored.state['params'], restored.state['opt_state'], dict(restored.meta)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
