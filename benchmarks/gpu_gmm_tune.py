"""Sweep the Pallas GPU kernels' launch shapes, then rerun dispatch_gpu.py with the best (issue 4).

  python3 benchmarks/gpu_gmm_tune.py                 # on a GPU: about 8-9 minutes
  python benchmarks/gpu_gmm_tune.py --quick          # CPU smoke run (interpreted, tiny)

GpuGmm (routed/kernels/gpu_gmm.py) runs three kernels: gmm (rows x w[e]), dgmm (the
rows' gradient, rows x w[e]^T) and tgmm (the weight gradient). Each takes a launch
shape, Blocks(k, n, warps, stages): the bk x bn column block, and Triton's warps and
pipeline stages. For bf16 [T, 1024] x [E, 1024, 4096], T = 16,384, E in {8, 32, 128},
each kernel is timed alone at every candidate shape (row tile as the dispatch picks
it, then a row tile of 128 where T / E allows, time permitting). The shape with the
least total time over E is chosen per kernel, set as GpuGmm's default for this
process, and dispatch_gpu.py then runs its sections (correctness first, so the
chosen shapes are checked against float64) with --dispatch_args. A candidate that
fails to compile (shared memory) is listed and skipped. Writes
$OUT/gpu_gmm_tune.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import dispatch_gpu as dg   # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from routed.kernels import gpu_gmm
from routed.kernels.gpu_gmm import Blocks, GpuGmm
from routed.model.dispatch_dropless import row_tile

CANDIDATES = [Blocks(32, 64, 4, 2), Blocks(64, 64, 4, 3), Blocks(64, 128, 4, 3),
              Blocks(64, 128, 8, 3), Blocks(32, 128, 4, 4), Blocks(64, 256, 8, 3),
              Blocks(128, 128, 8, 3), Blocks(128, 64, 4, 3)]


def kernels(pb, impl):
  """name -> (fn, args) for gmm, dgmm and tgmm alone on the problem's padded rows."""
  e = pb['w'].shape[0]
  return {'gmm': (lambda a, w, tl, ct: impl.gmm(a, w, tl), (pb['xp'], pb['w'], pb['tiles'], None)),
          'dgmm': (lambda a, w, tl, ct: impl.gmm(ct, w, tl, transpose_rhs=True),
                   (None, pb['w'], pb['tiles'], pb['ctp'])),
          'tgmm': (lambda a, w, tl, ct: impl.tgmm(a, ct, tl, e),
                   (pb['xp'], None, pb['tiles'], pb['ctp']))}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--quick', action='store_true')
  p.add_argument('--budget_s', type=float, default=240.0, help='for the sweep')
  p.add_argument('--windows', type=int, default=5)
  p.add_argument('--window_s', type=float, default=0.05)
  p.add_argument('--dispatch_args', default='--skip=ragged,einsum --budget_s=200',
                 help="dispatch_gpu.py's arguments for the rerun ('none': no rerun)")
  opts = p.parse_args(argv)
  q = opts.quick
  t, d, f = (256, 64, 96) if q else (16384, 1024, 4096)
  experts, cands = ((4, 8), CANDIDATES[:2]) if q else ((8, 32, 128), CANDIDATES)
  if q:
    opts.windows, opts.window_s = 2, 0.01
  out = {'device': dg.R['device'], 'T': t, 'D': d, 'F': f, 'times': [], 'failed': [],
         'skipped': []}
  start = time.perf_counter()
  passes = [('dispatch tile', lambda e: row_tile(t, e, 16, gpu_gmm.ROW_TILE))]
  if q:
    passes = [('dispatch tile', lambda e: 16)]
  else:
    passes.append(('tile 128', lambda e: 128 if t // e >= 128 else None))
  for label, tile_of in passes:
    for e in experts:
      tile = tile_of(e)
      if tile is None:
        continue
      pb = dg.problem(t, e, d, f, jnp.bfloat16, tile)
      for c in cands:
        if time.perf_counter() - start > opts.budget_s:
          out['skipped'].append(f'{label} E={e} {c}')
          continue
        impl = GpuGmm(tile, c, c, c, interpret=not dg.ON_GPU)
        for name, (fn, args) in kernels(pb, impl).items():
          try:
            ms, comp, _ = dg.timed(fn, args, opts)
          except Exception as err:  # pylint: disable=broad-except
            out['failed'].append(f'{name} tile {tile} E={e} {c}: {type(err).__name__}')
            dg.log(f'  FAILED {out["failed"][-1]}')
            continue
          out['times'].append(dict(kernel=name, tile=tile, E=e, blocks=list(c.__dict__.values()),
                                   ms=ms, tflops=2 * t * d * f / ms / 1e9))
          dg.log(f'  {label} {tile} E={e} {name} {c}: {ms:.3f} ms '
                 f"({out['times'][-1]['tflops']:.0f} TFLOP/s, compile {comp:.1f} s)")
      del pb
  best = choose(out, experts)
  out['best'] = {k: (v[0], list(v[1].__dict__.values()), v[2]) for k, v in best.items()}
  if os.environ.get('OUT'):
    with open(os.path.join(os.environ['OUT'], 'gpu_gmm_tune.json'), 'w') as fh:
      json.dump(out, fh, indent=1)
  report(out, experts)
  if opts.dispatch_args == 'none' or not best:
    return 0
  for k, (_, blocks, _) in best.items():
    gpu_gmm.DEFAULT_BLOCKS[k] = blocks
  dg.log(f'\nrerunning dispatch_gpu.py {opts.dispatch_args} with GpuGmm defaults '
         f'{gpu_gmm.DEFAULT_BLOCKS} (row tile as the dispatch picks it)\n')
  return dg.main(opts.dispatch_args.split() + (['--quick'] if q else []))


def choose(out, experts):
  """kernel -> (tile label, Blocks, total ms over E) with the least total, at the dispatch tile."""
  best = {}
  for name in ('gmm', 'dgmm', 'tgmm'):
    totals = {}
    for r in out['times']:
      if r['kernel'] == name and r['tile'] <= gpu_gmm.ROW_TILE:
        key = tuple(r['blocks'])
        totals.setdefault(key, {})[r['E']] = r['ms']
    full = {k: sum(v.values()) for k, v in totals.items() if len(v) == len(experts)}
    if full:
      key = min(full, key=full.get)
      best[name] = ('dispatch tile', Blocks(*key), full[key])
  return best


def report(out, experts):
  dg.log(f"\n## gpu_gmm_tune: {out['device']}, bf16 [{out['T']}, {out['D']}] x "
         f"[E, {out['D']}, {out['F']}]: ms (TFLOP/s)\n")
  rows = {}
  for r in out['times']:
    rows.setdefault((r['kernel'], r['tile'], tuple(r['blocks'])), {})[r['E']] = r
  dg.log('| kernel | row tile | bk, bn, warps, stages | ' + ' | '.join(f'E={e}' for e in experts)
         + ' |\n|' + '---|' * (3 + len(experts)))
  for (name, tile, blocks), by_e in sorted(rows.items()):
    cells = [f"{by_e[e]['ms']:.3f} ({by_e[e]['tflops']:.0f})" if e in by_e else '-'
             for e in experts]
    dg.log(f'| {name} | {tile} | {", ".join(map(str, blocks))} | ' + ' | '.join(cells) + ' |')
  dg.log(f"\nchosen (least total over E at the dispatch's row tile): {out['best']}")
  dg.log(f"failed: {out['failed']}\nskipped (time guard): {len(out['skipped'])}")


if __name__ == '__main__':
  sys.exit(main())
