"""wmtp_core.generation with the built-in MTPTransformer: the KV cache, greedy and sampled decoding, stops, and
self-speculative decoding against plain greedy, on a random model and on one trained so its heads agree."""

from __future__ import annotations

import pytest
import torch
from support.generation import PROMPTS, decode_in_blocks, read_prompt_then_decode, train_on_walks

from wmtp_core.generation import SamplingSettings, generate
from wmtp_core.models.tokenizer import ByteTokenizer
from wmtp_core.models.transformer import MTPTransformer
from wmtp_core.recipes import TINY_MODEL, load_recipe

TOKENIZER = ByteTokenizer()
GREEDY = SamplingSettings(max_new_tokens=24)


def _tiny(horizon: int = 4, max_seq_len: int = 64) -> MTPTransformer:
    recipe = load_recipe(None, [*TINY_MODEL, f"model.horizon={horizon}", f"model.max_seq_len={max_seq_len}"])
    torch.manual_seed(0)
    return MTPTransformer(recipe.model, vocab_size=TOKENIZER.vocab_size).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decoding a tiny model is a string of tiny ops: a second intra-op thread only adds waiting (10x slower on two
    busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_model() -> MTPTransformer:
    return _tiny()


@pytest.fixture(scope="module")
def walker() -> MTPTransformer:
    """Trained on alphabet walks: its heads agree often (acceptance well above 0) and it ends walks with eos."""
    return train_on_walks(_tiny(), TOKENIZER, steps=150)


def _ids(generations) -> list[list[int]]:
    return [g.token_ids for g in generations]


def _greedy_without_cache(model: MTPTransformer, prompt: str, max_new_tokens: int) -> list[int]:
    ids = [TOKENIZER.bos_id, *TOKENIZER.encode(prompt, add_special=False)]
    new = []
    with torch.no_grad():
        while len(new) < max_new_tokens and TOKENIZER.eos_id not in new:
            new.append(int(model(torch.tensor([ids + new]))[0, -1, 0].argmax()))
    return new


def test_decode_with_a_cache_gives_the_full_forward_logits_block_by_block(random_model):
    tokens_BT = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    # rejected drafts: the cache is cut back to 12 positions, so positions 12 and 13 are read again
    full_BTKV, stitched_BTKV = decode_in_blocks(random_model, tokens_BT, [9, 10, 14], crop=12)
    torch.testing.assert_close(stitched_BTKV, full_BTKV, rtol=1e-5, atol=1e-5)


def test_a_prompt_read_of_the_last_position_alone_caches_every_position(random_model):
    """last_only returns the last position's logits and leaves the cache as a full read does: the steps after it
    give the full forward's logits."""
    tokens_BT = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    full_BTKV, last_B1KV, after_BTKV = read_prompt_then_decode(random_model, tokens_BT, 20)
    assert last_B1KV.shape[:3] == (1, 1, 4)
    torch.testing.assert_close(last_B1KV, full_BTKV[:, 19:20], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after_BTKV, full_BTKV[:, 20:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name", ["random_model", "walker"])
def test_cached_greedy_equals_greedy_recomputed_without_a_cache(model_name, request):
    model = request.getfixturevalue(model_name)
    prompts = PROMPTS[:8]
    generations, stats = generate(model, TOKENIZER, prompts, GREEDY)
    assert _ids(generations) == [_greedy_without_cache(model, p, GREEDY.max_new_tokens) for p in prompts]
    assert stats.forward_passes == stats.tokens  # plain decoding: the prompt read, then one forward per later token


@pytest.mark.parametrize("heads", [2, 3, 4])
@pytest.mark.parametrize("model_name", ["random_model", "walker"])
def test_speculative_greedy_equals_plain_greedy_token_for_token(model_name, heads, request):
    model = request.getfixturevalue(model_name)
    settings = SamplingSettings(max_new_tokens=30, stop=("uvw", "\n"))
    plain, plain_stats = generate(model, TOKENIZER, PROMPTS, settings)
    speculative, stats = generate(model, TOKENIZER, PROMPTS, settings, heads=heads)
    assert len(PROMPTS) >= 20
    assert _ids(speculative) == _ids(plain)
    assert [(g.text, g.finish_reason) for g in speculative] == [(g.text, g.finish_reason) for g in plain]
    assert stats.tokens == plain_stats.tokens and len(stats.acceptance_per_head) == heads - 1
    if model_name == "walker":
        assert {g.finish_reason for g in plain} >= {"eos", "stop"}
        assert stats.acceptance_per_head[0] > 0.2 and stats.forward_passes < plain_stats.forward_passes


def test_acceptance_counts_each_drafting_head_and_predict_the_forward_passes(walker):
    _, stats = generate(walker, TOKENIZER, PROMPTS, SamplingSettings(max_new_tokens=30), heads=4)
    assert all(0 < a <= p for a, p in zip(stats.drafts_accepted, stats.drafts_proposed))
    # head i's draft is reached only when heads 1..i-1 were accepted: the counts cannot grow with i
    assert stats.drafts_accepted == sorted(stats.drafts_accepted, reverse=True)
    assert stats.acceptance_per_head == [a / p for a, p in zip(stats.drafts_accepted, stats.drafts_proposed)]
    # every token is the first of a step, an accepted draft, or the one after the prompt read
    steps = stats.forward_passes - len(PROMPTS)
    assert stats.tokens <= len(PROMPTS) + steps + sum(stats.drafts_accepted)
    assert stats.tokens_per_s == pytest.approx(stats.tokens / stats.seconds)
    # the prompt reads, timed apart: each gave one token, the decoding steps the rest
    assert (stats.prompts, 0 < stats.prompt_seconds < stats.seconds) == (len(PROMPTS), True)
    decode_seconds = stats.seconds - stats.prompt_seconds
    assert stats.decode_tokens_per_s == pytest.approx((stats.tokens - len(PROMPTS)) / decode_seconds)


def test_plain_decoding_reports_no_heads_and_counts_one_forward_per_token(random_model):
    _, stats = generate(random_model, TOKENIZER, ["abc"], SamplingSettings(max_new_tokens=5))
    assert (stats.tokens, stats.forward_passes, stats.acceptance_per_head) == (5, 5, [])


def test_batched_greedy_equals_one_prompt_at_a_time(random_model):
    batched, _ = generate(random_model, TOKENIZER, PROMPTS[:6], GREEDY, heads=2)
    one_by_one = [generate(random_model, TOKENIZER, [p], GREEDY, heads=2)[0][0] for p in PROMPTS[:6]]
    assert batched == one_by_one


def test_sampling_is_reproducible_with_a_seed_and_differs_across_seeds(random_model):
    settings = SamplingSettings(max_new_tokens=20, temperature=1.0, seed=3)
    first, _ = generate(random_model, TOKENIZER, ["def f(", "def f("], settings)
    again, _ = generate(random_model, TOKENIZER, ["def f(", "def f("], settings)
    other, _ = generate(
        random_model, TOKENIZER, ["def f(", "def f("], SamplingSettings(**{**vars(settings), "seed": 4})
    )
    assert first == again
    assert _ids(first) != _ids(other)
    assert first[0].token_ids != first[1].token_ids  # the same prompt twice: two samples (pass@k needs them apart)


def test_speculative_sampling_draws_what_plain_sampling_draws_with_the_same_seed(walker):
    settings = SamplingSettings(max_new_tokens=30, temperature=0.8, top_p=0.95, seed=11)
    plain, _ = generate(walker, TOKENIZER, PROMPTS, settings)
    speculative, stats = generate(walker, TOKENIZER, PROMPTS, settings, heads=3)
    assert _ids(speculative) == _ids(plain)
    assert stats.drafts_accepted[0] > 0


def test_a_tiny_top_p_behaves_like_greedy(random_model):
    nucleus_of_one = SamplingSettings(max_new_tokens=24, temperature=1.5, top_p=1e-6, seed=5)
    assert _ids(generate(random_model, TOKENIZER, PROMPTS[:6], nucleus_of_one)[0]) == _ids(
        generate(random_model, TOKENIZER, PROMPTS[:6], GREEDY)[0]
    )


def test_a_stop_string_cuts_the_text_before_it(walker):
    (walk,), _ = generate(walker, TOKENIZER, ["abc"], SamplingSettings(max_new_tokens=30))
    assert walk.finish_reason == "eos" and len(walk.text) > 8
    stop = walk.text[4:6]
    (cut,), _ = generate(walker, TOKENIZER, ["abc"], SamplingSettings(max_new_tokens=30, stop=("never", stop)))
    assert (cut.text, cut.finish_reason) == (walk.text[: walk.text.find(stop)], "stop")
    assert TOKENIZER.decode(cut.token_ids).endswith(stop)  # the tokens that spelled the stop string are kept


def test_eos_ends_a_generation_and_is_not_in_its_text(walker):
    generations, _ = generate(walker, TOKENIZER, PROMPTS, SamplingSettings(max_new_tokens=30))
    ended = [g for g in generations if g.finish_reason == "eos"]
    assert len(ended) >= 5
    for g in ended:
        assert g.token_ids.index(TOKENIZER.eos_id) == len(g.token_ids) - 1
        assert g.text == TOKENIZER.decode(g.token_ids[:-1])


def test_generation_stops_at_max_new_tokens_and_at_max_seq_len(random_model):
    (short,), _ = generate(random_model, TOKENIZER, ["abc"], SamplingSettings(max_new_tokens=3), heads=4)
    assert (len(short.token_ids), short.finish_reason) == (3, "length")
    prompt = "x" * 50  # bos + 50 tokens leaves 13 of the model's 64 positions
    (capped,), _ = generate(random_model, TOKENIZER, [prompt], SamplingSettings(max_new_tokens=40), heads=4)
    assert (len(capped.token_ids), capped.finish_reason) == (13, "length")


def test_a_prompt_that_leaves_no_room_is_refused(random_model):
    with pytest.raises(ValueError, match="prompt 1 is 64 tokens.*model.max_seq_len=64; shorten it"):
        generate(random_model, TOKENIZER, ["ok", "x" * 63], GREEDY)


def test_heads_beyond_the_horizon_or_a_training_model_are_refused(random_model):
    with pytest.raises(ValueError, match=r"heads=5: choose 1 .* up to the model's horizon \(4\)"):
        generate(random_model, TOKENIZER, ["a"], GREEDY, heads=5)
    model = _tiny().train()
    with pytest.raises(ValueError, match="call model.eval"):
        generate(model, TOKENIZER, ["a"], GREEDY)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_new_tokens", 0, "max_new_tokens must be at least 1"),
        ("temperature", -0.1, "temperature must be 0"),
        ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
        ("stop", ("",), "stop strings must not be empty"),
    ],
)
def test_invalid_sampling_settings_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**{field: value})
