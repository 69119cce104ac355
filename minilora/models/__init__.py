"""Which minilora class implements a checkpoint: config.json's `model_type` + a task -> (config, model) class.

Model modules are imported only when a class is asked for, so `import minilora` stays cheap.
`from minilora.models import LlamaForCausalLM` works too (resolved lazily through `__getattr__`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    module: str             # where the classes live
    config_class: str
    tasks: dict[str, str]   # task -> model class name
    default_task: str


def _encoder(module: str, name: str) -> ModelFamily:
    """A BERT-like encoder family: the bare model and its two task heads, under HF's class names."""
    return ModelFamily(module, f"{name}Config", {"base": f"{name}Model",
                                                 "sequence-classification": f"{name}ForSequenceClassification",
                                                 "question-answering": f"{name}ForQuestionAnswering"}, "base")


FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily("minilora.models.llama", "LlamaConfig", {"causal-lm": "LlamaForCausalLM"}, "causal-lm"),
    "bert": _encoder("minilora.models.bert", "Bert"),
    "t5": ModelFamily("minilora.models.t5", "T5Config", {"seq2seq": "T5ForConditionalGeneration"}, "seq2seq"),
    "roberta": _encoder("minilora.models.roberta", "Roberta"),
    "xlm-roberta": _encoder("minilora.models.roberta", "XLMRoberta"),
    # Decoders that are Llama with a few config switches (minilora/models/families.py).
    **{model_type: ModelFamily("minilora.models.families", config, {"causal-lm": model}, "causal-lm")
       for model_type, config, model in [
           ("qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
           ("qwen3", "Qwen3Config", "Qwen3ForCausalLM"),
           ("mistral", "MistralConfig", "MistralForCausalLM"),
           ("gemma", "GemmaConfig", "GemmaForCausalLM"),
           ("gemma2", "Gemma2Config", "Gemma2ForCausalLM"),
           ("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM"),
           ("gemma3", "Gemma3Config", "Gemma3ForConditionalGeneration"),
           ("phi3", "Phi3Config", "Phi3ForCausalLM"),
           ("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM"),
       ]},
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# HF class names found in config.json "architectures" -> minilora task: minilora's classes (named as HF's) and
# the HF classes minilora lacks. Bare decoders map to the causal LM, masked-LM and pre-training heads to the
# base model (their extra head tensors are dropped with a warning on load).
ARCHITECTURE_TASKS = {
    **{name: task for family in FAMILIES.values() for task, name in family.tasks.items()},
    **{f"{name}Model": "causal-lm"
       for name in ("Llama", "Qwen2", "Qwen3", "Mistral", "Gemma", "Gemma2", "Gemma3", "Phi3", "SmolLM3")},
    **{f"{name}ForMaskedLM": "base" for name in ("Bert", "Roberta", "XLMRoberta")},
    "BertForPreTraining": "base",
    "T5WithLMHeadModel": "seq2seq",
    "T5Model": "seq2seq",
}

# Other spellings users reach for (peft TaskType values, pipeline names) -> canonical task.
TASK_ALIASES = {
    **dict.fromkeys(("causal-lm", "text-generation"), "causal-lm"),
    **dict.fromkeys(("seq2seq", "seq-2-seq-lm", "seq2seq-lm", "text2text-generation"), "seq2seq"),
    **dict.fromkeys(("base", "feature-extraction"), "base"),
    **dict.fromkeys(("sequence-classification", "seq-cls", "text-classification"), "sequence-classification"),
    **dict.fromkeys(("question-answering", "question-ans", "qa"), "question-answering"),
}


def model_family(model_type: str | None) -> ModelFamily:
    """The registry entry for a config.json `model_type`; ValueError listing the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r} in config.json: minilora supports "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return FAMILIES[model_type]


def resolve_task(config_dict: dict, task: str | None = None) -> str:
    """The task to build: `task` if given, else from config.json `architectures`, else the type's default."""
    family = model_family(config_dict.get("model_type"))
    if task is not None:
        canonical = TASK_ALIASES.get(task.strip().lower().replace("_", "-"))
        if canonical not in family.tasks:
            raise ValueError(f"task {task!r} is not available for model_type {config_dict['model_type']!r}: "
                             f"choose one of {', '.join(family.tasks)}")
        return canonical
    for architecture in config_dict.get("architectures") or []:
        if ARCHITECTURE_TASKS.get(architecture) in family.tasks:
            return ARCHITECTURE_TASKS[architecture]
    return family.default_task


def model_classes(config_dict: dict, task: str | None = None) -> tuple[type, type]:
    """(config class, model class) for a config.json dict and an optional task."""
    family = model_family(config_dict.get("model_type"))
    module = importlib.import_module(family.module)
    return getattr(module, family.config_class), getattr(module, family.tasks[resolve_task(config_dict, task)])


def __getattr__(name: str):
    for family in FAMILIES.values():
        if name == family.config_class or name in family.tasks.values():
            return getattr(importlib.import_module(family.module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
