"""transformers' conventions: load_model's from_pretrained passthrough, LLaDA's Auto classes and saved code."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build_tiny_model

from dllm_sparse.eval.identity import run_identity
from dllm_sparse.models import loading
from dllm_sparse.models.llada import LLaDAModelLM, tiny_llada_config
from dllm_sparse.models.loading import LoadedModel, load_model, load_options


def _word_tokenizer(vocab_size: int):
    """A real (fast) Hugging Face tokenizer over words w0..w{n-1}, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0", eos_token="w2")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama", seed=3).save_pretrained(d)
    _word_tokenizer(128).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llada")
    torch.manual_seed(0)
    LLaDAModelLM(tiny_llada_config()).eval().save_pretrained(d)
    _word_tokenizer(100).save_pretrained(d)
    return d


IDS = torch.tensor([[5, 17, 3, 42, 8, 11], [1, 9, 27, 4, 60, 2]])


def _spy(monkeypatch, cls, seen: list):
    """Record the keywords of cls.from_pretrained calls (and call the real one)."""
    real = cls.from_pretrained

    def spy(path, *args, **kwargs):
        seen.append(dict(kwargs))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", spy)


# ---- load_model passthrough ----------------------------------------------------------------------------------


def test_device_map_and_attn_implementation_reach_from_pretrained(llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen: list = []
    _spy(monkeypatch, AutoModelForCausalLM, seen)
    plain = load_model(llama_dir)
    lm = load_model(llama_dir, device_map="cpu", attn_implementation="eager")
    assert seen[-1]["device_map"] == "cpu" and seen[-1]["attn_implementation"] == "eager"
    assert plain.model.config._attn_implementation == "sdpa"
    assert lm.model.config._attn_implementation == "eager"
    assert all(p.device.type == "cpu" for p in lm.model.parameters())
    with torch.no_grad():  # same weights, another attention kernel: the same numbers up to rounding
        torch.testing.assert_close(lm.model(IDS).logits, plain.model(IDS).logits, atol=1e-5, rtol=1e-5)
    # The attention implementation reaches the run identity; a plain load's identity keeps its fields.
    assert "load_options" not in run_identity(plain)
    ident = run_identity(lm)
    assert ident["load_options"] == {"attn_implementation": "eager"}
    assert ident["device_type"] == "cpu" and ident["dtype"] == "float32"
    assert ident["weights"] == run_identity(plain)["weights"]


def test_config_field_override_changes_the_model(llama_dir):
    base = load_model(llama_dir)
    lm = load_model(llama_dir, rms_norm_eps=0.5)
    assert lm.model.config.rms_norm_eps == 0.5 and base.model.config.rms_norm_eps != 0.5
    with torch.no_grad():
        assert not torch.allclose(lm.model(IDS).logits, base.model(IDS).logits, atol=1e-3)
    assert lm.load_options == {"config.rms_norm_eps": 0.5}
    assert run_identity(lm)["load_options"] == {"config.rms_norm_eps": 0.5}


def test_torch_dtype_is_dtype(llama_dir):
    lm = load_model(llama_dir, torch_dtype=torch.bfloat16)
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert run_identity(lm)["dtype"] == "bfloat16"
    assert next(load_model(llama_dir, dtype="bf16", torch_dtype="bfloat16").model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="same setting"):
        load_model(llama_dir, dtype="fp32", torch_dtype="bf16")


def test_typos_and_refused_keywords_are_named(llama_dir):
    with pytest.raises(TypeError, match=r"attn_implmentation=.*did you mean attn_implementation="):
        load_model(llama_dir, attn_implmentation="eager")
    with pytest.raises(TypeError, match=r"rms_norm_epz=.*did you mean rms_norm_eps="):
        load_model(llama_dir, rms_norm_epz=1e-3)
    with pytest.raises(TypeError, match="gguf_file=.*path of the .gguf file"):
        load_model(llama_dir, gguf_file="x.gguf")
    with pytest.raises(TypeError, match="output_loading_info="):
        load_model(llama_dir, output_loading_info=True)
    # A local directory has no revisions: transformers would ignore it, so it is refused.
    with pytest.raises(TypeError, match="revision= applies to hub ids only"):
        load_model(llama_dir, revision="v1")
    with pytest.raises(ValueError, match="both place the model"):
        load_model(llama_dir, device="cpu", device_map="auto")


def test_revision_reaches_config_model_and_tokenizer_of_a_hub_id(llama_dir, monkeypatch):
    """A hub id (here served from the local directory: no network) gets revision= at all three loads."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(loading, "_check_hub", lambda name: True)  # "cached, hub unreachable"
    seen: dict = {}
    for cls in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained

        def spy(path, *args, _real=real, _name=cls.__name__, **kwargs):
            if path != "some-org/tiny-llama":  # transformers' own inner call (the model reads its config)
                return _real(path, *args, **kwargs)
            seen[_name] = dict(kwargs)
            kwargs.pop("revision")
            return _real(llama_dir, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    lm = load_model("some-org/tiny-llama", revision="abc123", attn_implementation="eager")
    assert {k: v["revision"] for k, v in seen.items()} == {
        "AutoConfig": "abc123", "AutoModelForCausalLM": "abc123", "AutoTokenizer": "abc123"}
    assert seen["AutoModelForCausalLM"]["local_files_only"] is True
    assert "attn_implementation" not in seen["AutoTokenizer"]
    assert lm.load_options == {"attn_implementation": "eager", "revision": "abc123"}


def test_embedded_names_take_the_model_options_only(llama_dir, monkeypatch):
    monkeypatch.setitem(loading.EMBEDDED_MODELS, "tiny-embedded", lambda **_: llama_dir)
    lm = load_model("tiny-embedded", attn_implementation="eager")
    assert lm.model.config._attn_implementation == "eager"
    with pytest.raises(TypeError, match="revision= applies to hub ids only; the embedded model 'tiny-embedded'"):
        load_model("tiny-embedded", revision="v1")
    built = LoadedModel(build_tiny_model("llama"), None, "ar", "built")
    monkeypatch.setitem(loading.EMBEDDED_MODELS, "tiny-built", lambda **_: built)
    assert load_model("tiny-built") is built
    with pytest.raises(TypeError, match="built by its resolver.*device_map="):
        load_model("tiny-built", device_map="cpu")


def test_load_options_of_a_model_not_loaded_by_load_model_is_empty():
    assert load_options(build_tiny_model("llama")) == {}


# ---- LLaDA: Auto classes, eager attention, saved code --------------------------------------------------------


def test_llada_registers_auto_model_for_causal_lm(llada_dir):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM):
        assert type(auto.from_pretrained(llada_dir)) is LLaDAModelLM  # the package's class, no remote code
    lm = load_model(llada_dir)
    assert type(lm.model) is LLaDAModelLM and lm.kind == "diffusion" and lm.mask_id == 99


def test_llada_eager_attention_equals_sdpa(llada_dir):
    sdpa = load_model(llada_dir).model
    eager = load_model(llada_dir, attn_implementation="eager").model
    assert eager.config._attn_implementation == "eager"
    mask = torch.ones_like(IDS)
    mask[0, :2] = 0  # left padding: the masked path too
    with torch.no_grad():
        a, b = eager(IDS, attention_mask=mask).logits, sdpa(IDS, attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # set_attn_implementation after loading takes effect too (the blocks read the config at call time)
    sdpa.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(sdpa(IDS, attention_mask=mask).logits, a, atol=0, rtol=0)


def test_saved_llada_carries_its_code_and_auto_map(llada_dir):
    config = json.loads((llada_dir / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "llada.LLaDAConfig", "AutoModel": "llada.LLaDAModelLM",
                                  "AutoModelForCausalLM": "llada.LLaDAModelLM",
                                  "AutoModelForMaskedLM": "llada.LLaDAModelLM"}
    from dllm_sparse.models import llada, llada_config

    assert (llada_dir / "llada.py").read_text() == open(llada.__file__).read()
    assert (llada_dir / "llada_config.py").read_text() == open(llada_config.__file__).read()  # what llada.py imports


def _logits_without_dllm_sparse(model_dir, ids: torch.Tensor, tmp_path) -> torch.Tensor:
    """Logits of ``AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)`` in a fresh Python
    in which importing dllm_sparse fails."""
    torch.save(ids, tmp_path / "ids.pt")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["dllm_sparse"] = None  # any import of the package now raises ImportError
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert type(model).dllm_sparse_native_llada  # what dllm_sparse's diffusion sampler reads
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def test_saved_llada_loads_in_plain_transformers(llada_dir, tmp_path):
    with torch.no_grad():
        ref = load_model(llada_dir).model(IDS).logits
    torch.testing.assert_close(_logits_without_dllm_sparse(llada_dir, IDS, tmp_path), ref, atol=0, rtol=0)


def test_with_remote_code_completes_an_old_cache_entry(llada_dir, tmp_path):
    """A cached LLaDA built before save_pretrained wrote the code (no llada.py, no auto_map) gets it added."""
    import shutil

    old = tmp_path / "mdm-old"
    shutil.copytree(llada_dir, old)
    (old / "llada.py").unlink()
    config = json.loads((old / "config.json").read_text())
    del config["auto_map"]
    (old / "config.json").write_text(json.dumps(config))
    assert loading.with_remote_code(old) == old
    assert (old / "llada.py").is_file() and "AutoModelForCausalLM" in json.loads((old / "config.json").read_text())[
        "auto_map"]
    with torch.no_grad():
        ref = load_model(llada_dir).model(IDS).logits
    torch.testing.assert_close(_logits_without_dllm_sparse(old, IDS, tmp_path), ref, atol=0, rtol=0)


@pytest.mark.slow
def test_embedded_twin_cache_loads_in_plain_transformers(tmp_path):
    lm = load_model("smollm2-135m-mdm")
    model_dir = loading._smollm2_mdm_dir()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        ref = lm.model(ids).logits
    torch.testing.assert_close(_logits_without_dllm_sparse(model_dir, ids, tmp_path), ref, atol=0, rtol=0)


# ---- GenerationConfig: transformers' spellings ----------------------------------------------------------------


def test_generation_config_accepts_transformers_spellings():
    from dllm_sparse.samplers import GenerationConfig

    assert GenerationConfig(eos_token_id=7).stop_token_ids == (7,)
    assert GenerationConfig(eos_token_id=[7, 8]).stop_token_ids == (7, 8)
    assert GenerationConfig(stop_token_ids=[7, 8], eos_token_id=(7, 8)).eos_token_id == (7, 8)
    assert GenerationConfig(pad_token_id=3).pad_id == 3 and GenerationConfig(pad_id=3).pad_token_id == 3
    assert GenerationConfig(do_sample=False).temperature == 0.0
    assert GenerationConfig(do_sample=True).temperature == 1.0  # transformers' default temperature
    assert GenerationConfig(do_sample=True, temperature=0.7).temperature == 0.7
    assert GenerationConfig(temperature=0.7).do_sample and not GenerationConfig().do_sample
    assert GenerationConfig(max_new_tokens=12, gen_length=12).gen_length == 12
    cfg = GenerationConfig(temperature=0.5)
    assert cfg.replace(do_sample=False).temperature == 0.0 and cfg.replace(do_sample=True).temperature == 0.5
    assert GenerationConfig().replace(do_sample=True).temperature == 1.0
    assert cfg.replace(eos_token_id=4, pad_token_id=1).stop_token_ids == (4,)
    with pytest.raises(AttributeError):
        cfg.eos_token_id = 5  # read-only alias: set stop_token_ids


@pytest.mark.parametrize("kwargs, names", [
    (dict(eos_token_id=7, stop_token_ids=[8]), "eos_token_id=7 and stop_token_ids"),
    (dict(pad_token_id=1, pad_id=2), "pad_token_id=1 and pad_id=2"),
    (dict(gen_length=8, max_new_tokens=16), "gen_length=8 and max_new_tokens=16"),
    (dict(do_sample=False, temperature=0.7), "do_sample=False and temperature=0.7 disagree"),
    (dict(do_sample=True, temperature=0), "do_sample=True and temperature=0 disagree"),
])
def test_generation_config_alias_conflicts_are_errors(kwargs, names):
    from dllm_sparse.samplers import GenerationConfig

    with pytest.raises(ValueError, match=names):
        GenerationConfig(**kwargs)


def test_generation_config_from_transformers():
    import transformers

    from dllm_sparse.samplers import GenerationConfig

    hf = transformers.GenerationConfig(max_new_tokens=24, do_sample=True, temperature=0.6, eos_token_id=[2, 5],
                                       pad_token_id=0, bos_token_id=1)
    cfg = GenerationConfig.from_transformers(hf, steps=12, block_length=8)
    assert (cfg.max_new_tokens, cfg.temperature, cfg.stop_token_ids, cfg.pad_id) == (24, 0.6, (2, 5), 0)
    assert (cfg.steps, cfg.block_length) == (12, 8)
    greedy = transformers.GenerationConfig(max_new_tokens=4, do_sample=False, temperature=0.9)
    assert GenerationConfig.from_transformers(greedy).temperature == 0.0  # transformers ignores it there too
    with pytest.raises(ValueError, match=r"\['num_beams', 'top_k'\]"):
        GenerationConfig.from_transformers(transformers.GenerationConfig(top_k=5, num_beams=2))


def test_a_saved_copy_loaded_as_remote_code_counts_as_the_native_llada(llada_dir):
    """Without dllm_sparse, trust_remote_code=True builds the class of the saved llada.py (another class object,
    same code; the subprocess tests above check it carries the marker): the diffusion sampler must treat it as
    native (padding masked, logit shift applied by the model), and the released remote code as not native.
    (With dllm_sparse imported, transformers builds the package's own class: checked here.)"""
    from transformers import AutoModelForCausalLM

    from dllm_sparse.samplers.diffusion import _is_remote_llada, _shifts_itself

    assert type(AutoModelForCausalLM.from_pretrained(llada_dir, trust_remote_code=True)) is LLaDAModelLM
    copy_cls = type("LLaDAModelLM", (torch.nn.Module,), {"dllm_sparse_native_llada": True})
    copy = copy_cls()
    copy.config = tiny_llada_config()
    assert not _is_remote_llada(copy, "llada") and not _shifts_itself(copy)
    copy.config.logit_shift = True
    assert _shifts_itself(copy)

    class ReleasedLLaDA(torch.nn.Module):  # the released remote code has no such marker
        pass

    assert _is_remote_llada(ReleasedLLaDA(), "llada")


@pytest.fixture(scope="module")
def model_only_dir(tmp_path_factory):
    """A checkpoint saved with model.save_pretrained alone: no tokenizer files."""
    d = tmp_path_factory.mktemp("model-only")
    build_tiny_model("llama", seed=3).save_pretrained(d)
    return d


def test_checkpoint_without_tokenizer_is_refused_naming_the_options(model_only_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen: list = []
    _spy(monkeypatch, AutoModelForCausalLM, seen)
    with pytest.raises(ValueError, match=r"no tokenizer.*tokenizer=.*tokenizer=False") as err:
        load_model(model_only_dir)
    assert str(model_only_dir) in str(err.value)
    assert not seen  # refused before the weights were read


def test_checkpoint_without_tokenizer_loads_with_one_given_or_none(model_only_dir, llama_dir):
    from transformers import AutoTokenizer

    reference = load_model(llama_dir)  # the same weights (seed 3) with a tokenizer
    from_dir = load_model(model_only_dir, tokenizer=llama_dir)
    assert from_dir.tokenizer("w5 w17 w3")["input_ids"] == reference.tokenizer("w5 w17 w3")["input_ids"]
    given = AutoTokenizer.from_pretrained(llama_dir)
    assert load_model(model_only_dir, tokenizer=given).tokenizer is given
    bare = load_model(model_only_dir, tokenizer=False)
    assert bare.tokenizer is None
    with torch.no_grad():
        torch.testing.assert_close(bare.model(IDS).logits, reference.model(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("first", ["dllm_sparse", "transformers"])
def test_import_dllm_sparse_makes_the_auto_classes_build_the_native_llada(llada_dir, tmp_path, first):
    """In a fresh Python: ``import dllm_sparse`` (before or after transformers' Auto classes) imports no torch, and
    then AutoModel / AutoModelForCausalLM / AutoModelForMaskedLM build the native class from a saved directory
    without trust_remote_code (stdin closed: transformers' trust prompt would fail)."""
    code = textwrap.dedent(f"""
        import sys
        if {first!r} == "transformers":
            from transformers import AutoModel
        import dllm_sparse
        if {first!r} == "dllm_sparse":
            assert "torch" not in sys.modules and "transformers" not in sys.modules, "import dllm_sparse is heavy"
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
        for auto in (AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM):
            model = auto.from_pretrained({str(llada_dir)!r})
            assert type(model).__module__ == "dllm_sparse.models.llada", (auto, type(model).__module__)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          stdin=subprocess.DEVNULL,
                          env={**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules")})
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---- checkpoints whose weights do not fit their config ---------------------------------------------------------


def _edited_copy(src, dst, edit_weights=None, edit_config=None):
    """A copy of a checkpoint directory with its tensors and/or config.json edited."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if edit_weights is not None:
        tensors = load_file(dst / "model.safetensors")
        edit_weights(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_a_missing_ffn_tensor_is_refused_unless_allowed(llama_dir, tmp_path):
    gone = "model.layers.0.mlp.up_proj.weight"
    d = _edited_copy(llama_dir, tmp_path / "ckpt", edit_weights=lambda t: t.pop(gone))
    with pytest.raises(ValueError, match=rf"missing from the checkpoint.*{gone} \(1\).*allow_missing=True"):
        load_model(d)
    lm = load_model(d, allow_missing=True)  # asked for: loads, the tensor freshly initialised
    reference = load_model(llama_dir).model
    assert not torch.equal(lm.model.model.layers[0].mlp.up_proj.weight, reference.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(lm.model.model.layers[0].mlp.down_proj.weight,
                               reference.model.layers[0].mlp.down_proj.weight, rtol=0, atol=0)


def test_an_unexpected_tensor_is_refused(llama_dir, tmp_path):
    def add(t):
        t["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(3, 3)

    d = _edited_copy(llama_dir, tmp_path / "ckpt", edit_weights=add)
    with pytest.raises(ValueError, match=r"not in the model.*extra_proj"):
        load_model(d)


def test_one_layer_more_in_the_config_than_in_the_weights_is_refused(llada_dir, tmp_path):
    def grow(config):
        config["n_layers"] += 1

    d = _edited_copy(llada_dir, tmp_path / "ckpt", edit_config=grow)
    with pytest.raises(ValueError, match=r"missing from the checkpoint.*blocks\.2\..*in all\)") as err:
        load_model(d)
    assert "blocks.0." not in str(err.value) and "blocks.1." not in str(err.value)


def test_a_config_that_falls_back_to_a_default_size_is_refused_before_allocating(llada_dir, tmp_path, monkeypatch):
    """A LLaDA config relabelled ``model_type: llama`` has none of LlamaConfig's size fields: transformers would
    build a default-size Llama (6.5B parameters, 26 GB in fp32). Refused before from_pretrained runs."""
    from transformers import AutoModelForCausalLM

    def relabel(config):
        config["model_type"] = "llama"
        config.pop("auto_map", None)

    d = _edited_copy(llada_dir, tmp_path / "ckpt", edit_config=relabel)

    def must_not_build(*args, **kwargs):
        raise AssertionError("from_pretrained was called: the default-size model would be allocated")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", must_not_build)
    with pytest.raises(ValueError, match=r"model_type 'llama'; hidden_size=4096, num_hidden_layers=32.*"
                                         r"LlamaForCausalLM of \d+\.\dM parameters.*allow_missing=True"):
        load_model(d)
