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
  c.model.activation = 'gelu'      # MLP / expert nonlinearity: relu | gelu | silu | swiglu
                                   # (gated: silu(x W_gate) * x W_up, three matrices per MLP)
  c.model.num_kv_heads = 0         # key/value heads; fewer than num_heads (dividing it) is
                                   # grouped-query attention, 1 is multi-query; 0 = num_heads
  c.model.rope_base = 10000.0      # rotary position embedding base (wavelength)
  c.model.norm_eps = 1e-6          # RMSNorm's epsilon: x / sqrt(mean(x^2) + eps)
  c.model.attention = 'auto'       # attention implementation (routed/model/attention.py):
                                   # reference (einsum, the oracle) | dot_product
                                   # (jax.nn.dot_product_attention; cuDNN on GPU) | splash
                                   # (Pallas kernel, TPU) | auto (splash on TPU, dot_product on
                                   # GPU, reference elsewhere)
  c.model.remat = 'none'           # rematerialisation per block: none | dots_saveable | minimal |
                                   # full (what each saves: routed/model/transformer.py)
  c.model.scan_layers = False      # run the repeating unit of blocks under nnx.scan, parameters
                                   # stacked along a layer axis: the compiled program does not
                                   # grow with depth (routed/model/scan.py)
  c.model.param_dtype = 'float32'  # dtype parameters are stored in: float32 | bfloat16
  c.model.compute_dtype = 'float32'  # dtype of activations and matmuls: float32 | bfloat16
  c.model.parametrization = 'standard'  # standard | mup: μP's init, per-parameter learning
                                   # rates and multipliers (routed/model/mup.py), so the best
                                   # learning rate found at mup_base_width holds at any width
  c.model.mup_base_width = 128     # mup: the d_model at which μP equals the standard
                                   # parametrization (where learning rates were tuned)
  c.model.init_std = 0.02          # std of the normal init of embeddings and dense kernels
  c.model.tie_embeddings = True    # output logits reuse the input embedding matrix

  c.moe = ml_collections.ConfigDict()
  c.moe.num_experts = 8            # experts per MoE layer E
  c.moe.every = 2                  # every `every`-th block (counting from 1) has an MoE FFN;
                                   # 0 = a dense model with no MoE layers
  c.moe.router = 'switch'          # routing algorithm: switch | topk | expert_choice | soft |
                                   # sbase | hash | reinforce (registry in routed/model/moe.py)
  c.moe.top_k = 1                  # experts per token for topk (at most this many with top_p
                                   # or the relu gate); switch, sbase, hash, reinforce are top-1
  c.moe.capacity_factor = 1.25     # expert capacity in training: C = ceil(cf * S / E) tokens
  c.moe.eval_capacity_factor = 2.0  # the same at evaluation and sampling
  c.moe.group_size = 0             # tokens per routing group S: a multiple of train.seq_len,
                                   # that many consecutive sequences of a data shard filled
                                   # position-major (causal; routed/model/moe.py); 0 = one
                                   # sequence. Sampling routes each prompt alone.
  c.moe.dispatch = 'einsum'        # dispatch backend: einsum | gather (with capacity) |
                                   # ragged | tiled | pallas (dropless: ignore capacity);
                                   # see routed/model/dispatch.py
  c.moe.aux_loss_weight = 0.01     # weight of the load-balance loss, averaged over MoE layers
  c.moe.z_loss_weight = 1e-3       # weight of the router z-loss, averaged over MoE layers
  c.moe.erc_loss_weight = 0.0      # > 0: weight of the expert-router coupling loss (routers
                                   # with a linear kernel; routed/model/erc.py), averaged over
                                   # MoE layers; costs E^2 proxy activations per layer and step
  c.moe.erc_noise = 0.1            # ERC: proxy tokens are router embeddings * U(1-eps, 1+eps)
  c.moe.router_init_scale = 0.1    # router kernel std = sqrt(scale / d_model) (Switch: 0.1)
  c.moe.jitter = 0.01              # training-only router input noise: x * U(1-eps, 1+eps)
  c.moe.expert_d_ff = 0            # hidden width of each routed expert; 0 = model.d_ff
  c.moe.num_shared_experts = 0     # always-on experts added to the routed output (DeepSeekMoE),
                                   # computed as one dense MLP of width num_shared * expert d_ff
                                   # (the fine-grained width with granularity)
  c.moe.granularity = 1            # m > 1: fine-grained experts (DeepSeekMoE; topk and
                                   # expert_choice): each expert split into m of width d_ff / m,
                                   # m * num_experts of them and m * top_k choices (expert choice:
                                   # m * capacity factor), so parameters and FLOPs stay fixed
  # Gating options of the token-choice routers (switch, topk):
  c.moe.gate = 'softmax'           # softmax | sigmoid (normalised sigmoid scores) | relu (ReMoE)
  c.moe.renormalize = False        # divide the chosen gates by their sum (GShard top-k); topk only
  c.moe.num_null_experts = 0       # zero-compute experts a token may choose (AdaMoE): output 0
  c.moe.top_p = 0.0                # > 0: per-token k = fewest top experts whose probability
                                   # reaches top_p, capped at top_k; 0 = always top_k
  c.moe.bias_update_rate = 0.0     # > 0: aux-loss-free balancing (DeepSeek-V3; switch, topk with
                                   # softmax or sigmoid gates): a per-expert bias added to the
                                   # gates for choosing experts only, moved by this much each
                                   # step towards balance (routed/routing_state.py; DeepSeek-V3:
                                   # 0.001); aux_loss_weight may then be 0
  c.moe.relu_l1_weight = 1e-2      # relu gate: weight of the load-balanced L1 sparsity loss
  c.moe.relu_target = 1.0          # relu gate: the L1 loss applies while the mean number of
                                   # active experts per token exceeds this
  # Load balance: E * sum_i f_i P_i, f_i = share of all k choices on expert i (sum f = 1).
  c.moe.balance_scope = 'micro'    # micro: f per batch slice | global: f from the counts of all
                                   # slices and all train.microbatches of the step summed
                                   # ("Demons in the Detail"; with microbatches > 1 it costs a
                                   # forward pass more). micro is the default: the Switch /
                                   # GShard recipe every published routing baseline used
  c.moe.balance_shards = 1         # slices a step's batch is viewed as (data-parallel shards
                                   # or micro-batches); with train.microbatches = k each
                                   # microbatch is balance_shards / k slices (at least one)
  # Expert choice (router expert_choice):
  c.moe.causal_rule = 'none'       # how evaluation and sampling route: none (top-C of the group,
                                   # as in training: NOT causal) | threshold (every expert whose
                                   # learned threshold the token's score exceeds: causal, so
                                   # routed.sample works; routed/model/expert_choice.py)
  c.moe.threshold_ema = 0.01       # threshold: moving-average rate of each expert's C-th score
  c.moe.eval_max_experts = 0       # threshold: at most this many experts per token; 0 = all E
  # Other routers:
  c.moe.slots_per_expert = 1       # soft: slots P per expert; S / E slots each = top-1 FLOPs
  c.moe.sinkhorn_iters = 8         # sbase: Sinkhorn normalisations per training step
  c.moe.reinforce_weight = 1.0     # reinforce: weight of the REINFORCE loss (in-batch baseline)

  # Mixture-of-Depths (routed/model/mod.py): routed blocks run only some tokens.
  c.mod = ml_collections.ConfigDict()
  c.mod.enabled = False            # turn MoD on (configs/mod_base.py, configs/mode_base.py)
  c.mod.every = 2                  # with enabled: every `every`-th block (counting from 1) is
                                   # routed; with moe.every the same blocks: staged MoDE
  c.mod.capacity = 0.125           # training: the top round(capacity * L) tokens of each sequence
                                   # run through a routed block (paper's best: 12.5%)
  c.mod.eval_capacity = 0.25       # evaluation and sampling: at most this share of each sequence
                                   # (the first tokens the causal rule picks); >= capacity
  c.mod.causal_rule = 'aux_loss'   # how eval/sampling decide causally: aux_loss (the router's
                                   # logit > 0) | predictor (small MLP on stop-gradient inputs)
  c.mod.aux_loss_weight = 0.1      # weight of the rule's binary cross-entropy against top-k
                                   # membership ('mod_causal' loss), averaged over MoD blocks
  c.mod.predictor_d_ff = 64        # hidden width of the predictor (causal_rule=predictor)
  c.mod.router_init_scale = 0.1    # router kernel std = sqrt(scale / d_model)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 10000            # optimizer steps
  c.train.batch_size = 64          # sequences per step
  c.train.seq_len = 512            # tokens per sequence
  c.train.microbatches = 1         # gradient accumulation: each step's batch runs as this many
                                   # equal slices inside the jitted step; the update equals one
                                   # step on the whole batch (routed/step.py)
  c.train.seed = 0                 # seeds parameter init, router noise and batch order
  c.train.learning_rate = 1e-3     # peak AdamW learning rate
  c.train.warmup_steps = 500       # linear warmup from 0 to the peak
  c.train.min_lr_ratio = 0.1       # cosine decay ends at peak * min_lr_ratio
  c.train.weight_decay = 0.1       # AdamW decoupled weight decay (not on norms and biases)
  c.train.b1 = 0.9                 # AdamW beta1
  c.train.b2 = 0.95                # AdamW beta2
  c.train.grad_clip = 1.0          # global gradient-norm clip; 0 disables
  c.train.log_every = 50           # steps between progress lines and metrics.jsonl rows
  c.train.peak_flops = 0.0         # FLOP/s of all the run's devices for MFU; 0 = routed/hardware.py's
                                   # figure for the device kind (TPU, GPU; none on CPU)
  c.train.nonfinite = 'stop'       # a step whose loss or gradients are not finite is never
                                   # applied; then: stop (exit 1, nothing saved after it) |
                                   # skip (go on with the next batch; counted in train/skipped)

  # The first parameters from another run's checkpoint (routed/init_from.py).
  c.init = ml_collections.ConfigDict()
  c.init.from_checkpoint = ''      # a run's WORKDIR (its latest checkpoint) or a checkpoint
                                   # directory WORKDIR/checkpoints/<step>; '' = fresh init. Only
                                   # params are taken: optimizer and step start fresh
  c.init.upcycle = False           # sparse upcycling from a dense checkpoint: every expert starts
                                   # as a copy of its block's dense MLP, routers fresh
  c.init.upcycle_noise = 0.0       # upcycling: Gaussian noise added to each expert copy, in
                                   # units of the copied weight's std (0 = exact copies)
  c.init.data_offset = 0           # the run's step s reads the data's batch s + data_offset
                                   # (the source run's step continues its data; 0 = from the start)

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 1000        # steps between evaluations (and at the end); 0 = never
  c.eval.num_batches = 8           # validation batches per evaluation
  c.eval.batch_size = 0            # sequences per validation batch; 0 = train.batch_size

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000  # steps between checkpoints (one is always written at the end)
  c.checkpoint.keep = 3            # keep the last `keep` checkpoints
  c.checkpoint.async_save = True   # write checkpoints in the background while training goes on

  c.data = ml_collections.ConfigDict()
  c.data.path = ''                 # a directory made by `python -m routed.data.prepare`: train
                                   # on it (then task, data_dir and the vocab keys are unused)
  c.data.task = 'stdlib'           # with no path: stdlib | stdlib_mini (the embedded corpus,
                                   # prepared on first use; routed/data/load.py); c4 needs path
  c.data.data_dir = ''             # cache of the embedded corpus; '' = $ROUTED_DATA_DIR or
                                   # ~/.cache/routed/data
  c.data.vocab_size = 4096         # SentencePiece vocabulary trained on the stdlib corpus
  c.data.vocab_path = ''           # a SentencePiece model for the stdlib corpus instead
  c.data.cross_document_attention = False  # False: a token attends only within its document
                                   # of a packed row and rotary positions restart per
                                   # document; True: the whole row is one sequence (as before
                                   # 2026-12; for comparisons)

  # The device mesh (routed/sharding.py). Axis sizes multiply to the number of devices
  # over all processes; one of them may be -1 to take all remaining devices. The batch
  # is split over data x fsdp x expert; parameters as sharding.PARAM_AXES says.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # pure data parallelism: parameters replicated
  c.mesh.fsdp = 1                  # data parallelism with parameters and optimizer state
                                   # sharded over it (gathered for each use, ZeRO-3)
  c.mesh.expert = 1                # expert parallelism: each device holds E / expert experts;
                                   # tokens reach them by all-to-all (expert_parallel.py)
  c.mesh.tensor = 1                # tensor parallelism: attention heads, MLP / expert hidden
                                   # width and vocabulary split over it (Megatron-style)

  return c
