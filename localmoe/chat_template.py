"""Chat templates from GGUF metadata, rendered in jinja2's immutable sandbox.

Templates come from model files, i.e. from strangers: every render goes
through `environment()`, which only builds an ImmutableSandboxedEnvironment, and
templates see only the data and helpers below. This matches what
llama-cpp-python's Jinja2ChatFormatter and HF transformers expose.

The sandbox stops unsafe attribute access but not unbounded work, so the
environment also bounds it (the server renders for remote clients):
- size: no string, list or output longer than MAX_CHARS / MAX_ITEMS, checked
  before an operation that could build one (`*`, `+`, `~`, `%`, str methods and
  filters with a width or count) and on every result;
- time: a render past TIME_LIMIT seconds stops, checked on every call, attribute
  access, operator, output chunk and for-loop step (each loop's iterable is
  wrapped at compile time, so even empty nested loops are counted);
- constant folding is off, so nothing a template asks for runs at compile time.
"""
from __future__ import annotations

import functools
import json
import re
import threading
import time
from datetime import datetime
from typing import Any, Sequence

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from .errors import LocalMoEError

MAX_CHARS = 8 << 20    # longest string a template may build, and its whole output (~2M tokens)
MAX_ITEMS = 1 << 20    # longest list, tuple or dict
MAX_POW_BITS = 1 << 16  # largest integer `**` may make
TIME_LIMIT = 5.0       # seconds per render; real templates take milliseconds

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
    if indent is not None and len(str(indent) if not isinstance(indent, int) else " " * min(indent, 65)) > 64:
        raise ChatTemplateLimitError("tojson indent is larger than 64")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise ChatTemplateError(f"chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplateLimitError(ChatTemplateError):
    """A template went past a size or time limit of the sandbox."""


_DIGITS = re.compile(r"\d+")


def _check_size(x):
    """x, or ChatTemplateLimitError when it is a string or container past the limits."""
    if isinstance(x, str):
        if len(x) > MAX_CHARS:
            raise ChatTemplateLimitError(f"chat template built a string of {len(x)} characters "
                                         f"(the limit is {MAX_CHARS})")
    elif isinstance(x, (list, tuple, dict)) and len(x) > MAX_ITEMS:
        raise ChatTemplateLimitError(f"chat template built a list of {len(x)} items (the limit is {MAX_ITEMS})")
    return x


def _need(n: int, what: str) -> None:
    if n > MAX_CHARS:
        raise ChatTemplateLimitError(f"chat template asked for {what} of {n} characters or items "
                                     f"(the limit is {MAX_CHARS})")


def _check_format(fmt: str) -> None:
    """A format string ('%' or str.format) whose widths or precisions could make a huge string."""
    for m in _DIGITS.finditer(fmt):
        if len(m.group()) > 7 or int(m.group()) > MAX_CHARS:
            _need(10 ** min(len(m.group()), 30), "a formatted field")


def _growth(obj, args, kwargs) -> int:
    """A bound on the length of what str method `obj` returns (0: nothing to bound beforehand)."""
    s, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    if not isinstance(s, str):
        return 0
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        n = s.count(args[0]) if args[0] else len(s) + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            n = min(n, args[2])
        return len(s) + n * len(args[1])
    if name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        return len(s) + s.count("\t") * size if isinstance(size, int) else 0
    if name == "join" and args and isinstance(args[0], (list, tuple)):
        return _join_size(args[0], s)
    if name in ("format", "format_map"):
        _check_format(s)
    return 0


def _join_size(items, sep) -> int:
    return sum(len(x) if isinstance(x, str) else 0 for x in items) + max(len(items) - 1, 0) * len(str(sep))


def _check_ints(args, kwargs) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_CHARS:
            _need(abs(a), "a width or count")


# filters that work in pure Python over their whole input, out of reach of the deadline checks
_SLOW_FILTERS = {"wordwrap": 1 << 16, "urlize": 1 << 16, "striptags": 1 << 20}


def _guard_filter(name: str, f):
    """A filter with the same limits as calls; `indent` and `replace` grow per line / per match."""
    @functools.wraps(f)  # keeps jinja_pass_arg (pass_context, pass_environment...)
    def guarded(*args, **kwargs):
        _tick()
        _check_ints(args, kwargs)
        value = next((a for a in args if isinstance(a, str)), None)  # the filtered value, after any context
        if value is not None:
            i = [a is value for a in args].index(True)
            rest = args[i + 1:]
            if name == "indent":
                w = rest[0] if rest else kwargs.get("width", 4)
                _need(len(value) + (value.count("\n") + 1) * (w if isinstance(w, int) else len(str(w))),
                      "an indented string")
            elif name == "replace" and len(rest) >= 2:
                _need(_growth(value.replace, rest, {}), "a string")
            elif name == "format":
                _check_format(value)
            elif name in _SLOW_FILTERS and len(value) > _SLOW_FILTERS[name]:
                raise ChatTemplateLimitError(f"chat template passed {len(value)} characters to the "
                                             f"{name} filter (the limit is {_SLOW_FILTERS[name]})")
        if name == "join":
            seq = next((a for a in args if isinstance(a, (list, tuple))), None)
            if seq is not None:
                _need(_join_size(seq, args[-1] if isinstance(args[-1], str) and args[-1] is not seq else
                                 kwargs.get("d", "")), "a joined string")
        return _check_size(f(*args, **kwargs))
    return guarded


# the deadline of the render running on this thread (None outside a render)
_state = threading.local()


def _tick() -> None:
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise ChatTemplateLimitError(f"chat template took longer than {TIME_LIMIT:g} s to render and was stopped")


def _limit_iter(iterable):
    """A for-loop's iterable, counted against the render's deadline."""
    for i, x in enumerate(iterable):
        if not i & 255:
            _tick()
        yield x


def _concat(items) -> str:
    """`a ~ b ~ ...` (jinja2's str_join), bounded."""
    parts = [str(x) for x in items]
    _need(sum(map(len, parts)), "a concatenated string")
    return "".join(parts)


class _Bound(NodeTransformer):
    """Route every for-loop iterable and `~` concatenation through the limits above."""

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "_limit_iter", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node):
        node = self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), "_concat", [], [], None, None,
                            lineno=node.lineno)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def call_binop(self, context, operator, left, right):
        _tick()
        sized = (str, list, tuple)
        if operator == "*":
            seq, n = (left, right) if isinstance(left, sized) else (right, left)
            if isinstance(seq, sized) and isinstance(n, int):
                _need(len(seq) * max(n, 0), "a repeated string or list")
            elif isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_POW_BITS:  # squaring in a loop
                raise ChatTemplateLimitError("chat template asked for a product of huge integers")
        elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
            _need(len(left) + len(right), "a concatenated string or list")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if abs(left) > 1 and abs(left).bit_length() * right > MAX_POW_BITS:
                raise ChatTemplateLimitError(f"chat template asked for {left} ** {right}: too large")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
            _check_ints(right if isinstance(right, tuple) else (right,), {})  # '%*d' takes widths from here
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        _tick()
        _check_ints(args, kwargs)
        _need(_growth(__obj, args, kwargs), "a string")
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped

    def getattr(self, obj, attribute):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)

    def _parse(self, source, name, filename):
        tree = _Bound().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree


def environment() -> ImmutableSandboxedEnvironment:
    """The one factory for template environments (a test forbids any other): the immutable
    sandbox, bounded in size and time (see the module's docstring)."""
    env = _BoundedEnvironment(
        loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True, optimized=False,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    del env.globals["lipsum"]  # lipsum(n) builds n paragraphs in pure Python: no template needs it
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.filters["_limit_iter"] = _limit_iter
    env.filters["_concat"] = _concat
    return env


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        if source is not None and not isinstance(source, str):
            raise ChatTemplateError(f"the chat template must be text, got {type(source).__name__}")
        self.source = source if source else FALLBACK_TEMPLATE
        self.is_fallback = not source
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self._template = environment().from_string(self.source)
        except (jinja2.TemplateError, SyntaxError) as e:
            # jinja2 leaves some errors to Python's compiler of the generated code ('break' outside a loop)
            raise ChatTemplateError(f"chat template does not compile: {e}") from None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        data = dict(messages=[dict(m) for m in messages], bos_token=self.bos_token, eos_token=self.eos_token,
                    add_generation_prompt=add_generation_prompt, raise_exception=_raise_exception,
                    strftime_now=_strftime_now, tools=None, functions=None, function_call=None, tool_choice=None)
        data.update(extra)
        out, n = [], 0
        _state.deadline = time.monotonic() + TIME_LIMIT
        try:
            for chunk in self._template.generate(**data):
                n += len(chunk)
                if n > MAX_CHARS:
                    raise ChatTemplateLimitError(f"chat template output is longer than {MAX_CHARS} characters")
                _tick()
                out.append(chunk)
            return "".join(out)
        except ChatTemplateError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"chat template tried an unsafe operation and was stopped: {e}") from None
        except Exception as e:  # a template is arbitrary code: any failure is the template's
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
        finally:
            _state.deadline = None

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
