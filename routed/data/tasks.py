"""seqio Tasks: `stdlib`, `stdlib_mini` (local TFDS builder) and `c4` (TFDS c4/en).

Every task yields LM training chunks: documents are tokenized, each is
followed by EOS, all are concatenated and cut into chunks of exactly
seq_len + 1 tokens (the trainer uses chunk[:-1] as inputs, chunk[1:] as
targets). Each example is {'targets': int32 [seq_len + 1]}; the remainder
after the last full chunk of a pass is dropped.

Tasks depend on the data dir and vocabulary, so they are built by functions
(and registered in seqio's TaskRegistry under `routed_<task>`, replacing an
earlier registration) rather than at import time. Importing this module
imports seqio and TensorFlow: do it lazily.
"""

from __future__ import annotations

import functools

import numpy as np

from routed.data.tf_env import import_seqio, import_tf

tf = import_tf()
seqio = import_seqio()

# seqio wants TFDS names with an explicit version.
TFDS_NAMES = {'stdlib': 'routed_stdlib/full:1.0.0',
              'stdlib_mini': 'routed_stdlib/mini:1.0.0'}
C4_TFDS_NAME = 'c4/en:3.1.0'  # TFDS's current c4 version
C4_SHUFFLE_BUFFER = 10_000  # packed chunks; ~5 MB at seq_len 128


class SentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """seqio's SentencePiece vocabulary, tokenizing in tf.data with the Python
  `sentencepiece` library instead of tf_text's op.

  tf_text bundles its own SentencePiece build, which breaks ties between
  equal-score segmentations differently (e.g. "\n\n\n" as "\n\n"+"\n" vs
  "\n"+"\n\n"; ~0.4% of stdlib tokens). Then the training data would not
  be what `vocabulary.encode` produces at inference. One tokenizer for both
  keeps them identical; it runs at ~10 M tokens/s, plenty for training.
  """

  def _encode_tf(self, s):
    tokenizer = self.tokenizer  # load now, outside the tf.data graph

    def encode(text: bytes):
      return np.asarray(tokenizer.encode(text.decode('utf-8', 'replace')),
                        np.int32)

    ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
    ids.set_shape([None])
    return ids


def pack_lm(dataset: tf.data.Dataset, sequence_length) -> tf.data.Dataset:
  """Concatenate 'targets' of all examples and split into fixed-size chunks.

  Args:
    dataset: examples with 'targets' int32 [None] (already EOS-terminated).
    sequence_length: {'targets': L}; L = seq_len + 1 tokens per chunk.

  Returns:
    dataset of {'targets': int32 [L]} in stream order.
  """
  length = int(sequence_length['targets'])

  # A scan carries the unfinished tail across documents and emits all full
  # chunks of each document at once; ~50x faster than unbatch().batch(L),
  # which moves one token per tf.data element.
  def step(tail, tokens):
    buf = tf.concat([tail, tokens], axis=0)
    n = tf.size(buf) // length
    chunks = tf.reshape(buf[:n * length], [n, length])
    return buf[n * length:], chunks

  dataset = dataset.map(lambda ex: ex['targets'])
  dataset = dataset.scan(tf.zeros([0], tf.int32), step)
  dataset = dataset.unbatch()
  return dataset.map(lambda chunk: {'targets': chunk})


def _tokenize(dataset, output_features):
  # Drop the raw text right away: only 'targets' is needed downstream.
  return seqio.preprocessors.tokenize(
      dataset, output_features, copy_pretokenized=False)


def _register(task):
  if task.name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(task.name)
  seqio.TaskRegistry.add_provider(task.name, task)
  return task


def make_task(task: str, data_dir: str, vocab_path: str,
              tfds_name: str | None = None) -> 'seqio.Task':
  """The seqio Task for `task` reading TFDS from `data_dir`.

  Args:
    task: 'stdlib', 'stdlib_mini' or 'c4'.
    data_dir: TFDS data dir.
    vocab_path: SentencePiece model file.
    tfds_name: override the TFDS name with version (e.g. 'c4/en:3.0.1' for
      an older prepared version).
  """
  if tfds_name is None:
    tfds_name = C4_TFDS_NAME if task == 'c4' else TFDS_NAMES[task]
  if task != 'c4':
    from routed.data import stdlib_tfds  # pylint: disable=g-import-not-at-top,unused-import
    del stdlib_tfds  # imported to register the builder with TFDS
  vocabulary = SentencePieceVocabulary(vocab_path, extra_ids=0)
  source = seqio.TfdsDataSource(
      tfds_name=tfds_name, tfds_data_dir=data_dir,
      splits=('train', 'validation'), read_only=True)
  return _register(seqio.Task(
      name=f'routed_{task}',
      source=source,
      output_features={
          'targets': seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
      },
      preprocessors=[
          functools.partial(seqio.preprocessors.rekey,
                            key_map={'targets': 'text'}),
          _tokenize,
          seqio.preprocessors.append_eos,
          pack_lm,
      ],
      shuffle_buffer_size=C4_SHUFFLE_BUFFER,
  ))


def chunks(task: 'seqio.Task', split: str, seq_len: int, *,
           shuffle: bool = False, seed: int | None = None,
           num_epochs: int | None = 1) -> tf.data.Dataset:
  """int32 [seq_len + 1] chunks of a split, as a tf.data.Dataset."""
  ds = task.get_dataset(
      sequence_length={'targets': seq_len + 1}, split=split,
      shuffle=shuffle, seed=seed, num_epochs=num_epochs,
      # The in-memory cache would hold the whole raw split; we materialise
      # packed arrays ourselves (stdlib) or stream (c4).
      try_in_mem_cache=False)
  return ds.map(lambda ex: ex['targets'])
