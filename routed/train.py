"""Trains a (routed) decoder LM from a config.

  python -m routed.train --config=configs/switch_base.py:tiny --workdir=runs/quickstart

Running the same command again resumes from the last checkpoint in WORKDIR, and does
nothing more if the run already finished; a resumed run keeps the settings it was
trained with (routed/config_change.py; --allow_config_change=KEY,... changes others).
Outputs in WORKDIR: config.json, metrics.jsonl, tensorboard/, checkpoints/<step>/.
Several processes join one job with --coordinator/--num_processes/--process_id
(routed/distributed.py). Exit status: 0
finished, or stopped by SIGTERM after saving a checkpoint; 1 a non-finite step
(train.nonfinite=stop) or a checkpoint that could not be written; 2 bad input. Every
failure is one line on stderr."""

from __future__ import annotations

import contextlib
import json
import sys
import time

import numpy as np

from routed import cli, distributed, hardware
from routed.validate import validate, validate_mesh

FLAGS = {'config': None, 'workdir': None, 'allow_config_change': '', **distributed.FLAGS}
HELP = cli.Help(
    command='python -m routed.train', doc=__doc__,
    flags={'config': 'the config: FILE[:VARIANT], then --config.KEY=VALUE overrides',
           'workdir': 'the run directory (local or gs://): resumed when it has checkpoints',
           'allow_config_change': 'KEY,... that may differ from the resumed run\'s '
                                  'config.json (routed/config_change.py); recorded there',
           **distributed.FLAG_HELP},
    exit_codes={0: 'finished, or stopped by SIGTERM after saving a checkpoint',
                1: 'a non-finite step (train.nonfinite=stop) or a checkpoint that could '
                   'not be written', 2: cli.BAD_INPUT},
    reads=cli.CONFIG_KEYS)
QUIET = []  # set on processes other than 0: only process 0 reports progress


def log(message: str, *, always: bool = False) -> None:
  if always or not QUIET:
    print(message, file=sys.stderr, flush=True)


def mean_metrics(history: list[dict], prefix: str) -> dict:
  """Means over the steps since the last log line, named prefix/<metric>."""
  out = {}
  for name in history[0]:
    values = np.stack([np.asarray(h[name], dtype=np.float64) for h in history])
    out[f'{prefix}/{name}'] = values.mean(axis=0)
  layer_dropped = [v for k, v in out.items() if k.endswith('/dropped')]
  if layer_dropped:
    out[f'{prefix}/dropped'] = float(np.mean(layer_dropped))
  return out


class Run:
  """One training run in a workdir: model, optimizer, data, checkpoints, metrics."""

  def __init__(self, cfg, workdir: str, config_json: str | None = None):
    # Heavy imports here, after the command line and config were checked.
    import jax  # pylint: disable=g-import-not-at-top
    from routed import step as step_lib  # pylint: disable=g-import-not-at-top
    from routed.checkpoint import Checkpointer, workdir_path  # pylint: disable=g-import-not-at-top
    from routed.data import load_dataset  # pylint: disable=g-import-not-at-top
    from routed.model.accounting import model_size  # pylint: disable=g-import-not-at-top
    from routed.reporting import MetricsWriter  # pylint: disable=g-import-not-at-top
    from routed.routing_state import init_state  # pylint: disable=g-import-not-at-top
    from routed.sharding import make_mesh  # pylint: disable=g-import-not-at-top
    from routed.train_state import create_state  # pylint: disable=g-import-not-at-top

    self.cfg, self.workdir = cfg, workdir
    workdir_path(workdir).mkdir(parents=True, exist_ok=True)
    self.lead = jax.process_index() == 0
    self.data = load_dataset(cfg.data, cfg.train.seq_len)
    optimizer = step_lib.optimizer_for(cfg, self.data.vocab_size)
    self.mesh = make_mesh(cfg.mesh)
    graphdef, self.params, self.opt_state, self.layout = create_state(
        cfg, self.data.vocab_size, self.mesh, optimizer)
    # Replicated: a few numbers per MoE layer (routed/routing_state.py).
    self.routing = jax.jit(lambda: init_state(cfg), out_shardings=self.layout.replicated)()
    self.train_step = step_lib.make_train_step(graphdef, cfg, optimizer, self.layout)
    self.eval_step = step_lib.make_eval_step(graphdef, cfg, self.layout)
    self.size = model_size(cfg, self.data.vocab_size)
    self.peak_flops = hardware.peak_flops(cfg.train.peak_flops, jax.devices())
    self.checkpointer = Checkpointer(workdir, keep=cfg.checkpoint.keep,
                                     async_save=cfg.checkpoint.async_save)
    self.writer = MetricsWriter(workdir, enabled=self.lead)
    self.step = 0
    # Restored onto this run's mesh, whatever mesh wrote it; an unreadable latest
    # checkpoint is reported, set aside, and the one before it restored.
    restored = self.checkpointer.restore_latest(
        self.params, self.opt_state, lambda line: log(f'routed.train: {line}', always=True),
        self.routing)
    if restored is not None:
      self.step, self.params, self.opt_state, self.routing = restored
    elif cfg.init.from_checkpoint:
      # A new run starting from another run's parameters (warm start or upcycling).
      from routed.init_from import initial_params  # pylint: disable=g-import-not-at-top
      try:
        self.params = initial_params(cfg, self.params, self.layout.params)
      except Exception:
        self.close()
        raise
      log(f'routed.train: parameters from {cfg.init.from_checkpoint}' +
          (' (sparse upcycling)' if cfg.init.upcycle else ''))
    torn = self.writer.truncate_after(self.step)
    if torn:
      log(f'routed.train: dropped {torn} torn row(s) of {workdir}/metrics.jsonl (a write cut '
          'short by a kill); the rows up to the checkpoint are intact', always=True)
    if self.lead:
      (workdir_path(workdir) / 'config.json').write_text(config_json or cfg.to_json(indent=2))
    self._eval_batches = None
    self.preempted = False
    # This process reads only the rows of each batch that its devices hold.
    from routed.sharding import process_rows  # pylint: disable=g-import-not-at-top
    self.rows = process_rows(self.layout.batch, cfg.train.batch_size)

  def describe(self) -> str:
    s = self.size
    return (f'params {s.total_params / 1e6:.2f}M total, {s.active_params / 1e6:.2f}M active | '
            f'{s.train_flops_per_token / 1e6:.1f} MFLOP/token (train) | {self.data.describe()}')

  def evaluate(self) -> dict:
    ecfg = self.cfg.eval
    if self._eval_batches is None:
      # The same batches every evaluation: placed on the mesh once.
      from routed.sharding import process_rows  # pylint: disable=g-import-not-at-top
      size = ecfg.batch_size or self.cfg.train.batch_size
      rows = process_rows(self.layout.batch, size)
      self._eval_batches = [self.on_mesh(batch, rows, size) for batch in
                            self.data.eval_batches(ecfg.num_batches, size, rows)]
    import jax  # pylint: disable=g-import-not-at-top
    from routed import routing_state  # pylint: disable=g-import-not-at-top
    with jax.set_mesh(self.mesh):
      history = [self.eval_step(self.params, self.routing, batch)
                 for batch in self._eval_batches]
      out = mean_metrics(history, 'eval')
      if routing_state.uses_threshold(self.cfg):
        # What the causal rule costs: the same batches routed by top-C selection.
        top_c = [self.eval_step(self.params, routing_state.without_thresholds(self.routing),
                                batch)
                 for batch in self._eval_batches]
        out['eval/ce_top_c'] = mean_metrics(top_c, 'eval')['eval/ce']
    return out

  def on_mesh(self, batch: dict, rows, batch_size: int) -> dict:
    """This process's rows `rows` of a batch -> the global batch on the mesh."""
    from routed.sharding import global_batch  # pylint: disable=g-import-not-at-top
    return global_batch(batch, rows, self.layout.batch, batch_size)

  def save(self) -> None:
    self.checkpointer.save(self.step, self.params, self.opt_state,
                           {'seed': self.cfg.train.seed,
                            'data_position': self.step + self.cfg.init.data_offset},
                           self.routing)

  def train(self) -> dict:
    """Trains to cfg.train.steps, or until SIGTERM (then saves and returns); returns the
    last logged metrics row. Raises NonFiniteError (train.nonfinite=stop) and SaveError."""
    import jax  # pylint: disable=g-import-not-at-top
    from routed.preemption import NonFiniteWatch, StopRequest  # pylint: disable=g-import-not-at-top
    cfg, t = self.cfg, self.cfg.train
    if self.step >= t.steps:
      return {}  # run() reports finished runs before building anything
    log(self.describe())
    log(f'training from step {self.step} to {t.steps}' +
        (' (resumed from checkpoint)' if self.step else ''))
    history, row = [], {}
    clock = None  # (start time, steps since then), started after the first step
    watch = NonFiniteWatch(t.nonfinite, lambda line: log(f'routed.train: {line}'))
    # Batches are read ahead in threads, from this step on: the data position is the step
    # (plus init.data_offset).
    batches = self.data.train_batches(self.step + cfg.init.data_offset, t.batch_size, t.seed,
                                      self.rows)
    first = time.perf_counter()
    with StopRequest() as stop:
      while self.step < t.steps:
        batch = self.on_mesh(next(batches), self.rows, t.batch_size)
        with jax.set_mesh(self.mesh):
          self.params, self.opt_state, self.routing, metrics = self.train_step(
              self.params, self.opt_state, self.routing, batch, self.step)
        self.step += 1
        watch.add(self.step, metrics['skipped'])
        if clock is None:
          # The first step includes compilation: start the clock after it.
          metrics['loss'].block_until_ready()
          log(f'compiled train step in {time.perf_counter() - first:.1f} s (the first step, '
              'its run included)')
          clock = (time.perf_counter(), 0)
        else:
          clock = (clock[0], clock[1] + 1)
          history.append(metrics)
        is_last = self.step == t.steps
        preempted = stop.requested(self.step)
        do_eval = cfg.eval.every_steps > 0 and (self.step % cfg.eval.every_steps == 0 or is_last)
        # Saved before the evaluation: a failing evaluation must not cost the steps.
        if self.step % cfg.checkpoint.every_steps == 0 or is_last or preempted:
          watch.check()  # never save a run that should have stopped
          self.save()
        if self.step % t.log_every == 0 or do_eval or is_last or preempted:
          watch.check()
          row = self.log_row(history or [metrics], clock, do_eval and not preempted)
          history, clock = [], (time.perf_counter(), 0)
        if preempted:
          self.checkpointer.wait()
          log(f'routed.train: SIGTERM: saved checkpoint {self.step} and stopped; run the same '
              'command to resume', always=True)
          self.preempted = True
          break
    if jax.process_count() > 1:
      d = self.data
      log(f'routed.data: process {jax.process_index()} of {jax.process_count()} decoded '
          f'{d.examples_decoded} examples in {d.batches_read} batches ({len(self.rows)} rows '
          f'of each batch of {t.batch_size})', always=True)
    return row

  def log_row(self, history: list[dict], clock, do_eval: bool) -> dict:
    """Writes and prints the metrics of the steps since the last log line."""
    from routed.reporting import progress_line  # pylint: disable=g-import-not-at-top
    t = self.cfg.train
    row = mean_metrics(history, 'train')
    elapsed, steps = time.perf_counter() - clock[0], clock[1]
    tokens_per_s, eta = float('nan'), float('nan')
    if steps and elapsed > 0:
      tokens_per_s = steps * t.batch_size * t.seq_len / elapsed
      eta = (t.steps - self.step) * elapsed / steps
      row['train/tokens_per_s'] = tokens_per_s
      if self.peak_flops:
        row['train/mfu'] = tokens_per_s * self.size.train_flops_per_token / self.peak_flops
    if do_eval:
      row.update(self.evaluate())
    self.writer.write(self.step, row)
    line = progress_line(self.step, t.steps, row, tokens_per_s, eta)
    if 'eval/ce' in row:
      from routed.model.transformer import routing_mode  # pylint: disable=g-import-not-at-top
      line += f" | eval ce {row['eval/ce']:.4f} [{routing_mode(self.cfg, train=False)}]"
      if 'eval/ce_top_c' in row:
        line += f" | non-causal top-C eval ce {row['eval/ce_top_c']:.4f}"
    log(line)
    return row

  def close(self) -> None:
    self.checkpointer.close()
    self.writer.close()


def latest_step(cfg, workdir: str) -> int | None:
  """The step of the newest checkpoint in workdir, or None."""
  from routed.checkpoint import Checkpointer, workdir_path  # pylint: disable=g-import-not-at-top
  if not (workdir_path(workdir) / 'checkpoints').is_dir():
    return None
  checkpointer = Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=False)
  try:
    return checkpointer.latest_step()
  finally:
    checkpointer.close()


def config_text(cfg, workdir: str, step: int | None, allow_change: str = '') -> str:
  """What WORKDIR/config.json will hold. Resuming (checkpoints present), the command's
  config must match the recorded one (routed/config_change.py): UsageError otherwise."""
  from routed import config_change  # pylint: disable=g-import-not-at-top
  from routed.checkpoint import workdir_path  # pylint: disable=g-import-not-at-top
  path = workdir_path(workdir) / 'config.json'
  if step is None or not path.exists():
    return cfg.to_json(indent=2)
  return config_change.check(cfg, path.read_text(), step, allow_change)


def run(cfg, workdir: str, allow_config_change: str = '') -> dict:
  """Trains (or resumes) the run in workdir; returns the last logged metrics."""
  step = latest_step(cfg, workdir)
  # Before anything in the workdir is read for real or moved.
  text = config_text(cfg, workdir, step, allow_config_change)
  if step is not None and step >= cfg.train.steps:
    # Nothing to do: say so without loading data or building the model.
    log(f'{workdir}: already finished ({step}/{cfg.train.steps} steps); nothing to do')
    return {}
  training = Run(cfg, workdir, config_json=text)
  try:
    row = training.train()
  finally:
    training.close()
  return {} if training.preempted else row


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    cfg, flags = cli.parse(argv, FLAGS, HELP)
    validate(cfg, flags['workdir'])
    distributed.initialize(flags)
    import jax  # pylint: disable=g-import-not-at-top
    validate_mesh(cfg, jax.device_count())
  except cli.UsageError as e:
    log(f'routed.train: {e}', always=True)
    return 2
  if jax.process_index() != 0:
    QUIET.append(True)
  from routed.checkpoint import SaveError  # pylint: disable=g-import-not-at-top
  from routed.data import DataError  # pylint: disable=g-import-not-at-top
  from routed.preemption import NonFiniteError  # pylint: disable=g-import-not-at-top
  from routed import workdir_lock  # pylint: disable=g-import-not-at-top
  try:
    # Process 0 holds the workdir for the job (the others share it through it).
    with (workdir_lock.hold(flags['workdir'], '.train.lock', 'routed.train')
          if jax.process_index() == 0 else contextlib.nullcontext()):
      final = run(cfg, flags['workdir'], flags['allow_config_change'])
  except (DataError, cli.UsageError) as e:
    log(f'routed.train: {e}', always=True)
    return 2
  except (NonFiniteError, SaveError) as e:
    log(f'routed.train: {e}', always=True)
    return 1
  except OSError as e:  # writing metrics or the config: full disk, lost permissions
    log(f'routed.train: could not write to {flags["workdir"]}: {e}; checkpoints already '
        'written are intact', always=True)
    return 1
  if final:
    log('done: ' + json.dumps({k: round(float(np.mean(v)), 4) for k, v in final.items()
                               if k in ('train/ce', 'eval/ce', 'train/tokens_per_s')}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
