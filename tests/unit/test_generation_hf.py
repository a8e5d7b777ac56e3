"""wmtp_core.generation with Hugging Face trunks (tiny Llama and GPT-2 built locally from a config): the LM's own KV
cache plus one per extra head, and self-speculative greedy decoding against plain greedy."""

from __future__ import annotations

import pytest
import torch
from support.generation import PROMPTS, decode_in_blocks, read_prompt_then_decode, train_on_walks

from wmtp_core.data.records import builtin_dataset_path, format_example, load_records
from wmtp_core.generation import SamplingSettings, generate, head_accuracy
from wmtp_core.models.hf import load_hf_mtp_model
from wmtp_core.models.hf_tokenizer import load_hf_tokenizer

SETTINGS = SamplingSettings(max_new_tokens=24, stop=("uvw",))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decoding a tiny model is a string of tiny ops: a second intra-op thread only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(hf_model_dirs, kind: str):
    """The tiny model with 4 heads whose extra heads differ from the last layer they were copied from."""
    torch.manual_seed(0)
    model = load_hf_mtp_model(str(hf_model_dirs[kind]), horizon=4, max_seq_len=64).eval()
    with torch.no_grad():
        for param in model.extra_heads.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model, load_hf_tokenizer(str(hf_model_dirs[kind]))


@pytest.fixture(scope="module")
def llama_walker(hf_model_dirs):
    """The tiny Llama trained on alphabet walks: its heads agree often, so drafts are accepted and caches cut back
    to every length."""
    model, tokenizer = _load(hf_model_dirs, "llama")
    return train_on_walks(model, tokenizer, steps=100), tokenizer


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decode_with_the_lm_cache_gives_the_full_forward_logits_block_by_block(hf_model_dirs, kind):
    model, _ = _load(hf_model_dirs, kind)
    tokens_BT = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(2))

    def cut_back(cache) -> None:  # rejected drafts: positions 10 and 11 are read again
        assert cache.length == 10 and all(c.get_seq_length(len(c.layers) - 1) == 10 for c in cache.heads)

    full_BTKV, stitched_BTKV = decode_in_blocks(model, tokens_BT, [7, 8, 12], crop=10, on_crop=cut_back)
    torch.testing.assert_close(stitched_BTKV, full_BTKV, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_prompt_read_of_the_last_position_alone_caches_every_position(hf_model_dirs, kind):
    model, _ = _load(hf_model_dirs, kind)
    tokens_BT = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(4))
    full_BTKV, last_B1KV, after_BTKV = read_prompt_then_decode(model, tokens_BT, 12)
    assert last_B1KV.shape[:3] == (1, 1, 4)
    torch.testing.assert_close(last_B1KV, full_BTKV[:, 11:12], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after_BTKV, full_BTKV[:, 12:], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def random_trunks(hf_model_dirs) -> dict:
    """Per kind: the model, its tokenizer and its plain greedy generations (computed once for every k)."""
    trunks = {}
    for kind in ("llama", "gpt2"):
        model, tokenizer = _load(hf_model_dirs, kind)
        trunks[kind] = model, tokenizer, generate(model, tokenizer, PROMPTS, SETTINGS)[0]
    return trunks


@pytest.mark.parametrize("heads", [2, 3, 4])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_speculative_greedy_equals_plain_greedy_with_a_random_trunk(random_trunks, kind, heads):
    model, tokenizer, plain = random_trunks[kind]
    speculative, stats = generate(model, tokenizer, PROMPTS, SETTINGS, heads=heads)
    assert len(PROMPTS) >= 20 and [g.token_ids for g in speculative] == [g.token_ids for g in plain]
    assert [g.text for g in speculative] == [g.text for g in plain]
    assert len(stats.acceptance_per_head) == heads - 1


@pytest.mark.parametrize("heads", [2, 3, 4])
def test_speculative_greedy_equals_plain_greedy_when_heads_agree(llama_walker, heads):
    model, tokenizer = llama_walker
    plain, plain_stats = generate(model, tokenizer, PROMPTS, SETTINGS)
    speculative, stats = generate(model, tokenizer, PROMPTS, SETTINGS, heads=heads)
    assert [g.token_ids for g in speculative] == [g.token_ids for g in plain]
    assert [(g.text, g.finish_reason) for g in speculative] == [(g.text, g.finish_reason) for g in plain]
    assert {g.finish_reason for g in plain} >= {"eos", "stop"}
    assert min(stats.acceptance_per_head) > 0 and stats.forward_passes < plain_stats.forward_passes


def test_hf_generation_stops_where_the_sequence_reaches_max_seq_len(random_trunks):
    model, tokenizer, _ = random_trunks["llama"]
    prompt = "x " * 30
    room = 64 - len(tokenizer.encode(prompt, add_special=False)) - 1
    (capped,), _ = generate(model, tokenizer, [prompt], SamplingSettings(max_new_tokens=60), heads=3)
    assert (len(capped.token_ids), capped.finish_reason) == (room, "length")


def test_head_0_cross_entropy_is_the_lm_own_loss(random_trunks):
    model, tokenizer, _ = random_trunks["llama"]
    record = load_records(builtin_dataset_path())[0]
    (head_0, *_) = head_accuracy(model, tokenizer, [record], max_len=64)
    ids = torch.tensor([tokenizer.encode(format_example(record))[:64]])
    with torch.no_grad():
        lm_loss = model.lm(input_ids=ids, labels=ids).loss
    assert head_0["cross_entropy"] == pytest.approx(float(lm_loss), rel=1e-5)
    assert head_0["tokens"] == ids.shape[1] - 1
