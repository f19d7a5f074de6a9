"""Shared by the benchmark suites: give each benchmark's memory back before the next one starts (on a GPU, a
full-size model left in the caching allocator would skew the next benchmark's peak memory and may not fit)."""

import gc

import pytest
import torch


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
