"""The study levers (localmoe.routing): expert masks and per-token adaptive skipping, on
hand-made experts whose answer is known (tests/test_moe_routing.py's: expert e scales
silu(x) * x by D[e], the router logits are x), then on tiny random models of every
architecture and on the shipped model."""
import math

import numpy as np
import pytest
from click.testing import CliRunner

import localmoe
import test_arch_deepseek2 as ds
import test_moe_routing as mr
from localmoe.cli import main
from localmoe.errors import LocalMoEError
from localmoe.routing import least_used
from localmoe.shipped import SHIPPED, shipped_path
from models.archs import ARCHS
from reference import model_file

SOFTMAX = [("qwen3moe", True, 0.0), ("llama", True, 0.0), ("olmoe", False, 0.0), ("deepseek", False, 2.5),
           ("qwen2moe", False, 0.0)]


class Spy(mr.SpyStore):
    @classmethod
    def of(cls, blk):
        blk.store = cls.from_blocks([blk.w], mr.N)
        return blk.store

    def computed(self):
        return sorted({e for e, name in self.asked if name == "ffn_down_exps"})


def block(arch, scale):
    w = mr.expert_block(shared_gate=np.zeros(mr.N, np.float32)) if arch == "qwen2moe" else None
    blk, _ = mr.make(arch, scale=scale, w=w)
    return blk, Spy.of(blk)


def extra(arch, x):
    """The shared-expert term each arch adds (3 * silu(x) * x, gated by sigmoid(0) for qwen2moe)."""
    return {"deepseek": 3.0, "qwen2moe": 1.5}.get(arch, 0.0) * mr.silu_x(x)


def routed(x, keep, norm, scale, k=mr.K):
    """(ids, weights) of softmax top-k over the kept experts only, in float64."""
    x = x.astype(np.float64)
    live = np.flatnonzero(keep)
    p = np.zeros(mr.N)
    p[live] = np.exp(x[live] - x[live].max()) / np.exp(x[live] - x[live].max()).sum()
    top = sorted(live, key=lambda e: -p[e])[:k]
    w = p[top] / p[top].sum() if norm else p[top]
    return np.array(top), w * (scale or 1.0)


@pytest.mark.parametrize("arch,norm,scale", SOFTMAX)
def test_mask_routes_over_the_survivors_only(arch, norm, scale):
    blk, spy = block(arch, scale)
    keep = np.ones(mr.N, bool)
    keep[[1, 4]] = False              # each token's favourite expert (TOP = [[1, 3], [4, 0]])
    blk.keep = keep
    out = blk.ffn(mr.X)
    for t in range(len(mr.X)):
        top, w = routed(mr.X[t], keep, norm, scale)
        assert 1 not in top and 4 not in top
        want = (w * mr.D[top]).sum() * mr.silu_x(mr.X[t]) + extra(arch, mr.X[t])
        np.testing.assert_allclose(out[t], want, rtol=1e-5, atol=1e-6, err_msg=f"{arch} token {t} (rtol 1e-5)")
    assert spy.counts[0, [1, 4]].tolist() == [0, 0] and spy.counts[0].sum() == mr.K * len(mr.X)
    assert 1 not in spy.computed() and 4 not in spy.computed()


@pytest.mark.parametrize("arch,norm,scale", SOFTMAX)
@pytest.mark.parametrize("w_min", [0.3, 0.45, 0.9])
def test_min_expert_weight_skips_light_experts_without_renormalising(arch, norm, scale, w_min):
    blk, spy = block(arch, scale)
    blk.min_weight = w_min
    out = blk.ffn(mr.X)
    computed, n_run = set(), 0
    for t in range(len(mr.X)):
        top, w = routed(mr.X[t], np.ones(mr.N, bool), norm, scale)
        norm_w = w / (scale or 1.0)                        # W compares with the weight before the scale
        run = (norm_w >= w_min) | (np.arange(mr.K) == np.argmax(norm_w))
        want = (w[run] * mr.D[top[run]]).sum() * mr.silu_x(mr.X[t]) + extra(arch, mr.X[t])
        np.testing.assert_allclose(out[t], want, rtol=1e-5, atol=1e-6, err_msg=f"{arch} token {t} (rtol 1e-5)")
        computed |= set(top[run].tolist())
        n_run += run.sum()
    assert spy.computed() == sorted(computed)
    assert (blk.n_routed, blk.n_run) == (len(mr.X), n_run)
    assert n_run < mr.K * len(mr.X), "the threshold should skip something on these tokens"


def test_min_expert_weight_known_skips_qwen3moe():
    # normalised top-2 weights: token 0 experts 1, 3: .622 .378; token 1 experts 4, 0: .786 .214
    blk, spy = block("qwen3moe", 0.0)
    blk.min_weight = 0.3
    out = blk.ffn(mr.X)
    assert spy.computed() == [1, 3, 4]                  # expert 0 (.214) skipped, expert 3 (.378) kept
    w = 1 / (1 + math.exp(-(2.5 - 1.2)))
    np.testing.assert_allclose(out[1], w * mr.D[4] * mr.silu_x(mr.X[1]), rtol=1e-5, err_msg="rtol 1e-5")


def test_deepseek2_mask_and_threshold_with_bias_groups_and_scale():
    blk, spy = ds.routed_block(ds.BIAS)
    spy = Spy.of(blk)
    keep = np.ones(ds.N, bool)
    keep[4] = False                      # the expert the bias favours for token 1 (picks 4, 5)
    blk.keep = keep
    blk.ffn(ds.X)
    assert spy.counts[0, 4] == 0 and 4 not in spy.computed()
    # token 1 without expert 4: sigmoid .119 .047 | .269 .047 | -inf .646 | .599 .047 -> groups 2, 3 -> 5, 6
    assert spy.counts[0].tolist() == [0, 0, 1, 1, 0, 1, 1, 0]
    blk, _ = ds.routed_block(ds.BIAS)
    spy = Spy.of(blk)
    blk.min_weight = 0.5  # token 0: 2, 3 at .507 .493 (x 2.5 = 1.27, 1.23); token 1: 4, 5 at .22 .78
    out = blk.ffn(ds.X)
    assert spy.computed() == [2, 5]
    p2, p3 = 1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(-0.9))
    want = (p2 / (p2 + p3) * ds.SCALE * ds.D[2] + 3) * ds.silu_x(ds.X[0])
    np.testing.assert_allclose(out[0], want, rtol=1e-5, err_msg="rtol 1e-5")


def test_deepseek2_masked_groups_take_further_groups_until_k_survivors():
    from dataclasses import replace
    blk, _ = ds.routed_block(ds.BIAS)
    blk.args = replace(blk.args, n_expert_used=3)
    spy = Spy.of(blk)
    blk.keep = np.array([True, False] * 4)   # one survivor per group: the 2 best groups hold only 2 of k = 3
    blk.ffn(ds.X)
    # token 0: survivors 0 .953, 2 .731, 4 .018, 6 .550 -> groups 0, 1, then 3 -> picks 0, 2, 6
    # token 1: 0 .119, 2 .269, 4 .182 + bias .5, 6 .599 -> groups 2, 3, then 1 -> picks 4, 6, 2
    assert spy.counts[0].tolist() == [1, 0, 2, 0, 1, 0, 2, 0]
    assert spy.computed() == [0, 2, 4, 6]


def test_least_used_drops_the_rarest_first():
    counts = np.array([[0, 0, 0, 0], [5, 1, 9, 1], [3, 3, 3, 3]])
    assert least_used(counts, 0.5, [1, 2]) == {1: [0, 2], 2: [2, 3]}    # ties: the lower id goes first
    assert least_used(counts, 0.25, [1]) == {1: [0, 2, 3]}
    assert least_used(counts, 0.0, [1]) == {1: [0, 1, 2, 3]}
    with pytest.raises(LocalMoEError, match="drops all"):
        least_used(counts, 0.9, [1])


# --- tiny random models of every architecture ------------------------------------------------

TOKENS = list(range(100, 124))


@pytest.fixture(scope="module", params=[(a, None) for a in ARCHS] + [("deepseek2", "v3")],
                ids=lambda p: "-".join(filter(None, p)))
def tiny(request):
    """Every architecture's default variant, and DeepSeek-V3's sigmoid routing with exp_probs_b and groups."""
    arch, variant = request.param
    with localmoe.load(model_file(arch, variant=variant), n_ctx=64) as m:
        yield m


def test_levers_off_leave_the_logits_bit_identical(tiny):
    base = tiny.eval(TOKENS)
    tiny.set_min_expert_weight(0.5)
    tiny.drop_experts(0.5, np.ones((tiny.args.n_layer, tiny.args.n_expert), np.int64))
    assert not np.array_equal(tiny.eval(TOKENS), base)
    tiny.set_min_expert_weight(None)
    tiny.mask_experts(None)
    np.testing.assert_array_equal(tiny.eval(TOKENS), base)  # tolerance 0


def test_dropped_experts_are_never_picked(tiny):
    a = tiny.args
    tiny.store.reset_stats()
    tiny.eval(TOKENS)
    counts = tiny.store.counts.copy()
    keep = tiny.drop_experts(0.75, counts)
    try:
        n_keep = a.n_expert - math.floor(0.75 * a.n_expert + 0.5)
        assert keep and all(len(v) == n_keep for v in keep.values())
        tiny.store.reset_stats()
        tiny.eval(TOKENS)
        for il, kept in keep.items():
            dropped = sorted(set(range(a.n_expert)) - set(kept))
            assert tiny.store.counts[il, dropped].sum() == 0, f"layer {il} picked a dropped expert"
            assert counts[il, dropped].max() <= counts[il, kept].min(), f"layer {il}: not the least used"
    finally:
        tiny.mask_experts(None)


def test_mean_experts_run_falls_with_the_threshold(tiny):
    k, means = tiny.args.n_expert_used, []
    for w in (0.0, 0.05, 0.2, 0.99):
        tiny.set_min_expert_weight(w)
        tiny.reset_routing_stats()
        tiny.eval(TOKENS)
        means.append(tiny.routing_stats()["mean_experts_run"])
    tiny.set_min_expert_weight(None)
    assert means[0] == k and means[-1] == 1.0, means      # 0.99: only the heaviest expert runs
    assert all(a >= b for a, b in zip(means, means[1:])), means


def test_load_options_apply_the_levers():
    path = model_file("qwen3moe")
    with localmoe.load(path, n_ctx=64, min_expert_weight=0.4, mask_experts={1: [0, 1, 2, 3]}) as m:
        assert m.blocks[0].min_weight == 0.4
        assert m.blocks[1].keep.tolist() == [True] * 4 + [False] * (m.args.n_expert - 4)
        assert m.blocks[0].keep is None
        assert m.routing_stats()["kept_experts"] == {1: 4}


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("w", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.5", True])
def test_min_expert_weight_outside_0_1_is_an_error(w):
    with pytest.raises(LocalMoEError, match="min_expert_weight"):
        localmoe.load(model_file("qwen3moe"), min_expert_weight=w)


@pytest.mark.parametrize("keep,match", [
    ({0: []}, "keeps no experts"),
    ({0: [0]}, "fewer than the"),                 # tiny qwen3moe routes 2+ experts per token
    ({0: [0, 99]}, "must be in"),
    ({0: [0.5, 1.5]}, "integer expert ids"),
    ({99: [0, 1, 2]}, "not an expert layer"),
    ({"0": [0, 1, 2]}, "not an expert layer"),
    ([0, 1], "mapping"),
])
def test_bad_masks_are_errors(keep, match):
    with localmoe.load(model_file("qwen3moe"), n_ctx=16) as m:
        m.set_expert_used(2)
        with pytest.raises(LocalMoEError, match=match):
            m.mask_experts(keep)
        assert all(b.keep is None for b in m.blocks)


def test_dense_lead_layer_cannot_be_masked_and_k_cannot_exceed_the_survivors():
    with localmoe.load(model_file("deepseek"), n_ctx=16) as m:
        with pytest.raises(LocalMoEError, match="not an expert layer"):
            m.mask_experts({0: [0, 1, 2, 3]})            # leading dense block
        m.mask_experts({1: list(range(m.args.n_expert_used))})
        with pytest.raises(LocalMoEError, match="lift it first"):
            m.set_expert_used(m.args.n_expert_used + 1)


def test_dropping_every_expert_or_a_profile_of_another_shape_is_an_error():
    with localmoe.load(model_file("qwen3moe"), n_ctx=16) as m:
        ones = np.ones((m.args.n_layer, m.args.n_expert), np.int64)
        with pytest.raises(LocalMoEError, match="drops all"):
            m.drop_experts(0.99, ones)
        with pytest.raises(LocalMoEError, match="fraction"):
            m.drop_experts(1.0, ones)
        with pytest.raises(LocalMoEError, match="non-negative integers"):
            m.drop_experts(0.5, ones[:1])
    with pytest.raises(LocalMoEError, match="go together"):
        localmoe.load(model_file("qwen3moe"), drop_experts=0.5)


def test_cli_levers_and_their_errors(tmp_path):
    runner = CliRunner()
    path = str(shipped_path("shakespeare-moe-Q8_0.gguf"))   # 6 layers of 8 experts, top-2
    stats = tmp_path / "stats.json"
    r = runner.invoke(main, ["run", path, "-p", "ROMEO:", "-n", "4", "--temp", "0", "--stats-out", str(stats)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["run", path, "-p", "ROMEO:", "-n", "4", "--temp", "0", "--min-expert-weight", "0.4",
                             "--drop-experts", "0.25", "--drop-profile", str(stats)])
    assert r.exit_code == 0, r.output
    assert "experts run per token and layer:" in r.output and "experts kept per layer: 6 of 8" in r.output
    r = runner.invoke(main, ["run", path, "-p", "x", "--min-expert-weight", "1"])
    assert r.exit_code == 2 and "--min-expert-weight" in r.output
    r = runner.invoke(main, ["run", path, "-p", "x", "--drop-experts", "0.5"])
    assert r.exit_code == 1 and "error: --drop-experts and --drop-profile go together" in r.output
    r = runner.invoke(main, ["run", path, "-p", "x", "--drop-experts", "0.9", "--drop-profile", str(stats)])
    assert r.exit_code == 1 and "error: expert mask: layer 0 keeps 1 expert(s)" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"counts": [[1, 2]]}')
    r = runner.invoke(main, ["run", path, "-p", "x", "--drop-experts", "0.5", "--drop-profile", str(bad)])
    assert r.exit_code == 1 and "error: expert profile" in r.output and "6 x 8" in r.output
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be " * 200)
    r = runner.invoke(main, ["perplexity", path, str(text), "--ctx", "64", "--chunks", "1", "--min-expert-weight", "0.4"])
    assert r.exit_code == 0 and "experts run per token and layer:" in r.output, r.output
    for cmd in (["perplexity", path, str(text)], ["serve", path, "--port", "0"], ["chat", path]):
        r = runner.invoke(main, cmd + ["--drop-experts", "0.5"])
        assert r.exit_code == 1 and "go together" in r.output, (cmd, r.output)
        r = runner.invoke(main, cmd + ["--min-expert-weight", "-0.5"])
        assert r.exit_code == 2 and "--min-expert-weight" in r.output, (cmd, r.output)


# --- the shipped (trained) model -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("lever", ["min_weight", "mask"])
def test_shipped_batch_equals_token_by_token_with_the_levers_on(name, lever):
    """A skipped slot adds exactly nothing in a batch, so batch and decode agree to the bit (tolerance 0)."""
    with localmoe.load(shipped_path(name), n_ctx=128) as m:
        ids = m.tokenize("ROMEO: But soft, what light through yonder window breaks?")
        if lever == "min_weight":
            m.set_min_expert_weight(0.3)
        else:
            m.drop_experts(0.5, np.arange(m.args.n_layer * m.args.n_expert).reshape(m.args.n_layer, -1) % 5)
        batch = m.eval(ids)
        m.reset()
        step = np.stack([m.forward([t])[-1] for t in ids])
        m.reset_routing_stats()
        m.eval(ids)
        mean = m.routing_stats()["mean_experts_run"]
        k = m.args.n_expert_used
    np.testing.assert_array_equal(batch, step)
    assert (mean < k) if lever == "min_weight" else (mean == k)
