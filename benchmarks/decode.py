"""Decoding speed: the key/value cache against recomputing the window (issue 16).

  python benchmarks/decode.py                       # prompt 64, 448 new tokens, seq_len 512
  python benchmarks/decode.py --new_tokens=32 --batches=1 --rounds=1   # a quick look

For each config of --configs (the CPU quickstart shapes, randomly initialised: speed
does not depend on the weights) at train.seq_len = --seq_len, decodes --batches rows
of a --prompt_len-token prompt for --new_tokens tokens greedily, with the cache and by
recomputing, alternating the two --rounds times; the score is the median seconds per
decoding step (all rows together) after compilation, and tokens/s = rows / that. Also
checks that the two paths produced the same tokens. Prints a Markdown table with
the machine, date and command.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import numpy as np
from flax import nnx

from routed import cli, decode
from routed.model.transformer import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = {'configs': 'switch_base.py:tiny,mode_base.py:tiny', 'seq_len': 512, 'prompt_len': 64,
         'new_tokens': 448, 'batches': '1,8', 'rounds': 2, 'vocab_size': 4096}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    _, flags = cli.parse(argv, FLAGS)
    batches = [int(b) for b in str(flags['batches']).split(',')]
    specs = str(flags['configs']).split(',')
    if flags['prompt_len'] + flags['new_tokens'] - 1 > flags['seq_len']:
      raise cli.UsageError('--prompt_len + --new_tokens - 1 must fit in --seq_len')
    cfgs = []
    for spec in specs:
      cfg = cli.load_config(os.path.join(ROOT, 'configs', spec))
      cfg.train.seq_len = flags['seq_len']
      cfgs.append(decode.sampling_config(cfg))
  except (cli.UsageError, ValueError) as e:
    print(f'decode.py: {e}', file=sys.stderr)
    return 2
  rng = np.random.default_rng(0)
  rows = []
  for spec, cfg in zip(specs, cfgs):
    graphdef, params = nnx.split(build_model(cfg, flags['vocab_size'], 0), nnx.Param)
    functions = decode.make_functions(graphdef)
    for b in batches:
      prompts = rng.integers(0, flags['vocab_size'], (b, flags['prompt_len'])).tolist()
      per_step, outputs = {True: [], False: []}, {}
      for _ in range(flags['rounds']):
        for kv in (True, False):
          start = time.perf_counter()
          outputs[kv], seconds = decode.generate(cfg, graphdef, params, prompts,
                                                 max_new_tokens=flags['new_tokens'],
                                                 kv_cache=kv, functions=functions)
          per_step[kv].append(seconds)
          print(f"{spec} batch {b} {'cache' if kv else 'recompute'}: {b / seconds:.1f} "
                f'tokens/s ({time.perf_counter() - start:.0f} s)', file=sys.stderr, flush=True)
      cached, recompute = (statistics.median(per_step[kv]) for kv in (True, False))
      rows.append((spec, b, b / cached, b / recompute, recompute / cached,
                   outputs[True] == outputs[False]))
  print(f'Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; '
        f'load {", ".join(f"{x:.1f}" for x in os.getloadavg())}; date '
        f'{time.strftime("%Y-%m-%d")}; command: python benchmarks/decode.py {" ".join(argv)}')
  print(f"prompt {flags['prompt_len']}, {flags['new_tokens']} new tokens, seq_len "
        f"{flags['seq_len']}, greedy; median of {flags['rounds']} rounds\n")
  print('| config | batch | cached tokens/s | recompute tokens/s | speed-up | same tokens |')
  print('|---|---|---|---|---|---|')
  for spec, b, cached, recompute, ratio, same in rows:
    print(f'| {spec} | {b} | {cached:.1f} | {recompute:.1f} | {ratio:.1f}x | '
          f"{'yes' if same else 'NO'} |")
  return 0


if __name__ == '__main__':
  sys.exit(main())
