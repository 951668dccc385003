"""Write tests/data/shipped_golden.json: the shipped model's sha256 and llama.cpp's greedy ids.

    python -m tests.make_golden      # after replacing models/shipped/*.gguf

tests/test_shipped_model.py fails until this is rerun for a new model file.
"""
import hashlib
import json
from pathlib import Path

from localmoe.atomic import write_atomic
from localmoe.shipped import default_model_path
from tests.reference import greedy, tokenize

GOLDEN = Path(__file__).with_name("data") / "shipped_golden.json"
PROMPT = "ROMEO.\nBut soft, what light"  # a speaker turn, as the plays (and the chat template) write them
N_TOKENS = 32


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    path = default_model_path()
    prompt_ids = tokenize(path, PROMPT)
    ids, _ = greedy(path, prompt_ids, N_TOKENS)  # argmax of llama.cpp's logits, 2 threads
    golden = {"model": path.name, "sha256": sha256(path), "prompt": PROMPT, "prompt_ids": prompt_ids,
              "greedy_ids": ids}
    write_atomic(GOLDEN, json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {path.name}, {N_TOKENS} greedy tokens")


if __name__ == "__main__":
    main()
