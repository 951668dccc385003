"""llama.cpp's BPE pre-tokenizers: `tokenizer.ggml.pre` -> split regexes and vocab flags.

Each regex list is applied in order, every regex splitting the pieces left by the
previous one (llama.cpp unicode_regex_split); the patterns are llama.cpp's own
(src/llama-vocab.cpp), which already rewrite `(?i:...)` and `\\p{Lu}`-style classes
into forms that oniguruma (HF tokenizers) matches the same way.
"""
from dataclasses import dataclass

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp maps non-ASCII whitespace to \v before matching, so only \s can match it,
# never a literal range: these ranges of llama.cpp's have the whitespace cut out
# (U+0800..U+4E00 holds U+1680, U+2000..U+200A, U+2028, U+2029, U+202F, U+205F, U+3000).
_CJK = ("[\u4e00-\u9fa5\u0800-\u167f\u1681-\u1fff\u200b-\u2027\u202a-\u202e\u2030-\u205e"
        "\u2060-\u2fff\u3001-\u4e00\uac00-\ud7ff]+")
_CASED = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
_CASED2 = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"

REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "qwen35": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "gpt2": (_GPT2,),
    "starcoder": (r"\p{N}", _GPT2),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "deepseek-llm": (
        r"[\r\n]",
        "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
        "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
        "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf"
        "\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
        "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
        "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
        "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
        "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
        "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
        "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
        "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3001-\u3002]+",
        r"\s+$",
        _CJK,
        r"\p{N}+",
    ),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
    "deepseek-v3": (
        r"\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        '[!"#$%&\'()*+,' r"\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "gpt-4o": (_CASED + _CONTRACTIONS + "?|" + _CASED2 + _CONTRACTIONS
               + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "tekken": (_CASED + "|" + _CASED2 + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "bailingmoe": (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",),
    "seed-coder": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "exaone-moe": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",),
    "bloom": (" ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+",),
}


@dataclass(frozen=True)
class PreTokenizer:
    regexes: tuple[str, ...]
    clean_spaces: bool = True     # llama.cpp's BPE default
    ignore_merges: bool = False
    add_bos: bool = False         # default when tokenizer.ggml.add_bos_token is absent
    has_bos: bool = True          # chatglm: no BOS at all


def _pre(regex: str, **flags) -> PreTokenizer:
    return PreTokenizer(REGEXES[regex], **flags)


_NO_CLEAN = {"clean_spaces": False}
# name -> pre-tokenizer, following llama_vocab::impl::load (same flags per name)
PRE: dict[str, PreTokenizer] = {
    "default": _pre("default"),
    **{n: _pre("llama3", ignore_merges=True, add_bos=True) for n in (
        "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
        "jina-v5-nano")},
    "dbrx": _pre("llama3"), "smaug-bpe": _pre("llama3"),
    "chatglm-bpe": _pre("llama3", has_bos=False),
    "glm4": _pre("llama3", has_bos=False, ignore_merges=True),
    "glm5": _pre("llama3", has_bos=False, ignore_merges=True),
    "deepseek-llm": _pre("deepseek-llm", **_NO_CLEAN),
    "deepseek-coder": _pre("deepseek-coder", **_NO_CLEAN),
    **{n: _pre("deepseek-v3", **_NO_CLEAN) for n in ("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4")},
    "falcon": _pre("falcon"),
    **{n: _pre("starcoder") for n in ("starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2")},
    **{n: _pre("starcoder", **_NO_CLEAN) for n in ("command-r", "smollm")},
    **{n: _pre("gpt2") for n in (
        "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
        "modern-bert", "mpt", "olmo", "jais", "exaone4", "jina-v1-en", "jina-v2-code", "roberta-bpe")},
    **{n: _pre("gpt2", **_NO_CLEAN) for n in ("trillion", "granite-docling")},
    **{n: _pre("qwen2", **_NO_CLEAN) for n in (
        "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "grok-2", "solar-open")},
    "stablelm2": _pre("qwen2"), "megrez": _pre("qwen2"),
    "qwen35": _pre("qwen35", **_NO_CLEAN),
    **{n: _pre("gpt-4o", **_NO_CLEAN) for n in ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2")},
    "tekken": _pre("tekken", clean_spaces=False, ignore_merges=True, add_bos=True),
    **{n: _pre("bailingmoe", **_NO_CLEAN) for n in ("bailingmoe", "bailingmoe2", "llada-moe")},
    "seed-coder": _pre("seed-coder", **_NO_CLEAN),
    "exaone-moe": _pre("exaone-moe"),
    "poro-chat": _pre("bloom", **_NO_CLEAN), "bloom": _pre("bloom"), "gpt3-finnish": _pre("bloom"),
}
