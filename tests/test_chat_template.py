import re
from pathlib import Path

import pytest

from localmoe.chat_template import FALLBACK_TEMPLATE, ChatTemplate, ChatTemplateError

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).parent / "data" / "templates"
# DeepSeek-V2's template as llama.cpp's tests/test-chat-template.cpp lists it.
DEEPSEEK_V2 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you? <|im_end|> é 🦙"},
]


def cases():
    from llama_cpp import llama_chat_format as f
    return {
        "mixtral": (f.MIXTRAL_INSTRUCT_CHAT_TEMPLATE, "<s>", "</s>", CONVERSATION[1:]),
        "qwen3-chatml": ((TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text(), "", "<|im_end|>", CONVERSATION),
        "deepseek-v2": (DEEPSEEK_V2, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", CONVERSATION),
        "deepseek-v3.1": ((TEMPLATES / "deepseek-ai-DeepSeek-V3.1.jinja").read_text(),
                          "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", CONVERSATION),
    }


@pytest.mark.reference
@pytest.mark.parametrize("name", ["mixtral", "qwen3-chatml", "deepseek-v2", "deepseek-v3.1"])
@pytest.mark.parametrize("gen", [True, False])
def test_same_prompt_as_llama_cpp_python(name, gen):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    src, bos, eos, msgs = cases()[name]
    ref = Jinja2ChatFormatter(src, eos_token=eos, bos_token=bos, add_generation_prompt=gen)(messages=msgs).prompt
    ours = ChatTemplate(src, bos, eos).render(msgs, add_generation_prompt=gen)
    assert ours == ref
    assert "Hello" in ours


@pytest.mark.parametrize("evil", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__['os'].system('touch PWNED') }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% set x = messages.append({'role': 'user'}) %}",
])
def test_malicious_template_fails_clearly_and_runs_nothing(evil, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ChatTemplateError, match="chat template"):
        ChatTemplate(evil).render(CONVERSATION)
    assert not (tmp_path / "PWNED").exists()


def test_private_attributes_render_as_undefined_not_as_data():
    # the sandbox hides underscore attributes (Undefined renders empty), as in HF and llama-cpp-python
    out = ChatTemplate("[{{ raise_exception.__globals__ }}][{{ messages.__class__ }}]").render(CONVERSATION)
    assert out == "[][]"


def test_raise_exception_and_syntax_error_are_clear():
    src = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ChatTemplate(src).render(CONVERSATION)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_fallback_when_model_has_no_template():
    t = ChatTemplate.from_metadata({"tokenizer.ggml.tokens": ["<s>", "</s>"], "tokenizer.ggml.bos_token_id": 0})
    assert t.is_fallback and t.source == FALLBACK_TEMPLATE and t.bos_token == "<s>"
    out = t.render(CONVERSATION)
    assert out == ("You are a helpful assistant\n\nUser: Hello\nAssistant: Hi there\n"
                   "User: Who are you? <|im_end|> é 🦙\nAssistant:")


def test_no_unsandboxed_jinja_anywhere_in_the_code():
    offenders = []
    for d in ("localmoe", "quant", "cli", "models"):
        for p in (ROOT / d).rglob("*.py"):
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if re.search(r"(?<![A-Za-z_])(jinja2\.)?(Template|Environment|NativeEnvironment)\(", line):
                    offenders.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert offenders == []
