"""Shared pytest fixtures: where the real data lives and tiny configs."""
from __future__ import annotations

import os
import subprocess
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


def preprocess_shards(source: Path, sink: Path, seq: int, seed: int, blocks: int = 2) -> Path:
    """Pre-training Parquet shards of the text files under ``source`` (one ``en`` folder), as users make them."""
    subprocess.run([sys.executable, "-m", "data.preprocess_pretraining", "--wikipedia", str(source), "--sink",
                    str(sink), "--vocab-file", str(REPO / "vocab" / "vocab"), "--target-seq-length", str(seq),
                    "--num-blocks", str(blocks), "--local-n-workers", "1", "--seed", str(seed),
                    "--duplicate-factor", "3"], check=True, cwd=REPO, capture_output=True)
    return sink


@pytest.fixture(scope="session")
def pretraining_shards(tmp_path_factory) -> dict[str, Path]:
    """Train shards (seq 64) from most of the bundled corpus and held-out shards from documents it never sees."""
    root = tmp_path_factory.mktemp("shards")
    docs = (REPO / "data" / "sample" / "source" / "en" / "wikitext2_valid.txt").read_text(encoding="utf-8")
    docs = docs.splitlines()
    train_src, held_src = root / "train_src" / "en", root / "held_src" / "en"
    train_src.mkdir(parents=True)
    held_src.mkdir(parents=True)
    (train_src / "a.txt").write_text("\n".join(docs[:-4]) + "\n", encoding="utf-8")
    (held_src / "a.txt").write_text("\n".join(docs[-4:]) + "\n", encoding="utf-8")
    return {"train": preprocess_shards(train_src.parent, root / "train", 64, 1),
            "held": preprocess_shards(held_src.parent, root / "held", 64, 2, blocks=1)}


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> tuple[Path, Path]:
    """A randomly initialised tiny BertModel saved as a fine-tuning starting point: (weights folder, config file)."""
    from modeling import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny")
    config = BertConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
                        max_position_embeddings=160)
    config.to_json_file(folder / "config.json")
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder / "init")
    return folder / "init", folder / "config.json"
