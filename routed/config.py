"""The default configuration: every config key, documented once, next to its default.

Experiment configs in `configs/` start from `base_config()` and change only what
they need. Users override any key on the command line (`--config.moe.num_experts=16`).
`routed.validate` checks the final config before anything heavy starts.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.d_model = 768            # residual stream width D
  c.model.num_heads = 12           # attention heads; must divide d_model
  c.model.num_layers = 12          # Transformer blocks
  c.model.d_ff = 3072              # hidden width of the dense MLP and of each expert
  c.model.activation = 'gelu'      # MLP / expert nonlinearity: relu | gelu | silu
  c.model.rope_base = 10000.0      # rotary position embedding base (wavelength)
  c.model.param_dtype = 'float32'  # dtype parameters are stored in: float32 | bfloat16
  c.model.compute_dtype = 'float32'  # dtype of activations and matmuls: float32 | bfloat16
  c.model.init_std = 0.02          # std of the normal init of embeddings and dense kernels
  c.model.tie_embeddings = True    # output logits reuse the input embedding matrix

  c.moe = ml_collections.ConfigDict()
  c.moe.num_experts = 8            # experts per MoE layer E
  c.moe.every = 2                  # every `every`-th block (counting from 1) has an MoE FFN;
                                   # 0 = a dense model with no MoE layers
  c.moe.router = 'switch'          # routing algorithm (see routed/model/routers.py)
  c.moe.top_k = 1                  # experts per token for token-choice routers
  c.moe.capacity_factor = 1.25     # expert capacity in training: C = ceil(cf * S / E) tokens
  c.moe.eval_capacity_factor = 2.0  # the same at evaluation and sampling
  c.moe.dispatch = 'einsum'        # dispatch backend (see routed/model/dispatch.py)
  c.moe.aux_loss_weight = 0.01     # weight of the load-balance loss, averaged over MoE layers
  c.moe.z_loss_weight = 1e-3       # weight of the router z-loss, averaged over MoE layers
  c.moe.router_init_scale = 0.1    # router kernel std = sqrt(scale / d_model) (Switch: 0.1)
  c.moe.jitter = 0.01              # training-only router input noise: x * U(1-eps, 1+eps)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 10000            # optimizer steps
  c.train.batch_size = 64          # sequences per step
  c.train.seq_len = 512            # tokens per sequence (also the MoE routing group size S)
  c.train.seed = 0                 # seeds parameter init, router noise and batch order
  c.train.learning_rate = 1e-3     # peak AdamW learning rate
  c.train.warmup_steps = 500       # linear warmup from 0 to the peak
  c.train.min_lr_ratio = 0.1       # cosine decay ends at peak * min_lr_ratio
  c.train.weight_decay = 0.1       # AdamW decoupled weight decay (not on norms and biases)
  c.train.b1 = 0.9                 # AdamW beta1
  c.train.b2 = 0.95                # AdamW beta2
  c.train.grad_clip = 1.0          # global gradient-norm clip; 0 disables
  c.train.log_every = 50           # steps between progress lines and metrics.jsonl rows
  c.train.peak_flops = 0.0         # FLOP/s of the hardware for MFU; 0 = no MFU reported

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 1000        # steps between evaluations (and at the end); 0 = never
  c.eval.num_batches = 8           # validation batches per evaluation
  c.eval.batch_size = 0            # sequences per validation batch; 0 = train.batch_size

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000  # steps between checkpoints (one is always written at the end)
  c.checkpoint.keep = 3            # keep the last `keep` checkpoints
  c.checkpoint.async_save = True   # write checkpoints in the background while training goes on

  c.data = ml_collections.ConfigDict()
  c.data.task = 'stdlib'           # stdlib | stdlib_mini | c4 (see routed/data/tasks.py)
  c.data.data_dir = ''             # TFDS data dir; '' = $ROUTED_DATA_DIR or ~/.cache/routed/data
  c.data.vocab_size = 4096         # SentencePiece vocabulary trained on the stdlib corpus
  c.data.vocab_path = ''           # SentencePiece model for c4; '' = the public T5 vocabulary

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # data-parallel mesh axis size; -1 = all remaining devices

  return c
