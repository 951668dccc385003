"""Model.close: releases the prefetch thread, the file descriptor and the mapping; idempotent."""
import os
import threading

import numpy as np
import pytest

from localmoe.errors import LocalMoEError
from localmoe.model import load
from localmoe.planner import footprint
from models.build import cached_model

N_CTX = 32


@pytest.fixture(scope="module")
def path():
    return cached_model("llama", "tiny")


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "localmoe-prefetch"]


def test_close_is_idempotent_and_forward_after_close_raises(path):
    m = load(path, n_ctx=N_CTX)
    assert m.forward([1, 2]).shape == (2, m.n_vocab)
    m.close()
    m.close()
    assert m.file._mm is None  # the mapping is released (tensor views keep the pages until they go)
    with pytest.raises(LocalMoEError, match="model is closed"):
        m.forward([3])
    with pytest.raises(LocalMoEError, match="model is closed"):
        m.eval([1, 2])


def test_close_releases_the_offloaded_store(path):
    with load(path, n_ctx=N_CTX) as probe:
        fp = footprint(probe.file, probe.args, N_CTX)
    before = len(_prefetch_threads())
    with load(path, n_ctx=N_CTX, ram_budget=fp.minimum_bytes + fp.max_expert_bytes) as m:
        logits = m.forward([1, 5, 9])
        fd = m.store.reader.fd
        assert len(_prefetch_threads()) == before + 1
        os.fstat(fd)  # open while the model is
    assert np.isfinite(logits).all()
    assert m.closed and m.store.reader.fd == -1 and len(_prefetch_threads()) == before
    with pytest.raises(OSError):
        os.fstat(fd)  # closed, and nothing opened since could have taken its number
    m.close()  # idempotent after __exit__ too
    with pytest.raises(LocalMoEError, match="model is closed"):
        m.forward([1])
