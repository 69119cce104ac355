"""The benchmark cases. Each runs in a fresh interpreter for one stack and prints one JSON line:

    python -m benchmarks.cases <case> '<json params>'      e.g.  train_step '{"stack": "peft"}'

A case returns raw numbers (seconds, bytes, tokens/s); `report.py` turns pairs of them into table rows.
A minilora feature that is not there yet gives {"status": "missing", "reason": ...}; a crash exits non-zero.
"""
from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import assets
from benchmarks.bf16_products import Bf16ProductsInFp32
from benchmarks.measure import (
    matmul_flops_per_s, median, memory_kind, peak_memory_bytes, peak_rss_bytes, reset_peak_memory, rss_bytes, setup,
    tensor_bytes, timed,
)
from benchmarks.runner import RESULT_MARKER
from benchmarks.stacks import (
    LLAMA_PROJECTIONS, Missing, add_lora, canonical_name, count_parameters, enable_gradient_checkpointing,
    fast_bf16_products, generate, load, load_adapter, merge_and_unload, minilora_api, save_adapter, seeded_lora_init,
)

BERT_TARGETS = ["query", "key", "value", "dense"]
T5_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


def _train(stack: str, model: torch.nn.Module, batches: list[dict], warmup: int, lr: float,
           device: torch.device, gradient_checkpointing: bool, tokens_per_step: int) -> dict:
    """Run one optimizer step per batch; step times, losses and the training peak memory."""
    if gradient_checkpointing:
        enable_gradient_checkpointing(stack, model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    trainable, total = count_parameters(model)

    def step(batch: dict) -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    reset_ok = reset_peak_memory(device)
    rss_before = rss_bytes()
    times, cpu_times, losses = [], [], []
    for batch in batches:
        cpu_start = time.process_time()
        seconds, loss = timed(functools.partial(step, {k: v.to(device) for k, v in batch.items()}), device)
        cpu_times.append(time.process_time() - cpu_start)
        times.append(seconds)
        losses.append(loss)
    step_s = median(times[warmup:] or times)
    return {
        "step_s": step_s, "step_times_s": times, "warmup": warmup, "tokens_per_step": tokens_per_step,
        # CPU seconds of all threads: less sensitive than wall time to other processes on a shared machine
        "step_cpu_s": median(cpu_times[warmup:] or cpu_times), "step_cpu_times_s": cpu_times,
        "tokens_per_s": tokens_per_step / step_s, "losses": losses, "trainable": trainable, "total": total,
        "peak_mem": peak_memory_bytes(device), "memory_kind": memory_kind(device),
        "peak_mem_is_training_only": reset_ok, "mem_before_train": rss_before,
        "process_peak_rss": peak_rss_bytes(),
    }


def llama_step_flops(shape: dict, batch_size: int, seq_len: int, r: int, n_targets: int = 7,
                     layers: int | None = None) -> tuple[float, float]:
    """(model FLOPs of one LoRA training step of a Llama shape, FLOPs the gradient checkpointing recompute adds).

    Frozen matrices (the seven projections of every layer and the output head): 2 FLOPs per weight and token
    forward, 2 backward (the input gradient; no weight gradient). LoRA factors: 2 forward, 4 backward.
    Attention: q k^T and p v, 2 * 2 * seq * head_dim * heads per token and layer forward (causal masking not
    halved), twice that backward. The recompute repeats the forward of every layer (not the head)."""
    h, vocab, layers = shape["hidden_size"], shape["vocab_size"], layers or shape["num_hidden_layers"]
    head_dim = shape.get("head_dim") or h // shape["num_attention_heads"]
    q, kv, inner = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim, \
        shape["intermediate_size"]
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inner), (h, inner), (inner, h)][:n_targets]
    frozen = 2 * h * q + 2 * h * kv + 3 * h * inner
    lora = sum(r * (a + b) for a, b in shapes)
    tokens = batch_size * seq_len
    attention = 4 * seq_len * q  # per token and layer, forward
    layer_forward = tokens * (2 * frozen + 2 * lora + attention)
    model = layers * (layer_forward + tokens * (2 * frozen + 4 * lora + 2 * attention)) + tokens * 4 * h * vocab
    return float(model), float(layers * layer_forward)


SCALE = "llama2-7b-bf16"  # the --benchmark-scale checkpoint


def train_step(stack: str, precision: str = "bf16", gradient_checkpointing: bool = False, batch_size: int = 4,
               seq_len: int = 256, warmup: int = 1, steps: int = 3, lr: float = 2e-4, r: int = 16,
               alpha: float = 32, dropout: float = 0.05, seed: int = 0, distinct_batches: int | None = None,
               shape: str = "smollm2-135m", checkpoint: str | None = None, device: str = "cpu") -> dict:
    """Causal-LM LoRA / QLoRA steps (forward, backward, AdamW) of SmolLM2-135M on packed chat text, or of the
    Llama-2-7B shape (`shape="llama2-7b"`, random bf16 weights, --benchmark-scale), or of a prepared checkpoint
    of `assets.CHECKPOINTS` (`checkpoint="smollm2-135m-8l-bf16"`: an 8-layer cut of SmolLM2-135M, random bf16).

    With dropout=0 and warmup=0 the losses are the loss curve compared across stacks; `distinct_batches`
    cycles that many batches (epochs over a small set), so the loss must fall on data seen before."""
    dev = setup(device, seed)
    layers = None
    if checkpoint is not None:
        entry = assets.CHECKPOINTS[checkpoint]
        shape, layers = entry[0], entry[3] if len(entry) > 3 else None
        kind, path = "random", assets.checkpoint_dir(checkpoint)
    else:
        kind, path = assets.smollm2_dir() if shape == "smollm2-135m" else ("random", assets.checkpoint_dir(SCALE))
    dims = assets.SHAPES[shape]
    n_steps = warmup + steps
    source, batches = assets.lm_batches(dims["vocab_size"], batch_size, seq_len,
                                        min(distinct_batches or n_steps, n_steps), seed)
    batches = [batches[i % len(batches)] for i in range(n_steps)]
    reset_peak_memory(dev)
    load_s, model = timed(lambda: load(stack, path, precision=precision, device=dev), dev)
    load_peak = peak_memory_bytes(dev)
    model = add_lora(stack, model, r=r, alpha=alpha, dropout=dropout, targets=LLAMA_PROJECTIONS)
    seeded_lora_init(model, seed)
    result = _train(stack, model, batches, warmup, lr, dev, gradient_checkpointing, batch_size * seq_len)
    flops, recompute = llama_step_flops(dims, batch_size, seq_len, r, layers=layers)
    peak = matmul_flops_per_s(batch_size * seq_len, dims["hidden_size"], dims["intermediate_size"], dev)
    name = "SmolLM2-135M" if shape == "smollm2-135m" else "Llama-2-7B shape"
    name += f", {layers} layers" if layers else ""
    return {"model": f"{name} ({kind} weights)", "data": source, "load_s": load_s,
            "load_peak_mem": load_peak, **result, "model_flops": flops,
            "recompute_flops": recompute if gradient_checkpointing else 0.0, "matmul_flops_per_s": peak,
            "mfu": flops / result["step_s"] / peak}


WIDE = "llama2-7b-width-2l-bf16"
FIDELITY_STACKS = ("reference", "minilora", "minilora+autocast", "peft")


def _fidelity_model(stack: str, mode: str, path: Path, dev: torch.device) -> tuple[torch.nn.Module, str]:
    """The model `stack` trains in `mode` ("qlora": NF4 weights; "lora-bf16": the bf16 weights), and its recipe."""
    quantized = mode == "qlora"
    if stack.startswith("minilora") or stack == "reference":
        ml = minilora_api("from_pretrained", "QuantConfig")
        if stack == "reference":  # the same (NF4) weights, every product and sum in fp32
            quantize = ml.QuantConfig("nf4", compute_dtype=torch.float32) if quantized else None
            return (ml.from_pretrained(path, dtype=torch.float32, quantize=quantize, device=dev),
                    "fp32 compute" + (" on the dequantized NF4 weights" if quantized else ""))
        # minilora's defaults: QLoRA's fp32 residual with bf16 products, or the checkpoint's bf16
        model = ml.from_pretrained(path, quantize="nf4" if quantized else None, device=dev)
        return model, "from_pretrained(path" + (', quantize="nf4")' if quantized else ") (bf16)")
    import peft
    import transformers

    kwargs = {}
    if quantized:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": dev},
                                                              **kwargs)
    model.config.use_cache = False
    if quantized:  # norms, embeddings and head to fp32 (gradient checkpointing off: it changes no number)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return model, "prepare_model_for_kbit_training, bnb compute bf16"
    return model, "bf16 weights"


def fidelity(stack: str, mode: str = "qlora", steps: int = 20, batch_size: int = 2, seq_len: int = 128,
             lr: float = 1e-4, r: int = 16, alpha: float = 32, seed: int = 0, device: str = "cpu") -> dict:
    """The loss curve of one way of training the 2-layer Llama-2-7B-width model (hidden 4096) on one fixed
    batch: LoRA r=16 on all seven projections, dropout 0, AdamW, the seeded LoRA init of every stack.

    stack: "reference" (fp32 compute, the same weights), "minilora" (its defaults, no autocast: `ml.train`'s
    default), "minilora+autocast" (the same under bf16 autocast: `TrainConfig(bf16=True)`), "peft"
    (transformers + peft; QLoRA with `prepare_model_for_kbit_training` and bf16 autocast, as HF's Trainer
    runs the QLoRA recipe with bf16=True)."""
    if stack not in FIDELITY_STACKS:
        raise ValueError(f"stack must be one of {FIDELITY_STACKS}, got {stack!r}")
    dev = setup(device, seed)
    path = assets.checkpoint_dir(WIDE)
    _, batches = assets.lm_batches(assets.SHAPES["llama2-7b"]["vocab_size"], batch_size, seq_len, 1, seed)
    batch = {k: v.to(dev) for k, v in batches[0].items()}
    load_s, (model, recipe) = timed(lambda: _fidelity_model(stack, mode, path, dev), dev)
    model = add_lora(stack.partition("+")[0].replace("reference", "minilora"), model, r=r, alpha=alpha, dropout=0.0,
                     targets=LLAMA_PROJECTIONS)
    seeded_lora_init(model, seed)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    autocast = stack.endswith("+autocast") or (stack == "peft" and mode == "qlora")
    emulate = not fast_bf16_products(dev)
    products = Bf16ProductsInFp32() if emulate else contextlib.nullcontext()
    losses, times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        with products, torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        with products:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
    return {"model": "Llama-2-7B width, 2 layers (random bf16 weights)", "mode": mode,
            "recipe": recipe + (", bf16 autocast" if autocast else ""), "losses": losses,
            "bf16_products": "fp32 products rounded to bf16 (benchmarks/bf16_products.py)" if emulate else "native",
            "step_times_s": times,
            "load_s": load_s, "tokens_per_step": batch_size * seq_len}


def qwen_train_step(stack: str, precision: str = "nf4", batch_size: int = 2, seq_len: int = 256, warmup: int = 1,
                    steps: int = 2, lr: float = 2e-4, r: int = 16, alpha: float = 32, dropout: float = 0.05,
                    seed: int = 0, device: str = "cpu") -> dict:
    """Qwen2.5-Coder-0.5B (real weights, ../shared/tools/make_qwen.sh) LoRA / QLoRA steps on packed chat text."""
    path = assets.real_model_dir("qwen2.5-0.5b")
    if path is None:
        return {"status": "missing", "reason": "Qwen2.5-Coder-0.5B-Instruct is not built (make_qwen.sh)"}
    dev = setup(device, seed)
    vocab, eos = (json.loads((path / "config.json").read_text())[k] for k in ("vocab_size", "eos_token_id"))
    source, batches = assets.lm_batches(vocab, batch_size, seq_len, warmup + steps, seed, eos_id=eos,
                                        tokenizer="qwen2.5-0.5b")
    load_s, model = timed(lambda: load(stack, path, precision=precision, device=dev), dev)
    model = add_lora(stack, model, r=r, alpha=alpha, dropout=dropout, targets=LLAMA_PROJECTIONS)
    seeded_lora_init(model, seed)
    result = _train(stack, model, batches, warmup, lr, dev, False, batch_size * seq_len)
    return {"model": "Qwen2.5-Coder-0.5B (real weights)", "data": source, "load_s": load_s, **result}


TASKS = {  # task -> (checkpoint, LoRA targets, modules_to_save)
    "sequence-classification": ("bert-base-random", BERT_TARGETS, ["classifier"]),
    "question-answering": ("bert-base-random", BERT_TARGETS, ["qa_outputs"]),
    "seq2seq": ("flan-t5-base-random", T5_TARGETS, None),
}


def task_step(stack: str, task: str, precision: str = "fp32", batch_size: int = 8, seq_len: int = 128,
              target_len: int = 64, warmup: int = 1, steps: int = 3, lr: float = 2e-4, r: int = 16,
              alpha: float = 32, dropout: float = 0.05, seed: int = 0, device: str = "cpu") -> dict:
    """BERT-base-shaped classification / QA and flan-t5-base-shaped seq2seq LoRA / QLoRA training steps."""
    dev = setup(device, seed)
    checkpoint, targets, modules_to_save = TASKS[task]
    path = assets.checkpoint_dir(checkpoint)
    vocab = assets.SHAPES[checkpoint.rsplit("-", 1)[0]]["vocab_size"]
    n = warmup + steps
    if task == "seq2seq":
        source, batches = assets.seq2seq_batches(vocab, batch_size, seq_len, target_len, n, seed)
    elif task == "question-answering":
        source, batches = assets.qa_batches(vocab, batch_size, seq_len, n, seed)
    else:
        source, batches = assets.cls_batches(vocab, batch_size, seq_len, n, seed)
    num_labels = 2 if task == "sequence-classification" else None
    load_s, model = timed(lambda: load(stack, path, task=task, precision=precision, device=dev,
                                       num_labels=num_labels), dev)
    model = add_lora(stack, model, r=r, alpha=alpha, dropout=dropout, targets=targets,
                     modules_to_save=modules_to_save)
    seeded_lora_init(model, seed)
    tokens = batch_size * (seq_len + (target_len if task == "seq2seq" else 0))
    result = _train(stack, model, batches, warmup, lr, dev, False, tokens)
    return {"model": f"{checkpoint} (random weights)", "data": source, "load_s": load_s, **result}


def load_checkpoint(stack: str, precision: str = "bf16", prequantized: bool = False,
                    device: str = "cpu") -> dict:
    """Time and peak RSS of loading the TinyLlama-1.1B-shaped sharded bf16 checkpoint (as bf16 or NF4), or
    the NF4 folder minilora saved from it (`prequantized`), measured from the page cache."""
    dev = setup(device)
    path = assets.checkpoint_dir(assets.PREQUANTIZED if prequantized else "tinyllama-1.1b-bf16")
    # Import everything first: load time is loading, not importing (case import_time measures that).
    if precision == "nf4" or prequantized:
        import bitsandbytes  # noqa: F401
    if stack == "minilora":
        minilora_api("from_pretrained", "QuantConfig")
        import minilora.models.llama  # noqa: F401
    else:
        import transformers

        transformers.LlamaForCausalLM  # noqa: B018  (resolves transformers' lazy modeling import)
    assets.warm_page_cache(path)
    reset_ok = reset_peak_memory(dev)
    rss_before = rss_bytes()
    if prequantized and stack == "minilora":  # the folder's quantization_config says NF4
        ml = minilora_api("from_pretrained")
        load_s, model = timed(lambda: ml.from_pretrained(path, dtype=torch.bfloat16, device=dev), dev)
    elif prequantized:
        import transformers

        load_s, model = timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map={"": dev}), dev)
    else:
        load_s, model = timed(lambda: load(stack, path, precision=precision, device=dev), dev)
    load_peak = peak_memory_bytes(dev)
    # transformers maps weight files and reads pages on first touch, so "loaded" memory and time show up only
    # when the weights are used: the first forward (8 tokens) is measured too, and its peak is the headline.
    with torch.no_grad():
        forward_s, logits = timed(lambda: model(torch.arange(8, device=dev)[None]).logits, dev)
    peak = peak_memory_bytes(dev)
    return {
        "model": "TinyLlama-1.1B shape (random bf16 weights)",
        "n_files": len(list(path.glob("*.safetensors"))), "checkpoint_bytes": assets.checkpoint_bytes(path),
        "load_s": load_s, "first_forward_s": forward_s, "load_peak_mem": load_peak, "peak_mem": peak,
        "rss_before": rss_before,
        "peak_over_before": peak - rss_before if reset_ok else None, "model_bytes": tensor_bytes(model),
        "memory_kind": memory_kind(dev), "logits_finite": bool(logits.isfinite().all()),
    }


def generation(stack: str, precision: str = "bf16", prompt_len: int = 32, new_tokens: int = 64,
               rounds: int = 3, seed: int = 0, device: str = "cpu") -> dict:
    """Greedy generation tokens/s of SmolLM2-135M with a LoRA adapter (all seven projections, r=16, a
    non-zero update), unmerged, then merged into the base (merge_and_unload)."""
    dev = setup(device, seed)
    kind, path = assets.smollm2_dir()
    _, batches = assets.lm_batches(assets.SHAPES["smollm2-135m"]["vocab_size"], 1, prompt_len, 1, seed)
    prompt = batches[0]["input_ids"].to(dev)
    model = add_lora(stack, load(stack, path, precision=precision, device=dev), dropout=0.0)
    seeded_lora_init(model, seed, b_std=0.02)
    model.eval()

    def measure(m: torch.nn.Module) -> tuple[float, list[int]]:
        generate(stack, m, prompt, 4)  # warm up kernels and caches
        runs = [timed(lambda: generate(stack, m, prompt, new_tokens), dev) for _ in range(rounds)]
        return new_tokens / median([s for s, _ in runs]), runs[0][1][0, prompt_len:].tolist()

    unmerged_tps, unmerged_tokens = measure(model)
    merged_tps, merged_tokens = measure(merge_and_unload(stack, model))
    return {"model": f"SmolLM2-135M ({kind} weights)", "new_tokens": new_tokens, "prompt_len": prompt_len,
            "unmerged_tokens_per_s": unmerged_tps, "merged_tokens_per_s": merged_tps,
            "unmerged_tokens": unmerged_tokens, "merged_tokens": merged_tokens}


IMPORTS = {"minilora": "import minilora", "peft": "import peft, transformers"}


def import_time(stack: str, runs: int = 5) -> dict:
    """Wall time of `import minilora` vs `import peft, transformers`, each in `runs` fresh interpreters."""
    probe = ("import sys, time; t = time.perf_counter(); {stmt}; t = time.perf_counter() - t; "
             "print(t, 'transformers' in sys.modules, 'peft' in sys.modules)")

    def run(stmt: str) -> tuple[float, float, bool, bool]:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", probe.format(stmt=stmt)], capture_output=True, text=True,
                             check=True, cwd=assets.REPO).stdout.split()
        return float(out[0]), time.perf_counter() - start, out[1] == "True", out[2] == "True"

    measured = [run(IMPORTS[stack]) for _ in range(runs)]
    torch_only = [run("import torch")[0] for _ in range(max(1, runs // 2))]
    return {"statement": IMPORTS[stack], "import_s": median([m[0] for m in measured]),
            "process_s": median([m[1] for m in measured]), "import_torch_s": median(torch_only),
            "pulls_transformers": measured[0][2], "pulls_peft": measured[0][3], "runs": runs}


@torch.no_grad()
def interop(stack: str = "both", precision: str = "fp32", seed: int = 0, device: str = "cpu") -> dict:
    """Adapter files of both stacks (LoRA r=16 on all seven projections of SmolLM2-135M, random non-zero
    updates), and the max logit difference when each stack loads the other's adapter. Runs both stacks."""
    if stack != "both":
        raise ValueError(f"interop runs both stacks in one process: stack must be 'both', got {stack!r}")
    dev = setup(device, seed)
    _, path = assets.smollm2_dir()
    _, batches = assets.lm_batches(assets.SHAPES["smollm2-135m"]["vocab_size"], 2, 64, 1, seed)
    ids = batches[0]["input_ids"].to(dev)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        logits, folders = {}, {}
        for i, side in enumerate(("minilora", "peft")):
            model = add_lora(side, load(side, path, precision=precision, device=dev), dropout=0.0)
            seeded_lora_init(model, seed + 1 + i, b_std=0.02)
            logits[side] = model(ids).logits.float()
            folders[side] = save_adapter(side, model, Path(tmp) / side)
            n_lora = sum(".lora_" in canonical_name(name) for name, _ in model.named_parameters())
            out[side] = {"adapter_bytes": (folders[side] / "adapter_model.safetensors").stat().st_size,
                         "config_bytes": (folders[side] / "adapter_config.json").stat().st_size,
                         "n_lora_tensors": n_lora}
            del model
        bases = {s: load(s, path, precision=precision, device=dev) for s in ("minilora", "peft")}
        base_logits = {s: m(ids).logits.float() for s, m in bases.items()}
        for side, other in (("minilora", "peft"), ("peft", "minilora")):
            model = load_adapter(side, bases[side], folders[other])
            diff = model(ids).logits.float() - logits[other]
            out[side]["loads_other_max_abs_diff"] = diff.abs().max().item()
    out["base_max_abs_diff"] = (base_logits["minilora"] - base_logits["peft"]).abs().max().item()
    out["adapter_effect_max_abs"] = (logits["minilora"] - base_logits["minilora"]).abs().max().item()
    out["logits_max_abs"] = logits["minilora"].abs().max().item()
    return out


def prepare(name: str) -> dict:
    """Generate a cached checkpoint (not timed); the runner calls this before the cases that need it."""
    return {"path": str(assets.prepare(name))}


CASES = {f.__name__: f for f in (train_step, qwen_train_step, task_step, fidelity, load_checkpoint, generation,
                                 import_time, interop, prepare)}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in CASES:
        print(f"usage: python -m benchmarks.cases <{'|'.join(CASES)}> '<json params>'", file=sys.stderr)
        return 2
    params = json.loads(argv[2]) if len(argv) > 2 else {}
    if not isinstance(params, dict):
        print(f"params must be a JSON object, got {argv[2]!r}", file=sys.stderr)
        return 2
    try:
        result = {"status": "ok", **CASES[argv[1]](**params)}
    except Missing as e:
        result = {"status": "missing", "reason": str(e)}
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
