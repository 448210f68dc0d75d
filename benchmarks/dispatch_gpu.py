"""Pallas GPU grouped matmul vs ragged_dot vs dense, and whole MoE layers, on one GPU (issue 4).

  python3 benchmarks/dispatch_gpu.py           # on a GPU: about 3-4 minutes (--budget_s)
  python benchmarks/dispatch_gpu.py --quick    # CPU smoke run: tiny shapes, kernels interpreted

Shape letters as in routed/kernels/grouped.py: T rows (tokens, top-1), E experts, D, F
the widths. Three sections, each given a share of --budget_s; a case that would start
past its share is skipped (listed), and the tables still print at the end.
1. Correctness against float64 NumPy: GpuGmm (routed/kernels/gpu_gmm.py) through
   grouped_matmul (padded rows and the cotangent's unread rows are NaN) and
   gathered_grouped_matmul (gather fused), output and both gradients, with
   jax.lax.ragged_dot's error beside it; cases: widths off the blocks with an empty
   expert, one expert taking every row, a bf16 shape. Then a Switch layer (f32): pallas
   and ragged dispatch vs einsum with capacity E (nothing dropped), output and every
   gradient, and whether the Triton kernels are in the program. Error = max |got - ref|
   / max |ref| per tensor (FAIL past 1e-2 f32 (TF32 dots), 3e-2 bf16, or any NaN).
2. Kernels: [T, D] rows x w[e] [D, F], D 1024, F 4096; bf16 at T 16384 and 65536, f32
   at T 16384; E in {8, 32, 128}, uniform random experts. Forward, and forward +
   backward (out, d rows, d w): pallas (GpuGmm at the dispatch's row tile, rows
   pre-sorted and padded) and ragged (ragged_dot on the sorted rows) vs the dense
   [T, D] x [D, F] matmul of the same FLOPs (2 T D F, x3 with backward). GpuGmm runs
   with its default launch shapes (benchmarks/gpu_gmm_tune.py sweeps them).
3. Layer: Switch MoE (top-1, capacity factor 1.25 for gather/einsum, no jitter), 16 x 1024
   tokens, d_model 1024, d_ff 4096, ReLU, bf16 compute, f32 params, forward + backward
   (grads wrt params and x): gather, ragged, pallas (einsum at E 8) vs a dense FFN.
Timing: compile, one warm call, then --windows windows of back-to-back calls of about
--window_s each, synchronised at the end; the median per call. Prints progress and three
Markdown tables; writes $OUT/dispatch_gpu.json when OUT is set (after every section).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import sys
import time

os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.9')
faulthandler.enable()   # a crash inside XLA still shows which case it was

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from routed.config import base_config
from routed.kernels.gpu_gmm import ROW_TILE, Blocks, GpuGmm
from routed.kernels.grouped import Tiles, gathered_grouped_matmul, grouped_matmul
from routed.model.dispatch_dropless import row_tile
from routed.model.dropless import make_layout
from routed.model.moe import MoELayer
# pylint: enable=g-import-not-at-top,wrong-import-position

ON_GPU = jax.default_backend() == 'gpu'
TOL = {'float32': 1e-2, 'bfloat16': 3e-2}
R = {'device': jax.devices()[0].device_kind, 'jax': jax.__version__,
     'matmul_precision': str(jax.config.jax_default_matmul_precision),
     'correctness': [], 'kernels': [], 'layer': [], 'skipped': [], 'errors': []}
SKIP = set()   # --skip: impls / dispatches not to run


def log(*a):
  print(*a, flush=True)


def save():
  if os.environ.get('OUT'):
    with open(os.path.join(os.environ['OUT'], 'dispatch_gpu.json'), 'w') as f:
      json.dump(R, f, indent=1, default=str)


def timed(fn, args, opts):
  """(median ms per call, compile s, lowered text) of jit(fn)(*args)."""
  start = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  one = time.perf_counter() - start
  n = max(1, min(500, int(opts.window_s / max(one, 1e-6))))
  samples = []
  for _ in range(opts.windows if one < 1.0 else 2):
    start = time.perf_counter()
    for _ in range(n):
      out = compiled(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / n)
  return statistics.median(samples) * 1e3, compile_s, lowered.as_text()


def gmm_impl(t, e):
  if ON_GPU:
    return GpuGmm(row_tile(t, e, 16, ROW_TILE))
  return GpuGmm(16, *[Blocks(16, 16)] * 3, interpret=True)   # several, masked blocks


def problem(t, e, d, f, dtype, tile, experts=None, seed=0):
  """Inputs of one grouped matmul; experts int [T] (None: uniform random)."""
  expert = np.random.default_rng(seed).integers(0, e, t) if experts is None else experts
  lay = make_layout(jnp.asarray(expert, jnp.int32)[:, None], jnp.ones((t, 1), bool), e, tile)
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], (t, d)).astype(dtype)
  w = (jax.random.normal(k[1], (e, d, f)) * d ** -0.5).astype(dtype)
  ct = jax.random.normal(k[2], (t, f)).astype(dtype)
  dest, order = lay.dest[:, 0], jnp.asarray(np.argsort(expert, kind='stable'))
  pad = lambda a: jnp.full((lay.padded_rows, a.shape[1]), jnp.nan, dtype).at[dest].set(a)
  return dict(expert=np.asarray(expert), lay=lay, x=x, w=w, ct=ct, dest=dest, order=order,
              xp=pad(x), ctp=pad(ct), xs=x[order], cts=ct[order],
              sizes=jnp.asarray(np.bincount(expert, minlength=e), jnp.int32),
              tiles=Tiles(lay.tile_expert, lay.tile_rows, lay.used))


def with_grads(f):
  """f(a, w, aux) -> g(a, w, aux, ct) = (out, d a, d w), ct the output cotangent."""
  def g(a, w, aux, ct):
    out, pull = jax.vjp(lambda a, w: f(a, w, aux), a, w)
    return (out, *pull(ct))
  return g


def programs(pb, impl):
  """name -> (fn, args): forward and forward + backward of pallas and ragged."""
  pallas = lambda a, w, tiles: grouped_matmul(a, w, tiles, impl)
  pa, ra = (pb['xp'], pb['w'], pb['tiles'], pb['ctp']), (pb['xs'], pb['w'], pb['sizes'], pb['cts'])
  return {'pallas': (lambda a, w, tl, ct: pallas(a, w, tl), pa),
          'ragged': (lambda a, w, s, ct: jax.lax.ragged_dot(a, w, s), ra),
          'pallas+bwd': (with_grads(pallas), pa),
          'ragged+bwd': (with_grads(jax.lax.ragged_dot), ra)}


def rel_err(got, ref):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  if not np.isfinite(got).all():
    return float('inf')
  return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def check_kernels(name, t, e, d, f, dtype, experts):
  impl = gmm_impl(t, e)
  pb = problem(t, e, d, f, dtype, impl.tile, experts, seed=1)
  x, w, ct = (np.asarray(jnp.asarray(pb[k], jnp.float32), np.float64) for k in ('x', 'w', 'ct'))
  ex = pb['expert']
  ref = {'out': np.zeros(ct.shape), 'dx': np.zeros(x.shape), 'dw': np.zeros(w.shape)}
  for j in range(e):   # per expert (w[ex] would be T x D x F)
    m = ex == j
    ref['out'][m], ref['dx'][m], ref['dw'][j] = x[m] @ w[j], ct[m] @ w[j].T, x[m].T @ ct[m]
  lay, dest, inv = pb['lay'], pb['dest'], jnp.argsort(pb['order'])
  gathered = lambda a, w, tl: gathered_grouped_matmul(a, w, tl, lay.tokens_of_rows(),
                                                      lay.dest, impl)
  runs = {  # name: (fn, args, rows of out, rows of d rows in token order)
      'grouped_matmul': (lambda a, w, tl: grouped_matmul(a, w, tl, impl),
                         (pb['xp'], pb['w'], pb['tiles'], pb['ctp']), dest, dest),
      'gathered': (gathered, (pb['x'], pb['w'], pb['tiles'], pb['ctp']), dest, slice(None)),
      'ragged_dot': (jax.lax.ragged_dot, (pb['xs'], pb['w'], pb['sizes'], pb['cts']), inv, inv)}
  errs = {'ragged_dot': dict.fromkeys(ref, float('nan'))}
  for run, (fn, args, rows, drows) in runs.items():
    if run == 'ragged_dot' and 'ragged' in SKIP:
      continue
    out, dx, dw = jax.jit(with_grads(fn))(*args)
    errs[run] = {'out': rel_err(out[rows], ref['out']), 'dx': rel_err(dx[drows], ref['dx']),
                 'dw': rel_err(dw, ref['dw']),
                 'empty_dw_zero': not any(np.asarray(dw[j]).any() for j in set(range(e)) - set(ex))}
  tol = TOL[jnp.dtype(dtype).name]
  for run in ('grouped_matmul', 'gathered'):
    er = errs[run]
    ok = max(er['out'], er['dx'], er['dw']) <= tol and er['empty_dw_zero']
    row = dict(check=f'{name}: {run}', tol=tol, result='PASS' if ok else 'FAIL', **er,
               ragged=max(errs['ragged_dot'][q] for q in ref))
    R['correctness'].append(row)
    log(f"  {row['check']}: {row['result']} out {er['out']:.2e} d rows {er['dx']:.2e} "
        f"dw {er['dw']:.2e} (ragged_dot {row['ragged']:.2e}); empty experts' dw 0: "
        f"{er['empty_dw_zero']}")


def moe_layer(dispatch, e, d, f, dtype, cf=1.25):
  """(grads(state, x) -> (y, (d state, d x)), state) of one Switch MoE layer."""
  cfg = base_config().moe
  cfg.update(router='switch', num_experts=e, capacity_factor=cf, jitter=0.0, dispatch=dispatch)
  layer = MoELayer(cfg, d_model=d, d_ff=f, activation='relu', init_std=0.02, dtype=dtype,
                   param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    y, _ = nnx.merge(graphdef, state)(x, train=True)
    return jnp.sum(jnp.square(y.astype(jnp.float32))), y

  def grads(state, x):
    (_, y), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)
    return y, g
  return grads, state


def dense_ffn(d, f, dtype):
  """The dense FFN of the same active FLOPs: ReLU(x W1) W2, f32 weights used in dtype."""
  k = jax.random.split(jax.random.key(0), 2)
  w = (jax.random.normal(k[0], (d, f)) * 0.02, jax.random.normal(k[1], (f, d)) * 0.02)

  def loss(w, x):
    y = jax.nn.relu(x @ w[0].astype(dtype)) @ w[1].astype(dtype)
    return jnp.sum(jnp.square(y.astype(jnp.float32)))
  return jax.grad(loss, argnums=(0, 1)), w


def check_layer(g, s, d, f, e):
  x = jax.random.normal(jax.random.key(2), (g, s, d))
  ref_fn, state = moe_layer('einsum', e, d, f, jnp.float32, cf=float(e))
  ref = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.jit(ref_fn)(state, x))
  for dispatch in [n for n in ('pallas', 'ragged') if n not in SKIP]:
    fn, state = moe_layer(dispatch, e, d, f, jnp.float32)
    kernels = 'routed_gmm_gpu' in jax.jit(fn).lower(state, x).as_text()
    err = max(jax.tree.leaves(jax.tree.map(rel_err, jax.jit(fn)(state, x), ref)))
    ok = err <= TOL['float32'] and (kernels or dispatch != 'pallas' or not ON_GPU)
    R['correctness'].append(dict(check=f'Switch layer E={e} f32: {dispatch} vs einsum',
                                 out=err, tol=TOL['float32'], triton_kernels=kernels,
                                 result='PASS' if ok else 'FAIL'))
    log(f"  Switch layer {dispatch} vs einsum: {'PASS' if ok else 'FAIL'} max err {err:.2e} "
        f'(output and all gradients), Triton kernels in the program: {kernels}')


def attempt(what, fn, *args):
  try:
    return fn(*args)
  except Exception as err:  # pylint: disable=broad-except
    R['errors'].append({'case': what, 'error': f'{type(err).__name__}: {str(err)[:400]}'})
    log(f"  ERROR {what}: {R['errors'][-1]['error']}")
    return None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--quick', action='store_true', help='tiny shapes (CPU smoke run)')
  p.add_argument('--budget_s', type=float, default=200.0)
  p.add_argument('--windows', type=int, default=5)
  p.add_argument('--window_s', type=float, default=0.05)
  p.add_argument('--skip', default='', help='e.g. ragged,einsum: leave these out')
  p.add_argument('--sections', default='1,2,3', help='1 correctness, 2 kernels, 3 layer')
  opts = p.parse_args(argv)
  q = opts.quick
  SKIP.update(n for n in opts.skip.split(',') if n)
  d, f = (64, 96) if q else (1024, 4096)
  experts = (4, 8) if q else (8, 32, 128)
  shapes = [('bfloat16', 256)] if q else [('bfloat16', 16384), ('bfloat16', 65536),
                                          ('float32', 16384)]
  lg, ls, ld, lf = (2, 64, 32, 64) if q else (16, 1024, 1024, 4096)
  if q:
    opts.windows, opts.window_s = 2, 0.01
  start = time.perf_counter()

  def over(share, what):
    if time.perf_counter() - start < share * opts.budget_s:
      return False
    R['skipped'].append(what)
    log(f'  SKIPPED (time guard): {what}')
    return True

  log(f"device {R['device']}, jax {jax.__version__}, backend {jax.default_backend()}")
  sections = set(opts.sections.split(','))
  log('1. correctness')
  cases = [] if '1' not in sections else [('widths 200/300 off the blocks, expert 7 empty', 1000, 8, 200, 300, 'float32',
            np.random.default_rng(3).integers(0, 7, 1000)),
           ('one expert takes every row', 333, 4, 96, 160, 'float32', np.full(333, 2)),
           ('balanced, bf16', 4096, 32, 1024, 1024, 'bfloat16', None)]
  for name, t, e, dd, ff, dt, ex in cases:
    if q:
      t, dd, ff, ex = t // 4, dd // 4, ff // 4, None if ex is None else ex[:t // 4]
    if not over(0.22, f'check {name}'):
      attempt(name, check_kernels, name, t, e, dd, ff, jnp.dtype(dt), ex)
  if '1' in sections and not over(0.22, 'check Switch layer'):
    attempt('layer check', check_layer, 2, 64 if q else 256, 32 if q else 256,
            64 if q else 512, 8)
  R['pallas_verified'] = not (R['errors'] or R['skipped'] or
                              any(r['result'] == 'FAIL' for r in R['correctness']))
  log(f"pallas verified: {R['pallas_verified']}")
  save()

  log('2. kernels')
  def run_case(dt, t, e, name, fn, args):
    if name.split('+')[0] in SKIP:
      return
    ms, comp, _ = timed(fn, args, opts)
    tf = 2 * t * d * f * (3 if '+bwd' in name else 1) / ms / 1e9
    R['kernels'].append(dict(dtype=dt, T=t, E=e, impl=name, ms=ms, tflops=tf, compile_s=comp))
    log(f'  {dt} T={t} E={e} {name}: {ms:.3f} ms, {tf:.1f} TFLOP/s (compile {comp:.1f} s)')
  cases = [(dt, t, e) for dt, t in shapes for e in experts] if '2' in sections else []
  for dt, t, e in cases:
    if over(0.62, f'kernels {dt} T={t} E={e}'):
      continue
    pb = attempt('inputs', problem, t, e, d, f, jnp.dtype(dt), gmm_impl(t, e).tile)
    if pb is None:
      continue
    if e == experts[0]:   # the dense reference, once per (dtype, T)
      for name, fn in (('dense', lambda x, w, aux, ct: x @ w),
                       ('dense+bwd', with_grads(lambda x, w, aux: x @ w))):
        attempt(name, run_case, dt, t, 0, name, fn, (pb['x'], pb['w'][0], None, pb['ct']))
    for name, (fn, args) in programs(pb, gmm_impl(t, e)).items():
      attempt(f'{dt} T={t} E={e} {name}', run_case, dt, t, e, name, fn, args)
    del pb
  save()

  log('3. Switch layer forward + backward')
  x = jax.random.normal(jax.random.key(1), (lg, ls, ld)).astype(jnp.bfloat16)
  def run_layer(e, name):
    fn, params = dense_ffn(ld, lf, jnp.bfloat16) if e == 0 else moe_layer(
        name, e, ld, lf, jnp.bfloat16)
    ms, comp, text = timed(fn, (params, x.reshape(-1, ld) if e == 0 else x), opts)
    kernels = 'routed_gmm_gpu' in text
    R['layer'].append(dict(E=e, dispatch=name, ms=ms, compile_s=comp, triton_kernels=kernels))
    log(f'  E={e} {name}: {ms:.3f} ms (compile {comp:.1f} s)' +
        (f', Triton kernels in the program: {kernels}' if name == 'pallas' else ''))
  attempt('dense FFN', run_layer, 0, 'dense')
  for e in experts:
    for name in ('gather', 'ragged', 'pallas') + (('einsum',) if e == experts[0] else ()):
      if name not in SKIP and not over(1.0, f'layer E={e} {name}'):
        attempt(f'layer E={e} {name}', run_layer, e, name)
  R['elapsed_s'] = time.perf_counter() - start
  save()
  report(experts, shapes, (lg, ls, ld, lf), (d, f))
  return 0


def report(experts, shapes, layer_shape, widths):
  log(f"\n## dispatch_gpu: {R['device']}, jax {R['jax']}, {R['elapsed_s']:.0f} s\n")
  log('| check | out | d rows | d w | ragged_dot | tol | result |\n|---|---|---|---|---|---|---|')
  for r in R['correctness']:
    cells = [f"{r[k]:.1e}" if k in r else '' for k in ('out', 'dx', 'dw', 'ragged')]
    log(f"| {r['check']} | " + ' | '.join(cells) + f" | {r['tol']:g} | {r['result']} |")
  mark = '' if R['pallas_verified'] else ' !'   # ! = correctness failed or not checked
  k = {(r['dtype'], r['T'], r['E'], r['impl']): r for r in R['kernels']}
  impls = ('pallas', 'ragged')
  log(f'\nGrouped matmul [T, {widths[0]}] x [E, {widths[0]}, {widths[1]}]: '
      'ms (TFLOP/s, x dense)\n')
  log('| dtype | T | E | pass | dense | ' + ' | '.join(impls) + ' |\n|' + '---|' * 7)
  for dt, t in shapes:
    for e in experts:
      for ps in ('', '+bwd'):
        dense = k.get((dt, t, 0, 'dense' + ps))
        cells = [f"{dense['ms']:.3f} ({dense['tflops']:.0f})" if dense else '-']
        for i in impls:
          r = k.get((dt, t, e, i + ps))
          cells.append(f"{r['ms']:.3f} ({r['tflops']:.0f}, {r['ms'] / dense['ms']:.2f}x)"
                       + (mark if i.startswith('pallas') else '') if r and dense else '-')
        log(f"| {dt} | {t} | {e} | {'fwd+bwd' if ps else 'fwd'} | " + ' | '.join(cells) + ' |')
  lay = {(r['E'], r['dispatch']): r['ms'] for r in R['layer']}
  dense = lay.get((0, 'dense'))
  g, s, d, f = layer_shape
  log(f'\nSwitch layer fwd+bwd, {g}x{s} tokens, d_model {d}, d_ff {f}, bf16: ms (x dense); '
      f"dense FFN {f'{dense:.3f}' if dense else '-'} ms\n")
  names = ('gather', 'ragged', 'pallas', 'einsum')
  log('| E | ' + ' | '.join(names) + ' |\n|' + '---|' * 5)
  for e in experts:
    log(f'| {e} | ' + ' | '.join(f'{lay[(e, n)]:.3f} ({lay[(e, n)] / dense:.2f}x)'
                                 + (mark if n == 'pallas' else '')
                                 if (e, n) in lay and dense else '-' for n in names) + ' |')
  log(f"\nskipped (time guard): {len(R['skipped'])}; errors: {len(R['errors'])}; "
      f"FAIL: {sum(r['result'] == 'FAIL' for r in R['correctness'])}"
      + ('' if R['pallas_verified'] else '; ! = pallas not verified by section 1'))


if __name__ == '__main__':
  sys.exit(main())
