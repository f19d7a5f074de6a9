"""Repo-wide pytest hooks: the session header names every requirement's installed version (when a new release of a
dependency breaks the suite, the log's first lines say which), and tests marked `gpu` are skipped without CUDA."""

import pytest


def pytest_report_header(config):
    from merv_fast.dependencies import format_versions, requirement_versions

    return [f"merv-fast requirements: {format_versions(requirement_versions())}"]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)
