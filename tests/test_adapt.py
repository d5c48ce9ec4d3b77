"""AR -> masked-diffusion adaptation (dllm_sparse.models.adapt, dllm_sparse.models.twin) on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from dllm_sparse.models.adapt import (
    MaskRowDelta,
    adapter_bytes,
    add_lora,
    add_mask_token,
    collate_sft,
    convert_causal_lm,
    forward_mask,
    llada_config_from_causal,
    load_adapter_state,
    lora_param_count,
    lora_state_from_peft,
    masked_diffusion_loss,
    mdm_loss,
    merge_adapter,
    save_adapter,
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


def test_masked_diffusion_loss_matches_full_logits():
    """The head-on-masked-positions shortcut gives the same loss as the plain forward."""
    model = convert_causal_lm(build_tiny_model("llama", tie_word_embeddings=True))
    mask_id = add_mask_token(model)
    delta = MaskRowDelta(model.config.d_model, mask_id)
    with torch.no_grad():
        delta.delta.normal_()
    batch = collate_sft([([5, 6, 7], [8, 9, 10, 2], True), ([5, 6], [11, 12, 13, 14, 15], False)], eos_id=2)
    loss, info = masked_diffusion_loss(model, batch, mask_id, generator=torch.Generator().manual_seed(3),
                                       mask_delta=delta)
    noisy, masked, t = forward_mask(batch, mask_id, generator=torch.Generator().manual_seed(3))
    with delta.attach(model):
        logits = model(noisy, attention_mask=batch.attention_mask).logits
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.input_ids, reduction="none")
    torch.testing.assert_close(loss, mdm_loss(ce, masked, t, batch.answer_length))
    assert info["masked_tokens"] == int(masked.sum())
    # merging the delta gives the model the hooks emulated
    delta.merge_into(model)
    torch.testing.assert_close(model(noisy, attention_mask=batch.attention_mask).logits, logits)


# ---- LoRA adapter -----------------------------------------------------------------------------------------------


def test_lora_save_load_merge_roundtrip(tmp_path):
    pytest.importorskip("peft")
    hf = build_tiny_model("llama", tie_word_embeddings=True)
    model = convert_causal_lm(hf)
    mask_id = add_mask_token(model)
    peft_model = add_lora(model, r=4, alpha=8)
    n_lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert n_lora == lora_param_count(model.config, 4)
    assert not any("transformer.ff_out.lora" in n for n, _ in peft_model.named_parameters()), "head must be frozen"
    with torch.no_grad():  # LoRA B starts at zero; make the adapter do something
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    row = torch.randn(model.config.d_model) * 0.1
    ids = torch.tensor([[5, 6, mask_id, mask_id, 9]])
    delta = MaskRowDelta(model.config.d_model, mask_id)
    with torch.no_grad():
        delta.delta.copy_(row)
        with delta.attach(model):
            unmerged = peft_model(input_ids=ids).logits

    save_adapter(tmp_path, lora_state_from_peft(peft_model), row, {"scale": 2.0, "mask_token_id": mask_id})
    lora, mask_row, meta = load_adapter_state(tmp_path)
    assert meta["files"]["adapter_lora_A.safetensors"]["bytes"] > 0
    fresh = convert_causal_lm(hf)
    add_mask_token(fresh)
    assert merge_adapter(fresh, lora, meta["scale"], mask_row) == 7 * hf.config.num_hidden_layers
    assert all(type(m) is torch.nn.Linear for n, m in fresh.named_modules() if n.endswith("q_proj"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, unmerged, atol=1e-5, rtol=1e-4)


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

    if not (SMOLLM2_MDM_ADAPTER / "adapter.json").is_file():
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
