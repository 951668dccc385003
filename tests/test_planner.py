"""Memory planner: budgets, the plan and its minimum, eviction policies, the
offloading store (bit-identical logits under any budget), prefetch accuracy,
statistics files and the CLI."""
import json
import os
import re

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from localmoe.cli import main
from localmoe.errors import LocalMoEError
from localmoe.model import load
from localmoe.planner import BudgetTooSmallError, footprint, load_profile, make_plan, parse_size, save_stats
from localmoe.planner.policy import LRU, LFUDecay
from localmoe.planner.prefetch import prediction_hits, prefetch_order
from models.build import cached_model

N_CTX = 32
TOKENS = [1, 5, 9, 200, 31, 7, 7, 1000, 64, 3, 250, 11, 90, 17, 4, 300]


@pytest.fixture(scope="module")
def llama():
    return cached_model("llama", "tiny")


@pytest.fixture(scope="module")
def llama4():
    """4 MoE layers of 8 experts, 2 active: the minimum (2 experts) is below one slot per layer."""
    return cached_model("llama", "tiny", layers=4)


@pytest.fixture(scope="module")
def reference(llama):
    m = load(llama, n_ctx=N_CTX)
    return batch_and_steps(m)


def batch_and_steps(m):
    """(f32[n_tok, n_vocab] from one batch, the same from one token at a time)."""
    batch = m.eval(TOKENS)
    m.reset()
    steps = np.concatenate([m.forward([t]) for t in TOKENS])
    return batch, steps


def expected_minimum(path, n_ctx, run_bytes):
    """The minimum from the file read by gguf-py: non-expert bytes + fp16 KV + run
    buffers + n_expert_used of the largest layer's experts."""
    r = GGUFReader(path)
    kv = {f.name: f.contents() for f in r.fields.values() if f.name.startswith("llama.")}
    non_expert, per_layer = 0, {}
    for t in r.tensors:
        m = re.match(r"blk\.(\d+)\.ffn_\w+_exps\.weight", t.name)
        if m:
            per_layer[m.group(1)] = per_layer.get(m.group(1), 0) + int(t.n_bytes) // kv["llama.expert_count"]
        else:
            non_expert += int(t.n_bytes)
    head_dim = kv["llama.embedding_length"] // kv["llama.attention.head_count"]
    kv_bytes = kv["llama.block_count"] * n_ctx * kv["llama.attention.head_count_kv"] * 2 * head_dim * 2
    return non_expert + kv_bytes + run_bytes + kv["llama.expert_used_count"] * max(per_layer.values())


def plan_of(m, budget):
    return make_plan(footprint(m.file, m.args, N_CTX), budget)


# --- budgets and the plan -------------------------------------------------------

@pytest.mark.parametrize("text, n", [("6G", 6 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29),
                                     ("64k", 64 << 10), ("123", 123), (4096, 4096)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "6X", "-1G", "0", "G", "1.2.3M"])
def test_parse_size_rejects(text):
    with pytest.raises(LocalMoEError):
        parse_size(text)


def test_minimum_budget_is_stated_and_enforced(llama):
    m = load(llama, n_ctx=N_CTX)
    fp = footprint(m.file, m.args, N_CTX)
    assert fp.minimum_bytes == expected_minimum(str(llama), N_CTX, fp.run_bytes)
    with pytest.raises(BudgetTooSmallError, match=f"minimum of .* \\({fp.minimum_bytes} bytes\\)"):
        make_plan(fp, fp.minimum_bytes - 1)
    with pytest.raises(BudgetTooSmallError, match=f"\\({fp.minimum_bytes} bytes\\)"):
        load(llama, n_ctx=N_CTX, ram_budget=fp.minimum_bytes - 1)
    plan = make_plan(fp, fp.minimum_bytes)
    assert plan.resident_bytes <= fp.minimum_bytes


def test_plan_slots_fill_the_budget(llama4):
    m = load(llama4, n_ctx=N_CTX)
    fp = footprint(m.file, m.args, N_CTX)
    eb = fp.max_expert_bytes  # every layer has the same expert size in this file
    for extra, slots, shared in [(0, [0, 0, 0, 0], 2), (2, [1, 1, 1, 1], 0), (7, [3, 2, 2, 2], 0),
                                 (1000, [8, 8, 8, 8], 0)]:
        plan = make_plan(fp, fp.minimum_bytes + extra * eb)
        assert [plan.slots[il] for il in range(4)] == slots and plan.shared_slots == shared, extra
        assert plan.resident_bytes <= plan.budget
    plan = make_plan(fp, fp.minimum_bytes + 6 * eb)  # 2 slots per layer of 8 experts
    assert plan.disk_bytes_per_token(0.75) == pytest.approx(4 * 0.25 * 2 * eb, rel=1e-12)


# --- policies ---------------------------------------------------------------------

def victim(policy, cached):
    return min(cached, key=lambda e: policy.score[e])


def test_lru_evicts_least_recently_selected():
    p = LRU(4)
    for ids in ([0, 1], [2], [0], [3]):
        p.update(np.array(ids))
    assert victim(p, [0, 1, 2, 3]) == 1
    p.update(np.array([1]))
    assert victim(p, [0, 1, 2, 3]) == 2


def test_lfu_decay_prefers_frequent_but_forgets():
    p = LFUDecay(3, decay=0.9)
    for _ in range(4):
        p.update(np.array([0]))
    p.update(np.array([1]))
    assert victim(p, [0, 1, 2]) == 2 and victim(p, [0, 1]) == 1  # 0: 3.44 * 0.9 = 3.10 vs 1: 1
    for _ in range(3):
        p.update(np.array([1]))  # 0: 3.10 * 0.9^3 = 2.26 vs 1: 1 + 0.9 + 0.81 + 0.73 = 3.44
    assert victim(p, [0, 1]) == 0
    lru = LRU(3)
    lru.update(np.array([0]))
    lru.update(np.array([1]))
    assert victim(lru, [0, 1]) == 0


def test_policy_seed_from_profile():
    counts = np.array([5, 50, 0, 9])
    for p in (LRU(4), LFUDecay(4)):
        p.seed(counts)
        assert list(np.argsort(p.score)) == [2, 0, 3, 1], type(p).__name__


# --- offloading: identical logits -----------------------------------------------------

@pytest.mark.parametrize("policy", ["lfu", "lru"])
@pytest.mark.parametrize("extra_slots", [0, 3])
def test_logits_bit_identical_under_eviction(llama, reference, policy, extra_slots):
    probe = load(llama, n_ctx=N_CTX)
    fp = footprint(probe.file, probe.args, N_CTX)
    m = load(llama, n_ctx=N_CTX, ram_budget=fp.minimum_bytes + extra_slots * fp.max_expert_bytes, policy=policy)
    try:
        batch, steps = batch_and_steps(m)
        st = m.store.stats()["cache"]
        assert np.array_equal(batch, reference[0]), "batch logits differ (tolerance: bit-exact)"
        assert np.array_equal(steps, reference[1]), "one-token logits differ (tolerance: bit-exact)"
        n_slots = sum(m.plan.slots.values()) + m.plan.shared_slots
        assert st["demand_loads"] + st["prefetch_loads"] > n_slots  # the cache did evict
        assert st["bytes_read"] >= st["demand_loads"] * min(le.expert_bytes for le in fp.layers)
    finally:
        m.close()


def test_shared_pool_and_dense_layers_bit_identical(llama4):
    ref = batch_and_steps(load(llama4, n_ctx=N_CTX))
    probe = load(llama4, n_ctx=N_CTX)
    m = load(llama4, n_ctx=N_CTX, ram_budget=footprint(probe.file, probe.args, N_CTX).minimum_bytes)
    try:
        assert m.plan.shared_slots == 2 and not any(m.plan.slots.values())
        got = batch_and_steps(m)
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1]), "tolerance: bit-exact"
    finally:
        m.close()


def test_deepseek_shared_experts_and_dense_lead_bit_identical():
    path = cached_model("deepseek", "tiny")
    ref = load(path, n_ctx=N_CTX).eval(TOKENS)
    probe = load(path, n_ctx=N_CTX)
    fp = footprint(probe.file, probe.args, N_CTX)
    assert len(fp.layers) < probe.args.n_layer  # the leading dense layer has no experts
    m = load(path, n_ctx=N_CTX, ram_budget=fp.minimum_bytes + fp.max_expert_bytes)
    try:
        assert np.array_equal(m.eval(TOKENS), ref), "tolerance: bit-exact"
    finally:
        m.close()


# --- prefetch ------------------------------------------------------------------

def test_prefetch_order_and_hits_on_known_trace():
    pred = np.array([[3, 1], [1, 4], [5, 3]], np.int32)
    assert prefetch_order(pred, 10) == [3, 1, 5, 4]  # first slots of all tokens, then second slots
    assert prefetch_order(pred, 2) == [3, 1]
    actual = np.array([[1, 3], [4, 2], [6, 7]], np.int32)
    assert prediction_hits(pred, actual) == 2 + 1 + 0


def test_store_prefetch_accuracy_on_known_trace(llama):
    probe = load(llama, n_ctx=N_CTX)
    fp = footprint(probe.file, probe.args, N_CTX)
    m = load(llama, n_ctx=N_CTX, ram_budget=fp.minimum_bytes + 2 * fp.max_expert_bytes)
    s = m.store
    try:
        guesses = iter([np.array([[0, 1]], np.int32), np.array([[2, 3]], np.int32), np.array([[4, 5]], np.int32)])
        s.routers[1] = lambda x, k: next(guesses)
        x = np.zeros((1, probe.args.n_embd), np.float32)
        for actual in ([[1, 0]], [[3, 6]], [[7, 6]]):  # 2 + 1 + 0 of 6 predicted right
            s.before_block(0, x)
            s.note_selected(1, np.array(actual, np.int32))
        assert s.pred_correct[1] == 3 and s.pred_total[1] == 6
        assert s.stats()["cache"]["prefetch_accuracy"] == pytest.approx(0.5, abs=1e-12)
    finally:
        s.close()


def test_prefetch_runs_during_decode(llama):
    probe = load(llama, n_ctx=N_CTX)
    fp = footprint(probe.file, probe.args, N_CTX)
    m = load(llama, n_ctx=N_CTX, ram_budget=fp.minimum_bytes + 4 * fp.max_expert_bytes)
    try:
        for t in TOKENS:
            m.forward([t])
        c = m.store.stats()["cache"]
        # layer 0 has no predecessor; layer 1 is guessed once per token, k experts each
        assert c["predicted_total"] == len(TOKENS) * probe.args.n_expert_used
        assert c["prefetch_loads"] > 0 and 0 <= c["prefetch_accuracy"] <= 1
    finally:
        m.close()


# --- statistics and profiles ---------------------------------------------------------

def test_stats_json_round_trip(tmp_path):
    counts = np.arange(12).reshape(3, 4)
    path = tmp_path / "s.json"
    save_stats(path, {"counts": counts.tolist(), "cache": {"hit_rate": 0.25}})
    assert os.listdir(tmp_path) == ["s.json"]  # no temp file left behind
    assert json.loads(path.read_text())["cache"] == {"hit_rate": 0.25}
    assert np.array_equal(load_profile(path, 3, 4), counts)
    with pytest.raises(LocalMoEError, match="3 x 5"):
        load_profile(path, 3, 5)
    path.write_text("{not json")
    with pytest.raises(LocalMoEError, match="JSON"):
        load_profile(path, 3, 4)


def test_profile_warm_start(llama, tmp_path):
    probe = load(llama, n_ctx=N_CTX)
    fp = footprint(probe.file, probe.args, N_CTX)
    budget = fp.minimum_bytes + 4 * fp.max_expert_bytes  # 3 slots per layer of 8 experts
    cold = load(llama, n_ctx=N_CTX, ram_budget=budget, prefetch=False)
    cold.eval(TOKENS)
    save_stats(tmp_path / "p.json", cold.store.stats())
    counts = cold.store.counts.copy()
    cold_loads = cold.store.stats()["cache"]["demand_loads"]
    cold.close()
    warm = load(llama, n_ctx=N_CTX, ram_budget=budget, prefetch=False, expert_profile=tmp_path / "p.json")
    try:
        for il, cache in warm.store.caches.items():
            top = set(np.argsort(-counts[il], kind="stable")[:warm.plan.slots[il]].tolist())
            assert {e for (_, e) in cache.where} == top, il
        warm.eval(TOKENS)
        assert warm.store.stats()["cache"]["demand_loads"] < cold_loads
    finally:
        warm.close()


def test_options_need_a_budget(llama):
    for opt in ({"policy": "lru"}, {"prefetch": False}):
        with pytest.raises(LocalMoEError, match="need a RAM budget"):
            load(llama, **opt)
    with pytest.raises(LocalMoEError, match="unknown cache policy"):
        load(llama, n_ctx=N_CTX, ram_budget="8G", policy="fifo")


# --- CLI ------------------------------------------------------------------------------

def test_cli_plan(llama):
    r = CliRunner().invoke(main, ["plan", str(llama), "--ram-budget", "1G", "--ctx", str(N_CTX), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["budget_bytes"] == 1 << 30 and all(le["slots"] == 8 for le in d["layers"])
    assert d["disk_bytes_per_token"] == 0
    r = CliRunner().invoke(main, ["plan", str(llama), "--ram-budget", "30M", "--ctx", str(N_CTX)])
    assert r.exit_code == 1 and "minimum" in r.output and "Traceback" not in r.output
    min_bytes = d["minimum_bytes"]
    r = CliRunner().invoke(main, ["plan", str(llama), "--ram-budget", str(min_bytes + (1 << 20)),
                                  "--ctx", str(N_CTX), "--hit-rate", "0.5"])
    assert r.exit_code == 0 and "slots" in r.output and "50% hit rate" in r.output, r.output


def test_cli_run_stats_and_profile(llama, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # restored after the test
    out = tmp_path / "stats.json"
    base = ["run", str(llama), "-p", "Hello", "-n", "4", "--temp", "0", "--ctx", str(N_CTX)]
    plain = CliRunner().invoke(main, base)
    r = CliRunner().invoke(main, base + ["--ram-budget", "40M", "--stats", "--stats-out", str(out)])
    assert r.exit_code == 0, r.output
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # set for the OpenMP pool of a fresh process
    assert r.stdout == plain.stdout  # same greedy text under the budget
    assert "hit rate" in r.output and "prefetch prediction accuracy" in r.output
    saved = json.loads(out.read_text())
    assert sum(map(sum, saved["counts"])) > 0
    r = CliRunner().invoke(main, base + ["--ram-budget", "40M", "--expert-profile", str(out),
                                         "--cache-policy", "lru"])
    assert r.exit_code == 0 and r.stdout == plain.stdout, r.output
