"""The model builder: the KV-cache forward must reproduce the full forward."""

from __future__ import annotations

import pytest
import torch

from nas.stages.model import build_model
from tests.test_arch import ATTENTION, SHARING, make


@pytest.mark.parametrize("sharing", list(SHARING))
@pytest.mark.parametrize("attention", list(ATTENTION))
def test_cached_prefill_and_decode_match_full_forward(attention, sharing):
    spec = make(attention, sharing, norm="layernorm" if sharing == "none" else "rmsnorm")
    model = build_model(spec, seed=1).eval()
    idx = torch.randint(0, spec.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(idx)
        logits, cache = model.forward_cached(idx[:, :9], model.empty_cache(2))  # prefill
        steps = [logits]
        logits, cache = model.forward_cached(idx[:, 9:13], cache)  # a chunk on top of a cache
        steps.append(logits)
        for t in range(13, 20):  # one-token decode
            logits, cache = model.forward_cached(idx[:, t : t + 1], cache)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=1e-4)
    assert len(cache) == spec.n_layers  # one entry per applied layer, repeats included


def test_mla_caches_only_the_latent_and_rotary_key():
    spec = make("mla")
    model = build_model(spec).eval()
    with torch.no_grad():
        _, cache = model.forward_cached(torch.zeros(1, 7, dtype=torch.long), model.empty_cache(1))
    a, b = cache[0]
    assert a.shape == (1, 7, spec.mla_latent_rank)
    assert b.shape == (1, 7, spec.mla_rope_dim)
    cached = sum(t.numel() * t.element_size() for layer in cache for t in layer)
    assert cached == 7 * spec.kv_cache_bytes_per_token()


def test_gqa_cache_holds_kv_heads_not_query_heads():
    spec = make("gqa")
    model = build_model(spec).eval()
    with torch.no_grad():
        _, cache = model.forward_cached(torch.zeros(1, 5, dtype=torch.long), model.empty_cache(1))
    assert cache[0][0].shape == (1, spec.n_kv_heads, 5, spec.head_dim)
    cached = sum(t.numel() * t.element_size() for layer in cache for t in layer)
    assert cached == 5 * spec.kv_cache_bytes_per_token()


def test_same_seed_same_weights_and_tied_head_shares_the_table():
    spec = make(tied_embeddings=True)
    a, b, c = build_model(spec, seed=3), build_model(spec, seed=3), build_model(spec, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)
    assert a.lm_head.weight is a.tok_emb.weight


def test_block_repeat_applies_each_unique_block_in_a_row():
    model = build_model(make("gqa", "block_repeat"))
    applied = model.applied_blocks()
    assert len(model.blocks) == 2 and len(applied) == 4
    assert applied[0] is applied[1] and applied[2] is applied[3] and applied[1] is not applied[2]
