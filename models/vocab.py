"""Real tokenizer vocab files from llama.cpp (vendor/llama.cpp/models), xz-compressed.

Each `ggml-vocab-NAME.gguf.xz` has its llama.cpp test vectors beside it
(`.inp`/`.out`). `vocab_path(NAME)` unpacks the GGUF once into a cache dir.
"""
import lzma
import os
from pathlib import Path

from localmoe.atomic import write_atomic

HERE = Path(__file__).parent / "vocab"
NAMES = ("llama-spm", "llama-bpe", "deepseek-llm", "qwen2", "gpt-2")


def cache_dir() -> Path:
    d = Path(os.environ.get("LOCALMOE_CACHE", Path.home() / ".cache" / "localmoe")) / "vocab"
    d.mkdir(parents=True, exist_ok=True)
    return d


def vocab_path(name: str) -> Path:
    """Path of the unpacked ggml-vocab-NAME.gguf (written atomically on first use)."""
    src = HERE / f"ggml-vocab-{name}.gguf.xz"
    if not src.exists():
        raise FileNotFoundError(f"no vocab {name!r}; have {', '.join(NAMES)}")
    dst = cache_dir() / f"ggml-vocab-{name}.gguf"
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    return write_atomic(dst, lzma.decompress(src.read_bytes()))


def test_vectors(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's (text, token ids) pairs for vocab NAME, parsed as test-tokenizer-0 does."""
    sep = "\n__ggml_vocab_test__\n"
    raw = (HERE / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8")
    inp = raw.split(sep)
    if inp and inp[-1] == "":
        inp.pop()
    out = (HERE / f"ggml-vocab-{name}.gguf.out").read_bytes().decode("utf-8").split("\n")
    out = out[: len(inp)]
    if len(inp) != len(out):
        raise ValueError(f"{name}: {len(inp)} inputs but {len(out)} outputs")
    return [(t, [int(i) for i in o.split()]) for t, o in zip(inp, out)]
