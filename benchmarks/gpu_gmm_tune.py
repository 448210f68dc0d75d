"""Sweep the Pallas GPU kernels' launch shapes, then rerun dispatch_gpu.py with the best (issue 4).

  python3 benchmarks/gpu_gmm_tune.py                 # on a GPU: about 5-6 minutes
  python benchmarks/gpu_gmm_tune.py --quick          # CPU smoke run (interpreted, tiny)

GpuGmm (routed/kernels/gpu_gmm.py) runs three kernels: gmm (rows x w[e]), dgmm (the
rows' gradient, rows x w[e]^T) and tgmm (the weight gradient). Each takes a launch
shape, Blocks(k, n, warps, stages): the bk x bn column block, and Triton's warps and
pipeline stages. For [T, 1024] x [E, 1024, 4096], T = 16,384, E in {8, 32, 128}, in
each of --dtypes, each kernel is timed alone at every candidate shape (CANDIDATES),
at the row tile the dispatch picks (--tile128: also at 128), until --budget_s. Per
dtype and kernel, the shape with the least total time over E at the dispatch's row
tile is set as GpuGmm's default for this process, and dispatch_gpu.py then runs with
--dispatch_args (its correctness section first, so the chosen shapes are checked
against float64). A candidate that fails to compile (shared memory) is listed and
skipped. Writes $OUT/gpu_gmm_tune.json when OUT is set.
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

# Candidate launch shapes, by dtype: the shared memory a stage takes (row tile x bk +
# bk x bn elements) doubles in float32, so its candidates are smaller.
CANDIDATES = {
    'bfloat16': [Blocks(64, 256, 8, 3), Blocks(64, 128, 4, 3), Blocks(64, 256, 8, 4),
                 Blocks(64, 256, 4, 3), Blocks(128, 128, 4, 4), Blocks(64, 128, 4, 4),
                 Blocks(64, 128, 8, 4), Blocks(32, 256, 8, 3), Blocks(128, 256, 8, 2),
                 Blocks(64, 512, 8, 3), Blocks(32, 64, 4, 2)],
    'float32': [Blocks(32, 64, 4, 2), Blocks(32, 128, 4, 3), Blocks(64, 64, 4, 3),
                Blocks(32, 128, 8, 3), Blocks(64, 128, 8, 2), Blocks(16, 128, 4, 3),
                Blocks(32, 256, 8, 2), Blocks(64, 256, 8, 3), Blocks(64, 128, 4, 3)],
}


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
  p.add_argument('--dtypes', default='bfloat16,float32')
  p.add_argument('--tile128', action='store_true',
                 help='also time every shape at a row tile of 128 (where T / E >= 128)')
  p.add_argument('--budget_s', type=float, default=240.0, help='for the sweep')
  p.add_argument('--windows', type=int, default=5)
  p.add_argument('--window_s', type=float, default=0.05)
  p.add_argument('--dispatch_args', default='--skip=ragged,einsum --budget_s=200',
                 help="dispatch_gpu.py's arguments for the rerun ('none': no rerun)")
  opts = p.parse_args(argv)
  q = opts.quick
  t, d, f = (256, 64, 96) if q else (16384, 1024, 4096)
  experts = (4, 8) if q else (8, 32, 128)
  if q:
    opts.windows, opts.window_s = 2, 0.01
  out = {'device': dg.R['device'], 'T': t, 'D': d, 'F': f, 'times': [], 'failed': [],
         'skipped': []}
  start = time.perf_counter()
  tiles = [lambda e: 16] if q else [lambda e: row_tile(t, e, 16, gpu_gmm.ROW_TILE)]
  if opts.tile128 and not q:
    tiles.append(lambda e: 128 if t // e >= 128 else None)
  for dt in opts.dtypes.split(','):
    cands = CANDIDATES[dt][:2] if q else CANDIDATES[dt]
    for tile_of in tiles:
      for e in experts:
        tile = tile_of(e)
        if tile is None:
          continue
        pb = dg.problem(t, e, d, f, jnp.dtype(dt), tile)
        for c in cands:
          if time.perf_counter() - start > opts.budget_s:
            out['skipped'].append(f'{dt} tile {tile} E={e} {c}')
            continue
          impl = GpuGmm(tile, c, c, c, interpret=not dg.ON_GPU)
          for name, (fn, args) in kernels(pb, impl).items():
            case = f'{dt} tile {tile} E={e} {name} {c}'
            try:
              ms, comp, _ = dg.timed(fn, args, opts)
            except Exception as err:  # pylint: disable=broad-except
              out['failed'].append(f'{case}: {type(err).__name__}')
              dg.log(f'  FAILED {out["failed"][-1]}')
              continue
            out['times'].append(dict(dtype=dt, kernel=name, tile=tile, E=e, ms=ms,
                                     blocks=list(c.__dict__.values()),
                                     tflops=2 * t * d * f / ms / 1e9))
            dg.log(f"  {case}: {ms:.3f} ms ({out['times'][-1]['tflops']:.0f} TFLOP/s, "
                   f'compile {comp:.1f} s)')
        del pb
  best = choose(out, experts)
  out['best'] = {f'{dt} {k}': (list(b.__dict__.values()), ms) for (dt, k), (b, ms) in best.items()}
  if os.environ.get('OUT'):
    with open(os.path.join(os.environ['OUT'], 'gpu_gmm_tune.json'), 'w') as fh:
      json.dump(out, fh, indent=1)
  report(out, experts)
  if opts.dispatch_args == 'none' or not best:
    return 0
  for (dt, k), (blocks, _) in best.items():
    gpu_gmm.DEFAULT_BLOCKS[jnp.dtype(dt).itemsize][k] = blocks
  dg.log(f'\nrerunning dispatch_gpu.py {opts.dispatch_args} with GpuGmm defaults '
         f'{gpu_gmm.DEFAULT_BLOCKS} (row tile as the dispatch picks it)\n')
  return dg.main(opts.dispatch_args.split() + (['--quick'] if q else []))


def choose(out, experts):
  """(dtype, kernel) -> (Blocks, total ms over E) with the least total at the dispatch's tile."""
  totals = {}
  for r in out['times']:
    if r['tile'] <= gpu_gmm.ROW_TILE:
      totals.setdefault((r['dtype'], r['kernel']), {}).setdefault(
          tuple(r['blocks']), {})[r['E']] = r['ms']
  best = {}
  for key, by_blocks in totals.items():
    full = {b: sum(v.values()) for b, v in by_blocks.items() if len(v) == len(experts)}
    if full:
      b = min(full, key=full.get)
      best[key] = (Blocks(*b), full[b])
  return best


def report(out, experts):
  dg.log(f"\n## gpu_gmm_tune: {out['device']}, [{out['T']}, {out['D']}] x "
         f"[E, {out['D']}, {out['F']}]: ms (TFLOP/s)\n")
  rows = {}
  for r in out['times']:
    rows.setdefault((r['dtype'], r['kernel'], r['tile'], tuple(r['blocks'])), {})[r['E']] = r
  dg.log('| dtype | kernel | row tile | bk, bn, warps, stages | '
         + ' | '.join(f'E={e}' for e in experts) + ' |\n|' + '---|' * (4 + len(experts)))
  for (dt, name, tile, blocks), by_e in sorted(rows.items()):
    cells = [f"{by_e[e]['ms']:.3f} ({by_e[e]['tflops']:.0f})" if e in by_e else '-'
             for e in experts]
    dg.log(f'| {dt} | {name} | {tile} | {", ".join(map(str, blocks))} | ' + ' | '.join(cells) + ' |')
  dg.log(f"\nchosen (least total over E at the dispatch's row tile): {out['best']}")
  dg.log(f"failed: {out['failed']}\nskipped (time guard): {len(out['skipped'])}")


if __name__ == '__main__':
  sys.exit(main())
