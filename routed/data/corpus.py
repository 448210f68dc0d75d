"""The embedded default corpus: the running Python's standard library source.

Pure Python (no TensorFlow), so the file list and split can be tested and
inspected cheaply. routed.data.load prepares it like any other corpus (one
document per file); everything here is deterministic given the stdlib on disk.

Sizes on CPython 3.11: ~1,790 `*.py` files, ~31.5 M characters (full); the
`mini` config keeps ~1.5 MB of train text and ~0.15 MB of validation text.
"""

from __future__ import annotations

import hashlib
import io
import os
import sysconfig
import tokenize

# Fraction of files (by hash of their relative path) held out for validation,
# in thousandths. Splitting by file, not by chunk, keeps near-duplicate text
# from one module out of both splits.
VALIDATION_PER_MILLE = 30

# `mini` config: files taken in hash order until these character budgets are
# met; files larger than MINI_MAX_FILE_CHARS are skipped so that one huge
# generated module cannot dominate the small corpus.
MINI_TRAIN_CHARS = 1_500_000
MINI_VALIDATION_CHARS = 150_000
MINI_MAX_FILE_CHARS = 60_000

_EXCLUDED_DIRS = ('site-packages', 'dist-packages', '__pycache__')

def stdlib_root() -> str:
  """Directory of the running interpreter's standard library."""
  return os.path.realpath(sysconfig.get_paths()['stdlib'])


def list_stdlib_files(root: str | None = None) -> list[str]:
  """Sorted POSIX-style relative paths of all stdlib `*.py` files.

  Third-party packages (site-packages/dist-packages) are excluded: they differ
  between machines and are not "the standard library".
  """
  root = root or stdlib_root()
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    for name in filenames:
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(dirpath, name), root)
        found.append(rel.replace(os.sep, '/'))
  return sorted(found)


def _hash(salt: str, relpath: str) -> int:
  digest = hashlib.sha256(f'{salt}:{relpath}'.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big')


def split_of(relpath: str) -> str:
  """'train' or 'validation' for a file; a pure function of its path."""
  in_validation = _hash('routed-split', relpath) % 1000 < VALIDATION_PER_MILLE
  return 'validation' if in_validation else 'train'


def read_source(root: str, relpath: str) -> str:
  """The text of one source file, decoded the way Python would decode it.

  Honours PEP 263 coding cookies; the few test files with deliberately broken
  cookies fall back to UTF-8 with replacement characters. Line endings are
  kept as they are on disk.
  """
  with open(os.path.join(root, relpath), 'rb') as f:
    raw = f.read()
  try:
    encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    text = raw.decode(encoding)
  except (SyntaxError, LookupError, UnicodeDecodeError):
    text = raw.decode('utf-8', errors='replace')
  return text.removeprefix('\ufeff')  # BOM is an encoding marker, not text


def _mini_subset(root: str, relpaths: list[str], budget: int) -> list[str]:
  """Files in (salted) hash order until `budget` characters are collected."""
  chosen, total = [], 0
  for rel in sorted(relpaths, key=lambda p: (_hash('routed-mini', p), p)):
    if total >= budget:
      break
    size = os.path.getsize(os.path.join(root, rel))  # bytes ~ chars for code
    if size > MINI_MAX_FILE_CHARS or size == 0:
      continue
    chosen.append(rel)
    total += size
  return sorted(chosen)


def corpus_files(config: str, root: str | None = None) -> dict[str, list[str]]:
  """{'train': [...], 'validation': [...]} relative paths for a builder config.

  `full` is every file; `mini` is a deterministic ~1.6 MB subset whose
  validation part is chosen from validation files, so both splits of mini are
  non-empty and a file is in the same split in both configs.
  """
  root = root or stdlib_root()
  files = list_stdlib_files(root)
  splits = {'train': [], 'validation': []}
  for rel in files:
    splits[split_of(rel)].append(rel)
  if config == 'full':
    return splits
  if config == 'mini':
    return {
        'train': _mini_subset(root, splits['train'], MINI_TRAIN_CHARS),
        'validation': _mini_subset(root, splits['validation'],
                                   MINI_VALIDATION_CHARS),
    }
  raise ValueError(f'unknown stdlib corpus config {config!r}')
