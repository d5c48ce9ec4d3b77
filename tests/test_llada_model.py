"""Tests for the native LLaDA (dllm_sparse/models/llada.py, llada_config.py). Tiny models, CPU, float32."""

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from dllm_sparse.models import llada
from dllm_sparse.models.llada import LLaDABlock, LLaDAConfig, LLaDAModelLM, tiny_llada_config

# The config.json of GSAI-ML/LLaDA-8B-Base as released (field set and values), used to check that a real
# checkpoint's config loads. `auto_map` points at the checkpoint's own remote code.
LLADA_8B_CONFIG = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 126464,
    "eos_token_id": 126081,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": False,
    "vocab_size": 126464,
    "weight_tying": False,
}


def _tiny_model(seed: int = 0, **overrides) -> LLaDAModelLM:
    torch.manual_seed(seed)
    return LLaDAModelLM(tiny_llada_config(**overrides)).eval()


def _ids(B: int, T: int, seed: int = 1, vocab: int = 98) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------


def test_config_defaults_are_llada_8b_and_aliases_work():
    cfg = LLaDAConfig()
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (4096, 32, 32, 32)
    assert (cfg.mlp_hidden_size, cfg.vocab_size, cfg.embedding_size) == (12288, 126464, 126464)
    assert cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-5 and cfg.mask_token_id == 126336
    assert cfg.weight_tying is False

    cfg = tiny_llada_config()
    assert cfg.hidden_size == cfg.d_model == 64
    assert cfg.num_hidden_layers == 2 and cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2
    assert cfg.intermediate_size == 128 and cfg.max_position_embeddings == 128
    assert cfg.tie_word_embeddings is False

    # Aliases also work as constructor arguments and for assignment.
    cfg = tiny_llada_config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads) == (32, 2, 1)
    cfg.intermediate_size = 96
    assert cfg.mlp_hidden_size == 96


def test_config_derived_defaults():
    cfg = LLaDAConfig(
        d_model=64,
        n_heads=4,
        n_kv_heads=None,
        mlp_hidden_size=None,
        mlp_ratio=3,
        vocab_size=50,
        embedding_size=None,
    )
    assert cfg.n_kv_heads == 4
    assert cfg.mlp_hidden_size == 192
    assert cfg.embedding_size == 50


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"d_model": 60, "n_heads": 8}, "divisible by n_heads"),
        ({"n_heads": 4, "n_kv_heads": 3}, "divisible by n_kv_heads"),
        ({"vocab_size": 100, "embedding_size": 90}, "embedding_size"),
    ],
)
def test_config_validation_errors(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        tiny_llada_config(**overrides)


def test_real_llada_8b_config_loads_with_extra_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLADA_8B_CONFIG))
    cfg = AutoConfig.from_pretrained(tmp_path)  # no trust_remote_code
    assert type(cfg) is LLaDAConfig
    assert cfg.hidden_size == 4096 and cfg.num_hidden_layers == 32 and cfg.intermediate_size == 12288
    assert cfg.rope_theta == 500000.0 and cfg.eos_token_id == 126081 and cfg.pad_token_id == 126081
    # Unknown keys survive as attributes.
    assert cfg.init_fn == "mitchell" and cfg.precision == "amp_bf16" and cfg.init_device == "meta"
    assert cfg.auto_map["AutoModel"] == "modeling_llada.LLaDAModelLM"
    assert cfg.dtype == torch.bfloat16


# Every field of the official configuration class's ``ModelConfig`` (configuration_llada.py of the released
# checkpoints), which its ``LLaDAConfig.__init__`` writes into every config it saves; the official defaults.
OFFICIAL_MODEL_CONFIG_DEFAULTS = {
    "d_model": 768, "n_heads": 12, "n_kv_heads": None, "n_layers": 12, "mlp_ratio": 4, "mlp_hidden_size": None,
    "activation_type": "swiglu", "block_type": "sequential", "block_group_size": 1, "alibi": False,
    "alibi_bias_max": 8.0, "rope": False, "rope_full_precision": True, "flash_attention": True,
    "attention_dropout": 0.1, "multi_query_attention": None, "attention_layer_norm": False, "residual_dropout": 0.1,
    "embedding_dropout": 0.1, "input_emb_norm": False, "layer_norm_type": "default", "layer_norm_with_affine": True,
    "rms_norm_eps": 1e-05, "attention_layer_norm_with_affine": True, "max_sequence_length": 1024,
    "train_max_sequence_length": 1024, "rope_theta": 10000.0, "include_qkv_bias": False, "include_bias": False,
    "bias_for_layer_norm": None, "scale_logits": False, "vocab_size": 50257, "embedding_size": 50304,
    "weight_tying": True, "eos_token_id": 50256, "pad_token_id": 50256, "mask_token_id": 50256, "init_device": None,
    "init_fn": "normal", "init_std": 0.02, "init_cutoff_factor": None, "precision": None,
}


def test_every_official_config_field_is_read_or_known_to_be_ignored():
    read = set(LLaDAConfig.__dataclass_fields__)
    unclassified = set(OFFICIAL_MODEL_CONFIG_DEFAULTS) - read - set(llada.IGNORED_FIELDS)
    assert not unclassified, f"official fields neither read nor listed as ignored: {unclassified}"


@pytest.mark.parametrize("train_max_sequence_length", [1024, 4096])
def test_config_saved_by_the_official_class_loads_natively(tmp_path, train_max_sequence_length):
    """A checkpoint re-saved with the official code carries every ModelConfig field (train_max_sequence_length
    included, which LLaDA-1.5 omits): it loads without remote code and computes what the same weights compute without
    the extra fields."""
    model = _tiny_model()
    model.save_pretrained(tmp_path)
    official = dict(OFFICIAL_MODEL_CONFIG_DEFAULTS)
    official.update({k: v for k, v in LLADA_8B_CONFIG.items() if k in OFFICIAL_MODEL_CONFIG_DEFAULTS})
    official.update(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=128, vocab_size=100,
                    embedding_size=100, max_sequence_length=128, rope_theta=10000.0, mask_token_id=99,
                    eos_token_id=98, pad_token_id=98, train_max_sequence_length=train_max_sequence_length,
                    use_cache=False, architectures=["LLaDAModelLM"], model_type="llada", torch_dtype="float32")
    assert set(OFFICIAL_MODEL_CONFIG_DEFAULTS) <= set(official)
    (tmp_path / "config.json").write_text(json.dumps(official))
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is LLaDAModelLM and loaded.config.train_max_sequence_length == train_max_sequence_length
    ids = _ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_fields_the_official_code_does_not_have_are_still_refused():
    with pytest.raises(ValueError, match="does not read the config field"):
        LLaDAModelLM(tiny_llada_config(rope_scaling={"type": "linear", "factor": 2.0}))


def test_unsupported_variant_loads_config_but_refuses_model():
    cfg = tiny_llada_config(block_type="sequential")
    assert cfg.block_type == "sequential"
    with pytest.raises(ValueError, match="block_type"):
        LLaDAModelLM(cfg)


# --------------------------------------------------------------------------------------------------------------
# Module layout
# --------------------------------------------------------------------------------------------------------------


def test_module_names_and_state_dict_keys():
    model = _tiny_model()
    names = dict(model.named_modules())
    assert isinstance(names["model.transformer.wte"], torch.nn.Embedding)
    assert names["model.transformer.wte"].num_embeddings == 100
    for i in range(2):
        p = f"model.transformer.blocks.{i}"
        assert isinstance(names[p], LLaDABlock)
        for sub in (
            "attn_norm",
            "q_proj",
            "k_proj",
            "v_proj",
            "attn_out",
            "ff_norm",
            "ff_proj",
            "up_proj",
            "ff_out",
        ):
            assert f"{p}.{sub}" in names, sub
        assert isinstance(names[f"{p}.act"], torch.nn.SiLU)
        assert names[f"{p}.ff_proj"].weight.shape == (128, 64)  # gate: d_model -> mlp_hidden_size
        assert names[f"{p}.up_proj"].weight.shape == (128, 64)
        assert names[f"{p}.ff_out"].weight.shape == (64, 128)  # down
        assert names[f"{p}.k_proj"].weight.shape == (2 * 16, 64)  # n_kv_heads * head_dim
    assert "model.transformer.ln_f" in names
    assert names["model.transformer.ff_out"].weight.shape == (100, 64)
    assert model.get_input_embeddings() is names["model.transformer.wte"]
    assert model.get_output_embeddings() is names["model.transformer.ff_out"]

    keys = set(model.state_dict())
    assert "model.transformer.blocks.0.ff_proj.weight" in keys
    assert "model.transformer.blocks.1.attn_norm.weight" in keys
    assert {
        "model.transformer.wte.weight",
        "model.transformer.ln_f.weight",
        "model.transformer.ff_out.weight",
    } <= keys
    assert all(k.startswith("model.transformer.") for k in keys)
    assert not any(k.endswith(".bias") for k in keys)  # include_bias=False, like LLaDA-8B


def test_ffn_module_call_structure_is_hookable():
    """Hooks on ff_proj / up_proj / act / ff_out see exactly ff_out(act(ff_proj(x)) * up_proj(x))."""
    model = _tiny_model()
    blk = model.model.transformer.blocks[0]
    seen = {}
    hooks = [
        blk.ff_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("ff_proj_in", a[0])),
        blk.up_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("up_in", a[0])),
        blk.act.register_forward_hook(lambda m, a, o: seen.__setitem__("act_out", o)),
        blk.up_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("up_out", o)),
        blk.ff_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("down_in", a[0])),
    ]
    try:
        with torch.no_grad():
            model(_ids(1, 6))
    finally:
        for h in hooks:
            h.remove()
    assert seen["ff_proj_in"] is seen["up_in"]  # both read ff_norm(h)
    torch.testing.assert_close(seen["act_out"], F.silu(blk.ff_proj(seen["ff_proj_in"])))
    torch.testing.assert_close(seen["down_in"], seen["act_out"] * seen["up_out"])


# --------------------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------------------


def _ref_rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _ref_rope(x, theta):
    """Rotate pairs (i, i + hd/2) by angle pos * theta**(-2i/hd): LLaMA's rotate-half convention, written out."""
    T, hd = x.shape[-2], x.shape[-1]
    half = hd // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _ref_block(blk, x, cfg, key_mask=None):
    """One LLaDA block by hand: RMSNorm, RoPE, bidirectional softmax attention with GQA, SwiGLU."""
    B, T, C = x.shape
    H, KV = cfg.n_heads, cfg.n_kv_heads
    hd = C // H
    h = _ref_rms(x, blk.attn_norm.weight, cfg.rms_norm_eps)
    q = (h @ blk.q_proj.weight.T).view(B, T, H, hd).transpose(1, 2)
    k = (h @ blk.k_proj.weight.T).view(B, T, KV, hd).transpose(1, 2)
    v = (h @ blk.v_proj.weight.T).view(B, T, KV, hd).transpose(1, 2)
    q, k = _ref_rope(q, cfg.rope_theta), _ref_rope(k, cfg.rope_theta)
    kv_of_head = torch.arange(H) // (H // KV)  # query head h reads kv head h // group
    k, v = k[:, kv_of_head], v[:, kv_of_head]
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
    att = scores.softmax(-1) @ v
    x = x + att.transpose(1, 2).reshape(B, T, C) @ blk.attn_out.weight.T
    h = _ref_rms(x, blk.ff_norm.weight, cfg.rms_norm_eps)
    ffn = (F.silu(h @ blk.ff_proj.weight.T) * (h @ blk.up_proj.weight.T)) @ blk.ff_out.weight.T
    return x + ffn


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_block_matches_hand_written_reference(n_kv_heads):
    model = _tiny_model(n_kv_heads=n_kv_heads)
    cfg = model.config
    blk = model.model.transformer.blocks[0]
    with torch.no_grad():
        # Non-trivial norm weights so the RMSNorm weight multiply is exercised.
        blk.attn_norm.weight.uniform_(0.5, 1.5)
        blk.ff_norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(2, 7, cfg.d_model)
        rope = llada.rotary_cos_sin(7, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        torch.testing.assert_close(blk(x, rope), _ref_block(blk, x, cfg), atol=1e-5, rtol=1e-5)


def test_full_model_matches_reference():
    model = _tiny_model()
    cfg = model.config
    tr = model.model.transformer
    ids = _ids(2, 9)
    with torch.no_grad():
        x = tr.wte(ids)
        for blk in tr.blocks:
            x = _ref_block(blk, x, cfg)
        ref = _ref_rms(x, tr.ln_f.weight, cfg.rms_norm_eps) @ tr.ff_out.weight.T
        out = model(ids)
    assert out.logits.shape == (2, 9, 100) and out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)


def test_rope_tables_use_rotate_half_layout_and_theta():
    cos, sin = llada.rotary_cos_sin(5, 8, 500000.0)
    assert cos.shape == (5, 8) and cos.dtype == torch.float32
    inv = 500000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    torch.testing.assert_close(sin[3, :4], torch.sin(3 * inv))
    torch.testing.assert_close(sin[:, :4], sin[:, 4:])  # halves repeated: rotate-half, not interleaved pairs


def test_attention_is_bidirectional_not_causal(monkeypatch):
    model = _tiny_model()
    ids = _ids(1, 8)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 98
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    # The last token's change reaches the first position: information flows right-to-left.
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4
    assert (a[0, :-1] - b[0, :-1]).abs().amax(-1).min() > 1e-4

    # Counterpart: the same comparison on a causal version of the model leaves earlier positions untouched,
    # so the check above does discriminate bidirectional from causal attention.
    sdpa = F.scaled_dot_product_attention

    def causal_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        return sdpa(q, k, v, dropout_p=dropout_p, is_causal=True, **kw)

    monkeypatch.setattr(llada.F, "scaled_dot_product_attention", causal_sdpa)
    with torch.no_grad():
        ca, cb = model(ids).logits, model(changed).logits
    torch.testing.assert_close(ca[0, :-1], cb[0, :-1])
    assert (ca[0, -1] - cb[0, -1]).abs().max() > 1e-4


def test_padding_mask_matches_unpadded_rows():
    model = _tiny_model()
    pad = model.config.pad_token_id
    T, n = 10, 7
    real = _ids(1, n, seed=3)
    other = _ids(1, T, seed=4)
    left = torch.cat([torch.full((1, T - n), pad), real], dim=1)
    right = torch.cat([real, torch.full((1, T - n), pad)], dim=1)
    batch = torch.cat([left, right, other])
    mask = torch.ones(3, T, dtype=torch.long)
    mask[0, : T - n] = 0
    mask[1, n:] = 0
    with torch.no_grad():
        out = model(batch, attention_mask=mask).logits
        alone = model(real).logits
        other_alone = model(other).logits
    assert torch.isfinite(out).all()
    # RoPE is relative, so a left shift of the real tokens does not change their scores.
    torch.testing.assert_close(out[0, T - n :], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :n], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2], other_alone[0], atol=1e-5, rtol=1e-5)


def test_padding_matches_reference_and_all_padding_row_is_finite():
    model = _tiny_model()
    cfg = model.config
    tr = model.model.transformer
    ids = _ids(3, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        x = tr.wte(ids[:2])
        for blk in tr.blocks:
            x = _ref_block(blk, x, cfg, key_mask=mask[:2])
        ref = _ref_rms(x, tr.ln_f.weight, cfg.rms_norm_eps) @ tr.ff_out.weight.T
    assert torch.isfinite(out).all()  # including padded query positions and the all-padding row
    torch.testing.assert_close(out[:2], ref, atol=1e-5, rtol=1e-5)


def test_all_ones_mask_equals_no_mask_and_bool_mask_works():
    model = _tiny_model()
    ids = _ids(2, 5)
    with torch.no_grad():
        a = model(ids).logits
        b = model(ids, attention_mask=torch.ones_like(ids)).logits
        m = torch.tensor([[True, True, True, False, False], [True] * 5])
        c = model(ids, attention_mask=m).logits
        d = model(ids, attention_mask=m.long()).logits
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(c, d)


def test_gqa_shapes_and_equivalence_to_repeated_heads():
    """A GQA model equals the MHA model whose k/v projections repeat each kv head n_heads/n_kv_heads times."""
    gqa = _tiny_model(n_kv_heads=2)
    mha = LLaDAModelLM(tiny_llada_config(n_kv_heads=4)).eval()
    sd = gqa.state_dict()
    hd = 16
    for i in range(2):
        for name in ("k_proj", "v_proj"):
            key = f"model.transformer.blocks.{i}.{name}.weight"
            w = sd[key].view(2, hd, 64)  # [kv_heads, hd, d]
            sd[key] = w.repeat_interleave(2, dim=0).reshape(4 * hd, 64)
    mha.load_state_dict(sd)
    ids = _ids(2, 6)
    with torch.no_grad():
        out = gqa(ids).logits
        torch.testing.assert_close(out, mha(ids).logits, atol=1e-5, rtol=1e-5)
    assert out.shape == (2, 6, 100)


def test_bfloat16_forward_returns_model_dtype():
    model = _tiny_model().to(torch.bfloat16)
    ids = _ids(1, 6)
    with torch.no_grad():
        logits = model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_labels_hidden_states_and_tuple_output():
    model = _tiny_model()
    ids = _ids(2, 5)
    labels = ids.clone()
    labels[:, :2] = -100
    with torch.no_grad():
        out = model(ids, labels=labels, output_hidden_states=True)
        tup = model(ids, return_dict=False)
    expected = F.cross_entropy(out.logits[:, 2:].reshape(-1, 100), ids[:, 2:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert len(out.hidden_states) == 2 + 1  # input of each block + final normed state
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.logits)


def test_inputs_embeds_equals_input_ids():
    model = _tiny_model()
    ids = _ids(1, 5)
    with torch.no_grad():
        a = model(ids).logits
        b = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------------------
# Save / load / Auto classes
# --------------------------------------------------------------------------------------------------------------


def test_save_pretrained_roundtrip_through_auto_model(tmp_path):
    model = _tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.transformer.blocks.0.q_proj.weight" in keys and "model.transformer.ff_out.weight" in keys

    ids = _ids(2, 6)
    with torch.no_grad():
        ref = model(ids).logits
        for auto in (AutoModel, AutoModelForMaskedLM):
            loaded = auto.from_pretrained(tmp_path)  # no trust_remote_code
            assert type(loaded) is LLaDAModelLM
            assert not loaded.training
            torch.testing.assert_close(loaded(ids).logits, ref, atol=0, rtol=0)


def test_checkpoint_with_real_config_json_and_auto_map_loads(tmp_path):
    """A directory laid out like the Hub checkpoint (config.json with auto_map and all the original keys,
    safetensors with model.transformer.* keys) loads into this class without trust_remote_code."""
    model = _tiny_model()
    model.save_pretrained(tmp_path)
    real = dict(LLADA_8B_CONFIG)
    real.update(
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        n_layers=2,
        mlp_hidden_size=128,
        vocab_size=100,
        embedding_size=100,
        max_sequence_length=128,
        rope_theta=10000.0,
        mask_token_id=99,
        eos_token_id=98,
        pad_token_id=98,
        torch_dtype="float32",
    )
    (tmp_path / "config.json").write_text(json.dumps(real))
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is LLaDAModelLM
    assert loaded.config.init_fn == "mitchell" and "AutoModel" in loaded.config.auto_map
    ids = _ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_weight_tying_roundtrip(tmp_path):
    model = _tiny_model(weight_tying=True)
    tr = model.model.transformer
    assert tr.ff_out.weight is tr.wte.weight
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    ltr = loaded.model.transformer
    assert ltr.ff_out.weight is ltr.wte.weight
    ids = _ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_resize_token_embeddings_updates_embedding_size(tied):
    model = _tiny_model(weight_tying=tied)
    model.resize_token_embeddings(112, mean_resizing=False)
    tr = model.model.transformer
    assert tr.wte.weight.shape == (112, 64) and tr.ff_out.weight.shape == (112, 64)
    assert model.config.vocab_size == 112 and model.config.embedding_size == 112
    assert (tr.ff_out.weight is tr.wte.weight) == tied
    with torch.no_grad():
        assert model(_ids(1, 4)).logits.shape == (1, 4, 112)


def test_registration_is_idempotent_on_reimport():
    """Executing the module a second time (a reload, a second copy on sys.path) must not raise."""
    # A second copy inside the package: llada.py imports its config module relatively (as the saved remote code
    # does), so the copy shares the config class and brings its own model class.
    spec = importlib.util.spec_from_file_location("dllm_sparse.models._llada_second_copy", llada.__file__)
    copy = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = copy  # dataclass processing looks the module up by name
    try:
        spec.loader.exec_module(copy)
        assert AutoConfig.for_model("llada").__class__ is copy.LLaDAConfig
        assert copy.LLaDAModelLM is not LLaDAModelLM
        assert type(AutoModel.from_config(tiny_llada_config())) is copy.LLaDAModelLM  # the copy's registration won
    finally:
        # Give "llada" back to the package's classes so other tests see a single, consistent mapping.
        AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
        AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
        AutoModelForMaskedLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
        del sys.modules[spec.name]
    assert type(AutoModel.from_config(tiny_llada_config())) is LLaDAModelLM


def test_gradient_checkpointing_backward():
    model = _tiny_model()
    model.train()
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    ids = _ids(2, 5)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.model.gradient_checkpointing
    assert model.model.transformer.blocks[0].ff_proj.weight.grad is not None
