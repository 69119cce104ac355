"""The two stacks behind one small interface, so every case runs the same code path for both:
"minilora" (minilora alone) and "peft" (transformers + peft + bitsandbytes, the usual recipe).

Same checkpoint, dtype, quantization (NF4, double quantization), LoRA hyperparameters and seeded LoRA init on
both sides, and the same precision recipe: plain LoRA in the weights' dtype; QLoRA as the QLoRA recipe runs it,
norms, embeddings and head (so the residual stream) in fp32 and the quantized products in the compute dtype
(peft: `prepare_model_for_kbit_training`; minilora: its default for `quantize=` without `dtype`). Both use
non-reentrant gradient checkpointing.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import torch
from torch import nn

STACKS = ("minilora", "peft")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HF_CLASSES = {"causal-lm": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM",
              "sequence-classification": "AutoModelForSequenceClassification",
              "question-answering": "AutoModelForQuestionAnswering"}
# Task heads bitsandbytes must leave dense. transformers' default keeps only the last parameter's module,
# which misses BERT's heads (the last parameter is `classifier.bias`): users pass llm_int8_skip_modules.
HF_DENSE_HEADS = {"sequence-classification": ["classifier"], "question-answering": ["qa_outputs"]}


class Missing(Exception):
    """A minilora feature the case needs is not available: the case reports "missing", not a number."""


def minilora_api(*names: str):
    """`import minilora`, checking that `names` exist (lazy attributes are imported here)."""
    import minilora as ml

    for name in names:
        try:
            getattr(ml, name)
        except (AttributeError, ModuleNotFoundError) as e:
            raise Missing(f"minilora.{name} is not available ({e})") from e
    return ml


def fast_bf16_products(device: torch.device | str) -> bool:
    """Whether bf16 matrix products on `device` run on fast kernels, not PyTorch's CPU reference GEMM (AVX2)."""
    from minilora.ops.gemm import cpu_has_fast_bf16_gemm

    return torch.device(device).type != "cpu" or cpu_has_fast_bf16_gemm()


def check_stack(stack: str) -> None:
    if stack not in STACKS:
        raise ValueError(f"stack must be one of {STACKS}, got {stack!r}")


def load(stack: str, path: Path, *, task: str = "causal-lm", precision: str = "fp32", device: torch.device,
         num_labels: int | None = None) -> nn.Module:
    """The base model. precision: "fp32" | "bf16" | "nf4" (4-bit NF4 linears, double quant, bf16 compute, the
    rest in fp32) | "nf4-fp32" (the same with fp32 compute: the like-for-like QLoRA step on CPUs without fast
    bf16 matrix kernels, where peft's bf16 products take PyTorch's slow reference kernel)."""
    check_stack(stack)
    quantized = precision.startswith("nf4")
    compute = torch.float32 if precision == "nf4-fp32" else torch.bfloat16
    dtype = torch.bfloat16 if quantized else DTYPES[precision]  # as stored: the quantizers' input
    if stack == "minilora":
        ml = minilora_api("from_pretrained", "QuantConfig")
        if quantized:  # dtype=None: QLoRA's fp32 norms, embeddings and head
            quantize = ml.QuantConfig(quant_type="nf4", double_quant=True, compute_dtype=compute)
            return ml.from_pretrained(path, task=task, num_labels=num_labels, device=device, quantize=quantize)
        return ml.from_pretrained(path, task=task, num_labels=num_labels, dtype=dtype, device=device)
    import transformers

    kwargs = {"num_labels": num_labels} if num_labels is not None else {}
    if quantized:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=HF_DENSE_HEADS.get(task))
    auto_class = getattr(transformers, HF_CLASSES[task])
    model = auto_class.from_pretrained(path, dtype=dtype, device_map={"": device}, **kwargs)
    model.config.use_cache = False  # training: no KV cache (generation passes use_cache itself)
    if quantized:
        import peft

        # fp32 norms, embeddings and head; gradient checkpointing is the case's choice, not this call's
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model.eval()


def add_lora(stack: str, model: nn.Module, *, r: int = 16, alpha: float = 32, dropout: float = 0.05,
             targets: list[str] | str = LLAMA_PROJECTIONS,
             modules_to_save: list[str] | None = None) -> nn.Module:
    """LoRA on `targets` (base frozen); returns the model to train (peft: the PeftModel wrapper)."""
    if stack == "minilora":
        ml = minilora_api("apply_lora", "LoraConfig")
        return ml.apply_lora(model, ml.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                  target_modules=targets, modules_to_save=modules_to_save))
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             modules_to_save=modules_to_save)
    return peft.get_peft_model(model, config)


def canonical_name(name: str) -> str:
    """A parameter name without peft's wrapper parts, e.g. `model.layers.0.self_attn.q_proj.lora_A.weight`."""
    return name.removeprefix("base_model.model.").replace(".default.", ".")


@torch.no_grad()
def seeded_lora_init(model: nn.Module, seed: int = 0, b_std: float = 0.0) -> int:
    """Give both stacks the same LoRA init, keyed by parameter name: A ~ U(+-1/sqrt(in)) (Kaiming, as peft),
    B = 0 (or N(0, b_std) for a non-zero update). Returns how many LoRA matrices were set."""
    n = 0
    for name, p in model.named_parameters():
        key = canonical_name(name)
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        if ".lora_A." in key:
            bound = p.shape[1] ** -0.5
            value = torch.rand(p.shape, generator=g) * 2 * bound - bound
        else:
            value = torch.randn(p.shape, generator=g) * b_std
        p.copy_(value.to(p.dtype))
        n += 1
    return n


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), the same rule for both stacks: minilora's (shared tensors once, a packed 4-bit
    byte = 2 parameters), which works on any nn.Module."""
    return minilora_api("trainable_parameters").trainable_parameters(model)


def enable_gradient_checkpointing(stack: str, model: nn.Module) -> None:
    if stack == "minilora":
        minilora_api("enable_gradient_checkpointing").enable_gradient_checkpointing(model)
    else:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def generate(stack: str, model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding of exactly `new_tokens` tokens (EOS does not stop either stack)."""
    if stack == "minilora":
        ml = minilora_api("generate")
        never = model.config.vocab_size  # an id no logit has: generation never stops early
        return ml.generate(model, input_ids, max_new_tokens=new_tokens, eos_token_id=never)
    return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True)


def merge_and_unload(stack: str, model: nn.Module) -> nn.Module:
    if stack == "minilora":
        return minilora_api("merge_and_unload").merge_and_unload(model)
    return model.merge_and_unload()


def save_adapter(stack: str, model: nn.Module, out: Path) -> Path:
    if stack == "minilora":
        minilora_api("save_adapter").save_adapter(model, out)
    else:
        model.save_pretrained(out)
    return out


def load_adapter(stack: str, base: nn.Module, folder: Path) -> nn.Module:
    if stack == "minilora":
        return minilora_api("load_adapter").load_adapter(base, folder)
    import peft

    return peft.PeftModel.from_pretrained(base, folder)
