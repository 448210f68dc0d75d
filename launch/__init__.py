"""Launchers for routed.train on a Cloud TPU pod slice (`python -m launch.tpu`) and on a
SLURM GPU cluster (`python -m launch.slurm`).

Repository tools, not part of the installed `routed` package: run them from the
repository root. They use only the standard library (plus the gcloud CLI for launch.tpu),
so a laptop without JAX can launch a run.
"""
