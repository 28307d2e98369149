"""The one config schema shared by every family and preset.

Every field is defined here, once, with its meaning and unit (the growth options of
`config.upscale` are `models.growth.Options`'s fields); family files
in `launch/configs/` (`roformer.py`, `roformer_v2.py`, `gau.py`, `deepnet.py`, and the
fine-tuning presets `finetune.py`) only change values.
Overriding a field that is not defined here is an error (`--config.model.foo=1`
names the unknown field and exits with code 2).
"""

import dataclasses

import ml_collections

from models import growth


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the full default config (the `tiny` RoFormer v1 MLM on the built-in corpus)."""
  config = ml_collections.ConfigDict()

  # Base PRNG seed (int). Per-step randomness is fold_in(key(seed), step).
  config.seed = 0
  # Training objective: 'mlm' (masked LM, BERT 15 % 80/10/10) or 'clm' (causal next-token LM).
  config.objective = 'mlm'

  # ---------------------------------------------------------------- model
  config.model = model = ml_collections.ConfigDict()
  # Architecture family: 'roformer' (v1: post-LN, biases, GELU), 'roformer_v2'
  # (bias-free, parameter-free RMS norm), 'gau' (gated attention unit / FLASH / GAU-alpha).
  model.family = 'roformer'
  # Vocabulary size (tokens). The SentencePiece model is trained with this size.
  model.vocab_size = 8000
  # Model width d (features).
  model.hidden_size = 128
  # Number of blocks L (a GAU "block" is one GAU layer).
  model.num_layers = 2
  # Attention heads h (softmax attention families).
  model.num_heads = 2
  # Head size d_h (features); 0 means hidden_size // num_heads.
  model.head_dim = 0
  # FFN inner width F (features).
  model.mlp_dim = 512
  # Token-type (segment A/B) vocabulary; 0 disables token-type embeddings.
  model.type_vocab_size = 2
  # Dropout probability on embeddings, residual branches and attention weights.
  model.dropout_rate = 0.0
  # RoPE base (theta_i = rotary_base^(-2i/d_h)), docs/algorithms.md 7.1.
  model.rotary_base = 10000.0
  # Position information: 'rope' (rotary on q and k, no position table; every preset) or
  # 'learned' (BERT-style absolute table [max_position, d] added to the token embeddings,
  # rotary off), docs/algorithms.md 7.6. Positions restart at 0 in every packed document.
  model.position_embedding = 'rope'
  # Rows of the 'learned' table (positions 0..max_position-1; BERT's 512). Fixed, not tied to
  # data.seq_len, so a checkpoint evaluates at any seq_len <= max_position; rows at or beyond
  # the training length are never trained. Unused with 'rope'.
  model.max_position = 512
  # Softmax attention scale: 'standard' (1/sqrt(d_h)) or 'entropy_invariant'
  # (log_512(n)/sqrt(d_h), n = valid keys clamped at 16), docs/algorithms.md 7.4.
  model.attention_scale = 'standard'
  # Attention kernel of the softmax-attention families (docs/algorithms.md 9): 'auto' runs
  # JAX's Pallas splash-attention kernel on TPU (memory linear in seq_len, docs/tpu_fit.md)
  # and XLA elsewhere, and falls back to XLA where the kernel cannot run: dropout_rate > 0
  # (the kernel cannot drop attention weights), seq_len not a multiple of 128, family 'gau';
  # 'xla' always XLA; 'splash' always the kernel (TPU only), an error where it cannot run.
  model.attention_impl = 'auto'
  # Epsilon of every LayerNorm / RMSNorm.
  model.norm_eps = 1e-12
  # Norm type: 'layernorm' (RoFormer v1), 'rmsnorm' (with gain) or 'rmsnorm_noparam'
  # (parameter-free RMS norm of RoFormer v2 / GAU-alpha, docs/algorithms.md 7.2).
  model.norm_type = 'layernorm'
  # Biases in every dense layer and the MLM head (v1: True; v2 / GAU-alpha: False).
  model.use_bias = True
  # Residual form: 'post_ln' (x + G(x) then norm) or 'deepnorm' (norm(alpha*x + G(x)),
  # docs/algorithms.md 5).
  model.residual = 'post_ln'
  # DeepNorm alpha / beta; 0 means the encoder-only formulas (2N)^(1/4) and (8N)^(-1/4).
  model.deepnorm_alpha = 0.0
  model.deepnorm_beta = 0.0
  # GAU expansion width e as a multiple of hidden_size (docs/algorithms.md 6.1).
  model.expansion_factor = 2
  # GAU shared query/key width s (features).
  model.shared_dim = 128
  # GAU attention normalisation: 'relu2', 'softmax' or 'softmax_plus' (docs/algorithms.md 6.1).
  model.attention_norm = 'relu2'
  # FLASH mixed-chunk attention chunk size c (tokens); 0 = plain quadratic GAU
  # (docs/algorithms.md 6.2).
  model.chunk_size = 0
  # Feed-forward activation of RoFormer/DeepNet blocks (and v1's MLM head transform): 'gelu'
  # (exact erf, RoFormer v1), 'gelu_tanh', 'relu' (released RoFormer-v2) or 'swish'.
  model.mlp_activation = 'gelu'
  # Causal LM with relu2 attention (GAU / FLASH): divide each query's weights by the keys it
  # sees, 'visible' (j <= i; bert4keras), or by all keys of its document, 'n' (FLASH paper).
  model.causal_normalizer = 'visible'
  # GAU activation phi on U, V, Z: 'swish' (paper) or 'relu' (homogeneity tests,
  # docs/algorithms.md 6.5).
  model.gau_activation = 'swish'
  # Kernel init: 'normal' (std initializer_range), 'roformer_v2' (truncated normal L^-1/2),
  # 'gau_alpha' (L^-1/3), docs/algorithms.md 5.3.
  model.init = 'normal'
  # Std of the 'normal' init.
  model.initializer_range = 0.02
  # Activation/compute dtype ('float32' on CPU, 'bfloat16' on TPU) and parameter dtype.
  model.dtype = 'float32'
  model.param_dtype = 'float32'
  # Rematerialisation per layer: 'none', 'full' or 'dots_with_no_batch_dims' (docs/algorithms.md 8).
  model.remat_policy = 'none'
  # Scan over layers (compile time independent of depth).
  model.scan_layers = True
  # Layers per iteration of that scan (the parameters are the same): 0 = auto, all layers (no
  # loop) on CPU up to 12 layers, else 1 (docs/performance.md 3); k >= 1 as given.
  model.scan_unroll = 0

  # ---------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  # Local text files (glob, comma-separated globs allowed). Empty: use tfds_name or the
  # built-in corpus (the Python standard library's .py files).
  data.text_files = ''
  # How local text files split into documents: 'file' (one per file) or 'line' (one per line).
  data.text_unit = 'file'
  # Read local text files as tables instead, one document per row, the text in this column:
  # a 0-based index (TSV/CSV without a header line), a header name (TSV/CSV whose first line
  # names the columns) or a JSONL field; the format follows the extension (.csv CSV,
  # .jsonl/.json JSONL, other TSV). E.g. a fine-tuning task's training text for
  # task-adaptive pretraining (docs/finetuning.md 9). '' = plain text (text_unit).
  data.text_column = ''
  # A TFDS dataset by name (e.g. 'wikipedia/20230601.en'); must have a text feature.
  data.tfds_name = ''
  # TFDS data dir for named datasets; empty means the TFDS default (~/tensorflow_datasets).
  data.tfds_data_dir = ''
  # Feature holding the text in a TFDS dataset.
  data.tfds_text_key = 'text'
  # A Hugging Face dataset read through the `datasets` library (pip install
  # 'encoder-pretrain[hf]'): a Hub name ('wikitext', 'allenai/c4'), a local directory, or local
  # files by glob, comma-separated ('corpus/*.jsonl'; .txt (documents as data.text_unit says),
  # .json/.jsonl, .parquet, .csv, optionally compressed). Empty: not used. Its splits are
  # data.train_split and data.eval_split; without the eval split, data.validation_fraction of
  # the training examples is held out by a hash of their index. docs/configuration.md 1.
  data.hf_dataset = ''
  # The dataset's config (subset) name, e.g. 'wikitext-103-raw-v1'; '' = its default.
  data.hf_config = ''
  # Git revision of a Hub dataset (branch, tag or commit; pin one for an exact rerun); '' = main.
  data.hf_revision = ''
  # Column holding the text (a string column; blank and missing texts are skipped).
  data.hf_text_field = 'text'
  # Stream the dataset instead of downloading it whole: the first data.hf_max_examples examples
  # of each split are written once to <cache_dir>/hf_stream/ (Arrow files, random access), and
  # training reads those, so a resume continues at the exact example.
  data.hf_streaming = False
  # At most this many examples (rows, blank ones included) from the start of each split; 0 =
  # all. Set it when streaming a Hub dataset larger than the disk.
  data.hf_max_examples = 0
  # Splits used for training and evaluation.
  data.train_split = 'train'
  data.eval_split = 'validation'
  # Fraction of documents held out for validation (local files, built-in corpus).
  data.validation_fraction = 0.02
  # Several sources mixed with weights (docs/configuration.md 3); () = one source, chosen by
  # the fields above. A tuple of sources, each (name, weight, 'field=value', ...): a unique
  # name (letters, digits, '_', '.', '-'), a relative weight > 0 (the share of documents
  # drawn from the source; weights need not sum to 1), and the source's own values of the
  # fields above (text_files / hf_dataset / tfds_name choose it, none = the built-in corpus;
  # fields it leaves out take the run's value), e.g.
  # "(('wiki', 0.7, 'text_files=/data/wiki/*.txt'), ('code', 0.3, 'hf_dataset=code/*.jsonl'))".
  # text_files, hf_dataset and tfds_name of the run itself must then be empty.
  data.mixture = ()
  # Resume a checkpoint although the training data changed since it was written (files
  # added, removed, resized or touched): the model resumes, the data is read from the start.
  data.allow_changed_data = False
  # Where built TFDS datasets and trained tokenizers are cached; empty = ~/.cache/encoder_pretrain.
  data.cache_dir = ''
  # A tokenizer file to load: a SentencePiece .model, or a BERT WordPiece vocab.txt (as the
  # RoFormer / RoFormer-v2 / GAU-alpha releases ship); empty = train one on a sample of the
  # training split.
  data.tokenizer_model = ''
  # Tokenizer kind: 'auto' (a .txt tokenizer_model is WordPiece, any other file
  # SentencePiece; with no file, train SentencePiece), 'sentencepiece', or 'wordpiece' (with
  # no file, train a WordPiece vocabulary). docs/huggingface.md 4.
  data.tokenizer_kind = 'auto'
  # WordPiece lower-casing and accent stripping (BERT's do_lower_case); None = the
  # do_lower_case of a tokenizer_config.json next to the vocab.txt, else True.
  data.tokenizer_lowercase = ml_collections.config_dict.placeholder(bool)
  # Bytes of training text sampled to train the tokenizer.
  data.tokenizer_sample_bytes = 4_000_000
  # Tokens per packed row n.
  data.seq_len = 128
  # Rows per step over all processes (must divide over the data-parallel devices).
  data.global_batch_size = 32
  # MLM: fraction of non-special tokens selected, and of those the [MASK]/random fractions.
  data.mask_rate = 0.15
  data.mask_token_rate = 0.8
  data.random_token_rate = 0.1
  # Seed of the document shuffle (per epoch) and of the masking.
  data.shuffle_seed = 0
  # Grain read threads (tokenization) and their prefetch buffer (documents); -1 = auto, one per
  # core up to 16 (a TPU VM host has tens of cores), 0 = read on the consuming thread.
  data.num_threads = -1
  data.prefetch_buffer_size = 64
  # Batches packed, batched and masked ahead in a background thread, so that the training
  # loop's thread only takes them (0 = on the loop's thread; docs/performance.md 5).
  data.prefetch_batches = 4

  # ---------------------------------------------------------------- optimizer
  config.optim = optim = ml_collections.ConfigDict()
  # 'adamw', 'adafactor', 'lamb' or 'sgdm' (SGD with heavy-ball momentum b1).
  optim.name = 'adamw'
  # Peak learning rate (for AdaFactor with parameter scaling: relative step size).
  optim.learning_rate = 1e-3
  # Schedule: 'linear' or 'cosine' decay after linear warmup, 'constant' (after warmup),
  # 'rsqrt' (AdaFactor's relative step min(learning_rate, 1/sqrt(t))), or 'piecewise_linear'
  # (multipliers at steps, optim.schedule_boundaries).
  optim.schedule = 'linear'
  # Linear warmup length (optimizer updates).
  optim.warmup_steps = 50
  # Final learning rate as a fraction of the peak.
  optim.end_learning_rate_factor = 0.0
  # Decoupled weight decay (skips biases and norm scales); times lr except for
  # adafactor_variant='optax', which follows optax (theta -= wd * theta, docs/algorithms.md 1.2).
  # None: the optimizer's default, 0.01 where the decay is times lr, 0 for adafactor 'optax'.
  optim.weight_decay = ml_collections.config_dict.placeholder(float)
  # Adam/LAMB first and second moment decays and epsilon; momentum for sgdm/adafactor
  # (adafactor: 0 = no momentum buffer).
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-6
  # Global gradient-norm clip; 0 disables. multisteps clips the window mean; every_k each
  # micro-batch; accumulation='momentum' (k > 1) needs 0 (no window mean exists to clip).
  optim.grad_clip_norm = 1.0
  # Micro-steps per optimizer update, and how to accumulate: 'multisteps' (optax.MultiSteps,
  # exact, one extra buffer), 'momentum' (hidden in momentum, no buffer, docs/algorithms.md 2)
  # or 'every_k' (Su: the optimizer runs every micro-step, its updates are applied every k-th).
  # train.num_train_steps counts micro-steps (batches); schedules count optimizer updates.
  optim.accumulation_steps = 1
  optim.accumulation = 'multisteps'
  # Piecewise-linear multipliers ((step, multiplier), ...) for schedule='piecewise_linear'.
  optim.schedule_boundaries = ((0, 1.0),)
  # AdaFactor (docs/algorithms.md 1): 'optax' (paper / Su formulation, optax.adafactor placement) or
  # 'bert4keras' (momentum on the clipped update before parameter scaling, lr-scaled decay).
  optim.adafactor_variant = 'optax'
  # AdaFactor: factor second moments of matrices, scale steps by RMS(param) (eps2 = 1e-3),
  # update clipping threshold d, and the beta2 exponent c (beta2hat_t = 1 - t^-c).
  optim.factored = True
  optim.parameter_scale = True
  optim.clipping_threshold = 1.0
  optim.decay_rate = 0.8
  # AdaFactor: factor DenseGeneral kernels (L, d, h, d_h) as (L, d, h*d_h) matrices
  # (docs/algorithms.md 1.4), and factor a second moment only if its second-largest axis has
  # >= this many entries.
  optim.factor_merge_small_axes = True
  optim.min_dim_size_to_factor = 128
  # Exponentiated-gradient step-size adaptation wrapped around the base optimizer
  # (docs/algorithms.md 3).
  optim.eg = eg = ml_collections.ConfigDict()
  eg.enabled = False
  # Meta learning rates of the per-leaf scale S and of the per-coordinate gains p.
  eg.scale_lr = 1e-3
  eg.gain_lr = 1e-2
  # Normalised (cosine / sign) or unnormalised (inner product) meta-gradients.
  eg.normalized = True
  # Clip ranges of S and p.
  eg.scale_min = 0.1
  eg.scale_max = 10.0
  eg.gain_min = 0.01
  eg.gain_max = 100.0
  # Signal the scale aligns with: 'momentum' (EGDD) or 'gbar' (EMA of gradients), its
  # granularity 'per_leaf' (EGDD) or 'global', and the EMA decay of gbar.
  eg.scale_signal = 'momentum'
  eg.scale_granularity = 'per_leaf'
  eg.beta = 0.9

  # ---------------------------------------------------------------- training loop
  config.train = train = ml_collections.ConfigDict()
  # Total training steps in micro-batches (optimizer updates = num_train_steps //
  # optim.accumulation_steps).
  train.num_train_steps = 300
  # Console / metrics.jsonl / TensorBoard logging period (steps).
  train.log_every_steps = 25
  # Evaluation period (steps; 0 = only at the end; the final step is always evaluated) and
  # batches per evaluation (pretraining).
  train.eval_every_steps = 150
  train.eval_steps = 8
  # Checkpoint period (steps; the final step is always saved) and how many to keep.
  train.checkpoint_every_steps = 100
  train.keep_checkpoints = 2
  # Retention besides the newest keep_checkpoints (orbax preservation policies; a checkpoint
  # stays when any rule keeps it; docs/operations.md 1.1): every
  # checkpoint whose step is a multiple of keep_every_steps is kept for good (0 = off), and the
  # keep_best checkpoints with the lowest eval loss (0 = off). Only a checkpoint saved at a
  # step where the evaluation ran has an eval loss (steps that are multiples of both
  # checkpoint_every_steps and eval_every_steps, and num_train_steps); the others are kept by
  # the first two rules only. `launch.export|finetune|upscale --step=best` read the
  # lowest-loss checkpoint.
  train.keep_every_steps = 0
  train.keep_best = 0
  # Peak FLOP/s of one device for MFU; 0 = look up (CPU: measured, docs/design.md 10).
  train.peak_flops_per_device = 0.0
  # Stop after this many steps in this run (0 = run to num_train_steps); for tests and
  # preemption drills.
  train.stop_after_steps = 0
  # Consecutive steps with a non-finite loss or gradient (each one's update is skipped) after
  # which the run stops with exit code 3, keeping its last good checkpoint.
  train.max_nonfinite_steps = 10
  # A progress bar below the log lines: 'auto' (when stderr is a terminal), 'on' or 'off'.
  train.progress = 'auto'
  # 'START,COUNT': a jax.profiler trace of steps START..START+COUNT-1 under <workdir>/profile
  # (TensorBoard's Profile tab or ui.perfetto.dev); '' = off.
  train.profile_steps = ''
  # Where the logged scalars go, comma-separated (process 0 only): 'tensorboard' (events under
  # <workdir>/tensorboard), 'jsonl' (<workdir>/metrics.jsonl, read by launch.report), 'wandb'
  # (Weights & Biases; pip install 'encoder-pretrain[wandb]'; WANDB_MODE=offline logs without
  # a network); '' = the console only. docs/configuration.md 2.
  train.loggers = 'tensorboard,jsonl'
  # W&B project, and entity ('' = the default entity of the API key).
  train.wandb_project = 'encoder-pretrain'
  train.wandb_entity = ''
  # W&B run name ('' = the workdir's name) and tags (comma-separated; '' = none). A resumed run
  # continues its W&B run (the id is kept in <workdir>/wandb_run.json).
  train.wandb_run_name = ''
  train.wandb_tags = ''

  # ---------------------------------------------------------------- upscale
  # Lossless growth by launch.upscale (docs/algorithms.md 4), read from the target (large)
  # config: width_method, symmetry_breaking, noise_sigma, depth_method, depth_positions,
  # optimizer_state, seed. Defined once, with their meaning, by models.growth.Options.
  config.upscale = ml_collections.ConfigDict(dataclasses.asdict(growth.Options()))

  # ---------------------------------------------------------------- probe
  # A linear probe during pretraining (pretrain/probe.py, docs/finetuning.md 8): a logistic
  # regression on the frozen encoder's mean-pooled features of a small labelled task, its dev
  # accuracy logged as split 'probe'. Off unless both files are given (TSV, CSV or JSONL, the
  # fine-tuning formats; columns as in `finetune`: '' = label 0, text 1 for TSV/CSV).
  config.probe = probe = ml_collections.ConfigDict()
  probe.train_file = ''
  probe.dev_file = ''
  probe.label_column = ''
  probe.text_column = ''
  # Period in steps; 0 = with every evaluation (train.eval_every_steps and the end).
  probe.every_steps = 0
  # The first examples of each file that are used (bounds the cost), and tokens per example.
  probe.max_train_examples = 1000
  probe.max_dev_examples = 500
  probe.max_seq_len = 64

  # ---------------------------------------------------------------- finetune
  # Fine-tuning by launch.finetune (docs/finetuning.md 5); pretraining ignores this section.
  # Presets: launch/configs/finetune.py. The loop's cadence, stop_after_steps and progress
  # bar are the `train` fields above; the optimizer is AdamW with the values below.
  config.finetune = ft = ml_collections.ConfigDict()
  # The task: 'glue/<name>' (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli; read by
  # TFDS), or '' for local train_file / dev_file (TSV, CSV or JSONL).
  ft.task = ''
  # TFDS directory for a GLUE task ('' = the TFDS default, ~/tensorflow_datasets).
  ft.tfds_data_dir = ''
  # Local files: training examples, and the dev examples the metric is reported on.
  ft.train_file = ''
  ft.dev_file = ''
  # 'auto' (from the extension; .txt is TSV), 'tsv', 'csv' or 'jsonl'.
  ft.file_format = 'auto'
  # TSV/CSV: the first line holds column names.
  ft.header = False
  # TSV/CSV: a 0-based index or (with header) a name; JSONL: a field. '' = TSV/CSV label 0,
  # text 1; JSONL 'label', 'sentence'. text_pair_column '' = single-text task.
  ft.label_column = ''
  ft.text_column = ''
  ft.text_pair_column = ''
  # Local files: 'classification' or 'regression'.
  ft.task_type = 'classification'
  # Classification labels in id order (F1's positive class is the second of two); () = the
  # sorted distinct training labels.
  ft.label_names = ()
  # Dev metric that picks the learning rate: 'accuracy', 'f1', 'matthews', 'pearson' or
  # 'spearman' ('' = the task's: GLUE's, else accuracy / pearson).
  ft.metric = ''
  # Sentence representation: 'mean' (mean over non-padding tokens) or 'cls' (first token
  # through a tanh pooler, BERT).
  ft.pooling = 'mean'
  # Tokens per example, [CLS] and [SEP]s included (longer inputs are cut longest-first).
  ft.max_seq_len = 128
  # Examples per step over all processes (must divide over the data-parallel devices); also
  # the evaluation batch.
  ft.batch_size = 32
  # Training length: num_steps steps, or (num_steps 0) num_epochs passes over the training set.
  ft.num_epochs = 3.0
  ft.num_steps = 0
  # Peak AdamW learning rates to sweep (the best by the dev metric is reported), and seeds
  # per learning rate (head init, dropout, data order; mean and std reported).
  ft.learning_rates = (3e-4,)
  ft.seeds = (0,)
  # Linear warmup over this fraction of the steps, then linear decay to 0.
  ft.warmup_fraction = 0.1
  # Model selection on held-out training data: > 0 holds out this fraction of the training
  # examples (the same ones for every run), evaluates them with the dev split at every
  # evaluation (train.eval_every_steps, and the end), and reports each run's dev metrics at
  # its evaluation with the best held-out metric; the learning rate is then chosen on the
  # held-out metric too, so the dev metric chooses nothing. 0 = the dev metric at the last
  # step, and the dev metric picks the learning rate.
  ft.validation_fraction = 0.0
  # AdamW decoupled weight decay (not on biases and norm scales).
  ft.weight_decay = 0.01
  # Dropout in the encoder and before the output layer (BERT: 0.1).
  ft.dropout_rate = 0.1

  # ---------------------------------------------------------------- mesh
  config.mesh = mesh = ml_collections.ConfigDict()
  # Device mesh shape over ('data', 'fsdp', 'tensor'); one -1 takes the remaining devices.
  mesh.shape = (-1, 1, 1)
  # Logical axis -> mesh axis rules for parameters ('vocab', 'embed', 'heads', 'kv', 'mlp',
  # 'layers') and activations ('batch', 'length').
  mesh.logical_axis_rules = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv', None),
    ('mlp', 'tensor'),
    ('layers', None),
  )
  return config


def get_finetune_config() -> ml_collections.ConfigDict:
  """The schema's fine-tuning defaults (launch/configs/finetune.py builds its presets on it).

  The encoder is left to `launch.finetune --from_workdir`: model.family is '' (a preset names
  no encoder) and model.dtype / remat_policy are '' (the run's). The loop logs every 50
  steps, evaluates the dev set only at the end (eval_every_steps 0) and checkpoints every 500
  steps (docs/finetuning.md 5).
  """
  config = get_base_config()
  config.model.family = config.model.dtype = config.model.remat_policy = ''
  t = config.train
  t.log_every_steps, t.eval_every_steps, t.checkpoint_every_steps = 50, 0, 500
  return config
