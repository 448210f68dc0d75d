"""routed: pretraining sparse ("routed") language models in JAX/Flax."""

from routed import platforms as _platforms

__version__ = "0.1.0"

# Before anything imports JAX: no libtpu start-up noise on machines without a TPU.
_platforms.only_cpu_without_accelerators()
