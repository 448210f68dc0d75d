"""Mixture-of-Depths vs the dense baseline: step time, FLOPs, loss at equal FLOPs, sampling.

  python benchmarks/mod.py                         # tiny dense vs tiny MoD (12.5%, every other)
  python benchmarks/mod.py --dense_steps=300 --sample_tokens=64

1. Train-step time (median, interleaved rounds, synthetic tokens) and analytic train
   FLOPs per token (routed/model/accounting.py) of both configs.
2. Equal training FLOPs: the dense model trains --dense_steps steps; MoD trains
   dense_steps x dense FLOPs / MoD FLOPs steps (same batch, same schedule shape),
   both with routed.train on the embedded corpus (data.task=stdlib, vocab 4096,
   seq_len 128); then validation cross-entropy of each (MoD evaluates with its
   causal rule, as it samples).
3. Sampling: greedy tokens/s of routed.sample's decoder (full-window recompute) from
   each trained checkpoint, interleaved rounds, median.
Prints a Markdown table with the machine, date, command and load average.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import StepTimer  # pylint: disable=g-import-not-at-top,wrong-import-position

from routed import cli  # pylint: disable=wrong-import-position
from routed import decode  # pylint: disable=wrong-import-position
from routed import sample  # pylint: disable=wrong-import-position
from routed import train  # pylint: disable=wrong-import-position

FLAGS = {'dense': 'configs/dense_base.py:tiny', 'mod': 'configs/mod_base.py:tiny',
         'dense_steps': 200, 'timing_steps': 12, 'rounds': 3, 'sample_tokens': 96,
         'workdir': ''}


def load_average() -> str:
  return ', '.join(f'{x:.1f}' for x in os.getloadavg())


def train_run(spec: str, steps: int, workdir: str):
  """Trains spec for `steps` steps in workdir; returns (eval row, seconds)."""
  cfg = cli.load_config(spec)
  with cfg.unlocked():
    cfg.train.update(steps=steps, warmup_steps=max(1, steps // 10), log_every=50)
    cfg.eval.update(every_steps=steps, num_batches=8)
    cfg.checkpoint.update(every_steps=steps, keep=1)
  start = time.perf_counter()
  row = train.run(cfg, workdir)
  return row, time.perf_counter() - start


class Sampler:
  """routed.sample's decoder on the newest checkpoint of a run (compiled once)."""

  def __init__(self, workdir: str):
    from routed.data import load_dataset  # pylint: disable=g-import-not-at-top
    self.cfg = sample.load_run_config(workdir)
    data = load_dataset(self.cfg.data, self.cfg.train.seq_len)
    self.graphdef, self.params, _, _ = sample.load_params(self.cfg, workdir, data.vocab_size)
    self.prompt = list(data.vocabulary.encode('import os\n'))
    self.functions = decode.make_functions(self.graphdef)
    self.per_token: list[float] = []
    self.run(3)  # compile

  def run(self, tokens: int) -> None:
    # Recomputing the window, as when this benchmark was first recorded: the compute a
    # MoD block saves shows per token (benchmarks/decode.py measures the cache).
    _, per_token = decode.generate(self.cfg, self.graphdef, self.params, [self.prompt],
                                   max_new_tokens=tokens, kv_cache=False,
                                   functions=self.functions)
    self.per_token.append(per_token)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    _, flags = cli.parse(argv, FLAGS)
  except cli.UsageError as e:
    print(f'mod.py: {e}', file=sys.stderr)
    return 2
  command = 'python benchmarks/mod.py ' + ' '.join(argv)
  load_before = load_average()
  specs = {'dense': flags['dense'], 'MoD': flags['mod']}
  vocab = cli.load_config(flags['dense']).data.vocab_size

  # 1. Step time, interleaved.
  timers = {name: StepTimer(spec, vocab) for name, spec in specs.items()}
  for _ in range(flags['rounds']):
    for timer in timers.values():
      timer.run(flags['timing_steps'] // flags['rounds'])
  step_ms = {n: 1e3 * statistics.median(t.times[1:]) for n, t in timers.items()}
  flops = {n: t.size.train_flops_per_token for n, t in timers.items()}
  del timers

  # 2. Equal training FLOPs, 3. sampling.
  steps = {'dense': flags['dense_steps'],
           'MoD': round(flags['dense_steps'] * flops['dense'] / flops['MoD'])}
  root = flags['workdir'] or tempfile.mkdtemp(prefix='routed_mod_bench_')
  rows, seconds = {}, {}
  for name, spec in specs.items():
    workdir = os.path.join(root, name)
    rows[name], seconds[name] = train_run(spec, steps[name], workdir)
    print(f'{name}: {steps[name]} steps in {seconds[name]:.0f} s, eval ce '
          f"{rows[name]['eval/ce']:.4f}", file=sys.stderr, flush=True)

  samplers = {name: Sampler(os.path.join(root, name)) for name in specs}
  for _ in range(flags['rounds']):  # interleaved, like the step timing
    for sampler in samplers.values():
      sampler.run(1 + flags['sample_tokens'] // flags['rounds'])
  rates = {n: 1 / statistics.median(s.per_token[1:]) for n, s in samplers.items()}

  t = cli.load_config(flags['dense']).train
  tokens_per_step = t.batch_size * t.seq_len
  print(f'machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} '
        f'({jax.devices()[0].platform}); {time.strftime("%Y-%m-%d %H:%M %Z")}; '
        f'load average {load_before} before, {load_average()} after')
  print(f'command: `{command.strip()}`')
  print()
  print('| config | train MFLOP/token | step ms (median) | train steps | train TFLOP | '
        'train s | eval CE (nats) | sampling tokens/s |')
  print('|---|---|---|---|---|---|---|---|')
  for name, spec in specs.items():
    total = flops[name] * tokens_per_step * steps[name]
    print(f'| {name} (`{spec}`) | {flops[name] / 1e6:.2f} | {step_ms[name]:.1f} | '
          f'{steps[name]} | {total / 1e12:.2f} | {seconds[name]:.0f} | '
          f"{float(rows[name]['eval/ce']):.4f} | {rates[name]:.1f} |")
  acc = [float(v) for k, v in rows['MoD'].items() if k.endswith('mod_causal_acc')
         and k.startswith('eval/')]
  chosen = [float(v) for k, v in rows['MoD'].items() if k.endswith('mod_chosen')
            and k.startswith('eval/')]
  print()
  print(f"ratios MoD/dense: FLOPs/token {flops['MoD'] / flops['dense']:.3f}, step time "
        f"{step_ms['MoD'] / step_ms['dense']:.3f}, sampling speed {rates['MoD'] / rates['dense']:.2f}x; "
        f'MoD causal-rule accuracy at eval {", ".join(f"{a:.3f}" for a in acc)}, share of tokens '
        f'it routed {", ".join(f"{c:.3f}" for c in chosen)} (per routed block)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
