"""Per-chip memory, compiled FLOPs and compile time of big configs on TPU slices, from
`routed.aot` (libtpu compiles for the topology on this machine; nothing runs).

  python benchmarks/aot_scale.py                     # configs/moe_1b.py, remat variants
  python benchmarks/aot_scale.py --cases=baseline --checkout=/tmp/routed-old

Each case is one `python -m routed.aot` process (config, topology, overrides); its
JSON line becomes a row of a Markdown table. --checkout runs the cases in another
checkout of routed (the code before a change, for a baseline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from routed import cli

FLAGS = {'cases': 'moe_1b', 'checkout': '', 'timeout': 3000}

MOE_1B = 'configs/moe_1b.py'
MESH_V5P = ('mesh.fsdp=-1', 'mesh.expert=8')
# name -> list of (config, topology, overrides)
CASES = {
    'moe_1b': [(MOE_1B, 'v5p-64', (f'model.remat={remat}',) + MESH_V5P)
               for remat in ('none', 'dots_saveable', 'full')] + [
                   (MOE_1B, 'v6e-64', ('model.remat=dots_saveable',) + MESH_V5P)],
    'moe_1b_noscan': [(MOE_1B, 'v5p-64', ('model.scan_layers=false',) + MESH_V5P)],
    'moe_1b_micro': [(MOE_1B, 'v5p-64', ('model.remat=none', 'train.microbatches=4') + MESH_V5P)],
    'moe_1b_tensor': [(MOE_1B, 'v5p-64', ('mesh.fsdp=-1', 'mesh.expert=8', 'mesh.tensor=2'))],
    # The quickstart shape on one v5p host: seconds to compile (tests use it).
    'smoke': [('configs/switch_base.py:tiny', 'v5p:2x2x1', ('mesh.data=1', 'mesh.expert=2',
                                                          'mesh.tensor=2'))],
    # Switch-Base at seq_len 2048 (the baseline shape), today's defaults.
    'baseline': [('configs/switch_base.py', 'v5p-64',
                  ('train.seq_len=2048', 'train.batch_size=256', 'mesh.data=1', 'mesh.fsdp=-1',
                   'mesh.expert=8'))],
    'baseline_remat': [('configs/switch_base.py', 'v5p-64',
                        ('train.seq_len=2048', 'train.batch_size=256', 'mesh.data=1',
                         'mesh.fsdp=-1', 'mesh.expert=8', f'model.remat={remat}'))
                       for remat in ('dots_saveable', 'full')],
}


def run_case(checkout: str, config: str, topology: str, overrides, timeout: int) -> dict:
  cmd = [sys.executable, '-m', 'routed.aot', f'--config={config}', f'--topology={topology}',
         '--vocab_size=32000', *[f'--config.{o}' for o in overrides]]
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, timeout=timeout,
                        check=False, env=dict(os.environ, PYTHONPATH=checkout))
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if not lines:
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    return {'error': f'exit {proc.returncode}: {tail[:200]}', 'wall_s': time.perf_counter() - start}
  result = json.loads(lines[-1])
  result['wall_s'] = time.perf_counter() - start
  return result


def row(config, topology, overrides, r) -> str:
  name = f"{os.path.basename(config)} {' '.join(overrides)}"
  if 'error' in r:
    return f'| {name} | {topology} | {r["error"]} | | | | | | |'
  mesh = ' '.join(f'{k}={v}' for k, v in r['mesh'].items() if v > 1)
  return (f"| {name} | {topology} ({mesh}) | {r['params_gib'] + r['opt_state_gib']:.2f} | "
          f"{r['activations_temp_gib']:.2f} | {r['total_gib']:.2f} / {r['hbm_gib']:.0f} "
          f"{'fits' if r['fits'] else 'DOES NOT FIT'} | {r['compiled_tflop_per_step']:,.0f} | "
          f"{r['model_tflop_per_step']:,.0f} | {r.get('attention', '?')} | "
          f"{r.get('compile_s', r['wall_s']):.0f} |")


def main(argv=None) -> int:
  try:
    _, flags = cli.parse(sys.argv[1:] if argv is None else argv, FLAGS)
    names = flags['cases'].split(',')
    for name in names:
      if name not in CASES:
        raise cli.UsageError(f'--cases: unknown case {name!r}; one of {", ".join(CASES)}')
  except cli.UsageError as e:
    print(f'aot_scale.py: {e}', file=sys.stderr)
    return 2
  checkout = os.path.abspath(flags['checkout'] or os.path.dirname(os.path.dirname(__file__)))
  print(f'checkout {checkout}; {time.strftime("%Y-%m-%d")}; per device; GiB; TFLOP per step')
  print()
  print('| case | topology (mesh) | params + optimizer | activations + temps | total / HBM | '
        'compiled TFLOP | model TFLOP | attention | compile s |')
  print('|---|---|---|---|---|---|---|---|---|')
  for name in names:
    for config, topology, overrides in CASES[name]:
      result = run_case(checkout, config, topology, overrides, flags['timeout'])
      print(row(config, topology, overrides, result), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
