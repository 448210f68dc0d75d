"""Sweeps: many training runs from one config file, resumable, gathered into curves.

  python -m routed.sweep --config=configs/sweeps/unified_scaling.py:cpu --workdir=DIR

Modules, one concept each:

  spec     the sweep config format (base train config + points of overrides) and the
           FILE:VARIANT@HYPER_ID variant that gives one point's train config
  runner   planning (checks), point status, launching (subprocess, in-process, print),
           the progress bar and the lock on DIR
  collect  curves rows of finished points, in the paper's curves.csv schema
  cli      the `python -m routed.sweep` command line
  reeval   `python -m routed.sweep.reeval`: finished points re-evaluated with other
           evaluation settings (e.g. no capacity dropping), without retraining

Analysis of DIR/curves.csv: routed.scaling (`python -m routed.scaling fit --curves=...`).
"""
