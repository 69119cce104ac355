"""Chat templates: HF's jinja templates rendered in a sandbox, or a built-in ChatML / Llama-2 renderer."""
from __future__ import annotations

import json
import re
from typing import Any


# `{% generation %}...{% endgeneration %}` blocks (the assistant's output, as a template marks it) are rendered
# between these two private-use characters, then cut out of the text and returned as character spans.
_GENERATION_START, _GENERATION_END = "\ue000", "\ue001"


def render_chat(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                special_tokens: dict[str, str]) -> str:
    """Render `messages` with a chat template: jinja2 if installed (>= 3.1.6), else the built-in renderer."""
    return render_chat_with_generation_spans(template, messages, add_generation_prompt, special_tokens)[0]


def render_chat_with_generation_spans(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                                      special_tokens: dict[str, str]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the (start, end) character spans of its `{% generation %}` blocks, if any."""
    if not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError("messages must be a list of {'role': str, 'content': str} dicts")
    try:
        import jinja2
    except ImportError:
        jinja2 = None
    if jinja2 is None or tuple(map(int, re.findall(r"\d+", jinja2.__version__)[:3])) < (3, 1, 6):
        return render_builtin_chat(template, messages, add_generation_prompt, special_tokens), []
    marked = _render_jinja(template, messages, add_generation_prompt, special_tokens)
    text, spans, start = "", [], 0
    for piece in re.split(f"([{_GENERATION_START}{_GENERATION_END}])", marked):
        if piece == _GENERATION_START:
            start = len(text)
        elif piece == _GENERATION_END:
            spans.append((start, len(text)))
        else:
            text += piece
    return text, spans


def _render_jinja(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                  special_tokens: dict[str, str]) -> str:
    """The template rendered in the same sandboxed environment as transformers (templates are untrusted)."""
    from datetime import datetime

    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # jinja's own tojson escapes HTML characters
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class GenerationBlocks(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`, as transformers: the block renders as is, marked."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller) -> str:
            return _GENERATION_START + caller() + _GENERATION_END

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, GenerationBlocks])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=[dict(m) for m in messages],
                                                add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template failed: {e}") from e


_CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n(.+?)<\|im_end\|>", re.S)


def render_builtin_chat(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                        special_tokens: dict[str, str]) -> str:
    """ChatML or Llama-2 [INST] chat, whichever `template` uses, without jinja2."""
    if "<|im_start|>" in template:
        default_system = _CHATML_DEFAULT_SYSTEM.search(template)  # e.g. SmolLM2's "You are a helpful ..."
        if default_system and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": default_system.group(1)}, *messages]
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
    if "[INST]" not in template:
        raise ValueError("this chat template is neither ChatML nor Llama-2: rendering it needs jinja2 >= 3.1.6 "
                         "(`pip install -U jinja2`)")
    bos, eos = special_tokens.get("bos_token", "<s>"), special_tokens.get("eos_token", "</s>")
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    text = ""
    for i, message in enumerate(turns):
        if message["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError("Llama-2 chat needs user/assistant turns alternating, starting with user "
                             "(after an optional system message)")
        content = message["content"]
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        text += f"{bos}[INST] {content.strip()} [/INST]" if i % 2 == 0 else f" {content.strip()} {eos}"
    return text
