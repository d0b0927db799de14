"""Shared pytest fixtures: where the real data lives and tiny configs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# CI lays ../shared beside the clone; a user's fresh clone has none, so tests that need it skip.
SHARED_DATA = Path(os.environ.get("BERT_SHARED_DATA", REPO.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests run tiny models, for which extra intra-op threads cost more than they give (and oversubscribe a shared
# 2-core machine badly): one thread here and in every subprocess the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS is set)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def shared_path(*parts: str) -> Path:
    """Return a path under ../shared/data, skipping the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared real-data folder is not beside this clone)")
    return path


@pytest.fixture
def repo_root() -> Path:
    return REPO
