"""The CPU benchmark scripts still run: benchmarks/dispatch.py and the GPU kernel tuner
in their smallest settings (timings are not checked: they belong in RESULTS.md)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import dispatch  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_dispatch_benchmark_prints_every_column(capsys):
  argv = ['--experts=4', '--backends=gather,tiled,experts', '--rounds=1', '--batch=2',
          '--seq=32', '--d_model=16', '--d_ff=32']
  assert dispatch.main(argv) == 0
  out = capsys.readouterr().out
  header = '| E | gather ms (x dense) | tiled ms (x dense) | experts ms (x dense) |'
  assert header in out
  row = next(line for line in out.splitlines() if line.startswith('| 4 |'))
  assert row.count('x)') == 3
  assert 'Command: python benchmarks/' in out and '--backends=gather,tiled,experts' in out
