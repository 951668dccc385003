"""Trained weights -> GGUF, with models.archs' keys and tensor layout and models.build's
type choice (2-D weights F16; norms, router and biases F32), plus our tokenizer.
Tensors the spec derives from another one (deepseek2's attn_k_b / attn_v_b from
attn_kv_b) are computed here from the trained source tensor."""
import math
from pathlib import Path
from unittest import mock

import gguf
import numpy as np

from models import archs, build

VARIANT = "shakespeare"


def spec_for(cfg: dict, n_vocab: int, arch: str = "qwen3moe") -> archs.Spec:
    """models.archs' spec for our config (registered as one more ARCH variant)."""
    with mock.patch.dict(archs.CONFIGS, {(arch, VARIANT): cfg}):
        return archs.spec(arch, "tiny", VARIANT, n_vocab)


def write_gguf(path, tensors: dict, archs_cfg: dict, tok_keys: dict, name: str, dtype: str = "f16",
               arch: str = "qwen3moe") -> Path:
    """Write TENSORS ({GGUF name: f32 numpy-order array}) as an ARCH model; shapes must match the spec."""
    n_vocab = len(tok_keys["tokenizer.ggml.tokens"][1])
    s = spec_for(archs_cfg, n_vocab, arch)
    sources = [t.derive[0] if t.derive else t for t in s.tensors]
    want = {t.name: tuple(reversed(t.ne)) for t in sources}
    have = {k: v.shape for k, v in tensors.items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))
        raise ValueError(f"tensors do not match the {arch} layout: {diff[:6]}")
    path = Path(path)
    with build._atomic(path) as tmp:
        w = gguf.GGUFWriter(path=None, arch=arch)
        w.add_name(name)
        w.add_file_type(build.DTYPES[dtype][1])
        for k, v in s.keys.items():
            w.add_key_value(f"{arch}.{k}", v, build._value_type(v))
        for k, (t, v, sub) in tok_keys.items():
            w.add_key_value(k, v, t, sub_type=sub)
        for t in s.tensors:
            qt = build.qtype_for(t, dtype)
            a = tensors[t.derive[0].name] if t.derive else tensors[t.name]
            a = t.derive[1](a) if t.derive else a
            a = build._encode(np.ascontiguousarray(a, dtype=np.float32), qt)
            assert a.nbytes == math.prod(reversed(t.ne)) * gguf.GGML_QUANT_SIZES[qt][1], t.name
            w.add_tensor(t.name, a, raw_dtype=qt)
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path
