"""LoraConfig: peft's field names and meanings, validated up front."""
from __future__ import annotations

import copy
import math
import re
from dataclasses import FrozenInstanceError, asdict, dataclass, field, fields
from typing import Any

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian")

# peft fields that select features minilora does not implement: loading an adapter that turns one of them on
# must fail loudly rather than silently compute something else.
_UNSUPPORTED_WHEN_SET = {
    "fan_in_fan_out": False, "layer_replication": None, "use_qalora": False, "lora_bias": False,
    "target_parameters": None, "trainable_token_indices": None,
}


@dataclass
class LoraConfig:
    """Hyperparameters of a LoRA adapter, with peft's names so adapter_config.json files interoperate.

    target_modules: a list of module-name suffixes (`["q_proj", "v_proj"]` matches `...self_attn.q_proj`), a
    regex string fully matched against the module path (as peft does), `"all-linear"` (every linear layer
    except the output head), or None for the model type's usual default (q/v projections).
    rank_pattern / alpha_pattern: per-module r / lora_alpha, {pattern: value}; a module takes the value of the
    first pattern that matches the end of its path on a module boundary (peft's rule: `v_proj`,
    `layers\\.0\\.self_attn\\.q_proj`), else r / lora_alpha.
    use_dora: DoRA (`minilora.lora.dora`): the merged weight's rows rescaled to trained magnitudes.
    layers_to_transform / layers_pattern: with a list of target_modules, only the modules inside
    these layer indices; the index is the number after `<layers_pattern>.` in the path (`layers`, `h`, ...),
    or the first number in it when layers_pattern is None.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # peft fields passed through on save

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (tuple, set, str)):
            self.modules_to_save = [self.modules_to_save] if isinstance(self.modules_to_save, str) \
                else list(self.modules_to_save)
        if self.layers_to_transform == []:  # peft: an empty list selects every layer
            self.layers_to_transform = None
        self.validate()

    def validate(self) -> None:
        def fail(name: str, expected: str) -> ValueError:
            return ValueError(f"LoraConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise fail("r", "a positive integer")
        if not is_number(self.lora_alpha) or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise fail("lora_alpha", "a positive number")
        if not is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise fail("lora_dropout", "a number in [0, 1)")
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise fail(name, "True or False (a JSON boolean, not a string)")
        if self.bias not in BIAS_MODES:
            raise fail("bias", f"one of {BIAS_MODES}")
        if self.init_lora_weights not in INIT_MODES or isinstance(self.init_lora_weights, int) and \
                not isinstance(self.init_lora_weights, bool):
            raise fail("init_lora_weights", "True, False or 'gaussian'")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as e:
                    raise ValueError(f"LoraConfig.{name}: {value!r} is not a valid regular expression ({e})") from None
            elif value is not None and (not isinstance(value, list) or not value
                                        or not all(isinstance(v, str) and v for v in value)):
                raise fail(name, "a non-empty list of module names or a regex string")
        for name, valid, expected in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool)
                                       and v > 0, "positive integers"),
                                      ("alpha_pattern", lambda v: is_number(v) and math.isfinite(v) and v > 0,
                                       "positive numbers")):
            patterns = getattr(self, name)
            if not isinstance(patterns, dict) or not all(isinstance(k, str) and k and valid(v)
                                                         for k, v in patterns.items()):
                raise fail(name, f"a dict of module-name patterns to {expected}")
            for key in patterns:
                try:
                    re.compile(key)
                except re.error as e:
                    raise ValueError(f"LoraConfig.{name}: {key!r} is not a valid regular expression ({e})") from None
        layers = self.layers_to_transform
        is_index = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
        if layers is not None and not is_index(layers) and not (isinstance(layers, list) and layers
                                                               and all(is_index(v) for v in layers)):
            raise fail("layers_to_transform", "None, a layer index or a list of layer indices (ints >= 0)")
        pattern = self.layers_pattern
        if pattern is not None and not (isinstance(pattern, str) and pattern) and not (
                isinstance(pattern, list) and all(isinstance(p, str) and p for p in pattern)):
            raise fail("layers_pattern", "None, a module-list name such as 'layers', or a list of such names")
        if isinstance(self.target_modules, str) and (layers is not None or pattern):  # as peft refuses it
            raise ValueError("LoraConfig.layers_to_transform / layers_pattern need a list of target_modules, not "
                             f"{self.target_modules!r}: name the modules, or put the layers in a regex")
        if pattern and layers is None:
            raise ValueError("LoraConfig.layers_pattern is set but layers_to_transform is not: name the layers")
        if self.modules_to_save is not None and (not isinstance(self.modules_to_save, list)
                                                 or not all(isinstance(m, str) and m for m in self.modules_to_save)):
            raise fail("modules_to_save", "None or a list of module names")

    def frozen_copy(self) -> LoraConfig:
        """A copy whose fields cannot change: the config a model's LoRA layers were built with (`apply_lora`
        keeps one as `model.lora_config`), so `save_adapter` always writes what the layers hold."""
        frozen = copy.deepcopy(self)
        object.__setattr__(frozen, "_frozen", True)
        return frozen

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise FrozenInstanceError(f"cannot set LoraConfig.{name}: this config describes LoRA layers already "
                                      "built (model.lora_config); changing it would not change them. Build a new "
                                      f"config (dataclasses.replace(config, {name}=...)) and apply it to a fresh model")
        super().__setattr__(name, value)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_for(self, path: str) -> int:
        """r of the LoRA layer at module path `path` (rank_pattern, else r)."""
        return _pattern_value(self.rank_pattern, path, self.r)

    def alpha_for(self, path: str) -> float:
        """lora_alpha of the LoRA layer at module path `path` (alpha_pattern, else lora_alpha)."""
        return _pattern_value(self.alpha_pattern, path, self.lora_alpha)

    def to_peft_dict(self, **overrides: Any) -> dict[str, Any]:
        """The adapter_config.json content, in peft's schema."""
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        d.update({
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None,
            "inference_mode": True, "fan_in_fan_out": False,
        })
        d.update(self.extra)
        d.update(overrides)
        return d

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Read a peft adapter_config.json dict; refuse adapters that use features minilora lacks."""
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{source}: peft_type is {d.get('peft_type')!r}; minilora loads only LORA adapters")
        for key, default in _UNSUPPORTED_WHEN_SET.items():
            if d.get(key, default) not in (default, None):
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported by minilora "
                                 f"(supported value: {default!r})")
        names = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: d[k] for k in names if k in d}
        for key in ("r", "lora_alpha"):
            if key not in d:
                raise ValueError(f"{source}: missing required field {key!r}")
        extra = {k: d[k] for k in ("task_type", "base_model_name_or_path", "revision") if k in d}
        try:
            return cls(**kwargs, extra=extra)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{source}: {e}") from None


def _pattern_value(patterns: dict, path: str, default):
    """The value of the first pattern matching the end of `path` on a module boundary, else `default`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default
