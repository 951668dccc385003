"""qwen2moe vs llama.cpp on a tiny random model, F16 and llama.cpp-quantized files."""
import pytest

from reference import check_greedy, check_logits

pytestmark = pytest.mark.reference


def test_logits_match_llama_cpp(ftype):
    check_logits("qwen2moe", ftype)


def test_greedy_matches_llama_cpp(ftype):
    check_greedy("qwen2moe", ftype)
