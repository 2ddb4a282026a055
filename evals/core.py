"""CORE: DCLM's 22 in-context-learning tasks, centred accuracy averaged (STAGES.md §5), for base models.

    python -m evals.core --stage base [--step N] [--max-per-task N] [--base_dir DIR]

The eval bundle (core.yaml, eval_meta_data.csv, eval_data/*.jsonl) is downloaded once into the data
cache with the project's downloader and verified as a zip holding those files, then extracted. Each
task's items are shuffled with Random(1337) (and cut to max_per_task); item i's few-shot examples are
Random(1234 + i).sample(the other items, K). Three task types:
  - multiple choice: `query + delim + choice` per choice; the tokens after the choices' common prefix
    are scored; the lowest mean cross-entropy wins;
  - schema: `option + delim + continuation` per context option; the common suffix is scored;
  - language modelling: `context.strip() + delim + continuation`; right only if greedy argmax
    reproduces every continuation token.
Every prompt starts with BOS and is never truncated. Scoring runs in bucketed batches on the mesh
(evals/likelihood.py). Pipeline stage `base_eval` (after `base`): the final base checkpoint.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import shutil
import sys
import time
import zipfile
from pathlib import Path

from nanochat_jax.config import UserError

log = logging.getLogger(__name__)

SHUFFLE_SEED, FEWSHOT_SEED = 1337, 1234
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
CARD_CORE = 0.2219  # the model card's d20 base CORE (SPEC.md §8)


# ----------------------------------------------------------------------------------------------
# The bundle


def _bundle_root(names) -> str:
    """The folder inside the zip holding core.yaml ('' at the top, or e.g. 'eval_bundle/')."""
    roots = [n[:-len("core.yaml")] for n in names if n.endswith("core.yaml") and n.count("/") <= 1]
    if len(roots) != 1:
        raise ValueError("no core.yaml at the top of the zip or in one folder")
    return roots[0]


def verify_bundle(path: Path) -> None:
    """Raise ValueError unless `path` is an intact zip with core.yaml, eval_meta_data.csv and eval_data/*.jsonl."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"not a readable zip file: {e}") from e
    if bad is not None:
        raise ValueError(f"corrupt member {bad}")
    root = _bundle_root(names)
    if root + "eval_meta_data.csv" not in names or not any(
            n.startswith(root + "eval_data/") and n.endswith(".jsonl") for n in names):
        raise ValueError("the zip lacks eval_meta_data.csv or eval_data/*.jsonl")


def ensure_bundle(url: str, data_dir: str) -> Path:
    """The extracted bundle folder under data_dir (downloaded and extracted on first use; a local zip
    path or folder works too). Extraction goes to a temporary folder renamed into place."""
    from nanochat_jax.download import DownloadError, download_file

    if os.path.isdir(url):
        return Path(url)
    data_dir = Path(os.path.expanduser(data_dir))
    out = data_dir / "eval_bundle"
    if (out / "core.yaml").exists():
        return out
    data_dir.mkdir(parents=True, exist_ok=True)
    if os.path.isfile(url):
        verify_bundle(Path(url))
        zip_path = Path(url)
    else:
        zip_path = data_dir / "eval_bundle.zip"
        log.info("CORE: downloading the eval bundle from %s", url)
        try:
            download_file(url, zip_path, verify=verify_bundle)
        except DownloadError as e:
            raise UserError(f"CORE's eval bundle could not be downloaded ({e}); set config.eval.core_bundle_url "
                            "to a reachable URL, a local eval_bundle.zip or its extracted folder") from None
    tmp = data_dir / f".eval_bundle.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as z:
        root = _bundle_root(z.namelist())
        z.extractall(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp / root if root else tmp, out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tasks(bundle: Path) -> list[dict]:
    """core.yaml's tasks with their random baselines (eval_meta_data.csv, %) and items (eval_data/*.jsonl)."""
    import yaml

    try:
        spec = yaml.safe_load((bundle / "core.yaml").read_text())
        with open(bundle / "eval_meta_data.csv", newline="", encoding="utf-8") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    except (OSError, yaml.YAMLError, KeyError, ValueError) as e:
        raise UserError(f"CORE bundle {bundle}: unreadable core.yaml or eval_meta_data.csv ({e})") from None
    tasks = []
    for t in spec["icl_tasks"]:
        label, kind = t["label"], t["icl_task_type"]
        if kind not in TASK_TYPES:
            raise UserError(f"CORE bundle: task {label} has unknown icl_task_type {kind!r}")
        if label not in baselines:
            raise UserError(f"CORE bundle: task {label} has no row in eval_meta_data.csv")
        shots = t["num_fewshot"]
        path = bundle / "eval_data" / t["dataset_uri"]
        try:
            with open(path, encoding="utf-8") as f:
                items = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as e:
            raise UserError(f"CORE bundle: task {label}: cannot read {path} ({e})") from None
        tasks.append(dict(label=label, type=kind, num_fewshot=shots[0] if isinstance(shots, list) else shots,
                          delimiter=t.get("continuation_delimiter", " "), random_baseline=baselines[label],
                          items=items))
    return tasks


# ----------------------------------------------------------------------------------------------
# Prompts and scores


def _fewshot_text(kind: str, examples: list[dict], delim: str) -> str:
    if kind == "multiple_choice":
        return "".join(f"{e['query']}{delim}{e['choices'][e['gold']]}\n\n" for e in examples)
    if kind == "schema":
        return "".join(f"{e['context_options'][e['gold']]}{delim}{e['continuation']}\n\n" for e in examples)
    return "".join(f"{e['context'].strip()}{delim}{e['continuation']}\n\n" for e in examples)


def _common_length(seqs: list[list[int]], from_end: bool = False) -> int:
    n = 0
    while n < min(map(len, seqs)) and len({s[-1 - n] if from_end else s[n] for s in seqs}) == 1:
        n += 1
    return n


def task_sequences(task: dict, tokenizer, max_per_task: int = -1):
    """The task's items in evaluation order, and per item its token sequences with the scored span of
    each -> (items, [(seqs, starts, ends)])."""
    items = list(task["items"])
    random.Random(SHUFFLE_SEED).shuffle(items)
    if max_per_task > 0:
        items = items[:max_per_task]
    kind, delim, K = task["type"], task["delimiter"], task["num_fewshot"]
    if K >= len(items):
        raise UserError(f"CORE task {task['label']}: {K}-shot prompts need more than {K} items, got {len(items)} "
                        "(raise max_per_task)")
    texts, layout = [], []  # per item: (first text index, how many, what is scored)
    for i, item in enumerate(items):
        # = sample(the other items' indices, K): range(n - 1) skipping i samples the same, without an O(n) list
        shots = [items[j + (j >= i)] for j in random.Random(FEWSHOT_SEED + i).sample(range(len(items) - 1), K)]
        head = _fewshot_text(kind, shots, delim)
        if kind == "multiple_choice":
            prompts = [f"{head}{item['query']}{delim}{c}" for c in item["choices"]]
        elif kind == "schema":
            prompts = [f"{head}{c}{delim}{item['continuation']}" for c in item["context_options"]]
        else:
            context = f"{head}{item['context'].strip()}{delim}"
            prompts = [context.strip(), context + item["continuation"]]  # (strip: see the prefix check below)
        layout.append((len(texts), len(prompts)))
        texts.extend(prompts)
    tokens = tokenizer.encode(texts, prepend_bos=True)
    out = []
    for (first, n), item in zip(layout, items):
        seqs = tokens[first:first + n]
        if kind == "multiple_choice":
            start = _common_length(seqs)
            spans = [(min(start, len(s) - 1), len(s)) for s in seqs]  # (a choice that is a prefix of another
            # would score nothing: it keeps its last token)
        elif kind == "schema":
            suffix = _common_length(seqs, from_end=True)
            spans = [(len(s) - max(1, min(suffix, len(s) - 1)), len(s)) for s in seqs]
        else:
            without, full = seqs
            # the stripped context's tokens are normally a prefix of the full prompt's (a trailing space
            # joins the continuation's first token); where they are not, the common part is the prefix
            start = min(_common_length([without, full]), len(full) - 1)
            seqs, spans = [full], [(start, len(full))]
        out.append((seqs, [s for s, _ in spans], [e for _, e in spans]))
    return items, out


def score_task(task: dict, forward, tokenizer, max_per_task: int = -1) -> dict:
    """Accuracy of one task -> dict(accuracy, centered, examples, seconds)."""
    t0 = time.perf_counter()
    items, per_item = task_sequences(task, tokenizer, max_per_task)
    seqs = [s for item_seqs, _, _ in per_item for s in item_seqs]
    starts = [x for _, st, _ in per_item for x in st]
    ends = [x for _, _, en in per_item for x in en]
    mean_loss, match = forward.score(seqs, starts, ends)
    correct, k = 0, 0
    for item, (item_seqs, _, _) in zip(items, per_item):
        n = len(item_seqs)
        if task["type"] == "language_modeling":
            correct += bool(match[k])
        else:
            correct += int(min(range(n), key=lambda j: mean_loss[k + j])) == item["gold"]
        k += n
    accuracy = correct / max(len(items), 1)
    rb = task["random_baseline"] / 100
    return dict(accuracy=accuracy, centered=(accuracy - rb) / (1 - rb), examples=len(items),
                sequences=len(seqs), tokens=sum(map(len, seqs)), seconds=time.perf_counter() - t0)


def evaluate(tasks: list[dict], forward, tokenizer, max_per_task: int = -1) -> dict:
    """-> dict(results={label: score_task(...) + type}, core=mean centred accuracy, seconds)."""
    t0, results = time.perf_counter(), {}
    for task in tasks:
        r = score_task(task, forward, tokenizer, max_per_task)
        results[task["label"]] = dict(r, type=task["type"], num_fewshot=task["num_fewshot"])
        log.info("CORE %-34s acc %.4f centred %+.4f (%d examples, %.1f/s)", task["label"], r["accuracy"],
                 r["centered"], r["examples"], r["examples"] / max(r["seconds"], 1e-9))
    core = sum(r["centered"] for r in results.values()) / max(len(results), 1)
    return dict(results=results, core=core, seconds=time.perf_counter() - t0)


def markdown(ev: dict, where: str) -> str:
    lines = [f"## CORE ({where})", "",
             f"CORE **{ev['core']:.4f}** (card: {CARD_CORE}) over {len(ev['results'])} tasks, "
             f"{sum(r['examples'] for r in ev['results'].values()):,} examples in {ev['seconds']:.1f} s.", "",
             "| task | type | shots | examples | accuracy | centred | examples/s |", "|---|---|---:|---:|---:|---:|---:|"]
    for label, r in ev["results"].items():
        lines.append(f"| {label} | {r['type']} | {r['num_fewshot']} | {r['examples']:,} | {r['accuracy']:.4f} | "
                     f"{r['centered']:+.4f} | {r['examples'] / max(r['seconds'], 1e-9):,.1f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Running it on a checkpoint: CLI and pipeline stage


def results_path(base_dir: str, name: str) -> str:
    return os.path.join(os.path.expanduser(base_dir), "evals", f"{name}.json")


def _write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def load_checkpoint(base_dir: str, stage: str, step: int | None = None):
    """-> (params, ModelConfig, run config, tokenizer, meta) of a finished checkpoint (Orbax lists only
    complete steps: an eval never reads a checkpoint still being written)."""
    from nanochat_jax import model as model_lib
    from nanochat_jax.checkpoint import check_tokenizer, restore_model, use_compile_cache
    from nanochat_jax.tokenizer import Tokenizer

    use_compile_cache(base_dir)
    params, config, meta = restore_model(base_dir, stage, step=step)
    tokenizer = Tokenizer.load(os.path.join(base_dir, "tokenizer"))
    check_tokenizer(meta, tokenizer.hash, f"{stage} step {meta['step']}")
    return params, model_lib.ModelConfig.from_config(config), config, tokenizer, meta


def make_forward(params, model_cfg, config, tokenizer):
    from evals.likelihood import Forward
    from nanochat_jax import sharding

    return Forward(params, model_cfg, sharding.make_mesh(config.mesh), config.eval.batch_tokens,
                   config.eval.max_rows, pad_id=tokenizer.bos_id)


def run(base_dir: str, stage: str, step: int | None, bundle_url: str, max_per_task: int, config=None) -> dict:
    """Evaluate a checkpoint -> dict(step, core, results, seconds, max_per_task) (also the JSON written)."""
    params, model_cfg, ckpt_config, tokenizer, meta = load_checkpoint(base_dir, stage, step)
    config = config or ckpt_config
    tasks = load_tasks(ensure_bundle(bundle_url, config.data.dir))
    ev = evaluate(tasks, make_forward(params, model_cfg, config, tokenizer), tokenizer, max_per_task)
    return dict(ev, stage=stage, step=meta["step"], max_per_task=max_per_task)


def _final_base_step(config) -> int:
    from nanochat_jax import model as model_lib
    from nanochat_jax.checkpoint import checkpoint_dir
    from nanochat_jax.train import num_iterations

    n = num_iterations(config.train, model_lib.ModelConfig.from_config(config))
    if not os.path.isdir(os.path.join(checkpoint_dir(config.base_dir, "base", config.run_name), str(n))):
        raise UserError(f"base_eval: the base run has no finished checkpoint at step {n} yet: run the base stage first")
    return n


def stage_done(config, stage: str = "base_eval") -> bool:
    """The results file exists for the final base checkpoint and the configured settings."""
    try:
        with open(results_path(config.base_dir, stage)) as f:
            done = json.load(f)
        return done.get("step") == _final_base_step(config) and done.get("max_per_task") == \
            config.eval.core_max_per_task and done.get("bundle_url") == config.eval.core_bundle_url
    except (OSError, ValueError, UserError):
        return False


def run_stage(config, stage: str = "base_eval") -> dict:
    """Pipeline stage `base_eval`: CORE of the final base checkpoint (skipped, with no score, when the
    config names no bundle: the offline tiny config)."""
    step = _final_base_step(config)  # only a finished, saved base run is evaluated
    path = results_path(config.base_dir, stage)
    url = config.eval.core_bundle_url
    if not url:
        _write_json(path, dict(step=step, skipped="no bundle (offline config)", max_per_task=config.eval.core_max_per_task,
                               bundle_url=url))
        md = ("## CORE\n\nSkipped: no eval bundle (offline config: config.eval.core_bundle_url is empty). "
              f"No CORE score is reported (card: {CARD_CORE}).\n")
        return dict(outputs=[path], metrics={}, report=md)
    ev = run(config.base_dir, "base", step, url, config.eval.core_max_per_task, config)
    results = dict(ev, bundle_url=url)
    _write_json(path, results)
    metrics = {"CORE": ev["core"], "core_seconds": ev["seconds"],
               **{f"core/{label}": r["centered"] for label, r in ev["results"].items()}}
    return dict(outputs=[path], metrics=metrics, report=markdown(ev, f"base, step {step}"))


def cli_logging() -> None:
    """The eval CLIs' log lines: ours at INFO, Orbax's per-restore internals left out."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)


def main(argv=None) -> int:
    from nanochat_jax.config import base_config

    ap = argparse.ArgumentParser(prog="python -m evals.core", description=__doc__.split("\n")[0])
    ap.add_argument("--stage", default="base", help="checkpoint stage to evaluate (base, mid, ...)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("--max-per-task", type=int, default=-1, help="examples per task (-1: all)")
    ap.add_argument("--base_dir", default=os.environ.get("NANOCHAT_BASE_DIR", "runs/tiny"))
    ap.add_argument("--bundle", default=None, help="bundle URL, local zip or folder (default: config.eval.core_bundle_url)")
    args = ap.parse_args(argv)
    cli_logging()
    try:
        if args.max_per_task == 0 or args.max_per_task < -1:
            raise UserError(f"--max-per-task must be > 0 or -1, got {args.max_per_task}")
        url = args.bundle or base_config().eval.core_bundle_url
        if not url:
            raise UserError("no eval bundle given (--bundle URL, zip or folder)")
        ev = run(args.base_dir, args.stage, args.step, url, args.max_per_task)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = results_path(args.base_dir, f"core_{args.stage}")
    _write_json(path, dict(ev, bundle_url=url))
    print(markdown(ev, f"{args.stage}, step {ev['step']}"))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
