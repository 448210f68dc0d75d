"""seqio's SentencePiece vocabulary, for code that wants a `seqio.Vocabulary`
(`PreparedDataset.vocabulary`: routed.sample, the notebooks). Importing this module
imports seqio and TensorFlow: do it lazily.
"""

from __future__ import annotations

import numpy as np

from routed.data.tf_env import import_seqio, import_tf

tf = import_tf()
seqio = import_seqio()


class SentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """seqio's SentencePiece vocabulary, tokenizing in tf.data with the Python
  `sentencepiece` library instead of tf_text's op.

  tf_text bundles its own SentencePiece build, which breaks ties between
  equal-score segmentations differently (e.g. "\n\n\n" as "\n\n"+"\n" vs
  "\n"+"\n\n"; ~0.4% of stdlib tokens). Then tokens made in tf.data would not
  be what routed.data.prepare wrote. One tokenizer for both keeps them identical.
  """

  def _encode_tf(self, s):
    tokenizer = self.tokenizer  # load now, outside the tf.data graph

    def encode(text: bytes):
      return np.asarray(tokenizer.encode(text.decode('utf-8', 'replace')),
                        np.int32)

    ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
    ids.set_shape([None])
    return ids
