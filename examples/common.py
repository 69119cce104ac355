"""Plumbing shared by the example scripts: common options, results JSON, peak memory, offline hints.

Each example is a script (`python examples/NAME.py --help`) that imports this file as `common`; its
`main(argv)` returns the results dict, so tests can call it in-process.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

RESULTS_FILE = "results.json"  # beside train()'s metrics.jsonl (the log) and loss.png (the plot)
REPO_ROOT = Path(__file__).resolve().parents[1]
if (REPO_ROOT / "minilora" / "__init__.py").is_file() and str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without `pip install -e .`


# --- command line -------------------------------------------------------------------------------------------

def common_parser(description: str, *, model: str, data: str, output_dir: str, epochs: int = 1,
                  lr: float = 2e-4, batch_size: int = 8, max_train_samples: int | None = None,
                  max_eval_samples: int | None = None, lora_r: int = 16, lora_alpha: float = 32,
                  lora_dropout: float = 0.05) -> argparse.ArgumentParser:
    """An ArgumentParser with the options every example has; the keyword arguments are the recipe's defaults.

    Scripts add their own options to the returned parser. `--help` shows every default.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpWithDefaults)
    parser.add_argument("--model", default=model,
                        help="Hugging Face hub model id, or a local folder with config.json, *.safetensors "
                             "and tokenizer.json (offline)")
    parser.add_argument("--data", default=data,
                        help="hub dataset id, or a local .jsonl/.json/.csv/.parquet file or a folder of "
                             "split files such as train.jsonl + validation.jsonl (offline)")
    parser.add_argument("--output-dir", default=output_dir,
                        help=f"where the adapter, {RESULTS_FILE}, metrics.jsonl and loss.png are written")
    parser.add_argument("--device", default=None,
                        help="torch device: cuda, cuda:1, cpu, mps... (default: cuda if available, else cpu; "
                             "cuda:LOCAL_RANK under torchrun)")
    parser.add_argument("--seed", type=int, default=42, help="seed of sampling, init and data order")
    parser.add_argument("--epochs", type=int, default=epochs, help="training epochs")
    parser.add_argument("--max-steps", type=int, default=-1,
                        help="stop after this many optimizer steps (overrides --epochs when > 0)")
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="training batch size per device")
    parser.add_argument("--max-train-samples", type=_count_or_all, default=max_train_samples or "all",
                        help="train on a random subset of this many rows, or 'all'")
    parser.add_argument("--max-eval-samples", type=_count_or_all, default=max_eval_samples or "all",
                        help="evaluate on a random subset of this many rows, or 'all'")
    parser.add_argument("--lora-r", type=int, default=lora_r, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=float, default=lora_alpha, help="LoRA alpha (scaling = alpha / r)")
    parser.add_argument("--lora-dropout", type=float, default=lora_dropout, help="dropout on the LoRA input")
    return parser


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to every option's help unless the help already talks about its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        return help_text if "default" in help_text else super()._get_help_string(action)


def _count_or_all(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of rows or 'all', got {text!r}")
    return int(text)


def start(args: argparse.Namespace) -> torch.device:
    """What the LLM scripts' main() does first: `--target-modules all-linear` as peft's string, the seed, a
    fresh peak-memory window; returns the device."""
    if args.target_modules == ["all-linear"]:
        args.target_modules = "all-linear"
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    reset_peak_memory(device)
    return device


def resolve_device(name: str | None) -> torch.device:
    """`--device` (`minilora.resolve_device`): cuda when available, else cpu; a bare cuda is cuda:LOCAL_RANK
    under torchrun, so each rank loads and quantizes its model on its own GPU."""
    from minilora.device import resolve_device as resolve  # after the sys.path set-up above

    return resolve(name)


def train_config(args: argparse.Namespace, **overrides: Any):
    """A `minilora.TrainConfig` from the common options (output dir, device, seed, epochs, steps, lr, batch);
    `overrides` sets any other TrainConfig field (gradient_accumulation_steps, lr_scheduler, ...)."""
    from minilora import TrainConfig

    return TrainConfig(**{"output_dir": args.output_dir, "device": str(resolve_device(args.device)),
                          "seed": args.seed, "num_epochs": args.epochs, "max_steps": args.max_steps,
                          "learning_rate": args.lr, "batch_size": args.batch_size, **overrides})


def subsample(rows: Sequence[dict], n: int | None, seed: int) -> Sequence[dict]:
    """A random subset of `n` rows in their original order (all rows when n is None or >= len(rows)).

    Random rather than the first n: several data sets are sorted (rotten_tomatoes puts every positive first).
    The result keeps the type of `rows` (e.g. `Records` and its `source`).
    """
    if n is None or n >= len(rows):
        return rows
    if n < 1:
        raise ValueError(f"--max-train-samples / --max-eval-samples must be >= 1, got {n}")
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    subset = [rows[i] for i in keep]
    try:
        return type(rows)(subset, source=rows.source)  # type: ignore[attr-defined, call-arg]
    except (AttributeError, TypeError):
        return subset


def timed_evaluate(model: torch.nn.Module, data: Sequence[dict], **kwargs: Any) -> dict[str, float]:
    """`minilora.train.loop.evaluate` plus eval_runtime (s) and eval_samples_per_second, as transformers has."""
    from minilora.train.loop import evaluate

    start = time.perf_counter()
    metrics = evaluate(model, data, **kwargs)
    runtime = time.perf_counter() - start
    return {**metrics, "eval_runtime": runtime, "eval_samples_per_second": len(data) / runtime}


# --- prompts: Llama-2 chat text, or the checkpoint's own chat template -------------------------------------
# The guanaco and medical recipes train Llama-2 on "<s>[INST] question [/INST] answer </s>" text. Another
# model (Qwen2.5, SmolLM2, ...) learns the same conversations in its own chat template instead, so that it
# is prompted after training the way it was instruction-tuned. "auto" picks the template whenever the
# checkpoint has one that is not Llama-2's [INST] format; Llama-2 base models have none and keep the recipe.

PROMPT_FORMATS = ("auto", "llama2", "chat-template")


def add_prompt_format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                        help="how conversations become training text: llama2 = the recipe's '<s>[INST] q [/INST] "
                             "a </s>' in the tokenizer's BOS/EOS; chat-template = the checkpoint's chat template "
                             "(user/assistant messages); auto (default) = chat-template when the checkpoint has "
                             "one that is not Llama-2's [INST] format, else llama2")


def uses_chat_template(tokenizer, prompt_format: str) -> bool:
    """Whether `--prompt-format` renders conversations with the tokenizer's chat template."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"--prompt-format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    template = tokenizer.chat_template
    if prompt_format == "chat-template" and not template:
        raise ValueError(f"--prompt-format chat-template: {tokenizer.name or 'the tokenizer'} has no chat template "
                         "(chat_template.jinja or tokenizer_config.json 'chat_template'); use --prompt-format llama2")
    return prompt_format == "chat-template" or (prompt_format == "auto" and bool(template)
                                                and "[INST]" not in template)


def conversation_text(turns: Sequence[tuple[str, str]], tokenizer, chat_template: bool) -> str:
    """The training text of a conversation of (user, assistant) turns.

    Llama-2 text uses the tokenizer's own BOS/EOS strings. A chat-template rendering ends at the template's
    last end-of-turn token (trailing newlines dropped, so no EOS is appended after it) and loses a leading
    BOS that the tokenizer adds by itself anyway (Llama-3), so neither is doubled.
    """
    if not chat_template:
        bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
        return "".join(f"{bos}[INST] {user.strip()} [/INST] {reply.strip()} {eos}" for user, reply in turns)
    messages = [message for user, reply in turns for message in
                ({"role": "user", "content": user.strip()}, {"role": "assistant", "content": reply.strip()})]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if tokenizer.eos_token and text.rstrip().endswith(tokenizer.eos_token):
        text = text.rstrip()
    return _without_added_bos(text, tokenizer)


def question_prompt(question: str, tokenizer, chat_template: bool) -> str:
    """The generation prompt for one question, in the format the model is trained on."""
    if not chat_template:
        return f"{tokenizer.bos_token or ''}[INST] {question} [/INST]"
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return _without_added_bos(text, tokenizer)


def _without_added_bos(text: str, tokenizer) -> str:
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer.encode("")[:1] == [tokenizer.bos_token_id]:
        return text[len(bos):]
    return text


# --- results ------------------------------------------------------------------------------------------------

def print_metrics(title: str, metrics: dict[str, Any]) -> None:
    """One aligned `name  value` line per metric under a title."""
    print(f"\n== {title} ==")
    width = max((len(k) for k in metrics), default=0)
    for name, value in metrics.items():
        if isinstance(value, float):
            shown = f"{value:.4g}" if abs(value) >= 1e5 or 0 < abs(value) < 1e-3 else f"{value:.4f}"
        else:
            shown = str(value)
        print(f"  {name:<{width}}  {shown}")


def write_results(output_dir: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Write `results` as output_dir/results.json (indented, NaN/inf as null); returns the path."""
    path = Path(output_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(results), indent=2) + "\n", encoding="utf-8")
    print(f"\nresults written to {path}")
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)  # paths, devices, dtypes


# --- peak memory --------------------------------------------------------------------------------------------

def reset_peak_memory(device: str | torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator stats; on Linux also the process's peak RSS)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets VmHWM (the RSS high-water mark) to the current RSS; Linux only
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: str | torch.device) -> dict[str, Any]:
    """{"peak_memory_mb", "peak_memory_kind"}: CUDA max allocated memory on a GPU, else peak RSS.

    Peak RSS is the process's VmHWM (since the last `reset_peak_memory` on Linux), else getrusage's maxrss.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_memory_kind": "cuda max_memory_allocated"}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"peak_memory_mb": int(line.split()[1]) / 1024, "peak_memory_kind": "peak RSS (VmHWM)"}
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_memory_mb": maxrss / (2**20 if sys.platform == "darwin" else 1024),
            "peak_memory_kind": "peak RSS (getrusage)"}


# --- running a script ---------------------------------------------------------------------------------------

def offline_hint(offline_command: str) -> str:
    return ("No network (or the hub is unreachable)? Run the same recipe offline on local files:\n"
            "  --model DIR   a Hugging Face model folder (config.json, *.safetensors, tokenizer.json)\n"
            "  --data PATH   a .jsonl/.json/.csv/.parquet file or a folder of split files (train.jsonl...)\n"
            f"for example:\n  {offline_command}")


def run_script(main: Callable[[list[str] | None], Any], offline_command: str,
               argv: list[str] | None = None) -> None:
    """Run `main(argv)`; a hub connection error exits with the error and how to run offline instead."""
    try:
        main(argv)
    except ConnectionError as e:
        print(f"error: {e}\n\n{offline_hint(offline_command)}", file=sys.stderr)
        sys.exit(2)


def hold_out(rows: Sequence[dict], n_eval: int | None, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): n_eval rows (default 10%) held out at random, for data sets with one split."""
    n_eval = n_eval or max(1, len(rows) // 10)
    if len(rows) <= n_eval:
        raise ValueError(f"the data has only {len(rows)} rows and no test split: cannot hold out "
                         f"--max-eval-samples={n_eval} rows for evaluation")
    order = random.Random(seed).sample(range(len(rows)), len(rows))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in sorted(order[:n_eval])]


def split_rows(data: str, n_eval: int | None, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): the train and test (or validation) splits when the data set has them, else all rows
    of its one data file with `hold_out` (guanaco-llama2-1k's and MedQuAD's case)."""
    from minilora.data import load_records  # after the sys.path set-up above
    try:
        rows = load_records(data, split="train")
    except FileNotFoundError:
        rows = load_records(data)  # a single data file, whatever its name
    if not Path(data).is_file():
        for split in ("test", "validation"):
            try:
                return rows, load_records(data, split=split)
            except FileNotFoundError:
                pass
    return hold_out(rows, n_eval, seed)


def qlora_precision(device: torch.device) -> tuple[torch.dtype, bool]:
    """(compute dtype of the quantized layers, bf16 autocast): bf16 on GPUs that have it, fp16 on older GPUs
    (train with TrainConfig(fp16=True) there: fp16 autocast with loss scaling), fp32 on CPU."""
    if device.type == "cuda":
        return (torch.bfloat16, True) if torch.cuda.is_bf16_supported() else (torch.float16, False)
    return torch.float32, False
