"""Shared fixtures. Nothing here may touch the Hugging Face hub: it is unreachable on
our machines, and tests must not depend on it anywhere."""

import os

# Before transformers / tokenizers are imported by any test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stable_rlhf.config import ModelConfig

# Tests using these fixtures load real models; they are marked slow automatically.
SLOW_FIXTURES = {"smollm2", "minilm"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """A cache for dequantised GGUF models, fresh per session (so the conversion itself is
    tested), or $STABLE_RLHF_TEST_CACHE to keep one between runs. Exported as
    $STABLE_RLHF_CACHE so every test that loads 'smollm2' shares one conversion."""
    keep = os.environ.get("STABLE_RLHF_TEST_CACHE")
    path = Path(keep) if keep else tmp_path_factory.mktemp("model_cache")
    old = os.environ.get("STABLE_RLHF_CACHE")
    os.environ["STABLE_RLHF_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("STABLE_RLHF_CACHE", None)
    else:
        os.environ["STABLE_RLHF_CACHE"] = old


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    """The tiny random Llama: built in memory, no download, milliseconds to load."""
    return ModelConfig(name_or_path="tiny-random")


@dataclass
class LoadedModel:
    cfg: ModelConfig
    model: Any
    tokenizer: Any
    load_seconds: float
    """wall time of the first load_policy (dequantising the GGUF when the cache was empty)"""
    converted: bool
    """whether that load wrote the cache"""


@pytest.fixture(scope="session")
def smollm2(model_cache) -> LoadedModel:
    """SmolLM2-135M-Instruct from the packaged GGUF, loaded once per session (on CPU)."""
    from stable_rlhf.models import load_policy, resolve_model_path

    cfg = ModelConfig(name_or_path="smollm2", cache_dir=str(model_cache))
    had_cache = any(model_cache.glob("SmolLM2-135M-Instruct*/config.json"))
    t0 = time.perf_counter()
    model, tokenizer = load_policy(cfg, device="cpu")
    seconds = time.perf_counter() - t0
    assert Path(resolve_model_path(cfg)).parent == model_cache
    return LoadedModel(cfg, model, tokenizer, seconds, converted=not had_cache)


@pytest.fixture(scope="session")
def minilm():
    """The packaged all-MiniLM-L6-v2 sentence embedder."""
    from stable_rlhf.models import load_embedder

    return load_embedder("minilm", device="cpu")


@pytest.fixture(scope="module")
def small_model_cpu():
    """CPU settings for modules that train the tiny random model (opt in with
    ``pytestmark = pytest.mark.usefixtures("small_model_cpu")``): oneDNN builds a kernel for
    every new input shape (every prompt batch has one), seconds each on a busy machine, and
    several threads spin-wait on each other when other processes hold the cores; plain
    single-thread kernels take milliseconds at this size."""
    import torch

    enabled, threads = torch.backends.mkldnn.enabled, torch.get_num_threads()
    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(1)
    yield
    torch.backends.mkldnn.enabled = enabled
    torch.set_num_threads(threads)
