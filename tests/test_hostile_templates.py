"""Chat templates from strangers: bounded in size and time (issue: hostile input, finding 7)."""
import time
from pathlib import Path

import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localmoe import chat_template
from localmoe.chat_template import ChatTemplate, ChatTemplateError, _GenerationTag, _tojson
from localmoe.gguf_file import open_gguf

TEMPLATES = Path(__file__).parent / "data" / "templates"
SHIPPED = Path(__file__).resolve().parent.parent / "models" / "shipped" / "shakespeare-moe-Q8_0.gguf"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello é 🦙"},
        {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "More <|im_end|>?"}]

HOSTILE = {
    "nested-range": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested-list": "{% set l = [0] * 100000 %}{% for i in l %}{% for j in l %}{% endfor %}{% endfor %}",
    "string-repeat": "{{ 'x' * 10**9 }}",
    "list-repeat": "{{ ([0] * 10**9) | length }}",
    "doubling": "{% set s = 'x' * 1000 %}" + "{% set s = s + s %}" * 40 + "{{ s | length }}",
    "tilde-doubling": "{% set s = 'x' * 1000 %}" + "{% set s = s ~ s %}" * 40 + "{{ s | length }}",
    "center": "{{ 'x' | center(10**9) }}",
    "ljust": "{{ 'x'.ljust(10**9) }}",
    "indent": "{{ ('a\n' * 100000) | indent(100000) }}",
    "replace": "{{ ('x' * 100000).replace('', 'y' * 100000) }}",
    "format-width": "{{ '%0999999999d' % 1 }}",
    "str-format-width": "{{ '{:>999999999}'.format(1) }}",
    "percent-star": "{{ '%*d' % (10**9, 1) }}",
    "power": "{{ 7 ** (10 ** 9) }}",
    "join": "{% set s = 'x' * 1000000 %}{{ [s, s, s, s, s, s, s, s, s, s] | join(s) }}",
    "output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "int-squaring": "{% set ns = namespace(a=2 ** 60000) %}{% for i in range(40) %}"
                    "{% set ns.a = ns.a * ns.a %}{% endfor %}{{ ns.a > 0 }}",
    "wordwrap": "{{ ('x ' * 4000000) | wordwrap(1) | length }}",
    "lipsum": "{{ lipsum(1000000) | length }}",
    "macro-loop": "{% macro f(n) %}{% for i in range(n) %}{{ f(0) }}{% endfor %}{% endmacro %}"
                  "{% for i in range(100000) %}{{ f(1000) }}{% endfor %}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_stops_with_a_clear_error(name):
    t0 = time.monotonic()
    tmpl = ChatTemplate(HOSTILE[name])
    with pytest.raises(ChatTemplateError) as ei:
        tmpl.render(CHAT)
    assert time.monotonic() - t0 < 10  # the render's limit is 5 s
    assert "MemoryError" not in str(ei.value)  # refused before allocating, not after memory ran out


def _reference_render(source, messages, gen, bos="", eos=""):
    """The plain sandbox, configured as localmoe's was before the limits."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    return env.from_string(source).render(messages=messages, bos_token=bos, eos_token=eos,
                                          add_generation_prompt=gen, tools=None, functions=None,
                                          function_call=None, tool_choice=None,
                                          raise_exception=lambda m: 1 / 0, strftime_now=lambda f: "x")


def _real_templates():
    out = {p.name: (p.read_text(), "", "<|im_end|>") for p in sorted(TEMPLATES.glob("*.jinja"))}
    md = open_gguf(SHIPPED).metadata
    out["shipped"] = (md["tokenizer.chat_template"], "", "")
    return out


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("name", list(_real_templates()))
def test_real_templates_render_as_the_plain_sandbox(name, gen):
    src, bos, eos = _real_templates()[name]
    for msgs in (CHAT, CHAT[1:], CHAT[:2]):
        assert ChatTemplate(src, bos, eos).render(msgs, add_generation_prompt=gen) == \
            _reference_render(src, msgs, gen, bos, eos)


def test_long_but_legal_conversation_still_renders():
    """The limits leave room for a long history: 2000 turns of 1000 characters."""
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "y" * 1000} for i in range(2000)]
    src = (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text()
    assert len(ChatTemplate(src, "", "<|im_end|>").render(msgs)) > 2_000_000


def test_output_cap_is_what_keeps_the_tokenizer_safe():
    big = [{"role": "user", "content": "z" * (getattr(chat_template, "MAX_CHARS", 8 << 20) + 1)}]
    with pytest.raises(ChatTemplateError, match="longer than|characters"):
        ChatTemplate(None).render(big)
