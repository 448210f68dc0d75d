"""SentencePiece vocabulary for the stdlib corpus: training and caching.

The model is trained once per (corpus config, vocab size) on the train split
of the corpus and cached as `routed_vocab/<corpus>-v<size>-s<N>.model`.
Settings are chosen for source code:

* identity normalisation, no whitespace collapsing, no dummy prefix: the
  tokenizer must round-trip source exactly (indentation is syntax);
* whitespace-only pieces allowed, so runs of indentation become one token;
* byte_fallback: characters outside the learned set become UTF-8 byte tokens,
  so nothing maps to <unk>;
* ids 0/1/2 = pad/eos/unk, no bos: the T5/seqio convention seqio expects.

Training uses a deterministic sample of ~4 M characters (chunks of whole
lines, ordered by content hash) and a fixed seed and thread count, so the
model bytes are a function of the corpus alone (10-20 s for 4096 pieces on the
full corpus with 2 cores; training on all 31 M characters would take ~100 s
and compresses only ~1% better).
"""

from __future__ import annotations

import hashlib
import io
from typing import Iterable, Iterator

from routed.data import paths
from routed.data.errors import DataError, first_line

# Bump when training settings change, so old cached models are not reused.
SETTINGS_VERSION = 1

TRAIN_CHAR_BUDGET = 4_000_000  # characters of sampled text to train on
SENTENCE_CHARS = 2_000          # max characters per training "sentence"
NUM_THREADS = 4                 # fixed: float sums in EM depend on it
SEED = 0

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
# 256 byte pieces + pad/eos/unk + the characters of the corpus (~100 for
# Python source) must fit; below this SentencePiece training fails.
MIN_VOCAB_SIZE = 384


def split_into_sentences(text: str) -> Iterator[str]:
  """Chunks of whole lines (newlines kept) of at most SENTENCE_CHARS chars.

  SentencePiece learns pieces within a "sentence"; multi-line chunks let it
  see newline+indentation patterns, which dominate Python source.
  """
  chunk = ''
  for line in text.splitlines(keepends=True):
    while len(line) > SENTENCE_CHARS:  # rare: minified data, long literals
      if chunk:
        yield chunk
        chunk = ''
      yield line[:SENTENCE_CHARS]
      line = line[SENTENCE_CHARS:]
    if chunk and len(chunk) + len(line) > SENTENCE_CHARS:
      yield chunk
      chunk = ''
    chunk += line
  if chunk:
    yield chunk


def sample_sentences(texts: Iterable[str],
                     budget: int = TRAIN_CHAR_BUDGET) -> list[str]:
  """Deterministic sample: sentences in content-hash order up to `budget`.

  Hash order is independent of document order and spreads the sample across
  all files; it is also stable when the corpus grows.
  """
  keyed = []
  for text in texts:
    for s in split_into_sentences(text):
      digest = hashlib.md5(s.encode('utf-8', 'surrogatepass')).digest()
      keyed.append((digest, s))
  keyed.sort()
  chosen, total = [], 0
  for _, s in keyed:
    if total >= budget:
      break
    chosen.append(s)
    total += len(s)
  return chosen


def train_sentencepiece(texts: Iterable[str], vocab_size: int,
                        key: str = 'data.vocab_size') -> bytes:
  """Train a code-friendly SentencePiece unigram model; returns model bytes.

  `key` names the setting in error messages (a config key or a flag)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sentences = sample_sentences(texts)
  if not sentences:
    raise DataError(f'{key}: no text to train a vocabulary on')
  spm.set_random_generator_seed(SEED)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type='unigram',
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        character_coverage=0.9995,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        max_sentence_length=4 * SENTENCE_CHARS + 16,  # bytes, UTF-8 worst case
        input_sentence_size=0,  # we sampled already
        shuffle_input_sentence=False,
        num_threads=NUM_THREADS,
        minloglevel=2,
    )
  except RuntimeError as e:
    # E.g. "INTERNAL: src/trainer_interface.cc(744) [<check>] Vocabulary size
    # too high (30000). Please set it to a value <= 9620.": keep the advice.
    reason = first_line(e).rsplit('] ', 1)[-1]
    raise DataError(f'{key}={vocab_size}: SentencePiece training '
                    f'failed: {reason}') from None
  return model.getvalue()


def check_vocab_size(vocab_size, key: str = 'data.vocab_size') -> int:
  if (not isinstance(vocab_size, int) or isinstance(vocab_size, bool)
      or vocab_size < MIN_VOCAB_SIZE or vocab_size > 1 << 20):
    raise DataError(f'{key}={vocab_size!r} must be an integer in '
                    f'[{MIN_VOCAB_SIZE}, {1 << 20}] (256 byte-fallback pieces '
                    'plus the characters of the corpus must fit)')
  return vocab_size


def stdlib_vocab_path(data_dir: str, corpus_config: str,
                      vocab_size: int) -> str:
  return paths.vocab_file(data_dir, f'stdlib_{corpus_config}', vocab_size,
                          SETTINGS_VERSION)


def train_stdlib_vocab(data_dir: str, corpus_config: str,
                       vocab_size: int) -> str:
  """Train on the corpus's train split and cache atomically."""
  from routed.data import corpus  # pylint: disable=g-import-not-at-top
  root = corpus.stdlib_root()
  texts = (corpus.read_source(root, rel)
           for rel in corpus.corpus_files(corpus_config, root)['train'])
  model = train_sentencepiece(texts, vocab_size)
  path = stdlib_vocab_path(data_dir, corpus_config, vocab_size)
  paths.atomic_write_bytes(path, model)
  return path


def file_md5(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.md5(f.read()).hexdigest()


def load_processor(path: str):
  """A `sentencepiece.SentencePieceProcessor` (no TensorFlow needed)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    return spm.SentencePieceProcessor(model_proto=f.read())


def piece_count(path: str) -> int:
  return load_processor(path).get_piece_size()


def seqio_vocabulary(path: str):
  """The seqio vocabulary for a model file (imports seqio/TF)."""
  from routed.data import seqio_vocab  # pylint: disable=g-import-not-at-top
  return seqio_vocab.SentencePieceVocabulary(path, extra_ids=0)
