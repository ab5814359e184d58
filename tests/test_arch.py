"""ArchSpec: identity, validation and analytic figures checked against the built model."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nas.spec.arch import ArchSpec
from nas.spec.errors import SpecError
from nas.stages.model import build_model

ATTENTION = {
    "mha": dict(attention="mha", n_heads=4),
    "gqa": dict(attention="gqa", n_heads=4, n_kv_heads=2),
    "mqa": dict(attention="mqa", n_heads=4),
    "mla": dict(attention="mla", n_heads=4, mla_latent_rank=24, mla_rope_dim=8),
}
SHARING = {"none": dict(), "block_repeat": dict(layer_sharing="block_repeat", share_repeat=2)}


def make(attention: str = "gqa", sharing: str = "none", **kw) -> ArchSpec:
    base = dict(vocab_size=300, d_model=48, n_layers=4, head_dim=12, context_length=32)
    base.update(ATTENTION[attention])
    base.update(SHARING[sharing])
    base.update(kw)
    return ArchSpec(**base)


@pytest.mark.parametrize(
    "attention,sharing,tied,norm,ffn",
    list(itertools.product(ATTENTION, SHARING, [False, True], ["rmsnorm", "layernorm"], ["gated", "plain"])),
)
def test_param_count_matches_built_model(attention, sharing, tied, norm, ffn):
    spec = make(attention, sharing, tied_embeddings=tied, norm=norm, ffn=ffn, ffn_ratio=2.5)
    model = build_model(spec)
    assert sum(p.numel() for p in model.parameters()) == spec.params()
    assert spec.params() == spec.embedding_params() + spec.non_embedding_params()


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_linear_flops_match_torch_flop_counter(attention):
    spec = make(attention, "block_repeat", tied_embeddings=True)
    model = build_model(spec).eval()
    T = 16
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, T, dtype=torch.long))
    counts = counter.get_flop_counts()["Global"]
    # Linear layers run as mm/addmm. Attention runs as an SDPA kernel the counter does not see on
    # the CPU, or (MLA's unequal K/V widths) as bmm without the causal half: not compared here.
    linear = sum(v for op, v in counts.items() if str(op).split(".")[-1] in ("mm", "addmm"))
    assert linear == 2 * T * spec._linear_macs_per_token()


def test_prefill_flops_equal_the_sum_of_decode_steps():
    for attention in ("mha", "gqa", "mqa"):
        spec = make(attention)
        assert spec.prefill_flops(20) == sum(spec.decode_flops(p) for p in range(20))


def test_block_repeat_shares_parameters_but_not_compute_or_cache():
    plain, shared = make("gqa"), make("gqa", "block_repeat")
    assert shared.params() < plain.params()
    assert shared.non_embedding_params() - shared._norm_params(48) == (
        plain.non_embedding_params() - plain._norm_params(48)) // 2
    assert shared.decode_flops(10) == plain.decode_flops(10)
    assert shared.kv_cache_bytes_per_token() == plain.kv_cache_bytes_per_token()


def test_tied_embeddings_save_one_table():
    assert make(tied_embeddings=False).params() - make(tied_embeddings=True).params() == 300 * 48


def test_kv_cache_bytes_follow_attention_kind():
    kv = {a: make(a).kv_cache_bytes_per_token() for a in ATTENTION}
    assert kv["mha"] == 4 * 2 * 4 * 12 * 4  # layers * (K,V) * heads * head_dim * fp32
    assert kv["mqa"] < kv["gqa"] < kv["mha"]
    assert kv["mla"] == 4 * (24 + 8) * 4
    assert make("gqa", bitwidth=16).kv_cache_bytes_per_token() == kv["gqa"] // 2


def test_weight_bytes_shrink_with_bitwidth():
    sizes = [make(bitwidth=b).weight_bytes() for b in (32, 16, 8, 4)]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] == 4 * make().params()
    # int4 pays one fp32 scale and a 4-bit zero point per 32 weights: ~0.64 bytes per matrix weight
    assert 0.5 * sizes[2] < sizes[3] < 0.7 * sizes[2]


def test_equal_specs_share_id_and_json_round_trips():
    a, b = make(ffn_ratio=3), make(ffn_ratio=3.0)
    assert a == b and hash(a) == hash(b) and a.arch_id == b.arch_id
    assert ArchSpec.from_json(a.canonical_json()) == a
    assert make(bitwidth=8).arch_id != a.arch_id
    assert len({make(x).arch_id for x in ATTENTION}) == 4


def test_derived_kv_heads_are_filled_in():
    assert make("mha").n_kv_heads == 4
    assert make("mqa").n_kv_heads == 1
    assert make("mla").n_kv_heads == 4


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(attention="gqa", n_kv_heads=4), "n_kv_heads"),  # equals n_heads: that is mha
        (dict(attention="gqa", n_kv_heads=3), "n_kv_heads"),  # does not divide 4 heads
        (dict(attention="mqa", n_kv_heads=2), "n_kv_heads"),
        (dict(mla_latent_rank=16), "mla_latent_rank"),  # MLA field on a gqa spec
        (dict(layer_sharing="block_repeat", share_repeat=3), "n_layers"),
        (dict(share_repeat=2), "share_repeat"),
        (dict(bitwidth=6), "bitwidth"),
        (dict(norm="batchnorm"), "norm"),
        (dict(d_model=48.0), "d_model"),
        (dict(vocab_size=100), "vocab_size"),
        (dict(head_dim=11), "head_dim"),
        (dict(tied_embeddings="yes"), "tied_embeddings"),
    ],
)
def test_inconsistent_specs_are_refused_naming_the_field(kw, field):
    with pytest.raises(SpecError, match=field):
        make(**kw)


def test_from_dict_names_unknown_and_missing_fields():
    data = make().to_dict()
    with pytest.raises(SpecError, match="'n_layer'"):
        ArchSpec.from_dict({**data, "n_layer": 3})
    del data["d_model"]
    with pytest.raises(SpecError, match="'d_model' is required"):
        ArchSpec.from_dict(data)


def test_field_metadata_covers_every_field_once() -> None:
    # validation, the space loader and the web page iterate these lists: a new field must land
    # in exactly one kind, read from its annotation, with no list to keep by hand
    from nas.spec.arch import BOOL_FIELDS, FLOAT_FIELDS, INT_FIELDS, LITERAL_FIELDS

    names = [f.name for f in dataclasses.fields(ArchSpec)]
    kinds = [set(INT_FIELDS), set(FLOAT_FIELDS), set(BOOL_FIELDS), set(LITERAL_FIELDS) - set(INT_FIELDS)]
    for name in names:
        assert sum(name in k for k in kinds) == 1, name
    assert set().union(*kinds) == set(names)
    assert LITERAL_FIELDS["bitwidth"] == (32, 16, 8, 4) and "bitwidth" in INT_FIELDS
