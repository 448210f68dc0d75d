"""routed.aot: the full train step compiled ahead of time for a TPU topology (libtpu,
no TPU here), with expert parallelism and the Pallas kernels; and its bad inputs."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from routed.aot import topology_name
from routed.cli import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS_LIBTPU = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason="libtpu is not installed "
                                         "(pip install -e '.[test]' brings it)")


def run_aot(*args):
  """`python -m routed.aot ARGS` in a subprocess, from the repository root. JAX runs on
  the CPU; libtpu only compiles (its lock shared with any other jax process)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  return subprocess.run([sys.executable, '-m', 'routed.aot', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)


def skip_without_libtpu(proc):
  if proc.returncode == 3:
    pytest.skip(proc.stderr.strip().splitlines()[-1])


def assert_usage_error(proc, *words):
  """Exit 2 with one `routed.aot:` line naming words, and no traceback."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  lines = [l for l in proc.stderr.splitlines() if l.startswith('routed.aot:')]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  for word in words:
    assert word in lines[0], lines[0]
  assert not proc.stdout.strip()


def test_topology_name():
  """Cloud TPU types -> the topology names libtpu accepts (largest dimensions last, 1s
  at the end: v5p:1x2x2 is rejected, v5p:2x2x1 accepted)."""
  for spec, name in (('v4-8', 'v4:2x2x1'), ('v4-16', 'v4:2x2x2'), ('v4-32', 'v4:2x2x4'),
                     ('v5p-8', 'v5p:2x2x1'), ('v5p-16', 'v5p:2x2x2'),
                     ('v5p-64', 'v5p:2x4x4'), ('v5p-128', 'v5p:4x4x4'),
                     ('v5litepod-16', 'v5e:4x4'), ('v6e-4', 'v6e:2x2'), ('v6e-8', 'v6e:2x4'),
                     ('v6e-16', 'v6e:4x4'), ('v5p:2x2x1', 'v5p:2x2x1')):
    assert topology_name(spec) == name, spec
  for bad in ('v9-8', 'v5p', 'v5p-x', 'v5p-0', 'v6e-12'):
    with pytest.raises(UsageError, match='--topology'):
      topology_name(bad)


@NEEDS_LIBTPU
@pytest.mark.slow
def test_switch_tiny_compiles_for_v5p_with_expert_parallelism_and_pallas():
  proc = run_aot('--config=configs/switch_base.py:tiny', '--topology=v5p:2x2x1',
                 '--config.mesh.data=1', '--config.mesh.expert=4', '--config.moe.dispatch=pallas')
  skip_without_libtpu(proc)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report['devices'] == 4 and report['chips'] == 4
  assert report['mesh'] == {'data': 1, 'fsdp': 1, 'expert': 4, 'tensor': 1}
  # The Mosaic (Pallas TPU) grouped-matmul kernels are in the compiled train step.
  assert report['mosaic_kernels'] > 0
  assert 'routed_gmm_tpu' in report['routed_kernels']
  assert report['params_gib'] > 0 and report['opt_state_gib'] > 0
  assert report['total_gib'] > 0 and report['fits'] is True
  assert report['total_gib'] <= report['hbm_gib'] == pytest.approx(95.0)
  assert report['compiled_tflop_per_step'] > 0 and report['model_tflop_per_step'] > 0
  assert 0 < report['mfu_upper_bound'] <= 1
  # libtpu compiled without a TPU host and said nothing about it (routed/platforms.py).
  assert not any(n in proc.stderr for n in ('host bounds', 'TPU_WORKER_HOSTNAMES',
                                            'InitGoogle')), proc.stderr[-3000:]


@NEEDS_LIBTPU
def test_mesh_that_does_not_fit_the_topology_is_a_usage_error():
  proc = run_aot('--config=configs/switch_base.py:tiny', '--topology=v5p:2x2x1',
                 '--config.mesh.data=3')
  skip_without_libtpu(proc)
  assert_usage_error(proc, 'mesh', 'v5p:2x2x1')


def test_bad_topology_is_a_usage_error():
  # Rejected before libtpu is loaded: no skip needed.
  assert_usage_error(run_aot('--config=configs/switch_base.py:tiny', '--topology=v9-8'),
                     '--topology', 'v9-8')
