"""Importing TensorFlow (and seqio/TFDS, which import it) quietly and safely.

TF is only needed to *prepare* data; the trainer runs on JAX. So TF is
imported lazily through `import_tf()`, which
  * sets TF_CPP_MIN_LOG_LEVEL=3 first (unless the user chose a level);
  * swallows the C++ banner lines TF 2.21 prints at import even at that level
    (oneDNN notice, "could not find cuda drivers"), passing other output on;
  * hides GPUs from TF so it never grabs accelerator memory JAX needs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

# Lines TF prints on every import that carry no information for us.
_NOISE = ('All log messages before absl::InitializeLog()', 'port.cc:',
          'cudart_stub.cc:', 'cuda_dnn.cc', 'cuda_fft.cc', 'cuda_blas.cc',
          'computation_placer.cc', 'This TensorFlow binary is optimized',
          'cuda_platform.cc', 'failed call to cuInit',
          'To enable the following instructions', 'oneDNN custom operations',
          # tf_text's SentencePiece op, once per tokenizer instance:
          'precompiled_charsmap is empty')

_tf = None


@contextlib.contextmanager
def quiet_native_logs():
  """Capture fd 2 (C++ logs bypass sys.stderr) and replay non-noise lines.

  Output is delayed until the block ends, so wrap whole stages, not
  interactive code.
  """
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError):  # no real fd 2 (e.g. some notebook setups)
    yield
    return
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      for line in tmp.read().decode('utf-8', 'replace').splitlines():
        if line.strip() and not any(n in line for n in _NOISE):
          print(line, file=sys.stderr)


def import_tf():
  """Import and return `tensorflow`, quietly and CPU-only."""
  global _tf
  if _tf is not None:
    return _tf
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  with quiet_native_logs():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      # Enumerating GPUs here may log a cuInit failure on CPU-only hosts.
      tf.config.set_visible_devices([], 'GPU')
    except (RuntimeError, ValueError):
      pass  # devices already initialised by someone else; nothing to do
  _tf = tf
  return tf


def import_seqio():
  """Import seqio after TF has been imported the quiet way."""
  import_tf()
  with quiet_native_logs():
    import seqio  # pylint: disable=g-import-not-at-top
  return seqio


def _ensure_importlib_resources() -> None:
  """TFDS 4.9.10 uses the `importlib_resources` backport on every Python but
  only declares it for Python < 3.9 (tensorflow/datasets#11212), so building
  any dataset fails with ModuleNotFoundError. The stdlib `importlib.resources`
  (3.11+) has the same API; alias it when the backport is not installed.
  """
  try:
    import importlib_resources  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    import importlib.resources  # pylint: disable=g-import-not-at-top
    import importlib.resources.abc  # pylint: disable=g-import-not-at-top,unused-import
    sys.modules.setdefault('importlib_resources', importlib.resources)


def import_tfds():
  import_tf()
  _ensure_importlib_resources()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds
