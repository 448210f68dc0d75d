"""routed: pretraining sparse ("routed") language models in JAX/Flax."""

__version__ = "0.1.0"
