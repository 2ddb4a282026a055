"""One config schema for every size and stage.

`base_config()` returns the full schema with the d20 numbers of SPEC.md; the files in configs/
only override values. Every config is validated by `validate()` before anything runs, and a bad
value raises ConfigError naming the key, which the entry points print without a traceback.
"""
from __future__ import annotations

import ml_collections


MAX_VOCAB_SIZE = 2**31 - 1  # token ids travel as int32 in the data batches


class UserError(Exception):
    """A user's mistake (bad config, missing corpus, wrong tokenizer): entry points print it as one
    line and exit with status 2, never as a traceback."""


class ConfigError(UserError, ValueError):
    """A bad config value; the message names the key."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_name = "d20"  # checkpoints go to <base_dir>/checkpoints/<stage>/<run_name>
    c.base_dir = "runs/d20"  # everything a run writes (relative paths are under the cwd)
    c.seed = 0

    # --- model (SPEC §1): depth is the one dial, the rest is derived in model.ModelConfig ---
    c.model = ml_collections.ConfigDict()
    c.model.depth = 20
    c.model.aspect_ratio = 64  # d_model = aspect_ratio * depth
    c.model.head_dim = 128
    c.model.n_kv_head = 0  # 0 = same as n_head; 1 = MQA
    c.model.sequence_len = 2048
    c.model.compute_dtype = "auto"  # auto | bfloat16 | float32 (auto: bf16 on GPUs with cc >= 8.0)
    c.model.attention = "auto"  # auto | cudnn | xla (auto: cudnn on GPU, xla elsewhere)
    c.model.kernels = "auto"  # auto | pallas | xla: the GPU kernels of nanochat_jax/kernels/ (auto: each where it runs)
    # remat/residual/scan: the fastest d20 setting measured on an H100 at device batch 32 (bench/NOTES.md)
    c.model.remat = "dots_with_no_batch_dims_saveable"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable
    c.model.loss_chunk = 256  # >0: cross-entropy over chunks of this many positions x all rows (never full fp32 logits)
    c.model.residual_dtype = "compute"  # compute (bf16 on GPU, as the reference's autocast residual) | float32
    c.model.scan_layers = False  # params stay stacked (L, ...); False unrolls the layers in the program
    # (d20: 505 ms a step against 559 ms scanned, compile 20 s against 15 s)

    # --- tokenizer (SPEC §5) ---
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.vocab_size = 65536
    c.tokenizer.max_chars = 2_000_000_000  # characters of training text fed to the BPE trainer
    c.tokenizer.doc_cap = 10_000  # characters kept of each document (as the reference does)

    # --- data (SPEC §6) ---
    c.data = ml_collections.ConfigDict()
    c.data.source = "fineweb"  # fineweb | embedded (offline Python docs corpus)
    c.data.dir = "~/.cache/nanochat_jax/data"  # parquet shards live in <dir>/<source>/, shared by runs
    c.data.num_shards = 240  # fineweb shards to download; the last one is the validation split
    c.data.base_url = "https://hfp.19830613.xyz/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
    c.data.download_workers = 4
    c.data.tokenizer_threads = 4
    c.data.shuffle = False  # False: read documents in shard order (as the reference); True: seeded row-group shuffle

    # --- base training (SPEC §4); mid / sft get sections of the same shape when they land ---
    c.train = ml_collections.ConfigDict()
    c.train.device_batch_size = 32  # rows per device per micro-step
    c.train.total_batch_size = 524_288  # tokens per optimizer step; grad accumulation keeps it
    c.train.num_iterations = -1  # explicit step count; -1 = derive from the two below
    c.train.target_flops = -1.0  # -1 = unused
    c.train.target_param_data_ratio = 20  # Chinchilla tokens:params
    c.train.embedding_lr = 0.2
    c.train.unembedding_lr = 0.004
    c.train.matrix_lr = 0.02
    c.train.weight_decay = 0.0
    c.train.adam_b1 = 0.8
    c.train.adam_b2 = 0.95
    c.train.adam_eps = 1e-10
    c.train.grad_clip = 1.0  # global norm; 0 = off
    c.train.init_lr_frac = 1.0  # every LR x this x the schedule's multiplier (SFT 0.02, RL 0.05)
    c.train.warmup_ratio = 0.0
    c.train.warmdown_ratio = 0.2
    c.train.final_lr_frac = 0.0
    c.train.muon_momentum_start = 0.85
    c.train.muon_momentum_end = 0.95
    c.train.muon_momentum_warmup_steps = 300
    c.train.log_every = 1
    c.train.eval_every = 250
    c.train.eval_tokens = 20 * 524_288
    c.train.sample_every = 2000
    c.train.save_every = 1000
    c.train.keep_checkpoints = 2

    # --- device mesh: data-parallel x FSDP; -1 = all devices left over ---
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1

    # --- midtraining (STAGES.md §2): from base, packed rows of the chat mixture, one epoch ---
    c.mid = _chat_stage_section(c.train)
    c.mid.mixture = ("smoltalk:train,mmlu:auxiliary_train,gsm8k:train,identity,identity,"
                     "simple_spelling:train:200000,spelling_bee:train:80000")
    c.mid.val_mixture = "smoltalk:test,mmlu:test:5200,gsm8k:test:420"
    c.mid.supervise = "all"  # all (the reference trains on every token in mid) | assistant
    c.mid.warmdown_ratio = 0.2  # LR 1 until 80% of the epoch, then linear to 0
    c.mid.eval_every = 150

    # --- SFT (STAGES.md §3): from mid, one padded, masked conversation per row ---
    c.sft = _chat_stage_section(c.train)
    c.sft.mixture = ("arc_easy:train,arc_challenge:train,gsm8k:train,smoltalk:train:10000,identity,"
                     "simple_spelling:train:300,spelling_bee:train:300")
    c.sft.val_mixture = "smoltalk:test"
    c.sft.device_batch_size = 4  # conversations per device per micro-step
    c.sft.total_batch_size = 32  # conversations per step (not tokens: rows are padded)
    c.sft.init_lr_frac = 0.02
    c.sft.warmdown_ratio = 1.0  # LR base x 0.02 x (1 - step/n)
    c.sft.muon_momentum_start = 0.95
    c.sft.eval_every = 100
    c.sft.eval_tokens = 0  # SFT's val loss runs over val_conversations instead
    c.sft.val_conversations = 1024
    c.sft.mc_eval_tasks = "MMLU,ARC-Easy"  # accuracy (categorical) during SFT; "" = none
    c.sft.mc_eval_every = 200
    c.sft.mc_eval_problems = 1024

    # --- RL (STAGES.md §4): from SFT, GRPO on GSM8K train, 16 questions x 16 samples a step, one epoch ---
    c.rl = _chat_stage_section(c.train)
    c.rl.enabled = True
    c.rl.task = "gsm8k"  # a generative task with "#### <number>" answers: gsm8k | arithmetic (synthetic, offline)
    c.rl.train_examples = -1  # questions of the train split (-1 = all; a synthetic task's size)
    c.rl.examples_per_step = 16  # questions a step
    c.rl.num_samples = 16  # completions a question
    c.rl.max_new_tokens = 256
    c.rl.max_prompt_tokens = 256  # every prompt is padded to this (one compile); longer questions are left out
    c.rl.temperature = 1.0
    c.rl.top_k = 50  # 0 = no top-k
    c.rl.device_batch_size = 32  # rows (completions) per device per micro-step of the training step
    c.rl.init_lr_frac = 0.05
    c.rl.warmdown_ratio = 1.0  # LR base x 0.05 x (1 - step/n)
    c.rl.muon_momentum_start = 0.95
    c.rl.eval_every = 60  # pass@1..eval_samples on the test split
    c.rl.eval_examples = 400
    c.rl.eval_samples = 8
    c.rl.save_every = 60

    # --- evals (§5), report and chat app (§7): sections filled by their stages ---
    c.eval = ml_collections.ConfigDict()
    # CORE (base_eval): DCLM's bundle, fetched once into <data.dir>/eval_bundle; "" = no bundle (offline)
    c.eval.core_bundle_url = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
    c.eval.core_max_per_task = -1  # -1 = every example of each task (the reference's in-training CORE: 500)
    c.eval.batch_tokens = 65_536  # tokens per likelihood forward (CORE, categorical chat tasks)
    c.eval.max_rows = 256  # rows per likelihood forward at most
    # chat evals (chat_eval after sft, rl_eval after rl)
    c.eval.chat_tasks = "ARC-Easy,ARC-Challenge,MMLU,GSM8K,HumanEval,SpellingBee"
    c.eval.chat_max_problems = -1  # -1 = the whole test set (synthetic tasks: 256 problems)
    c.eval.max_new_tokens = 512  # generative tasks, greedy, calculator on
    c.eval.generate_batch_size = 128  # prompts per on-device generation batch
    c.eval.chat_compare = "mid"  # earlier stages chat_eval also evaluates on the same problems ("" = none)
    c.report = ml_collections.ConfigDict()
    c.report.gpu_hour_price = 3.0  # $ per GPU-hour, for the report's cost line
    # the Gradio chat (python -m nanochat_jax.chat_app); limits as the reference's web chat (STAGES.md §7)
    c.chat = ml_collections.ConfigDict()
    c.chat.temperature = 0.8  # the UI's defaults
    c.chat.top_k = 50
    c.chat.max_tokens = 512
    c.chat.max_temperature = 2.0  # requests outside [0, max_temperature], [1, max_top_k], [1, max_max_tokens]
    c.chat.max_top_k = 200  # are refused with a message
    c.chat.max_max_tokens = 4096
    c.chat.max_messages = 500  # in one conversation
    c.chat.max_message_chars = 8000
    c.chat.max_total_chars = 32000  # the whole conversation
    c.chat.concurrency = 4  # replies generated at once by the one engine; the rest wait in the queue
    c.chat.queue_size = 64  # requests waiting beyond this are turned away ("queue full")
    c.chat.timeout_s = 120.0  # a reply stops after this long
    c.chat.loaded_models = 2  # checkpoints kept in memory when users pick several

    # --- which stages run_pipeline.py runs, in pipeline order ---
    c.stages = "tokenizer,base,base_eval,mid,sft,chat_eval,rl,rl_eval,report"
    return c


def _chat_stage_section(train: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A chat stage's training section: base training's fields (the loop reads the same ones), then
    the chat recipe's differences: fresh optimiser, no weight decay or clipping, one epoch."""
    s = ml_collections.ConfigDict(train.to_dict())
    s.num_iterations = -1  # -1 = one epoch of the mixture
    s.weight_decay = 0.0
    s.grad_clip = 0.0
    s.warmup_ratio = 0.0
    s.eval_tokens = 4 * 524_288
    s.sample_every = 1_000_000
    s.save_every = 500
    s.mixture = ""
    s.val_mixture = ""
    return s


# The pipeline in order: stage -> the module whose stage_done(config, stage) -> bool says its output is
# complete and whose run_stage(config, stage) -> dict(outputs, metrics, report) runs it.
STAGES = {
    "tokenizer": "nanochat_jax.tokenizer",
    "base": "nanochat_jax.train",
    "base_eval": "evals.core",  # CORE of the base model
    "mid": "nanochat_jax.chat_train",
    "sft": "nanochat_jax.chat_train",
    "chat_eval": "evals.chat_eval",  # the chat evals of the SFT model
    "rl": "nanochat_jax.rl",
    "rl_eval": "evals.chat_eval",  # the same evals of the RL model
    "report": "nanochat_jax.report",
}
KNOWN_STAGES = tuple(STAGES)

_CHOICES = {  # (config.model's choices are checked by the model's own config classes: see validate)
    "data.source": ("fineweb", "embedded"),
    "mid.supervise": ("all", "assistant"),
}
_TRAINING_SECTIONS = ("train", "mid", "sft", "rl")  # sections train.train_loop reads: the same checks for each
_POSITIVE = (
    "model.depth", "model.aspect_ratio", "model.head_dim", "model.sequence_len",
    "tokenizer.vocab_size", "tokenizer.max_chars", "tokenizer.doc_cap",
    "data.num_shards", "data.download_workers", "data.tokenizer_threads",
    *(f"{s}.{k}" for s in _TRAINING_SECTIONS for k in (
        "device_batch_size", "total_batch_size", "log_every", "eval_every", "save_every", "keep_checkpoints",
        "embedding_lr", "unembedding_lr", "matrix_lr", "adam_eps", "init_lr_frac")),
    "train.eval_tokens", "train.sample_every", "mid.eval_tokens", "sft.val_conversations", "sft.mc_eval_every",
)
_FRACTIONS = tuple(f"{s}.{k}" for s in _TRAINING_SECTIONS for k in (
    "warmup_ratio", "warmdown_ratio", "final_lr_frac", "adam_b1", "adam_b2", "muon_momentum_start",
    "muon_momentum_end"))
_NON_NEGATIVE = ("sft.mc_eval_problems",
                 *(f"{s}.{k}" for s in _TRAINING_SECTIONS for k in (
                     "weight_decay", "grad_clip", "muon_momentum_warmup_steps")))
_POSITIVE += ("chat.top_k", "chat.max_tokens", "chat.max_top_k", "chat.max_max_tokens", "chat.max_messages",
              "chat.max_message_chars", "chat.max_total_chars", "chat.concurrency", "chat.queue_size",
              "chat.timeout_s", "chat.loaded_models")


def _validate_rl(c) -> None:
    """RL's own fields (its training fields are checked with the other training sections'; that prompt and answer
    fit the context is checked by the stage, against the SFT checkpoint's sequence length)."""
    r = c.rl
    for key in ("examples_per_step", "num_samples", "max_new_tokens", "max_prompt_tokens", "eval_examples",
                "eval_samples"):
        if not r[key] > 0:
            raise ConfigError(f"config.rl.{key} must be > 0, got {r[key]!r}")
    if r.temperature < 0 or r.top_k < 0:
        raise ConfigError(f"config.rl.temperature and top_k must be >= 0, got {r.temperature!r}, {r.top_k!r}")
    if r.eval_samples > r.examples_per_step * r.num_samples:
        raise ConfigError(f"config.rl.eval_samples={r.eval_samples} must be <= examples_per_step x num_samples "
                          f"(an eval call holds as many rows as a step)")


def _get(c, dotted):
    for part in dotted.split("."):
        c = c[part]
    return c


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raise ConfigError naming the first bad key; return the config unchanged otherwise."""
    for key, allowed in _CHOICES.items():
        if _get(c, key) not in allowed:
            raise ConfigError(f"config.{key} must be one of {allowed}, got {_get(c, key)!r}")
    for key in _POSITIVE:
        if not _get(c, key) > 0:
            raise ConfigError(f"config.{key} must be > 0, got {_get(c, key)!r}")
    for key in _FRACTIONS:
        if not 0.0 <= _get(c, key) <= 1.0:
            raise ConfigError(f"config.{key} must be in [0, 1], got {_get(c, key)!r}")
    for key in _NON_NEGATIVE:
        if _get(c, key) < 0:
            raise ConfigError(f"config.{key} must be >= 0, got {_get(c, key)!r}")
    from nanochat_jax import model, tokenizer  # their own checks (imported here: model imports jax)
    model.parts_of(c)  # the shape (head count, kv heads, head_dim) and the options, 'auto' left unresolved
    problem = tokenizer.vocab_size_problem(c.tokenizer.vocab_size)
    if problem:
        raise ConfigError(f"config.tokenizer.vocab_size {problem}")
    for s in _TRAINING_SECTIONS:
        if c[s].warmup_ratio + c[s].warmdown_ratio > 1.0:
            raise ConfigError(f"config.{s}.warmup_ratio + config.{s}.warmdown_ratio must be <= 1")
        if c[s].num_iterations == 0 or c[s].num_iterations < -1:
            raise ConfigError(f"config.{s}.num_iterations must be > 0 or -1, got {c[s].num_iterations}")
    for key in ("data", "fsdp"):
        if c.mesh[key] == 0 or c.mesh[key] < -1:
            raise ConfigError(f"config.mesh.{key} must be > 0 or -1, got {c.mesh[key]}")
    _validate_rl(c)
    if c.report.gpu_hour_price < 0:
        raise ConfigError(f"config.report.gpu_hour_price must be >= 0, got {c.report.gpu_hour_price}")
    ch = c.chat
    if not 0 <= ch.temperature <= ch.max_temperature:
        raise ConfigError(f"config.chat.temperature must be in [0, chat.max_temperature={ch.max_temperature}], "
                          f"got {ch.temperature}")
    for key, bound in (("top_k", "max_top_k"), ("max_tokens", "max_max_tokens"), ("max_message_chars", "max_total_chars")):
        if ch[key] > ch[bound]:
            raise ConfigError(f"config.chat.{key}={ch[key]} must be <= config.chat.{bound}={ch[bound]}")
    from nanochat_jax.tasks import check_mixture  # no jax, no data read: names, splits and sizes only
    for key in ("mid.mixture", "mid.val_mixture", "sft.mixture", "sft.val_mixture"):
        if _get(c, key):
            try:
                check_mixture(_get(c, key))
            except UserError as e:
                raise ConfigError(f"config.{key}: {e}") from None
    for key in ("batch_tokens", "max_rows", "max_new_tokens", "generate_batch_size"):
        if not c.eval[key] > 0:
            raise ConfigError(f"config.eval.{key} must be > 0, got {c.eval[key]!r}")
    for key in ("core_max_per_task", "chat_max_problems"):
        if c.eval[key] == 0 or c.eval[key] < -1:
            raise ConfigError(f"config.eval.{key} must be > 0 or -1 (all), got {c.eval[key]}")
    stages = [s.strip() for s in c.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in KNOWN_STAGES]
    if unknown:
        raise ConfigError(f"config.stages: unknown stage(s) {unknown}; known: {list(KNOWN_STAGES)}")
    return c
