"""The data path's speed: prepare, read, resume, and the quickstart's first use.

  python benchmarks/data.py                          # every section, ~5 minutes here
  python benchmarks/data.py --corpus_mb=4 --sections=reader,resume
  python benchmarks/data.py --sections=stdlib --compare_checkout=/tmp/routed-old

Sections (a Markdown table each):
  prepare  MB/s of C4-layout json.gz input per core: `routed.data.prepare --workers=1`
           over files written here in the released C4 layout (one JSON object per line
           with text, timestamp and url). The text is the embedded Python corpus cut into
           ~2 KB documents (C4's median is ~2 KB), since no web text ships with Python.
  reader   examples/s and tokens/s of the Grain reader (`PreparedDataset.train_batches`,
           its threads and read-ahead included) with this process pinned to one core,
           against the tokens/s one TPU v5p host (4 chips) must be fed to train
           configs/switch_base.py at 50% MFU: 4 x 459 TFLOP/s (bf16 peak) x 0.5 /
           train FLOPs per token (routed.model.accounting, vocabulary 32,000).
  resume   time to the first batch when training starts at step 10 and at step
           1,000,000 of the same prepared data (the dataset opened afresh each time),
           in interleaved rounds; medians.
  stdlib   wall time of the quickstart's first data preparation (vocabulary 4,096,
           seq_len 128, a fresh data dir, its own process); with --compare_checkout, the
           same call into another checkout of routed (e.g. the commit before this data
           path) in alternating rounds.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dispatch import cpu_name  # pylint: disable=g-import-not-at-top,wrong-import-position
from routed import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = {'sections': 'prepare,reader,resume,stdlib', 'corpus_mb': 24.0, 'files': 4,
         'vocab_size': 16000, 'seq_len': 512, 'batch_size': 256, 'read_batches': 40,
         'rounds': 3, 'workdir': '', 'compare_checkout': ''}

V5P_CHIPS_PER_HOST = 4
V5P_BF16_FLOPS = 459e12   # per chip, dense bf16 peak
TARGET_MFU = 0.5
DOC_CHARS = 2000          # documents of about C4's median length
STDLIB_SNIPPET = """
import sys, time, tempfile
from routed.config import base_config
from routed.data.load import load_dataset
data = base_config().data
data.task, data.vocab_size, data.data_dir = 'stdlib', 4096, tempfile.mkdtemp(dir=sys.argv[1])
start = time.perf_counter()
load_dataset(data, 128)
print(f'FIRST_USE_S {time.perf_counter() - start:.3f}')
"""


def machine() -> str:
  return f'{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}'


@contextlib.contextmanager
def one_core():
  """Pins this process (and the threads it starts) to one CPU while inside."""
  before = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {min(before)})
  try:
    yield
  finally:
    os.sched_setaffinity(0, before)


def documents(limit_chars: int):
  """~DOC_CHARS-character documents cut at line ends from the embedded corpus."""
  from routed.data import corpus  # pylint: disable=g-import-not-at-top
  root, total = corpus.stdlib_root(), 0
  for rel in corpus.corpus_files('full', root)['train']:
    text, start = corpus.read_source(root, rel), 0
    while start < len(text):
      end = text.find('\n', start + DOC_CHARS)
      end = len(text) if end < 0 else end + 1
      yield text[start:end]
      total += end - start
      start = end
      if total >= limit_chars:
        return


def write_c4_layout(directory: str, mb: float, files: int) -> list[str]:
  """json.gz files named and laid out as the released C4 (en) files."""
  os.makedirs(directory, exist_ok=True)
  names = [os.path.join(directory, f'c4-train.{i:05d}-of-{files:05d}.json.gz')
           for i in range(files)]
  outs = [gzip.open(n, 'wt', encoding='utf-8') for n in names]
  for i, text in enumerate(documents(int(mb * 1e6))):
    outs[i % files].write(json.dumps({'text': text, 'timestamp': '2019-04-25T12:57:54Z',
                                      'url': f'https://example.org/{i}'}) + '\n')
  for out in outs:
    out.close()
  return names


def prepare_section(args, work: str) -> str:
  """Writes the corpus, trains its vocabulary, times a one-worker prepare."""
  from routed.data import prepare, records, vocab  # pylint: disable=g-import-not-at-top
  inputs = write_c4_layout(os.path.join(work, 'c4'), args['corpus_mb'], args['files'])
  raw = sum(len(line) for n in inputs for line in gzip.open(n, 'rb'))
  packed = sum(os.path.getsize(n) for n in inputs)
  vocab_file = os.path.join(work, 'vocab.model')
  start = time.perf_counter()
  texts = [json.loads(line)['text'] for n in inputs for line in gzip.open(n, 'rt')]
  with open(vocab_file, 'wb') as f:
    f.write(vocab.train_sentencepiece(texts, args['vocab_size'], '--vocab_size'))
  vocab_s = time.perf_counter() - start
  output = os.path.join(work, 'prepared')
  start = time.perf_counter()
  rc = prepare.main([f'--input={os.path.join(work, "c4", "*.json.gz")}',
                     f'--output={output}', f'--vocab={vocab_file}',
                     f'--seq_len={args["seq_len"]}', '--workers=1', '--noprogress'])
  seconds = time.perf_counter() - start
  if rc:
    raise SystemExit(f'prepare failed with exit code {rc}')
  index = records.read_index(output)
  tokens = sum(s['tokens'] for s in index['splits'].values())
  return '\n'.join([
      f'Input: {len(inputs)} C4-layout json.gz files, {packed / 1e6:.1f} MB gzipped '
      f'({raw / 1e6:.1f} MB of JSON lines); vocabulary {args["vocab_size"]} pieces '
      f'(trained in {vocab_s:.1f} s, not counted below); seq_len '
      f'{args["seq_len"]}.', '',
      '| workers | wall s | json.gz MB/s per core | JSON MB/s per core | tokens/s per core |',
      '|---|---|---|---|---|',
      f'| 1 | {seconds:.1f} | {packed / 1e6 / seconds:.2f} | {raw / 1e6 / seconds:.2f} | '
      f'{tokens / seconds:,.0f} |'])


def v5p_host_demand(vocab_size: int = 32000) -> tuple[float, float]:
  """(tokens/s one v5p host consumes training switch_base at TARGET_MFU, FLOPs/token)."""
  from routed.model.accounting import model_size  # pylint: disable=g-import-not-at-top
  cfg = cli.load_config(os.path.join(ROOT, 'configs', 'switch_base.py'))
  flops = model_size(cfg, vocab_size).train_flops_per_token
  return V5P_CHIPS_PER_HOST * V5P_BF16_FLOPS * TARGET_MFU / flops, flops


def reader_section(args, output: str) -> str:
  from routed.data.reader import PreparedDataset  # pylint: disable=g-import-not-at-top
  ds = PreparedDataset(output, args['seq_len'])
  b, n = args['batch_size'], args['read_batches']
  rates = []
  with one_core():
    for r in range(args['rounds']):
      batches = ds.train_batches(r * 10 * n, b, seed=0)
      next(batches)  # threads started, read-ahead filled: what the loop sees in a run
      start = time.perf_counter()
      for _ in range(n):
        next(batches)
      rates.append(n * b / (time.perf_counter() - start))
  examples = statistics.median(rates)
  tokens = examples * args['seq_len']
  demand, flops = v5p_host_demand()
  return '\n'.join([
      f'Batches of {b} x {args["seq_len"]}+1 from {ds.num_train_sequences} train examples '
      f'(in the page cache), {n} batches a round, {args["rounds"]} rounds, one core.', '',
      '| reader examples/s | reader tokens/s | v5p host demand tokens/s | reader / demand |',
      '|---|---|---|---|',
      f'| {examples:,.0f} | {tokens:,.0f} | {demand:,.0f} | {tokens / demand:.1f}x |', '',
      f'Demand: configs/switch_base.py, {flops / 1e9:.2f} GFLOP per trained token; '
      f'{V5P_CHIPS_PER_HOST} chips x {V5P_BF16_FLOPS / 1e12:.0f} TFLOP/s x '
      f'{TARGET_MFU:.0%} MFU.'])


def resume_section(args, output: str) -> str:
  from routed.data.reader import PreparedDataset  # pylint: disable=g-import-not-at-top
  starts = (10, 1_000_000)
  times = {s: [] for s in starts}
  for _ in range(args['rounds'] * 2):
    for s in starts:
      start = time.perf_counter()
      ds = PreparedDataset(output, args['seq_len'])
      next(ds.train_batches(s, args['batch_size'], seed=0))
      times[s].append(time.perf_counter() - start)
  med = {s: statistics.median(v) for s, v in times.items()}
  rows = [f'| {s:,} | {med[s] * 1e3:.0f} | {min(times[s]) * 1e3:.0f}-'
          f'{max(times[s]) * 1e3:.0f} |' for s in starts]
  return '\n'.join([
      f'Open the prepared directory, start the threaded iterator at the step, take its '
      f'first batch ({args["batch_size"]} x {args["seq_len"]}+1); {len(times[10])} '
      'interleaved rounds.', '',
      '| start step | median ms to first batch | range ms |', '|---|---|---|', *rows, '',
      f'Ratio step 1,000,000 / step 10: {med[1_000_000] / med[10]:.2f}.'])


def first_use(checkout: str, work: str) -> float:
  env = dict(os.environ, PYTHONPATH=checkout, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', STDLIB_SNIPPET, work], cwd=checkout, env=env,
                       capture_output=True, text=True, check=True)
  return float(out.stdout.split('FIRST_USE_S')[1])


def stdlib_section(args, work: str) -> str:
  checkouts = {'this checkout': ROOT}
  if args['compare_checkout']:
    checkouts[args['compare_checkout']] = os.path.abspath(args['compare_checkout'])
  rounds = max(1, args['rounds'] - 1)
  times = {name: [] for name in checkouts}
  for _ in range(rounds):
    for name, path in checkouts.items():
      times[name].append(first_use(path, work))
  rows = [f'| {name} | {statistics.median(v):.1f} | {min(v):.1f}-{max(v):.1f} |'
          for name, v in times.items()]
  return '\n'.join([
      f'`load_dataset` for data.task=stdlib, vocab 4096, seq_len 128, fresh data dir, '
      f'{rounds} alternating rounds.', '',
      '| code | median s | range s |', '|---|---|---|', *rows])


def main(argv=None) -> int:
  _, args = cli.parse(sys.argv[1:] if argv is None else argv, FLAGS)
  sections = args['sections'].split(',')
  unknown = set(sections) - {'prepare', 'reader', 'resume', 'stdlib'}
  if unknown:
    print(f'--sections: unknown {sorted(unknown)}', file=sys.stderr)
    return 2
  work = args['workdir'] or tempfile.mkdtemp(prefix='routed_data_bench_')
  output = os.path.join(work, 'prepared')
  flags = ' '.join(a for a in (sys.argv[1:] if argv is None else argv))
  print(f'Command: python benchmarks/data.py {flags}'.rstrip())
  print(f'Machine: {machine()}; date {time.strftime("%Y-%m-%d")}\n')
  if ({'reader', 'resume'} & set(sections) and 'prepare' not in sections and
      not os.path.isfile(os.path.join(output, 'index.json'))):
    sections.insert(0, 'prepare')
  for name in sections:
    section = {'prepare': lambda: prepare_section(args, work),
               'reader': lambda: reader_section(args, output),
               'resume': lambda: resume_section(args, output),
               'stdlib': lambda: stdlib_section(args, work)}[name]
    print(f'### {name}\n\n{section()}\n', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
