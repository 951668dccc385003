"""Byte-level BPE trained with HF `tokenizers`, stored as a llama.cpp `gpt2` vocab.

The pre-tokenizer is HF's ByteLevel with its GPT-2 regex, which is llama.cpp's
pre-tokenizer "gpt-2"; no BOS is added (like GPT-2), and <|endoftext|> separates
documents and ends generation.
"""
import json

import gguf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VT = gguf.GGUFValueType
EOT = "<|endoftext|>"
PRE = "gpt-2"
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3   # llama.cpp llama_token_type

# Dialogue as in the plays: "SPEAKER.\nlines\n\n". A message's `name` is its
# speaker; otherwise user -> USER, assistant -> the model's own speaker name.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ m['content'] + '\\n\\n' }}"
    "{%- else -%}"
    "{%- set who = m['name'] if m['name'] is defined and m['name'] else "
    "('USER' if m['role'] == 'user' else 'SHAKESPEARE') -%}"
    "{{ (who | upper) + '.\\n' + m['content'] + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'SHAKESPEARE.\\n' }}{%- endif -%}"
)


def train_bpe(texts, vocab_size: int) -> Tokenizer:
    """A byte-level BPE of about VOCAB_SIZE tokens (all 256 bytes + merges + EOT)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def gguf_keys(tok: Tokenizer) -> dict:
    """tokenizer.* metadata as {key: (type, value, array subtype)} (models.build's form)."""
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("token ids are not contiguous")
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    merges = [m if isinstance(m, str) else " ".join(m) for m in _merges(tok)]
    eot = vocab[EOT]
    return {
        "tokenizer.ggml.model": (VT.STRING, "gpt2", None),
        "tokenizer.ggml.pre": (VT.STRING, PRE, None),
        "tokenizer.ggml.tokens": (VT.ARRAY, tokens, VT.STRING),
        "tokenizer.ggml.token_type": (VT.ARRAY, [TOKEN_CONTROL if t in special else TOKEN_NORMAL for t in tokens],
                                      VT.INT32),
        "tokenizer.ggml.merges": (VT.ARRAY, merges, VT.STRING),
        "tokenizer.ggml.bos_token_id": (VT.UINT32, eot, None),
        "tokenizer.ggml.eos_token_id": (VT.UINT32, eot, None),
        "tokenizer.ggml.add_bos_token": (VT.BOOL, False, None),
        "tokenizer.chat_template": (VT.STRING, CHAT_TEMPLATE, None),
    }


def _merges(tok: Tokenizer) -> list:
    return json.loads(tok.to_str())["model"]["merges"]


def write_vocab_gguf(tok: Tokenizer, path, arch: str = "qwen3moe") -> None:
    """A vocab-only GGUF (no tensors): what localmoe.load_tokenizer reads."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    for k, (t, v, sub) in gguf_keys(tok).items():
        w.add_key_value(k, v, t, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
