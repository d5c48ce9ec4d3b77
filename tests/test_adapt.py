"""AR -> masked-diffusion adaptation (dllm_sparse.models.adapt, dllm_sparse.models.twin) on tiny random models."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import build_tiny_model

from dllm_sparse.models.adapt import (
    ADAPTER_META,
    ADAPTER_META_SHA256,
    adapter_bytes,
    add_lora,
    add_mask_token,
    collate_sft,
    convert_causal_lm,
    forward_mask,
    llada_config_from_causal,
    load_adapted_model,
    lora_param_count,
    mask_row_parameter,
    masked_diffusion_loss,
    mdm_loss,
    read_adapter_meta,
    save_adapter,
    write_adapter_meta,
)
from dllm_sparse.models.llada import LLaDAModelLM, tiny_llada_config


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _ids(seed=0, shape=(2, 9)):
    return torch.randint(3, 120, shape, generator=torch.Generator().manual_seed(seed))


# ---- conversion -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_causal_conversion_equals_hf(family, tied):
    hf = build_tiny_model(family, tie_word_embeddings=tied)
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        out = convert_causal_lm(hf, logit_shift=False, causal=True)(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_causal_conversion_with_padding_matches_hf():
    hf = build_tiny_model("llama")
    ids = _ids()
    am = torch.ones_like(ids)
    am[0, :3] = 0  # left padding
    with torch.no_grad():
        ref = hf(ids, attention_mask=am).logits
        out = convert_causal_lm(hf, logit_shift=False, causal=True)(ids, attention_mask=am).logits
    torch.testing.assert_close(out[am.bool()], ref[am.bool()], atol=1e-5, rtol=0)


def test_converted_model_is_bidirectional():
    model = convert_causal_lm(build_tiny_model("llama"), logit_shift=False)
    ids = _ids()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 120 + 3
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert not torch.allclose(a[:, 0], b[:, 0]), "a later token must change the first position's logits"
    causal = convert_causal_lm(build_tiny_model("llama"), logit_shift=False, causal=True)
    with torch.no_grad():
        torch.testing.assert_close(causal(ids).logits[:, :-1], causal(changed).logits[:, :-1])


def test_logit_shift_semantics():
    hf = build_tiny_model("llama")
    ids = _ids()
    plain = convert_causal_lm(hf, logit_shift=False)
    shifted = convert_causal_lm(hf, logit_shift=True)
    with torch.no_grad():
        a, b = plain(ids).logits, shifted(ids).logits
    torch.testing.assert_close(b[:, 1:], a[:, :-1])  # position i comes from the hidden state at i - 1
    torch.testing.assert_close(b[:, 0], a[:, 0])  # position 0 keeps its own
    # With causal attention too, the shifted model scores token i exactly as the AR model predicts it.
    ar = convert_causal_lm(hf, logit_shift=True, causal=True)
    with torch.no_grad():
        torch.testing.assert_close(ar(ids).logits[:, 1:], hf(ids).logits[:, :-1], atol=1e-5, rtol=0)


def test_unsupported_config_is_refused():
    hf = build_tiny_model("gemma3")
    with pytest.raises(ValueError, match="model_type"):
        llada_config_from_causal(hf.config)


def test_add_mask_token_mean_row_and_tying():
    for tied in (False, True):
        model = convert_causal_lm(build_tiny_model("llama", tie_word_embeddings=tied))
        old = model.model.transformer.wte.weight.detach().clone()
        mask_id = add_mask_token(model)
        wte = model.model.transformer.wte.weight
        assert mask_id == old.shape[0] == model.config.mask_token_id
        assert wte.shape[0] == model.config.embedding_size == old.shape[0] + 1
        torch.testing.assert_close(wte[mask_id], old.mean(0))
        assert (model.model.transformer.ff_out.weight is wte) == tied
        assert model(torch.tensor([[5, mask_id]])).logits.shape[-1] == old.shape[0] + 1


# ---- objective --------------------------------------------------------------------------------------------------


def test_collate_and_prompt_never_masked():
    rows = [([10, 11, 12], [20, 21], True), ([13], [22, 23, 24, 25], False)]
    batch = collate_sft(rows, eos_id=2, pad_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21], [13, 22, 23, 24, 25]]
    assert batch.answer_length.tolist() == [2, 4]
    rows = [([10, 11, 12], [20, 21, 2], True), ([13], [22], False)]
    batch = collate_sft(rows, eos_id=2, pad_id=0)
    # finished: eos padding is answer (scored, attended); unfinished: padding is neither
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 2], [13, 22, 0, 0, 0, 0]]
    assert batch.answer.tolist() == [[False, False, False, True, True, True], [False, True] + [False] * 4]
    assert batch.attention_mask.tolist() == [[1] * 6, [1, 1, 0, 0, 0, 0]]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        noisy, masked, t = forward_mask(batch, mask_id=99, generator=g)
        assert not masked[~batch.answer].any()
        assert (noisy[masked] == 99).all() and (noisy[~masked] == batch.input_ids[~masked]).all()
        assert ((t >= 1e-3) & (t <= 1)).all()


def test_mdm_loss_weighting():
    ce = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    masked = torch.tensor([[False, True, True, False], [True, False, False, False]])
    t = torch.tensor([0.5, 0.25])
    length = torch.tensor([3.0, 4.0])
    expected = ((2 / 0.5 + 3 / 0.5) / 3 + (5 / 0.25) / 4) / 2
    assert mdm_loss(ce, masked, t, length).item() == pytest.approx(expected)


def _trained_looking_lora(hf, r=4, seed=0):
    """A converted tiny model with mask token and a LoRA + mask row that do something (B and the row random)."""
    pytest.importorskip("peft")
    model = convert_causal_lm(hf)
    mask_id = add_mask_token(model)
    peft_model = add_lora(model, r=r, alpha=2 * r)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA B starts at zero and the row at its initial value
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        row = mask_row_parameter(peft_model)
        row.add_(torch.randn(row.shape, generator=g))
    return peft_model, mask_id


def test_masked_diffusion_loss_matches_full_logits():
    """The head-on-masked-positions shortcut gives the same loss as the plain forward (trained mask row too)."""
    hf = build_tiny_model("llama", tie_word_embeddings=True)
    peft_model, mask_id = _trained_looking_lora(hf)
    batch = collate_sft([([5, 6, 7], [8, 9, 10, 2], True), ([5, 6], [11, 12, 13, 14, 15], False)], eos_id=2)
    loss, info = masked_diffusion_loss(peft_model, batch, mask_id, generator=torch.Generator().manual_seed(3))
    noisy, masked, t = forward_mask(batch, mask_id, generator=torch.Generator().manual_seed(3))
    logits = peft_model(input_ids=noisy, attention_mask=batch.attention_mask).logits
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.input_ids, reduction="none")
    torch.testing.assert_close(loss, mdm_loss(ce, masked, t, batch.answer_length))
    assert info["masked_tokens"] == int(masked.sum())
    # the head is back in place after the loss
    assert peft_model(input_ids=noisy).logits.shape[-1] == mask_id + 1


def test_mask_row_trains_input_and_tied_output():
    """peft's trainable token row is the only embedding parameter, and it reaches both ends of a tied model."""
    hf = build_tiny_model("llama", tie_word_embeddings=True)
    peft_model, mask_id = _trained_looking_lora(hf)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert len(trainable) == 1 and "trainable_tokens_delta" in trainable[0]
    row = mask_row_parameter(peft_model).detach()[0]
    ids = torch.tensor([[5, mask_id, 7]])
    base = peft_model.get_base_model()
    with torch.no_grad():
        emb = base.get_input_embeddings()(ids)
        hidden = torch.randn(2, row.numel())
        out = base.get_output_embeddings()(hidden)
    torch.testing.assert_close(emb[0, 1], row)
    torch.testing.assert_close(out[:, mask_id], hidden @ row)


def test_lora_save_load_merge_roundtrip(tmp_path):
    """save_adapter writes a peft adapter; peft's merge gives the trained model, equal to W + s B A by hand."""
    peft = pytest.importorskip("peft")
    hf = build_tiny_model("llama", tie_word_embeddings=True)
    peft_model, mask_id = _trained_looking_lora(hf)
    model = peft_model.get_base_model()
    n_lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert n_lora == lora_param_count(model.config, 4)
    assert not any("transformer.ff_out.lora" in n for n, _ in peft_model.named_parameters()), "head must be frozen"
    ids = torch.tensor([[5, 6, mask_id, mask_id, 9]])
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
    (tmp_path / "README.md").write_text("model card")
    meta = save_adapter(tmp_path, peft_model, {"base": "tiny", "logit_shift": True, "mask_token_id": mask_id})
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "README.md").read_text() == "model card"  # peft's template does not replace the card
    assert {p.name for p in tmp_path.iterdir()} == {"README.md", ADAPTER_META, ADAPTER_META_SHA256,
                                                     "adapter_config.json", "adapter_model.safetensors"}
    assert read_adapter_meta(tmp_path)["files"] == meta["files"]

    plain_q = convert_causal_lm(hf).model.transformer.blocks[0].q_proj.weight.detach().clone()
    fresh = load_adapted_model(build_tiny_model("llama", tie_word_embeddings=True), tmp_path)  # same seed: same hf
    assert all(type(m) is torch.nn.Linear for n, m in fresh.named_modules() if n.endswith("q_proj"))
    assert type(fresh.get_input_embeddings()) is torch.nn.Embedding
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, unmerged, atol=1e-5, rtol=1e-4)

    # independent reference: one merged matrix by hand from the stored factors
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(k for k in state if k.endswith("blocks.0.q_proj.lora_A.weight"))
    a, b = state[key], state[key.replace("lora_A", "lora_B")]
    expected = plain_q + 2.0 * b @ a
    torch.testing.assert_close(fresh.model.transformer.blocks[0].q_proj.weight, expected)

    # and the stock peft path a user would take gives the same model
    stock = convert_causal_lm(build_tiny_model("llama", tie_word_embeddings=True))
    add_mask_token(stock)
    stock = peft.PeftModel.from_pretrained(stock, str(tmp_path)).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, fresh(ids).logits)


def test_corrupt_adapter_is_refused(tmp_path):
    hf = build_tiny_model("llama", tie_word_embeddings=True)
    peft_model, mask_id = _trained_looking_lora(hf)
    save_adapter(tmp_path, peft_model, {"base": "tiny", "logit_shift": True, "mask_token_id": mask_id})
    with (tmp_path / "adapter_model.safetensors").open("ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="sha256"):
        read_adapter_meta(tmp_path)
    with pytest.raises(FileNotFoundError, match=ADAPTER_META):
        read_adapter_meta(tmp_path / "nowhere")


@pytest.fixture
def saved_adapter(tmp_path):
    """A saved tiny adapter: (directory, mask id)."""
    hf = build_tiny_model("llama", tie_word_embeddings=True)
    peft_model, mask_id = _trained_looking_lora(hf)
    out = tmp_path / "adapter"
    save_adapter(out, peft_model, {"base": "tiny", "logit_shift": True, "mask_token_id": mask_id})
    return out, mask_id


def test_loading_an_adapter_warns_nothing(saved_adapter):
    """peft reads is_gradient_checkpointing from the model it wraps; transformers 5.24 made that a deprecated alias
    that warns. The native LLaDA answers it itself: loading the twin's adapter raises no warning, and the answer
    follows the flag that (gradient|activation)_checkpointing_enable sets on the transformer."""
    adapter_dir, _ = saved_adapter
    base = build_tiny_model("llama", tie_word_embeddings=True)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_adapted_model(base, adapter_dir)
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
    assert model.is_gradient_checkpointing is False
    model.model.gradient_checkpointing = True
    assert model.is_gradient_checkpointing is True
    model.model.gradient_checkpointing = False
    assert model.is_gradient_checkpointing is False


def _edit_meta(adapter_dir, edit):
    meta = json.loads((adapter_dir / ADAPTER_META).read_text())
    edit(meta)
    (adapter_dir / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")


def test_edited_rebuild_metadata_is_refused(saved_adapter):
    """Flipping logit_shift would rebuild another model from the same factors: the metadata is hashed too."""
    adapter_dir, _ = saved_adapter
    read_adapter_meta(adapter_dir)  # intact: accepted
    _edit_meta(adapter_dir, lambda m: m.update(logit_shift=False))
    with pytest.raises(ValueError, match=rf"{ADAPTER_META} does not match the sha256 in {ADAPTER_META_SHA256}"):
        load_adapted_model(build_tiny_model("llama", tie_word_embeddings=True), adapter_dir)


def test_metadata_without_its_hash_is_refused(saved_adapter):
    adapter_dir, _ = saved_adapter
    (adapter_dir / ADAPTER_META_SHA256).unlink()
    with pytest.raises(ValueError, match=rf"no {ADAPTER_META_SHA256}.*seal_adapter_meta"):
        read_adapter_meta(adapter_dir)


def test_a_file_dropped_from_the_list_is_still_checked(saved_adapter):
    """Removing a file from ``files`` (and re-sealing, as a careless edit would) cannot skip its hash check."""
    adapter_dir, _ = saved_adapter
    meta = json.loads((adapter_dir / ADAPTER_META).read_text())
    del meta["files"]["adapter_model.safetensors"]
    weights = adapter_dir / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped byte in the tensor data
    weights.write_bytes(bytes(data))
    (adapter_dir / ADAPTER_META).write_text(json.dumps(meta))
    from dllm_sparse.models.adapt import seal_adapter_meta

    seal_adapter_meta(adapter_dir)
    with pytest.raises(ValueError, match=r"lists the files \['adapter_config.json'\].*exactly"):
        read_adapter_meta(adapter_dir)


def test_a_path_outside_the_adapter_is_never_followed(saved_adapter, tmp_path):
    """A ``files`` entry with ``../`` names a file outside the directory: refused, and never read."""
    adapter_dir, _ = saved_adapter
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"outside")

    def point_outside(meta):
        meta["files"]["../secret.bin"] = {"bytes": 7, "sha256": hashlib.sha256(b"outside").hexdigest()}

    meta = json.loads((adapter_dir / ADAPTER_META).read_text())
    point_outside(meta)
    write_adapter_meta(adapter_dir, meta)  # write_adapter_meta lists exactly peft's files again
    assert set(read_adapter_meta(adapter_dir)["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    _edit_meta(adapter_dir, point_outside)
    from dllm_sparse.models.adapt import seal_adapter_meta

    seal_adapter_meta(adapter_dir)
    with pytest.raises(ValueError, match=r"\.\./secret\.bin.*exactly"):
        read_adapter_meta(adapter_dir)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("mask_token_id"), r"has no 'mask_token_id', the id of the mask token the adapter was trained"),
    (lambda m: m.update(mask_token_id="260"), r"has '260' as 'mask_token_id'"),
    (lambda m: m.update(mask_token_id=-1), r"has -1 as 'mask_token_id'"),
    (lambda m: m.pop("logit_shift"), r"has no 'logit_shift', whether the converted base shifts its logits"),
    (lambda m: m.update(logit_shift="yes"), r"has 'yes' as 'logit_shift'"),
    (lambda m: m.update(mask_token=7), r"has 7 as 'mask_token', the mask token's text"),
])
def test_resealed_metadata_without_a_field_the_rebuild_needs_is_refused(saved_adapter, edit, message):
    """A hand edit that is re-sealed passes the hash check; a missing or mistyped rebuild field is then named,
    with its file and the fix, instead of a KeyError deep in the rebuild."""
    from dllm_sparse.models.adapt import seal_adapter_meta

    adapter_dir, _ = saved_adapter
    _edit_meta(adapter_dir, edit)
    seal_adapter_meta(adapter_dir)
    with pytest.raises(ValueError, match=rf"{ADAPTER_META} {message}.*re-export.*seal_adapter_meta"):
        load_adapted_model(build_tiny_model("llama", tie_word_embeddings=True), adapter_dir)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_metadata_that_is_not_a_json_object_is_refused_clearly(saved_adapter, text):
    adapter_dir, _ = saved_adapter
    (adapter_dir / ADAPTER_META).write_bytes(text.encode("latin-1"))
    from dllm_sparse.models.adapt import seal_adapter_meta

    seal_adapter_meta(adapter_dir)
    with pytest.raises(ValueError, match=rf"{ADAPTER_META} (is not valid JSON|holds a list).*re-export"):
        read_adapter_meta(adapter_dir)


def test_the_shipped_adapter_passes_its_checks():
    from dllm_sparse.models.twin import SMOLLM2_MDM_ADAPTER

    if not (SMOLLM2_MDM_ADAPTER / ADAPTER_META).is_file():
        pytest.skip("the smollm2-135m-mdm adapter is not in this checkout")
    meta = read_adapter_meta(SMOLLM2_MDM_ADAPTER)
    assert (meta["logit_shift"], meta["mask_token_id"]) == (True, 49152)


def test_adapter_size_estimate_for_smollm2():
    cfg = tiny_llada_config(d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, mlp_hidden_size=1536,
                            vocab_size=49153, embedding_size=49153)
    assert lora_param_count(cfg, 16) == 30 * 16 * (2 * 1152 + 2 * 768 + 3 * 2112)
    assert adapter_bytes(cfg, 16) <= 25 * 2**20  # the shipping budget (fp32)


def test_converted_model_saves_and_loads_as_diffusion(tmp_path):
    from transformers import AutoModel

    model = convert_causal_lm(build_tiny_model("llama", tie_word_embeddings=True))
    mask_id = add_mask_token(model)
    model.save_pretrained(tmp_path)
    back = AutoModel.from_pretrained(tmp_path)
    assert isinstance(back, LLaDAModelLM) and back.config.logit_shift and back.config.mask_token_id == mask_id
    ids = torch.tensor([[5, 6, mask_id, 9]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits)


# ---- the shipped model ------------------------------------------------------------------------------------------


def test_load_smollm2_mdm_and_generate():
    from dllm_sparse import load_model
    from dllm_sparse.models.loading import cache_dir
    from dllm_sparse.models.twin import SMOLLM2_MDM_ADAPTER

    if not (SMOLLM2_MDM_ADAPTER / ADAPTER_META).is_file():
        pytest.skip("the smollm2-135m-mdm adapter is not in this checkout")
    if not (cache_dir() / "smollm2" / "hf" / "config.json").is_file():
        try:
            from dllm_sparse.models.loading import smollm2_gguf_path

            smollm2_gguf_path()
        except Exception as e:  # noqa: BLE001 - any fetch failure means: cannot run here
            pytest.skip(f"SmolLM2 is not cached and could not be fetched: {e}")
    lm = load_model("smollm2-135m-mdm")
    assert (lm.kind, lm.family, lm.mask_id) == ("diffusion", "llada", 49152)
    assert lm.tokenizer.mask_token_id == 49152 and lm.model.config.logit_shift
    from dllm_sparse.samplers import GenerationConfig, generate

    out = generate(lm, prompts=["What is the capital of France?"], apply_chat_template=True,
                   config=GenerationConfig(gen_length=16, steps=16, block_length=16))
    assert out.nfe == 16 and isinstance(out.texts[0], str)
    assert "Paris" in out.texts[0], out.texts[0]  # the shipped adapter answers this probe question
