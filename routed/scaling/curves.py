"""Training curves in the schema of Clark et al. 2022's released `curves.csv.gz`, and
the final-step selection the paper's scaling laws are fitted on.

One row per run (`hyper_id`) and evaluation step. The same schema is read from the
paper's data (https://github.com/deepmind/scaling_laws_for_routing, `data/curves.csv.gz`,
CC-BY 4.0) and written by `routed.sweep` for our own runs, so one analysis reads both.
Units: losses are natural-log cross-entropy in nats per token (the paper's on MassiveText
with a 32k vocabulary; ours on our validation split with our vocabulary, so the two are
not comparable in absolute terms); parameter counts are numbers of parameters;
`flops_per_step` is FLOPs.

No pandas: a `Curves` is a dict of equal-length numpy columns (float64 for numbers,
str for text); that is all the fitting code needs.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import math
import os
import urllib.request

import numpy as np

PAPER_URL = ('https://github.com/deepmind/scaling_laws_for_routing/raw/main/'
             'data/curves.csv.gz')

# The released file's columns, in its order. `routed.sweep` writes these first (values it
# cannot measure, like the paper's downstream losses, are left empty), then EXTRA_COLUMNS.
PAPER_COLUMNS = (
    'hyper_id', 'step', 'loss_c4', 'loss_curation_corpus', 'loss_lambada', 'loss_pile',
    'loss_validation', 'loss_wikitext103', 'num_experts', 'd_model', 'num_blocks',
    'num_heads', 'kqv_size', 'flop_increase', 'k', 'router_type', 'seed',
    'routing_frequency', 'total_parameter_count', 'dense_parameter_count',
    'flops_per_step', 'model_size_label')
# Ours only: training cross-entropy (nats/token, mean over the last log interval),
# tokens seen so far, and the `moe.router` config value.
EXTRA_COLUMNS = ('loss_train', 'tokens', 'moe_router')
COLUMNS = PAPER_COLUMNS + EXTRA_COLUMNS
TEXT_COLUMNS = frozenset({'hyper_id', 'router_type', 'model_size_label', 'moe_router'})

ROUTER_TYPES = ('Dense', 'S-Base', 'RL-R', 'Hash')  # the paper's names


class Curves:
  """Equal-length columns: `curves['step']` is a float64 array, `curves['hyper_id']` str."""

  def __init__(self, columns: dict[str, np.ndarray]):
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
      raise ValueError(f'columns of different lengths: {sorted(lengths)}')
    self.columns = dict(columns)

  def __len__(self) -> int:
    return len(next(iter(self.columns.values()))) if self.columns else 0

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self.columns:
      raise KeyError(f'no column {name!r} (columns: {", ".join(self.columns)})')
    return self.columns[name]

  def __contains__(self, name: str) -> bool:
    return name in self.columns

  @property
  def names(self) -> list[str]:
    return list(self.columns)

  def where(self, mask) -> Curves:
    """The rows where the boolean mask (or index array) selects."""
    return Curves({k: v[mask] for k, v in self.columns.items()})

  def rows(self) -> list[dict]:
    """The rows as dicts (for printing and small tables)."""
    return [{k: v[i] for k, v in self.columns.items()} for i in range(len(self))]


def _column(name: str, values: list[str]) -> np.ndarray:
  if name in TEXT_COLUMNS:
    # The paper's hyper_ids are integers, ours are names: both are read as text.
    return np.array(values, dtype=str)
  return np.array([float(v) if v.strip() not in ('', 'nan', 'NaN') else math.nan
                   for v in values], dtype=np.float64)


def read_bytes(path_or_url: str) -> bytes:
  """The raw bytes of a local path or an http(s) URL."""
  if path_or_url.startswith(('http://', 'https://')):
    with urllib.request.urlopen(path_or_url, timeout=60) as response:
      return response.read()
  with open(os.path.expanduser(path_or_url), 'rb') as f:
    return f.read()


def parse_csv(data: bytes) -> Curves:
  """Curves from CSV bytes, gzip-compressed or not (detected from the magic bytes)."""
  if data[:2] == b'\x1f\x8b':
    data = gzip.decompress(data)
  reader = csv.reader(io.StringIO(data.decode('utf-8')))
  header = next(reader, None)
  if not header:
    raise ValueError('empty CSV: no header row')
  rows = list(reader)
  for i, row in enumerate(rows):
    if len(row) != len(header):
      raise ValueError(f'CSV row {i + 2} has {len(row)} fields, the header {len(header)}')
  return Curves({name: _column(name, [row[j] for row in rows])
                 for j, name in enumerate(header)})


def load_curves(path_or_url: str = PAPER_URL) -> Curves:
  """Reads a curves CSV (.csv or .csv.gz) from a local path or an http(s) URL."""
  return parse_csv(read_bytes(path_or_url))


def write_curves(path: str, rows: list[dict]) -> None:
  """Writes rows (dicts keyed by COLUMNS; missing keys are left empty) atomically."""
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(COLUMNS)
    for row in rows:
      writer.writerow([_format(row.get(name)) for name in COLUMNS])
  os.replace(tmp, path)


def _format(value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ''
  if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
    return str(int(value))
  return str(value)


def final_step(curves: Curves, loss_column: str = 'loss_validation') -> Curves:
  """One row per hyper_id: its last step with a finite loss.

  A few runs of the paper's data have an empty loss at their last step (248,000): as
  in the paper's example notebook (pandas groupby().last() skips missing values), the
  run's last finite evaluation is used instead.
  """
  loss, step, ids = curves[loss_column], curves['step'], curves['hyper_id']
  best: dict[str, int] = {}
  for i in np.flatnonzero(np.isfinite(loss)):
    if ids[i] not in best or step[i] > step[best[ids[i]]]:
      best[ids[i]] = i
  return curves.where(np.array(sorted(best.values()), dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class ScalingPoints:
  """The (N, E, L) points a scaling law is fitted on, one per run.

  n: dense parameter count N (parameters a token sees; ours: non-embedding), float64 [P].
  e: experts per routed layer E (1 for dense runs), float64 [P].
  loss: final validation loss L in nats/token, float64 [P].
  hyper_id, router_type, model_size_label: str [P], for tables and plots.
  """
  n: np.ndarray
  e: np.ndarray
  loss: np.ndarray
  hyper_id: np.ndarray
  router_type: np.ndarray
  model_size_label: np.ndarray

  def __len__(self) -> int:
    return len(self.n)

  def take(self, index) -> ScalingPoints:
    return ScalingPoints(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def select(curves: Curves, router_type: str, *, k: int = 1,
           routing_frequency: float | None = 0.5, seed: float | None = 42,
           loss_column: str = 'loss_validation') -> ScalingPoints:
  """The points of one router for the unified law, as the paper selects them.

  Final step of each run (`final_step`), top-k = k, routed every 1/routing_frequency
  blocks, the given seed (the paper's data repeats a few runs with seeds 1-3; 42 is
  the main one; None keeps every seed), plus the dense runs (router_type Dense, E = 1,
  flop_increase 1 or unset), which every router shares as its E = 1 points. Dense rows
  are kept whatever their routing_frequency (they have no routed layers; the paper
  records 0.5, `routed.sweep` records 0). router_type 'Dense' selects the dense runs only.
  """
  final = final_step(curves, loss_column)
  rtype = final['router_type']
  keep = np.ones(len(final), dtype=bool)
  if seed is not None:
    keep &= final['seed'] == seed
  routed = (rtype == router_type) & (final['k'] == k)
  if routing_frequency is not None:
    routed &= np.isclose(final['routing_frequency'], routing_frequency)
  flop_increase = final['flop_increase'] if 'flop_increase' in final else np.ones(len(final))
  dense = ((rtype == 'Dense') & (final['num_experts'] == 1) &
           (np.isnan(flop_increase) | (flop_increase == 1)))
  chosen = final.where(keep & (routed | dense))
  if router_type != 'Dense' and not np.any(chosen['router_type'] == router_type):
    known = sorted(set(final['router_type'].tolist()))
    raise ValueError(f'no runs of router_type {router_type!r} with k={k}, '
                     f'routing_frequency={routing_frequency}, seed={seed} '
                     f'(router types in the data: {", ".join(known)})')
  order = np.lexsort((chosen['num_experts'], chosen['dense_parameter_count']))
  chosen = chosen.where(order)
  labels = (chosen['model_size_label'] if 'model_size_label' in chosen
            else np.array([''] * len(chosen)))
  return ScalingPoints(n=chosen['dense_parameter_count'], e=chosen['num_experts'],
                       loss=chosen[loss_column], hyper_id=chosen['hyper_id'],
                       router_type=chosen['router_type'], model_size_label=labels)
