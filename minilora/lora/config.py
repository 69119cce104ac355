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
    "use_dora": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
    "layers_to_transform": None, "layer_replication": None, "use_qalora": False, "lora_bias": False,
    "target_parameters": None, "trainable_token_indices": None,
}


@dataclass
class LoraConfig:
    """Hyperparameters of a LoRA adapter, with peft's names so adapter_config.json files interoperate.

    target_modules: a list of module-name suffixes (`["q_proj", "v_proj"]` matches `...self_attn.q_proj`), a
    regex string fully matched against the module path (as peft does), `"all-linear"` (every linear layer
    except the output head), or None for the model type's usual default (q/v projections).
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
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # peft fields passed through on save

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (tuple, set, str)):
            self.modules_to_save = [self.modules_to_save] if isinstance(self.modules_to_save, str) \
                else list(self.modules_to_save)
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
        if not isinstance(self.use_rslora, bool):
            raise fail("use_rslora", "True or False (a JSON boolean, not a string)")
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

    def to_peft_dict(self, **overrides: Any) -> dict[str, Any]:
        """The adapter_config.json content, in peft's schema."""
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        d.update({
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None,
            "inference_mode": True, "fan_in_fan_out": False, "use_dora": False, "rank_pattern": {},
            "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
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
