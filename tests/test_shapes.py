"""8B shapes with random weights (dllm_sparse/models/shapes.py), the official checkpoint layout, and what loading
refuses: missing shards, an auto_map naming a missing file, config fields the native LLaDA would ignore.

The full 8B shapes are checked on the meta device (no memory); checkpoints and forwards use the -mini shapes,
which take the same code path."""

from __future__ import annotations

import json

import pytest
import torch
from test_llada_model import LLADA_8B_CONFIG as RELEASED_LLADA_CONFIG

from dllm_sparse import load_model
from dllm_sparse.models.llada import LLaDAConfig, LLaDAModelLM, tiny_llada_config, unread_fields
from dllm_sparse.models.shapes import (
    LLADA_8B_CONFIG,
    build_random,
    save_checkpoint,
    shape_config,
    standin_tokenizer,
    weight_bytes,
)


def test_llada_config_is_the_released_one():
    assert LLADA_8B_CONFIG == RELEASED_LLADA_CONFIG


@pytest.mark.parametrize("name, params", [
    # meta-llama/Llama-3.1-8B: 8,030,261,248 parameters (its model card / safetensors index total_size / 2).
    ("llama-3.1-8b", 8_030_261_248),
    # LLaDA-8B: the Llama-3 body with 32 kv heads, FFN 12288 and 126464 rows in wte and ff_out, counted by hand:
    # 32 x (4 x 4096^2 + 3 x 4096 x 12288 + 2 x 4096) + 2 x 126464 x 4096 + 4096.
    ("llada-8b", 32 * (4 * 4096**2 + 3 * 4096 * 12288 + 2 * 4096) + 2 * 126464 * 4096 + 4096),
])
def test_published_shapes_on_meta(name, params):
    config = shape_config(name)
    cls = LLaDAModelLM if name.startswith("llada") else None
    if cls is None:
        from transformers import LlamaForCausalLM as cls
    with torch.device("meta"):
        model = cls._from_config(config)
    assert sum(p.numel() for p in model.parameters()) == params
    wb = weight_bytes(name, 32, torch.bfloat16)
    assert wb["total"] == 2 * params and wb["fixed"] + 32 * wb["per_layer"] == wb["total"]
    if name == "llada-8b":
        assert (config.d_model, config.mlp_hidden_size, config.n_heads, config.n_kv_heads, config.vocab_size,
                config.rope_theta, config.mask_token_id) == (4096, 12288, 32, 32, 126464, 500000.0, 126336)
    else:
        assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
                config.vocab_size, config.rope_parameters["rope_theta"]) == (4096, 14336, 32, 8, 128256, 500000.0)
        assert config.rope_parameters["rope_type"] == "llama3"


def test_standin_tokenizer_of_the_full_vocabulary():
    tok = standin_tokenizer("llada-8b")
    assert len(tok) == 126464
    assert tok.convert_tokens_to_ids("<|mdm_mask|>") == 126336 and tok.eos_token_id == 126081
    text = "Grüße, 世界!"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8"))  # one token per byte, id = byte value
    assert tok.decode(ids) == text


@pytest.mark.parametrize("name", ["llada-8b-mini", "llama-3.1-8b-mini"])
def test_official_layout_roundtrip(tmp_path, name):
    model, kind = build_random(name, layers=2)
    save_checkpoint(model, tmp_path, name, max_shard_size=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(model.state_dict())
    config = json.loads((tmp_path / "config.json").read_text())
    published = RELEASED_LLADA_CONFIG if kind == "diffusion" else None
    if published is not None:  # every released field name, the released auto_map, no remote code written
        assert set(config) == set(published) and config["auto_map"] == published["auto_map"]
        assert config["n_layers"] == 2 and not list(tmp_path.glob("*.py"))
    lm = load_model(tmp_path)
    assert lm.kind == kind and type(lm.model) is type(model)
    ids = torch.tensor([[5, 17, 3, 9, 200]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert lm.tokenizer.encode("abc", add_special_tokens=False) == [97, 98, 99]
    if kind == "diffusion":
        assert lm.mask_id == 511


def test_missing_shard_is_refused(tmp_path):
    model, _ = build_random("llada-8b-mini", layers=1)
    save_checkpoint(model, tmp_path, "llada-8b-mini", max_shard_size=60_000)
    gone = sorted(tmp_path.glob("model-*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(ValueError, match=f"incomplete.*|{gone.name}") as e:
        load_model(tmp_path)
    assert gone.name in str(e.value) and "fetch the missing shards" in str(e.value)


def test_auto_map_pointing_at_a_missing_file_is_refused_under_trust_remote_code(tmp_path):
    model, _ = build_random("llada-8b-mini", layers=1)
    save_checkpoint(model, tmp_path, "llada-8b-mini")
    with pytest.raises(ValueError, match="configuration_llada.py is not in") as e:
        load_model(tmp_path, trust_remote_code=True)
    assert "without trust_remote_code" in str(e.value)
    # With the modelling file at hand (this package's own copy, as save_pretrained writes it) it loads.
    other = tmp_path / "own"
    model.save_pretrained(other)
    standin_tokenizer("llada-8b-mini").save_pretrained(other)
    assert (other / "llada.py").is_file()
    lm = load_model(other, trust_remote_code=True)
    ids = torch.tensor([[5, 17, 3, 9]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("field, value", [("rope_scaling", {"type": "linear", "factor": 2.0}), ("clip_qkv", 8.0),
                                          ("multi_query_attention", True)])
def test_config_field_the_native_model_ignores_is_refused(tmp_path, field, value):
    model, _ = build_random("llada-8b-mini", layers=1)
    save_checkpoint(model, tmp_path, "llada-8b-mini")
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    # transformers renames rope_scaling to rope_parameters while reading the config: either name is the field
    with pytest.raises(ValueError, match=f"does not read the config field.*({field}|rope_parameters)"):
        load_model(tmp_path)


def test_known_harmless_fields_pass():
    # Every released key is read or known to be harmless; multi_query_attention=True is consistent with 1 kv head.
    assert unread_fields(LLaDAConfig(**{k: v for k, v in RELEASED_LLADA_CONFIG.items() if k != "model_type"})) == {}
    assert unread_fields(tiny_llada_config(multi_query_attention=True, n_kv_heads=1)) == {}
    assert unread_fields(tiny_llada_config(multi_query_attention=True)) == {"multi_query_attention": True}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_layers(bad):
    with pytest.raises(ValueError, match="layers must be a whole number"):
        shape_config("llada-8b", bad)


def test_unknown_shape():
    with pytest.raises(ValueError, match="unknown shape 'llada-7b'"):
        build_random("llada-7b")
