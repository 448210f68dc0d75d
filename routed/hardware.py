"""Peak matmul throughput per accelerator, for the MFU routed.train reports.

MFU = tokens/s x model FLOPs per token (routed/model/accounting.py) / peak FLOP/s of
all the run's devices. train.peak_flops sets that peak; at 0 it is this table's figure
for the devices' kind (jax.Device.device_kind) times their count, and a device kind
not listed here (a CPU) gets no MFU. Figures are dense bfloat16 matmul FLOP/s per JAX
device (no structured sparsity), from the vendors' spec pages; a float32 model runs
below them, so its MFU reads low by design (the convention of PaLM's MFU).

  device_kind contains   FLOP/s     source
  TPU v4                 275e12     cloud.google.com/tpu/docs/v4 (per chip; a JAX device
                                    is a chip, its two TensorCores as one)
  TPU v5 lite (v5e)      197e12     cloud.google.com/tpu/docs/v5e
  TPU v5p / TPU v5       459e12     cloud.google.com/tpu/docs/v5p
  TPU v6 lite (v6e)      918e12     cloud.google.com/tpu/docs/v6e (Trillium)
  H100 / H200 (SXM)      989e12     nvidia.com H100 and H200 datasheets, BF16 Tensor Core
  H100 PCIe              756e12     nvidia.com H100 datasheet (PCIe)
  A100                   312e12     nvidia.com A100 datasheet
  B200                   2250e12    nvidia.com DGX B200 / HGX B200 datasheet (per GPU)
  L4                     121e12     nvidia.com L4 datasheet
"""

from __future__ import annotations

# (substring of device_kind, FLOP/s per device); the first match wins, so the more
# specific names come first.
PEAK_FLOPS = (
    ('TPU v6 lite', 918e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5', 459e12),        # v5p reports 'TPU v5p' or 'TPU v5'
    ('TPU v4', 275e12),
    ('H100 PCIe', 756e12),
    ('H100', 989e12),
    ('H200', 989e12),
    ('A100', 312e12),
    ('B200', 2250e12),
    ('L4', 121e12),
)


def peak_flops_per_device(device_kind: str) -> float:
  """This table's FLOP/s for a device kind, or 0.0 when it has none."""
  return next((flops for name, flops in PEAK_FLOPS if name in device_kind), 0.0)


def peak_flops(configured: float, devices) -> float:
  """train.peak_flops, or (at 0) the table's figure times the number of devices."""
  if configured:
    return configured
  devices = list(devices)
  return peak_flops_per_device(devices[0].device_kind) * len(devices) if devices else 0.0
