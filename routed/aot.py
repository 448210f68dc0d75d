"""Compile a config's full train step for a TPU slice that is not here, and say whether
it fits: per-chip memory and FLOPs per step, before paying for the pod.

  python -m routed.aot --config=configs/switch_base.py --topology=v5p-64
  python -m routed.aot --config=configs/switch_base.py --topology=v5p:2x2x1 \\
      --config.mesh.expert=4 --config.moe.dispatch=pallas

--topology is a Cloud TPU type (v4-32, v5p-64, v5litepod-16, v6e-8: the name's number
counts TensorCores for v4 / v5p and chips for v5e / v6e) or a topology (v5p:2x4x4).
libtpu (`pip install 'jax[tpu]'`, in the test extra) compiles for it without TPU
hardware (routed/kernels/aot.py); the mesh comes from the config's `mesh` group over
the topology's devices, and the state, batch and train step are exactly routed.train's
(routed/train_state.py, routed/step.py), abstract: nothing is allocated.

Prints a table and one JSON line, per device (a v4 chip is two devices):
parameters, optimizer state, activations and temporaries (XLA's buffer assignment),
total against the device's HBM; FLOPs per step from XLA's cost analysis of the
compiled program, against the model's analytic FLOPs (routed/model/accounting.py):
model FLOPs / compiled FLOPs bounds the MFU the step can reach (compiled work
includes recomputation, dispatch, the optimizer...). XLA's count leaves out Mosaic
kernels (splash attention) and counts a scanned loop body once (model.scan_layers),
so the table says when either applies; compare FLOPs without scan_layers.

Exit status: 0 compiled and fits; 1 does not fit the HBM (compiled,
or refused by XLA while compiling, said in one line); 2 bad input (a mesh that does not fit the topology, say); 3 no libtpu.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from routed import cli

FLAGS = {'config': None, 'topology': None, 'vocab_size': 0}
HELP = cli.Help(
    command='python -m routed.aot', doc=__doc__,
    flags={'config': 'the config: FILE[:VARIANT], then --config.KEY=VALUE overrides',
           'topology': 'a Cloud TPU type (v5p-64, v6e-8, ...) or a topology (v5p:2x4x4)',
           'vocab_size': "the vocabulary (0: the data's, or 32,000 for c4 without data.path)"},
    exit_codes={0: 'compiled, and it fits', 1: 'it does not fit the HBM', 2: cli.BAD_INPUT,
                3: 'libtpu is not installed'},
    reads=cli.CONFIG_KEYS + ' (the mesh group lays the mesh over the topology)')
HBM_GIB_PER_CHIP = {'v4': 32, 'v5p': 95, 'v5e': 16, 'v6e': 32}
C4_VOCAB_SIZE = 32000  # routed.data.prepare's default vocabulary, for c4 without data.path
TOPOLOGY_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6': 'v6e', 'v5': 'v5p'}


def topology_name(spec: str) -> str:
  """'v5p-64' -> 'v5p:2x4x4', 'v4-8' -> 'v4:2x2x1'; 'v5p:2x2x1' stays. UsageError for
  anything else."""
  if ':' in spec:
    return spec
  kind, _, count = spec.partition('-')
  kind = TOPOLOGY_ALIASES.get(kind, kind)
  if kind not in HBM_GIB_PER_CHIP or not count.isdigit() or int(count) < 1:
    raise cli.UsageError(f'--topology: {spec!r} is not a TPU type like v4-32, v5p-64, '
                     'v5litepod-16, v6e-8 or a topology like v5p:2x2x1')
  chips = int(count) // 2 if kind in ('v4', 'v5p') else int(count)
  dims = [1, 1, 1] if kind in ('v4', 'v5p') else [1, 1]
  while math.prod(dims) < chips:
    dims[dims.index(min(dims))] *= 2
  if math.prod(dims) != chips:
    raise cli.UsageError(f'--topology: {spec!r} is not a power-of-two slice')
  # Cloud TPU's own names: ascending, 1s last (v5p-8 is v5p:2x2x1, v5p-16 v5p:2x2x2,
  # v5p-64 v5p:2x4x4, v6e-8 v6e:2x4); libtpu rejects v5p:1x2x2.
  dims.sort(key=lambda d: (d == 1, d))
  return f"{kind}:{'x'.join(str(d) for d in dims)}"


def shard_bytes(abstract_tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for leaf in __import__('jax').tree.leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def prepared_vocab_size(data_cfg) -> int:
  """The vocabulary size recorded in data.path's index (0 without one here)."""
  from routed.data import DataError, records  # pylint: disable=g-import-not-at-top
  path = data_cfg.get('path', '')
  try:
    index = records.read_index(path) if path and os.path.isdir(path) else None
  except DataError:
    index = None  # compiling needs only a size; training will name what is wrong
  return int(index['vocab']['pieces']) if index else 0


def compile_train_step(cfg, devices, vocab_size: int):
  """Lowers and compiles routed.train's step for devices; returns (compiled, params,
  opt_state, mesh, seconds the lowering and compiling took)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from routed import step as step_lib  # pylint: disable=g-import-not-at-top
  from routed.routing_state import init_state  # pylint: disable=g-import-not-at-top
  from routed.sharding import make_mesh  # pylint: disable=g-import-not-at-top
  from routed.train_state import abstract_state  # pylint: disable=g-import-not-at-top
  mesh = make_mesh(cfg.mesh, devices)
  optimizer = step_lib.optimizer_for(cfg, vocab_size)
  graphdef, params, opt_state, layout = abstract_state(cfg, vocab_size, mesh, optimizer)
  train_step = step_lib.make_train_step(graphdef, cfg, optimizer, layout)
  t = cfg.train
  row = jax.ShapeDtypeStruct((t.batch_size, t.seq_len + 1), jnp.int32, sharding=layout.batch)
  batch = {'tokens': row, 'segment_ids': row, 'positions': row}
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=layout.replicated)
  routing = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=layout.replicated),
      jax.eval_shape(lambda: init_state(cfg)))
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = train_step.lower(params, opt_state, routing, batch, step).compile()
  return compiled, params, opt_state, mesh, time.perf_counter() - start


def report(cfg, topology: str, devices, compiled, params, opt_state, mesh, vocab_size,
           compile_s: float) -> dict:
  from routed.kernels.aot import summary  # pylint: disable=g-import-not-at-top
  from routed.model.accounting import model_size  # pylint: disable=g-import-not-at-top
  kind = topology.split(':')[0]
  chips = len({tuple(d.coords) for d in devices})
  per_chip = len(devices) // chips
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = 1 << 30
  params_b, opt_b = shard_bytes(params), shard_bytes(opt_state)
  temp = mem.temp_size_in_bytes
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + temp + mem.generated_code_size_in_bytes)
  hbm = HBM_GIB_PER_CHIP[kind] * gib / per_chip
  t = cfg.train
  model_flops = model_size(cfg, vocab_size).train_flops_per_token * t.batch_size * t.seq_len
  compiled_flops = float(cost.get('flops', 0.0)) * len(devices)
  kernels = summary(compiled)
  # What attention ran: the splash kernel shows in the program as Mosaic calls by name.
  attention = cfg.model.attention
  ran = 'splash' if 'splash' in compiled.as_text() else (
      'reference' if attention == 'auto' else attention)
  return {
      'topology': topology, 'devices': len(devices), 'chips': chips,
      'mesh': dict(mesh.shape),
      'params_gib': params_b / gib, 'opt_state_gib': opt_b / gib,
      'activations_temp_gib': temp / gib, 'total_gib': total / gib, 'hbm_gib': hbm / gib,
      'fits': total <= hbm,
      'compiled_tflop_per_step': compiled_flops / 1e12, 'model_tflop_per_step': model_flops / 1e12,
      'mfu_upper_bound': model_flops / compiled_flops if compiled_flops else float('nan'),
      'mosaic_kernels': kernels['mosaic_kernels'], 'routed_kernels': kernels['routed_kernels'],
      'attention': f'{attention} -> {ran}' if attention != ran else ran,
      'remat': cfg.model.remat, 'microbatches': t.microbatches,
      'scan_layers': bool(cfg.model.scan_layers),
      'compile_s': compile_s,
  }


def table(r: dict) -> str:
  mesh = ' x '.join(f'{k}={v}' for k, v in r['mesh'].items())
  return '\n'.join([
      f"{r['topology']}: {r['chips']} chips, {r['devices']} devices, mesh {mesh}",
      f"per device: params {r['params_gib']:.2f} GiB + optimizer {r['opt_state_gib']:.2f} GiB"
      f" + activations/temporaries {r['activations_temp_gib']:.2f} GiB"
      f" = {r['total_gib']:.2f} GiB of {r['hbm_gib']:.1f} GiB HBM"
      f" ({'fits' if r['fits'] else 'DOES NOT FIT'})",
      f"per step: {r['compiled_tflop_per_step']:.3g} TFLOP compiled, "
      f"{r['model_tflop_per_step']:.3g} TFLOP model -> MFU at most {r['mfu_upper_bound']:.1%}"
      + (' (scan_layers: XLA counts the scanned body once, so compiled FLOPs are too low)'
         if r.get('scan_layers') else '')
      + (' (the splash kernels\' FLOPs are not in XLA\'s count)'
         if 'splash' in r.get('attention', '') else ''),
      f"attention {r['attention']}, remat {r['remat']}, microbatches {r['microbatches']}; "
      f"compiled in {r['compile_s']:.0f} s"])


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from routed.validate import validate_model, validate_mesh, validate_training  # pylint: disable=g-import-not-at-top
  try:
    cfg, flags = cli.parse(argv, FLAGS, HELP)
    validate_model(cfg)
    validate_training(cfg)
    topology = topology_name(flags['topology'])
  except cli.UsageError as e:
    print(f'routed.aot: {e}', file=sys.stderr)
    return 2
  from routed.kernels.aot import LIBTPU_UNAVAILABLE, topology_devices  # pylint: disable=g-import-not-at-top
  try:
    devices = topology_devices(topology)
  except Exception as e:  # pylint: disable=broad-except
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if 'Invalid' in message or 'topology' in message.lower():
      print(f'routed.aot: --topology={topology}: {message}', file=sys.stderr)
      return 2
    print(f'routed.aot: libtpu is not available ({message}); pip install "jax[tpu]"',
          file=sys.stderr)
    return LIBTPU_UNAVAILABLE
  vocab_size = flags['vocab_size'] or prepared_vocab_size(cfg.data) or (
      C4_VOCAB_SIZE if cfg.data.task == 'c4' else cfg.data.vocab_size)
  try:
    validate_mesh(cfg, len(devices))
  except cli.UsageError as e:
    print(f'routed.aot: {e} (topology {topology})', file=sys.stderr)
    return 2
  try:
    compiled, params, opt_state, mesh, seconds = compile_train_step(cfg, devices, vocab_size)
  except Exception as e:  # pylint: disable=broad-except
    # XLA refuses a program whose buffers exceed the HBM while compiling it.
    message = ' '.join(str(e).split())
    if 'RESOURCE_EXHAUSTED' not in message:
      raise
    print(f'routed.aot: does not fit {topology}: '
          f'{message[message.index("RESOURCE_EXHAUSTED"):][:300]}', file=sys.stderr)
    return 1
  result = report(cfg, topology, devices, compiled, params, opt_state, mesh, vocab_size,
                  seconds)
  print(table(result))
  print(json.dumps(result))
  return 0 if result['fits'] else 1


if __name__ == '__main__':
  sys.exit(main())
