"""LoraConfig: peft's field names and meanings, validated up front."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
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
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or not math.isfinite(self.lora_alpha) \
                or self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig.lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init_lora_weights not in INIT_MODES or isinstance(self.init_lora_weights, int) and \
                not isinstance(self.init_lora_weights, bool):
            raise ValueError(f"LoraConfig.init_lora_weights must be True, False or 'gaussian', "
                             f"got {self.init_lora_weights!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"LoraConfig.{name} must be a non-empty list of module names or a regex "
                                 f"string, got {value!r}")
        if self.modules_to_save is not None and not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise ValueError(f"LoraConfig.modules_to_save must be a list of module names, "
                             f"got {self.modules_to_save!r}")

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
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
