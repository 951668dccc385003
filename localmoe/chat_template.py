"""Chat templates from GGUF metadata, rendered in jinja2's immutable sandbox.

Templates come from model files, i.e. from strangers: every render goes
through `environment()`, which only builds ImmutableSandboxedEnvironment, and
templates see only the data and helpers below. This matches what
llama-cpp-python's Jinja2ChatFormatter and HF transformers expose.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import LocalMoEError

# Used when a model has no tokenizer.chat_template.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class ChatTemplateError(LocalMoEError):
    """The model's chat template is invalid, unsafe, or refused the conversation."""


class _GenerationTag(jinja2.ext.Extension):
    """HF's `{% generation %}` marker: render its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise ChatTemplateError(f"chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def environment() -> ImmutableSandboxedEnvironment:
    """The one factory for template environments (a test forbids any other)."""
    env = ImmutableSandboxedEnvironment(
        loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    return env


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        self.source = source if source else FALLBACK_TEMPLATE
        self.is_fallback = not source
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self._template = environment().from_string(self.source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template does not compile: {e}") from None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        data = dict(messages=[dict(m) for m in messages], bos_token=self.bos_token, eos_token=self.eos_token,
                    add_generation_prompt=add_generation_prompt, raise_exception=_raise_exception,
                    strftime_now=_strftime_now, tools=None, functions=None, function_call=None, tool_choice=None)
        data.update(extra)
        try:
            return self._template.render(**data)
        except ChatTemplateError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"chat template tried an unsafe operation and was stopped: {e}") from None
        except Exception as e:  # a template is arbitrary code: any failure is the template's
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None

    def turn_end(self) -> str:
        """The text the template writes after an assistant message, e.g. '<|im_end|>\\n', or
        '\\n\\n' for a template whose turns end in plain text (no end-of-turn token to stop at)."""
        mark = "\ue000reply\ue000"  # private-use text no template rewrites
        try:
            out = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}],
                              add_generation_prompt=False)
        except ChatTemplateError:
            return ""
        return out.split(mark, 1)[1] if mark in out else ""

    @classmethod
    def from_metadata(cls, metadata, tokenizer=None) -> "ChatTemplate":
        """From GGUF metadata; bos/eos text from the tokenizer's vocab when given."""
        bos = eos = ""
        tokens = metadata.get("tokenizer.ggml.tokens")
        if tokens is not None:
            bid, eid = metadata.get("tokenizer.ggml.bos_token_id"), metadata.get("tokenizer.ggml.eos_token_id")
            bos = tokens[bid] if bid is not None and 0 <= bid < len(tokens) else ""
            eos = tokens[eid] if eid is not None and 0 <= eid < len(tokens) else ""
        return cls(metadata.get("tokenizer.chat_template"), bos, eos)
