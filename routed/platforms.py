"""Which JAX platforms to start: keeps libtpu quiet on machines without a TPU.

With libtpu installed (jax[tpu], or routed's test extra, which compiles TPU kernels
ahead of time), JAX tries to start a TPU backend on every machine, and libtpu prints
a screen of start-up errors ("Failed to find host bounds", "INVALID_ARGUMENT ...
TPU_WORKER_HOSTNAMES") before JAX falls back to the CPU. When the machine has
neither a TPU nor a GPU, only_cpu_without_accelerators sets JAX_PLATFORMS=cpu before
JAX starts, and on any machine without a TPU it tells libtpu that there is no TPU host
to discover, so nothing is printed (routed.aot still compiles for TPU topologies). A
JAX_PLATFORMS the user set is left alone, and a TPU VM keeps JAX's own choice.
"""

from __future__ import annotations

import glob
import os

GOOGLE_PCI_VENDOR = '0x1ae0'   # TPU chips on the PCI bus (as jax's hardware_utils reads them)
TPU_OFF_HOST = {'TPU_SKIP_MDS_QUERY': '1', 'TPU_WORKER_HOSTNAMES': 'localhost',
                'TPU_HOST_BOUNDS': '1,1,1'}


def has_tpu() -> bool:
  for path in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(path) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def has_gpu() -> bool:
  return bool(glob.glob('/dev/nvidia[0-9]*') or os.path.exists('/dev/kfd'))


def only_cpu_without_accelerators() -> None:
  """Sets JAX_PLATFORMS=cpu when it is unset and there is no TPU or GPU. Call before
  JAX starts its backends (routed/__init__.py does, on import)."""
  if has_tpu():
    return
  # routed.aot loads libtpu for its compile-only topologies even then: these tell it
  # there is no TPU host to discover (one host, no metadata server), which it
  # otherwise reports at length. A running TPU VM sets its own.
  for name, value in TPU_OFF_HOST.items():
    os.environ.setdefault(name, value)
  if 'JAX_PLATFORMS' not in os.environ and not has_gpu():
    os.environ['JAX_PLATFORMS'] = 'cpu'
