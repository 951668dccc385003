"""Replays of the fuzz campaign's crash reproducers, and a smoke run of the campaign.

Each tests/fuzz_corpus/*.json is a case the campaign (benchmarks/fuzz.py) found
crashing localmoe, reduced by hand; "_note" says what it did. The replay runs it
in a fresh worker subprocess (an abort or heap corruption cannot be seen in
process) and passes only when the outcome is "ok" or a LocalMoEError.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = sorted((ROOT / "tests" / "fuzz_corpus").glob("*.json"))


def test_corpus_present():
    assert CORPUS, "tests/fuzz_corpus/ is empty"
    assert all(p.stat().st_size < 50_000 for p in CORPUS), "corpus files must stay under 50 KB"


@pytest.mark.parametrize("case", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_case_does_not_crash(case):
    r = subprocess.run([sys.executable, "-m", "benchmarks.fuzz", "--replay", str(case)],
                       cwd=ROOT, capture_output=True, text=True, timeout=400)
    line = r.stdout.strip()
    assert r.returncode == 0, f"{line}\n{r.stderr[-2000:]}"
    assert re.search(r": (ok|expected)", line), line


def test_campaign_smoke(tmp_path):
    """A 6-second campaign on the templates target runs inputs and prints the report table."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.fuzz", "--minutes", "0.1", "--targets", "templates,server",
                        "--crash-dir", str(tmp_path / "crashes"), "--seed", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| target | inputs | ok | expected errors | crashing inputs | crash classes | seconds |" in r.stdout
    row = re.search(r"^\| templates \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", r.stdout, re.M)
    assert row, r.stdout
    inputs, ok, expected, crashes = map(int, row.groups())
    assert inputs > 0 and inputs == ok + expected + crashes, r.stdout
    assert re.search(r"^\| server \| (skipped: |\d+ )", r.stdout, re.M), r.stdout
    if crashes:   # every crashing input of a new class is saved for the corpus
        assert list((tmp_path / "crashes").glob("templates-*.json")), r.stdout
