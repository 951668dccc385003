"""Write tests/data/golden-MODEL.json for each shipped model: its sha256 and llama.cpp's greedy ids.

    python -m tests.make_golden      # after replacing a models/shipped/*.gguf

tests/test_shipped_model.py fails until this is rerun for a new model file.
"""
import hashlib
import json
from pathlib import Path

from localmoe.atomic import write_atomic
from localmoe.shipped import SHIPPED, shipped_path
from tests.reference import greedy, tokenize

PROMPT = "ROMEO.\nBut soft, what light"  # a speaker turn, as the plays (and the chat template) write them
N_TOKENS = 32


def golden_path(name: str) -> Path:
    return Path(__file__).with_name("data") / f"golden-{Path(name).stem}.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    for name in SHIPPED:
        path = shipped_path(name)
        prompt_ids = tokenize(path, PROMPT)
        ids, _ = greedy(path, prompt_ids, N_TOKENS)  # argmax of llama.cpp's logits, 2 threads
        golden = {"model": name, "sha256": sha256(path), "prompt": PROMPT, "prompt_ids": prompt_ids,
                  "greedy_ids": ids}
        write_atomic(golden_path(name), json.dumps(golden, indent=1) + "\n")
        print(f"wrote {golden_path(name)}: {name}, {N_TOKENS} greedy tokens")


if __name__ == "__main__":
    main()
