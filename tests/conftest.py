"""Shared fixtures for the runtime tests."""
import pytest

# every quantized file is made by llama.cpp's own quantizer (tests/reference.py)
FTYPES = ["F16", "Q8_0", "Q4_K_M", "Q3_K_M"]


@pytest.fixture(params=FTYPES)
def ftype(request):
    return request.param
