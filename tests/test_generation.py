"""generate(): shapes, masks, EOS handling, seeding, ordering; SmolLM2 answers (slow)."""

import time

import pytest
import torch

from stable_rlhf import models as M
from stable_rlhf.config import GenerationConfig
from stable_rlhf.generation import Generation, generate, response_masks, stop_token_ids

PROMPTS = ["What is 12 plus 30?", "Write a short poem about the sea.", "Name a colour."]


@pytest.fixture
def tiny(tiny_model_cfg):
    return M.load_policy(tiny_model_cfg, device="cpu")


@pytest.fixture
def eos_prone(tiny):
    """The tiny model with its EOS logit raised (about 1 in 8 per step), so that in a
    few dozen samples some responses end early and some run to max_new_tokens."""
    model, tok = tiny
    bias = torch.zeros(model.config.vocab_size)
    bias[tok.eos_token_id] = 4.2
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
    return model, tok


def test_response_masks_by_hand():
    ids = torch.tensor(
        [
            [5, 6, 2, 7, 2],  # EOS at 2: real through it
            [2, 9, 9, 9, 9],  # EOS first
            [5, 6, 7, 8, 9],  # no EOS: truncated
            [5, 3, 6, 7, 8],  # a second stop id
        ]
    )
    mask, truncated = response_masks(ids, [2, 3])
    assert mask.int().tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert truncated.tolist() == [False, False, True, False]


def test_stop_token_ids(tiny):
    model, tok = tiny
    assert stop_token_ids(tok, model) == [tok.eos_token_id]


def test_generate_shapes_masks_and_eos(eos_prone):
    model, tok = eos_prone
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=1.0, batch_size=5)
    n = 8
    gen = generate(model, tok, PROMPTS, cfg, n=n, seed=0)
    N = len(PROMPTS) * n
    assert isinstance(gen, Generation) and len(gen) == N
    assert gen.query_ids.shape[0] == gen.query_mask.shape[0] == N
    assert gen.response_ids.shape == gen.response_mask.shape
    assert gen.response_ids.shape[0] == N and gen.response_ids.shape[1] <= cfg.max_new_tokens
    assert gen.query_mask.dtype == gen.response_mask.dtype == gen.truncated.dtype == torch.bool
    eos, pad = tok.eos_token_id, tok.pad_token_id

    # queries: left-padded chat-formatted prompts
    for row in range(N):
        m = gen.query_mask[row]
        first = int(m.int().argmax())
        assert m[first:].all() and not m[:first].any()
        assert (gen.query_ids[row][~m] == pad).all()
        text = M.chat_prompt(tok, gen.prompts[row])
        assert tok.decode(gen.query_ids[row][m]) == text

    # responses: real through the first EOS, pad after; truncated iff no EOS
    assert gen.truncated.any() and (~gen.truncated).any(), "test needs both kinds of rows"
    for row in range(N):
        ids, m = gen.response_ids[row], gen.response_mask[row]
        length = int(m.sum())
        assert m[:length].all() and not m[length:].any()
        assert (ids[length:] == pad).all()
        is_eos = ids[:length] == eos
        if gen.truncated[row]:
            assert length == cfg.max_new_tokens and not is_eos.any()
        else:
            assert is_eos[-1] and not is_eos[:-1].any()
        assert pad not in ids[:length].tolist()  # the pad token is never sampled
        assert gen.responses[row] == tok.decode(ids[m], skip_special_tokens=True).strip()

    assert gen.to("cpu").response_ids.data_ptr() == gen.response_ids.data_ptr()
    input_ids, attention_mask = gen.sequences()
    assert input_ids.shape == (N, gen.query_ids.shape[1] + gen.response_ids.shape[1])
    # each row's real tokens are one contiguous run
    changes = (attention_mask[:, 1:] != attention_mask[:, :-1]).sum(1)
    assert (changes <= 2).all()


def test_generate_seeded_and_prompt_major(tiny):
    model, tok = tiny
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, batch_size=4)
    rng = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, cfg, n=3, seed=123)
    assert torch.equal(rng, torch.get_rng_state()), "a seeded generate moved the global RNG"
    b = generate(model, tok, PROMPTS, cfg, n=3, seed=123)
    c = generate(model, tok, PROMPTS, cfg, n=3, seed=124)
    assert a.responses == b.responses and torch.equal(a.response_ids, b.response_ids)
    assert a.responses != c.responses
    assert a.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert a.prompts == [p for p in PROMPTS for _ in range(3)]
    assert len(set(a.responses[:3])) > 1  # samples of one prompt differ


def test_greedy_is_independent_of_batching(tiny):
    """Left padding must not change what a row generates (positions come from the mask)."""
    model, tok = tiny
    prompts = PROMPTS + ["Hi", "Explain in two sentences why the sky is blue and the sea is too."]
    one = generate(model, tok, prompts, GenerationConfig(max_new_tokens=10, temperature=0.0, batch_size=1))
    all_ = generate(model, tok, prompts, GenerationConfig(max_new_tokens=10, temperature=0.0, batch_size=8))
    assert one.responses == all_.responses
    torch.testing.assert_close(one.response_ids, all_.response_ids)


def test_model_generation_defaults_do_not_leak(tiny):
    """Samples follow softmax(logits / T) with top_p only, whatever generation_config a
    hub model ships (PPO's logprobs assume exactly that distribution)."""
    model, tok = tiny
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.9, top_p=1.0, batch_size=4)
    clean = generate(model, tok, PROMPTS, cfg, n=2, seed=5)
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.top_k = 1
    model.generation_config.no_repeat_ngram_size = 1
    shipped = generate(model, tok, PROMPTS, cfg, n=2, seed=5)
    assert torch.equal(clean.response_ids, shipped.response_ids)
    assert model.generation_config.top_k == 1  # the model's own config is left as it was


def test_generate_restores_training_mode_and_progress(tiny):
    model, tok = tiny
    model.train()
    gen = generate(model, tok, PROMPTS[:1], GenerationConfig(max_new_tokens=4, batch_size=2), progress=True)
    assert model.training
    assert len(gen) == 1


def test_smollm2_answers_arithmetic(smollm2, capsys):
    model, tok = smollm2.model, smollm2.tokenizer
    cfg = GenerationConfig(max_new_tokens=32, temperature=0.0, batch_size=8)
    gen = generate(model, tok, ["What is 2 + 3? Answer with a number."], cfg)
    answer = gen.responses[0]
    assert answer, "empty answer"
    assert "<|im_end|>" not in answer and "<|im_start|>" not in answer

    # throughput: a batch of 8 prompts x 32 new tokens, sampled (the rollout setting)
    prompts = [f"What is {a} + {b}?" for a, b in zip(range(8), range(10, 18))]
    cfg = GenerationConfig(max_new_tokens=32, temperature=0.7, top_p=0.95, batch_size=8)
    t0 = time.perf_counter()
    batch = generate(model, tok, prompts, cfg, seed=0)
    seconds = time.perf_counter() - t0
    new_tokens = int(batch.response_mask.sum())
    with capsys.disabled():
        print(f"\n[smollm2] 'What is 2 + 3?' -> {answer!r}")
        print(
            f"[timing] SmolLM2 generate 8 prompts x 32 new tokens: {seconds:.2f} s "
            f"({new_tokens} tokens, {new_tokens / seconds:.0f} tok/s)"
        )
    assert all(r for r in batch.responses)
    assert (~batch.truncated).any() or batch.response_ids.shape[1] == 32


def test_generation_logprobs_equal_a_forward_pass(eos_prone):
    """generate(logprobs=True) keeps each sampled token's log-probability at the sampling
    temperature from the sampler's own logits: what PPO's no-grad forward pass computes over
    the finished sequences (rows ending early, two batches padded to one length), top_p
    notwithstanding (both are of softmax(logits / T)), and 0 past each response."""
    from stable_rlhf.ppo import response_logprobs

    model, tok = eos_prone
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.3, top_p=0.9, batch_size=5)
    gen = generate(model, tok, PROMPTS, cfg, n=3, seed=7, logprobs=True)
    assert gen.truncated.any() and not gen.truncated.all()
    with torch.no_grad():
        forward, _ = response_logprobs(model, gen.query_ids, gen.query_mask, gen.response_ids, gen.response_mask, 1.3)
    torch.testing.assert_close(gen.logprobs, forward * gen.response_mask, atol=1e-5, rtol=0)
    assert torch.all(gen.logprobs[~gen.response_mask] == 0)
    plain = generate(model, tok, PROMPTS, cfg, n=3, seed=7)
    assert plain.logprobs is None and plain.responses == gen.responses


def test_response_logprobs_read_the_head_at_response_positions_only(tiny):
    """The LM head on the response positions alone (logits_to_keep) gives the log-probs of
    the full logits sliced; a wrapper (PEFT) still takes the argument."""
    from stable_rlhf.models import position_ids_from_mask
    from stable_rlhf.ppo import accepts_logits_to_keep, response_logprobs

    model, tok = tiny
    gen = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=6, temperature=1.0, batch_size=2), seed=1)
    ids, mask = gen.sequences()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask)).logits
        Tq = gen.query_ids.shape[1]
        expected = torch.log_softmax(full[:, Tq - 1 : -1] / 0.5, -1).gather(-1, gen.response_ids[..., None])[..., 0]
        got, _ = response_logprobs(model, gen.query_ids, gen.query_mask, gen.response_ids, gen.response_mask, 0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert accepts_logits_to_keep(model)
    from peft import LoraConfig, get_peft_model

    assert accepts_logits_to_keep(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])))
