"""Trained weights -> GGUF, with models.archs' keys and tensor layout and models.build's
type choice (2-D weights F16; norms and router F32), plus our tokenizer."""
import math
from pathlib import Path
from unittest import mock

import gguf
import numpy as np

from models import archs, build

ARCH = "qwen3moe"
VARIANT = "shakespeare"


def spec_for(cfg: dict, n_vocab: int) -> archs.Spec:
    """models.archs' spec for our config (registered as one more qwen3moe variant)."""
    with mock.patch.dict(archs.CONFIGS, {(ARCH, VARIANT): cfg}):
        return archs.spec(ARCH, "tiny", VARIANT, n_vocab)


def write_gguf(path, tensors: dict, archs_cfg: dict, tok_keys: dict, name: str, dtype: str = "f16") -> Path:
    """Write TENSORS ({GGUF name: f32 numpy-order array}) as an ARCH model; shapes must match the spec."""
    n_vocab = len(tok_keys["tokenizer.ggml.tokens"][1])
    s = spec_for(archs_cfg, n_vocab)
    want = {t.name: tuple(reversed(t.ne)) for t in s.tensors}
    have = {k: v.shape for k, v in tensors.items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))
        raise ValueError(f"tensors do not match the {ARCH} layout: {diff[:6]}")
    path = Path(path)
    with build._atomic(path) as tmp:
        w = gguf.GGUFWriter(path=None, arch=ARCH)
        w.add_name(name)
        w.add_file_type(build.DTYPES[dtype][1])
        for k, v in s.keys.items():
            w.add_key_value(f"{ARCH}.{k}", v, build._value_type(v))
        for k, (t, v, sub) in tok_keys.items():
            w.add_key_value(k, v, t, sub_type=sub)
        for t in s.tensors:
            qt = build.qtype_for(t, dtype)
            a = build._encode(np.ascontiguousarray(tensors[t.name], dtype=np.float32), qt)
            assert a.nbytes == math.prod(want[t.name]) * gguf.GGML_QUANT_SIZES[qt][1], t.name
            w.add_tensor(t.name, a, raw_dtype=qt)
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path
