"""Family profiles (dllm_sparse/models/families.py) and the masking path (dllm_sparse/sparsity/hooks.py) on tiny
random models.

Each site is checked against the spec (sparsification.md, "The gated FFN and its four sites") with the test's
own forward hooks: hooks registered *before* ``sparsify`` attaches see the dense values, hooks registered
inside the block (after it) see what the model really computes with; the sparse values must equal a
brute-force top-p (exact arithmetic, python loops) of the dense ones.
"""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import FAMILIES, build_tiny_model

from dllm_sparse import (
    ALL_SITES,
    PROFILES,
    FamilyProfile,
    FFNSite,
    MaskEvent,
    Sparsifier,
    SparsityStats,
    TopK,
    TopP,
    detect_family,
    find_ffns,
    register_family,
    sparsify,
)

SITES = [s.value for s in ALL_SITES]
_MODELS: dict[str, nn.Module] = {}


def shared_model(family: str) -> nn.Module:
    """One tiny model per family for the read-only tests (sparsify leaves no trace on it)."""
    if family not in _MODELS:
        _MODELS[family] = build_tiny_model(family)
    return _MODELS[family]


def ids_for(seed: int = 0, shape=(2, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 120, shape, generator=g)


@torch.no_grad()
def logits(model, ids, **kw) -> torch.Tensor:
    return model(input_ids=ids, **kw).logits


def brute_top_p_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Spec top-p per token (last dim), exact arithmetic in python loops."""
    rows = x.detach().reshape(-1, x.shape[-1]).double().tolist()
    out = []
    for row in rows:
        a = [Fraction(abs(v)) for v in row]
        total = sum(a)
        if total == 0:
            out.append([False] * len(a))
            continue
        target, running = Fraction(str(p)) * total, Fraction(0)
        for val in sorted(a, reverse=True):
            running += val
            if running >= target:
                tau = val
                break
        out.append([v >= tau and v > 0 for v in a])
    return torch.tensor(out, dtype=torch.bool).reshape(x.shape)


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs)
        + len(m._forward_pre_hooks_with_kwargs)
        for m in model.modules()
    )


class Recorder:
    """Forward hooks of the test itself on every FFN's gate / up / act / down."""

    def __init__(self):
        self.data: dict[tuple[int, str], torch.Tensor] = {}
        self.handles = []

    def attach(self, ffns, prefix: str):
        for f in ffns:
            i = f.layer
            self._pre(f.gate, (i, prefix + "gate_in"))
            self._pre(f.up, (i, prefix + "up_in"))
            self._pre(f.down, (i, prefix + "down_in"))
            self._post(f.gate, (i, prefix + "gate_out"))
            self._post(f.up, (i, prefix + "up_out"))
            self._post(f.act, (i, prefix + "act_out"))
        return self

    def _pre(self, module, key):
        self.handles.append(module.register_forward_pre_hook(lambda m, args: self.data.__setitem__(key, args[0])))

    def _post(self, module, key):
        self.handles.append(module.register_forward_hook(lambda m, a, out: self.data.__setitem__(key, out)))

    def remove(self):
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------------------------------------------
# Family profiles
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_detect_family_and_find_ffns(family):
    model = shared_model(family)
    profile = detect_family(model)
    assert profile.family == family
    assert profile.kind == ("diffusion" if family in ("dream", "llada") else "ar")
    assert profile.activation == ("gelu_tanh" if family == "gemma3" else "silu")
    ffns = find_ffns(model)
    assert [f.layer for f in ffns] == [0, 1]
    for i, f in enumerate(ffns):
        if family == "llada":
            block = model.model.transformer.blocks[i]
            assert (f.gate, f.up, f.down, f.act, f.owner) == (block.ff_proj, block.up_proj, block.ff_out, block.act,
                                                              block)
        else:
            mlp = model.model.layers[i].mlp
            assert (f.gate, f.up, f.down, f.act, f.owner) == (mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn,
                                                              mlp)
            assert f.block is model.model.layers[i]
        assert f.gate.weight.shape == (64, 32) and f.down.weight.shape == (32, 64)


def test_detect_by_module_names_when_model_type_is_unknown():
    model = build_tiny_model("llama")
    model.config.model_type = "llama_fork"
    assert detect_family(model).family in ("llama", "qwen2", "mistral", "gemma3", "dream")  # LLaMA names
    assert len(find_ffns(model)) == 2


@pytest.mark.parametrize("family", ["llama", "gemma3", "llada"])
def test_base_model_without_lm_head(family):
    # AutoModel gives the base model (LlamaModel: blocks at "layers", not "model.layers")
    base = shared_model(family).model
    assert detect_family(base).family == family
    assert [f.gate for f in find_ffns(base)] == [f.gate for f in find_ffns(shared_model(family))]
    ids = ids_for()
    with torch.no_grad():
        def run():
            out = base(input_ids=ids)
            return out[0] if isinstance(out, tuple) else out.last_hidden_state
        dense = run()
        with sparsify(base, "intermediate", TopP(0.5)) as stats:
            sparse = run()
    assert not torch.equal(sparse, dense) and sorted(stats.per_layer()) == [0, 1]
    assert hook_count(base) == 0


# A model no built-in profile knows: different module names everywhere.
class _MysteryFFN(nn.Module):
    def __init__(self, d=16, h=40):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, d)
        self.nonlin = nn.SiLU()

    def forward(self, x):
        return self.w2(self.nonlin(self.w1(x)) * self.w3(x))


class _MysteryBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.ffn = _MysteryFFN()

    def forward(self, x):
        return x + self.ffn(self.norm(x))


class _MysteryModel(nn.Module):
    def __init__(self, n_layers=3):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(model_type="mystery")
        self.emb = nn.Embedding(128, 16)
        self.body = nn.Module()
        self.body.stack = nn.ModuleList(_MysteryBlock() for _ in range(n_layers))
        self.head = nn.Linear(16, 128)

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids)
        for b in self.body.stack:
            x = b(x)
        return SimpleNamespace(logits=self.head(x))


def test_unknown_model_error_and_register_family():
    model = _MysteryModel().eval()
    with pytest.raises(ValueError) as err:
        detect_family(model)
    msg = str(err.value)
    assert "mystery" in msg and "Supported families" in msg and "register_family" in msg
    for family in FAMILIES:
        assert family in msg
    with pytest.raises(ValueError, match="register_family"):
        sparsify(model, "input", TopP(0.5)).__enter__()

    saved = list(PROFILES)
    try:
        profile = register_family(FamilyProfile("mystery", ("mystery",), layers="body.stack", ffn="ffn", gate="w1",
                                                up="w3", down="w2", act="nonlin"))
        assert PROFILES[0] is profile and detect_family(model) is profile
        ids = ids_for()
        dense = logits(model, ids)
        for site in SITES:
            with sparsify(model, site, TopP(1.0)):
                assert torch.equal(logits(model, ids), dense)
            with sparsify(model, site, TopP(0.5)) as stats:
                assert not torch.equal(logits(model, ids), dense)
            assert sorted(stats.per_layer()) == [0, 1, 2]
            assert 0.2 < stats.mean() < 0.95
        assert hook_count(model) == 0
        # re-registering the same family replaces it
        register_family(FamilyProfile("mystery", ("mystery",), layers="body.stack", ffn="ffn", gate="w3", up="w1",
                                      down="w2", act="nonlin"))
        assert sum(a.family == "mystery" for a in PROFILES) == 1
        # a profile whose names do not fit is reported by find_ffns
        with pytest.raises(ValueError, match="does not fit"):
            find_ffns(model, FamilyProfile("x", ("x",), layers="body.stack", ffn="ffn", gate="nope", up="w3",
                                           down="w2", act="nonlin"))
    finally:
        PROFILES[:] = saved
    with pytest.raises(ValueError):
        detect_family(model)


# --------------------------------------------------------------------------------------------------------------
# Identity and effect of the rule, per family and site
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_p1_is_dense_and_p_half_is_not(family):
    model = shared_model(family)
    ids = ids_for()
    dense = logits(model, ids)
    for site in SITES:
        with sparsify(model, site, TopP(1.0)) as stats:
            out = logits(model, ids)
        assert torch.equal(out, dense), site
        assert stats.mean() < 0.05  # p = 1 keeps every non-zero entry
        with sparsify(model, site, TopP(0.5)) as stats:
            out = logits(model, ids)
        assert not torch.equal(out, dense), site
        assert torch.isfinite(out).all()
        assert 0.3 < stats.mean() < 0.99, (site, stats.mean())
        assert torch.equal(logits(model, ids), dense)  # nothing left behind
    assert hook_count(model) == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", SITES)
def test_site_sparsifies_what_the_spec_says(family, site):
    model = shared_model(family)
    ffns = find_ffns(model)
    p = 0.5
    dense_rec = Recorder().attach(ffns, "dense_")  # registered first: sees the values before the library's hooks
    try:
        with sparsify(model, site, TopP(p)) as stats:
            real = Recorder().attach(ffns, "")  # registered after: sees what the model computes with
            try:
                logits(model, ids_for(1))
            finally:
                real.remove()
    finally:
        dense_rec.remove()
    d, r = dense_rec.data, real.data
    for f in ffns:
        i = f.layer
        x = d[i, "dense_gate_in"]
        if site == "input":
            expected = torch.where(brute_top_p_mask(x, p), x, 0)
            assert torch.equal(r[i, "gate_in"], expected)
            assert torch.equal(r[i, "up_in"], expected)  # gate and up receive the same sparse x
            sparse = expected
        elif site == "gate":
            assert torch.equal(r[i, "gate_in"], x) and torch.equal(r[i, "up_in"], x)
            act_dense = f.act(r[i, "gate_out"])
            assert torch.equal(d[i, "dense_act_out"], act_dense)
            sparse = torch.where(brute_top_p_mask(act_dense, p), act_dense, 0)
            assert torch.equal(r[i, "act_out"], sparse)
            assert torch.equal(r[i, "down_in"], sparse * r[i, "up_out"])
        elif site == "up":
            assert torch.equal(r[i, "gate_in"], x) and torch.equal(r[i, "up_in"], x)
            up_dense = F.linear(x, f.up.weight, f.up.bias)
            assert torch.equal(d[i, "dense_up_out"], up_dense)
            sparse = torch.where(brute_top_p_mask(up_dense, p), up_dense, 0)
            assert torch.equal(r[i, "up_out"], sparse)
            assert torch.equal(r[i, "down_in"], r[i, "act_out"] * sparse)
        else:
            inter = f.act(F.linear(x, f.gate.weight, f.gate.bias)) * F.linear(x, f.up.weight, f.up.bias)
            assert torch.equal(d[i, "dense_down_in"], inter)  # the site is the input of the down projection
            sparse = torch.where(brute_top_p_mask(inter, p), inter, 0)
            assert torch.equal(r[i, "down_in"], sparse)
        if site == "input":  # the projections really ran on the sparse x
            assert torch.equal(r[i, "gate_out"], F.linear(sparse, f.gate.weight, f.gate.bias))
        # the statistics count exactly the zeros of the sparse vector
        expect = (sparse == 0).double().mean().item()
        assert abs(stats.per_layer(site)[i] - expect) < 1e-12
        assert 0.3 < expect < 0.99


@pytest.mark.parametrize("site", SITES)
def test_other_rules_and_sequence_scope(site):
    model = shared_model("llama")
    ffns = find_ffns(model)
    key = {"input": "gate_in", "gate": "act_out", "up": "up_out", "intermediate": "down_in"}[site]
    for rule in (TopK(0.75), TopP(0.6, scope="sequence")):
        with sparsify(model, site, rule):
            rec = Recorder().attach(ffns, "")
            try:
                logits(model, ids_for(2))
            finally:
                rec.remove()
        for f in ffns:
            v = rec.data[f.layer, key]
            if isinstance(rule, TopK):
                assert ((v != 0).sum(-1) == v.shape[-1] // 4).all()
            else:  # one selection over all tokens x features of each sample
                assert 0 < (v == 0).double().mean() < 1
                per_token = (v != 0).sum(-1)
                assert per_token.max() > per_token.min()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("family", ["llama", "llada"])
def test_sequence_scope_selects_over_each_rows_real_tokens_only(family, site, side):
    """scope='sequence' on a padded batch: each row's selection is the brute-force top-p over its own real tokens
    x features (what the row selects alone), and padded positions keep nothing, whichever side the padding is on.
    Dense and sparse values come from the same forward pass (the test's hooks before / after sparsify's), so the
    check is exact and no float rounding between a batched and a single-row forward can enter it."""
    model = shared_model(family)
    ffns = find_ffns(model)
    key = {"input": "gate_in", "gate": "act_out", "up": "up_out", "intermediate": "down_in"}[site]
    ids = ids_for(4)
    lengths = (7, 3)
    am = torch.zeros(ids.shape, dtype=torch.long)
    for r, n in enumerate(lengths):
        am[r, :n] = 1 if side == "right" else 0
        if side == "left":
            am[r, ids.shape[1] - n:] = 1
    dense = Recorder().attach(ffns, "")
    try:
        with sparsify(model, site, TopP(0.6, scope="sequence")):
            sparse = Recorder().attach(ffns, "")
            try:
                logits(model, ids, attention_mask=am)
            finally:
                sparse.remove()
    finally:
        dense.remove()
    for f in ffns:
        x, y = dense.data[f.layer, key], sparse.data[f.layer, key]
        for r in range(len(lengths)):
            real = am[r].bool()
            want = brute_top_p_mask(x[r, real].reshape(-1), 0.6).reshape(x[r, real].shape)
            assert torch.equal(y[r, real] != 0, want), (f.layer, r)
            assert torch.equal(y[r, real][want], x[r, real][want])  # kept entries unchanged
            assert not bool(y[r, ~real].any())  # padding keeps nothing


# --------------------------------------------------------------------------------------------------------------
# Hook hygiene
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3", "llada"])
def test_hooks_are_removed_also_after_an_exception(family):
    model = shared_model(family)
    ids = ids_for()
    assert hook_count(model) == 0
    dense = logits(model, ids)
    for site in SITES:
        with sparsify(model, site, TopP(0.5)):
            assert hook_count(model) > 0
            logits(model, ids)
        assert hook_count(model) == 0
        with pytest.raises(RuntimeError, match="boom"):
            with sparsify(model, site, TopP(0.5)):
                logits(model, ids)
                raise RuntimeError("boom")
        assert hook_count(model) == 0
        # an exception inside the model's forward
        with pytest.raises(IndexError):
            with sparsify(model, site, TopP(0.5)):
                model(input_ids=torch.full((1, 3), 10_000))  # token id out of the vocabulary
        assert hook_count(model) == 0
        assert torch.equal(logits(model, ids), dense)


def test_attach_twice_and_bad_arguments():
    model = shared_model("llama")
    sp = Sparsifier(model, "input", TopP(0.9)).attach()
    try:
        with pytest.raises(RuntimeError, match="already attached"):
            sp.attach()
    finally:
        sp.detach()
    assert hook_count(model) == 0
    with pytest.raises(TypeError, match="SparsityRule"):
        Sparsifier(model, "input", 0.9)
    with pytest.raises(ValueError, match="unknown FFN site"):
        Sparsifier(model, "output", TopP(0.9))
    assert hook_count(model) == 0


def test_gate_site_refuses_a_shared_activation_module():
    model = build_tiny_model("llama")
    model.model.layers[1].mlp.act_fn = model.model.layers[0].mlp.act_fn
    with pytest.raises(ValueError, match="shares one activation module"):
        with sparsify(model, "gate", TopP(0.5)):
            pass
    assert hook_count(model) == 0
    with sparsify(model, "intermediate", TopP(0.5)):  # other sites do not care
        logits(model, ids_for())


# --------------------------------------------------------------------------------------------------------------
# Layer selection
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("site", SITES)
def test_only_selected_layers_change(site):
    model = build_tiny_model("qwen2", num_hidden_layers=3)
    ffns = find_ffns(model)
    ids = ids_for()
    dense = Recorder().attach(ffns, "")
    try:
        logits(model, ids)
    finally:
        dense.remove()
    for layers in ([1], [-2], (1, 1)):
        with sparsify(model, site, TopP(0.5), layers=layers) as stats:
            rec = Recorder().attach(ffns, "")
            try:
                logits(model, ids)
            finally:
                rec.remove()
        assert sorted(stats.per_layer()) == [1]
        assert torch.equal(rec.data[0, "down_in"], dense.data[0, "down_in"])  # before the chosen layer
        assert not torch.equal(rec.data[1, "down_in"], dense.data[1, "down_in"])
        # layer 2 changes only through its input (it is not sparsified itself): no exact zeros appear there
        assert (rec.data[2, "down_in"] == 0).sum() == 0
    # An empty selection is a mistake (a filter that matched nothing), not a silent dense run: layers=None is
    # "every layer", and the dense model needs no sparsify block.
    with pytest.raises(ValueError, match="layers is empty"):
        with sparsify(model, site, TopP(0.5), layers=[]):
            pass
    for bad in ([3], [-4], [0, 7]):
        with pytest.raises(ValueError, match="out of range.*3 FFN layers"):
            with sparsify(model, site, TopP(0.5), layers=bad):
                pass
    assert hook_count(model) == 0


# --------------------------------------------------------------------------------------------------------------
# Measured sparsity: padding, tags, groups, masks, observers
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,padding_side", [("llama", "left"), ("llada", "right")])
def test_measured_sparsity_excludes_padding(family, padding_side):
    # float64 so that the batched and the solo forward agree to ~1e-16 and no mask decision can flip
    model = build_tiny_model(family).double()
    full, short = ids_for(3, (1, 7)), ids_for(4, (1, 4))
    pad = torch.full((1, 3), 0)
    if padding_side == "left":
        batch = torch.cat([full, torch.cat([pad, short], 1)])
        mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    else:
        batch = torch.cat([full, torch.cat([short, pad], 1)])
        mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    kw = {}
    if family == "llama":  # real tokens keep their positions 0.. in the padded row
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    for site in SITES:
        with sparsify(model, site, TopP(0.7)) as batched:
            logits(model, batch, attention_mask=mask, **kw)
        solo = SparsityStats()
        with sparsify(model, site, TopP(0.7), stats=solo):
            logits(model, full)
            logits(model, short)
        b, s = batched.per_layer(), solo.per_layer()
        assert b.keys() == s.keys() == {0, 1}
        for layer in b:
            assert abs(b[layer] - s[layer]) < 1e-12, (site, layer, b[layer], s[layer])
        assert {r["tokens"] for r in batched.records()} == {11}
        # without the attention mask the padding would be counted
        with sparsify(model, site, TopP(0.7)) as unmasked:
            logits(model, batch, **kw)
        assert {r["tokens"] for r in unmasked.records()} == {14}


@pytest.mark.parametrize("family", ["llama", "llada"])
def test_positional_attention_mask_is_seen(family):
    model = shared_model(family)
    ids = ids_for(11)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    events = []
    with sparsify(model, "input", TopP(0.5), mask_observers=[events.append]) as by_keyword:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    with sparsify(model, "input", TopP(0.5), mask_observers=[events.append]) as positional:
        with torch.no_grad():
            model(ids, mask)
    assert all(e.valid is mask for e in events)
    assert positional.records() == by_keyword.records()
    assert {r["tokens"] for r in positional.records()} == {11}


def test_tags_and_groups_keep_calls_apart():
    model = shared_model("llada")
    ffns = find_ffns(model)
    ids_a, ids_b = ids_for(5), ids_for(6)
    masked = torch.zeros(2, 7, dtype=torch.bool)
    masked[:, 4:] = True
    stats = SparsityStats()
    with sparsify(model, "intermediate", TopP(0.8), stats=stats) as same:
        assert same is stats
        with stats.tagged(0, groups={"masked": masked}):
            rec = Recorder().attach(ffns, "")
            try:
                logits(model, ids_a)
            finally:
                rec.remove()
        with stats.tagged(1):
            logits(model, ids_b)
    assert stats.tags == [0, 1]
    for tag, ids in ((0, ids_a), (1, ids_b)):
        with sparsify(model, "intermediate", TopP(0.8)) as alone:
            logits(model, ids)
        assert stats.per_layer(tag=tag) == alone.per_layer()
    # the group counts the masked positions only, from the activations the model really used
    for f in ffns:
        v = rec.data[f.layer, "down_in"]
        expect = (v[masked] == 0).double().mean().item()
        assert abs(stats.per_layer(tag=0, group="masked")[f.layer] - expect) < 1e-12
    rows = [r for r in stats.records() if r["group"] == "masked"]
    assert len(rows) == 2 and all(r["tokens"] == 2 * 3 and r["tag"] == 0 for r in rows)
    # a second sparsify block adds to the same statistics
    with sparsify(model, "intermediate", TopP(0.8), stats=stats):
        with stats.tagged(1):
            logits(model, ids_b)
    assert all(r["tokens"] == 28 for r in stats.records() if r["tag"] == 1)


@pytest.mark.parametrize("site", SITES)
def test_record_masks_equal_the_rule_masks(site):
    model = shared_model("mistral")
    ffns = find_ffns(model)
    key = {"input": "dense_gate_in", "gate": "dense_act_out", "up": "dense_up_out",
           "intermediate": "dense_down_in"}[site]
    rule = TopP(0.7)
    dense = Recorder().attach(ffns, "dense_")
    seen = []
    try:
        with sparsify(model, site, rule, record_masks=True) as stats:
            for step, seed in enumerate((7, 8)):
                with stats.tagged(step):
                    logits(model, ids_for(seed))
                seen.append({layer: dense.data[layer, key].clone() for layer in (0, 1)})
    finally:
        dense.remove()
    assert [(m["tag"], m["layer"], m["site"]) for m in stats.masks] == [(0, 0, site), (0, 1, site), (1, 0, site),
                                                                          (1, 1, site)]
    for m in stats.masks:
        v = seen[m["tag"]][m["layer"]]
        assert torch.equal(m["keep"], rule.mask(v))  # masks computed afresh at every call
        assert torch.equal(m["keep"], brute_top_p_mask(v, 0.7))
    assert not torch.equal(stats.masks[0]["keep"], stats.masks[2]["keep"])


@pytest.mark.parametrize("family", ["llama", "gemma3", "dream", "llada"])
@pytest.mark.parametrize("site", SITES)
def test_one_mask_event_per_ffn_call(family, site):
    model = shared_model(family)
    events: list[MaskEvent] = []
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 0] = 0
    with sparsify(model, site, TopP(0.6), mask_observers=[events.append]) as stats:
        with stats.tagged("first"):
            logits(model, ids_for(), attention_mask=mask)
        n = len(events)
        logits(model, ids_for(9))
    assert n == 2 and len(events) == 4  # exactly one selection per layer and forward call (input: not two)
    assert [e.layer for e in events] == [0, 1, 0, 1]
    assert all(e.site is FFNSite(site) for e in events)
    assert [e.tag for e in events] == ["first", "first", "default", "default"]
    assert all(e.valid is mask for e in events[:2]) and all(e.valid is None for e in events[2:])
    width = 32 if site == "input" else 64
    assert all(e.keep.shape == (2, 7, width) and e.keep.dtype == torch.bool for e in events)


def test_select_mask_replaces_the_rule():
    model = shared_model("qwen2")
    ids = ids_for()
    dense = logits(model, ids)
    calls = []

    def keep_all(layer, site, x, rule):
        calls.append((layer, site, tuple(x.shape), rule))
        return torch.ones_like(x, dtype=torch.bool)

    with sparsify(model, "intermediate", TopP(0.1), select_mask=keep_all):
        assert torch.equal(logits(model, ids), dense)
    assert calls == [(0, FFNSite.INTERMEDIATE, (2, 7, 64), TopP(0.1)), (1, FFNSite.INTERMEDIATE, (2, 7, 64),
                                                                         TopP(0.1))]


def test_all_sites_on_native_llada_with_padding_and_generation_like_loop():
    # a few "denoising steps": masks are fresh at every step, sparsity is reported per step
    model = shared_model("llada")
    mask_id = model.config.mask_token_id
    x = ids_for(10)
    x[:, 3:] = mask_id
    for site in SITES:
        stats = SparsityStats()
        with sparsify(model, site, TopP(0.9), stats=stats):
            for step in range(3):
                with stats.tagged(step, groups={"masked": x == mask_id}):
                    out = logits(model, x)
                x = x.clone()
                x[:, 3 + step] = out[:, 3 + step].argmax(-1)
        assert stats.tags == [0, 1, 2]
        for step in range(3):
            assert 0.05 < stats.mean(tag=step) < 0.95
            recs = [r for r in stats.records() if r["tag"] == step and r["group"] == "masked"]
            assert all(r["tokens"] == 2 * (4 - step) for r in recs)
        x[:, 3:] = mask_id
