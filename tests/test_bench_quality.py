"""The pure parts of benchmarks/quality.py and benchmarks/png.py (no model, no llama.cpp)."""
import struct
import zlib

import gguf
import numpy as np
import pytest

from benchmarks import png, quality


def decode_png(data: bytes) -> np.ndarray:
    """An independent reader for what encode_png may write: 8-bit RGB, filter 0, CRCs checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body), tag
        chunks.append((tag, body))
        pos += 12 + n
    assert [t for t, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, ctype, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = np.frombuffer(zlib.decompress(chunks[1][1]), np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 2)])
def test_png_round_trip(shape):
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(png.encode_png(rgb)), rgb)


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 3), np.float32), np.zeros((2, 2), np.uint8),
                                 np.zeros((0, 2, 3), np.uint8), np.zeros((2, 2, 4), np.uint8)])
def test_png_rejects_other_arrays(bad):
    with pytest.raises(ValueError):
        png.encode_png(bad)


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"old")
    assert png.write_atomic(path, b"new") == path
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_diverging_colours_at_the_stops_and_between():
    rgb = png.diverging_rgb(np.array([0.0, 0.125, 0.25, 0.5, 0.025]), mid=0.125, top=0.25)
    assert rgb[:4].tolist() == [list(png.LOW), list(png.MID), list(png.HIGH), list(png.HIGH)]
    assert rgb[4].tolist() == [76, 131, 187]  # a fifth of LOW -> MID: 33 + 214/5, 102 + 145/5, 172 + 75/5, rounded


def test_heat_map_layout():
    img = png.heat_map(np.array([[0.0, 2.0], [1.0, 1.0], [2.0, 0.0]]), mid=1.0, top=2.0, cell=4)
    assert img.shape == (3 * 5 + 1, 2 * 5 + 1, 3)
    assert img[0].tolist() == [list(png.GRID)] * 11 and img[:, 5].tolist() == [list(png.GRID)] * 16
    assert img[1:5, 1:5].reshape(-1, 3).tolist() == [list(png.LOW)] * 16    # row 0 = layer 0, at the top
    assert img[1:5, 6:10].reshape(-1, 3).tolist() == [list(png.HIGH)] * 16
    assert img[11:15, 1:5].reshape(-1, 3).tolist() == [list(png.HIGH)] * 16  # last row at the bottom


def test_scored_windows_hold_the_scored_targets_after_one_context_token():
    # ctx 4: positions 2 predicts 3, so the targets are tokens 3 and 7; each window starts one token earlier
    w = quality.scored_windows(np.arange(10), 4, 2)
    assert w.tolist() == [[2, 3], [6, 7]]
    assert w[:, 1:].ravel().tolist() == [3, 7]


def test_usage_table_shares_and_collapse_flag():
    counts = np.array([[30, 30, 30, 10], [40, 40, 18, 2]])  # 4 experts: uniform 25 %, flag under 6.25 %
    rows, shares, collapsed = quality.usage_table(counts)
    assert np.allclose(shares, counts / 100, rtol=0, atol=1e-15)
    assert collapsed == [(1, 3)]
    assert rows[0] == [0, "30.0", "30.0", "30.0", "10.0", "10.0", "30.0", "ok"]
    assert rows[1] == [1, "40.0", "40.0", "18.0", "2.0", "2.0", "40.0", "collapsed: e3"]


def test_usage_table_dense_layer():
    """A leading dense layer (deepseek2) routes nothing: a row of its own, no 0/0 shares, no flag."""
    rows, shares, collapsed = quality.usage_table(np.array([[0, 0, 0, 0], [30, 30, 30, 10]]))
    assert np.isfinite(shares).all() and collapsed == []
    assert rows[0] == [0, "-", "-", "-", "-", "-", "-", "dense (no experts)"]
    assert rows[1][-1] == "ok"


def test_right_align_pads_text_to_the_header_or_widest_cell():
    rows = quality.right_align(["k", "ppl", "x"], [["1", "9.5", 3], ["long", "10.25", None]])
    assert rows == [["1", "  9.5", 3], ["long", "10.25", None]]  # column 0 stays as it is


def test_quant_rows():
    files = {"F16": {"bytes": 2 * 2**20, "bpw": 16.0}, "Q8_0": {"bytes": 2**20, "bpw": 8.5}}
    ppl = {"F16": {"localmoe": 100.0, "llama.cpp": 100.02}, "Q8_0": {"localmoe": 101.0, "llama.cpp": None}}
    rows = quality.quant_rows(files, ppl)
    assert rows[0] == ["F16", "100.00", "100.02", "-0.020%", "2.00", "16.00", "+0.00%", "+0.00%"]
    assert rows[1] == ["Q8_0", "101.00", None, None, "1.00", "8.50", "+1.00%", None]


def test_file_info_bits_per_weight(tmp_path):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), arch="qwen3moe")
    for key, v in (("expert_count", 8), ("expert_used_count", 2), ("block_count", 1), ("context_length", 256)):
        w.add_uint32(f"qwen3moe.{key}", v)
    w.add_token_list(["a", "b", "c"])
    w.add_tensor("a.weight", np.zeros((4, 32), np.float16))   # 128 weights x 16 bits
    w.add_tensor("b.weight", np.zeros(64, np.float32))        # 64 weights x 32 bits
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = quality.file_info(path)
    assert abs(info["bpw"] - (128 * 16 + 64 * 32) / 192) < 1e-12, info
    assert (info["n_expert"], info["n_expert_used"], info["n_layer"], info["n_ctx_train"], info["n_vocab"]) == \
        (8, 2, 1, 256, 3)
    assert info["bytes"] == path.stat().st_size


@pytest.mark.parametrize("a, b, n", [([1, 2, 3], [1, 2, 4], 2), ([5], [6], 0), ([1, 2], [1, 2, 3], 2),
                                     ([7, 8], [7, 8], 2)])
def test_same_prefix(a, b, n):
    assert quality.same_prefix(a, b) == n


def test_axis_numbers_frame_the_grid():
    grid = png.heat_map(np.zeros((6, 12)), mid=1.0, top=2.0, cell=8)
    img = png.with_axis_numbers(grid, 6, 12, cell=8, scale=1)
    pad = img.shape[0] - grid.shape[0]
    assert pad == img.shape[1] - grid.shape[1] == 4 * 2 + 2       # two digits for "11"
    assert np.array_equal(img[pad:, pad:], grid)
    ink = (img == png.INK).all(axis=2)
    assert ink[:pad, pad:].any() and ink[pad:, :pad].any()       # column and row numbers drawn
    assert not ink[pad:, pad:].any()                             # nothing drawn over the cells


def test_draw_number_glyphs():
    img = np.full((5, 8, 3), 255, np.uint8)
    png.draw_number(img, 10, 0, 0, scale=1)
    ink = (img == png.INK).all(axis=2).astype(int)
    assert ink[:, :3].tolist() == [[0, 1, 0], [1, 1, 0], [0, 1, 0], [0, 1, 0], [1, 1, 1]]   # "1"
    assert ink[:, 4:7].tolist() == [[1, 1, 1], [1, 0, 1], [1, 0, 1], [1, 0, 1], [1, 1, 1]]  # "0"


# --- e) the study (benchmarks/_study.py) ---------------------------------------------------------

def study_result():
    """A made-up --study result: baseline PPL 100 at 20 tok/s (two steps of 0.05 s at best)."""
    from benchmarks import _study

    def cfg(lever, v, ppl, secs, run=2.0, kept=8):  # each step's fastest repetition takes secs / 2
        return {"lever": lever, "value": v, "ppl": ppl, "mean_experts_run": run, "experts_kept": kept,
                "step_s": [[secs, secs / 2], [secs / 2, secs * 3]], "step_cpu_s": [[secs, secs]] * 2}
    cfgs = [cfg("k", 2, 100.0, 0.1), cfg("k", 1, 110.0, 0.05, 1.0), cfg("drop", 0.5, 150.0, 0.25 / 2.7, kept=4),
            cfg("min_weight", 0.1, 100.5, 0.25 / 2.85, 1.6), cfg("min_weight", 0.3, 103.0, 0.0625, 1.2)]
    assert [c[:2] for c in _study.configs(2, [0.5], [0.1, 0.3])] == [[c["lever"], c["value"]] for c in cfgs]
    ref = {"ppl": {k: {"ppl": p} for k, p in ((1, 111.0), (2, 100.1))},
           "decode": {k: {"step_s": [[s, s]]} for k, s in ((1, 0.025), (2, 0.05))}}
    return {"args": {"decode": 2}, "study": {"localmoe": {"configs": dict(enumerate(cfgs))}, "llama.cpp": ref}}


def test_study_rows_relative_to_the_trained_k():
    from benchmarks import _study
    rows, points = _study.study_rows(study_result())
    assert rows[0] == ["a) active experts", "k=2 (trained)", "2.00", 8, "100.00", "+0.0%", "20.0", "+0.0%",
                       "100.10", "20.0"]
    assert rows[1][1:8] == ["k=1", "1.00", 8, "110.00", "+10.0%", "40.0", "+100.0%"]
    assert rows[2][1:4] == ["50% dropped", "2.00", 4] and rows[2][-2:] == ["n/a", "n/a"]  # no llama.cpp option
    assert points["k"] == [(100.0, 100.0, 2), (200.0, 110.0, 1)]
    assert points["drop"][0] == (100.0, 100.0, None) and points["min_weight"][2][2] == 30


def test_study_verdicts_pick_the_fastest_threshold_within_the_tolerance():
    from benchmarks import _study
    lines = _study.verdicts(study_result(), 0.01)
    assert lines[0].endswith("Here k=1: decode +100.0%, PPL +10.0%.")
    assert "50% dropped: decode +8.0%, PPL +50.0%" in lines[1]
    assert "best W=0.1, 1.60 experts run, decode +14.0%" in lines[2] and lines[2].endswith("-> meets the 10%.")
    assert "best W=0.3" in _study.verdicts(study_result(), 0.05)[2]
    assert "no threshold stays within it" in _study.verdicts(study_result(), 0.001)[2]


def test_nice_ticks_cover_the_range():
    assert png.nice_ticks(100, 160) == [100.0, 120.0, 140.0, 160.0]
    assert png.nice_ticks(97, 655) == [0.0, 200.0, 400.0, 600.0, 800.0]
    t = png.nice_ticks(0.3, 0.37)
    assert t[0] <= 0.3 and t[-1] >= 0.37 and len(t) <= 9


def test_scatter_plot_marks_each_point_in_its_colour():
    red, blue = (200, 0, 0), (0, 0, 200)
    img = png.scatter_plot([(red, [(100, 100, None), (200, 300, 75)]), (blue, [(150, 200, 1)])], 320, 240)
    assert img.shape == (240, 320, 3) and img.dtype == np.uint8
    is_red, is_blue = (img == red).all(axis=2), (img == blue).all(axis=2)
    assert is_red.sum() > 2 * 81 and is_blue.sum() == 81       # two markers and a line; one 9x9 marker
    r, c = np.argwhere(is_blue).mean(axis=0)
    assert 0.3 * 240 < r < 0.7 * 240 and 0.3 * 320 < c < 0.7 * 320   # the middle point lies mid-canvas
    decode_png(png.encode_png(img))
