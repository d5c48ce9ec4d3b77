"""The configuration of the native LLaDA (:mod:`dllm_sparse.models.llada`) and how it handles the official
checkpoints' fields: :class:`LLaDAConfig` (field-compatible with the released ``config.json``), the fields the
native model does not read but may ignore (:data:`IGNORED_FIELDS`), and the check that refuses a config it
would silently compute something else for (:func:`check_supported`).

Like ``llada.py``, this file imports only ``transformers``: it is saved next to ``llada.py`` as part of the
modelling code of a saved model (:func:`dllm_sparse.models.llada.add_remote_code`), which transformers loads with
``trust_remote_code=True`` without dllm_sparse installed. Keep it free of imports from the rest of the package.
"""

from typing import ClassVar

from transformers import PretrainedConfig

__all__ = [
    "LLADA_MASK_TOKEN_ID",
    "LLaDAConfig",
    "IGNORED_FIELDS",
    "check_supported",
    "tiny_llada_config",
    "unread_fields",
]

#: Id of ``<|mdm_mask|>`` in the LLaDA-8B tokenizer: the absorbing "masked" state of the diffusion process.
LLADA_MASK_TOKEN_ID = 126336


class LLaDAConfig(PretrainedConfig):
    """Configuration of a LLaDA model, field-compatible with the ``config.json`` of the released checkpoints.

    Defaults are the LLaDA-8B values. Field names are LLaDA's own (``d_model``, ``n_layers`` ...); the usual
    Hugging Face names (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads``, ``intermediate_size``, ``max_position_embeddings``, ``tie_word_embeddings``) are
    aliases for reading and writing through ``attribute_map``.

    Keys a real ``config.json`` carries that this implementation does not need (``init_fn``, ``precision``,
    ``auto_map``, ...) are kept as plain attributes, as ``PretrainedConfig`` does for any unknown key. Keys
    that select an architecture variant this file does not implement (``block_type`` other than ``"llama"``,
    ALiBi, QK-norm, ...) load fine but make :class:`LLaDAModel` refuse to build, rather than silently computing
    something else.
    """

    model_type = "llada"
    # `transformers` code (and other modules of this package) reads the standard names; map them onto LLaDA's.
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
        # PreTrainedModel ties `_tied_weights_keys` only when `config.tie_word_embeddings` is true.
        "tie_word_embeddings": "weight_tying",
    }

    # In transformers 5.x a config is a dataclass: annotated class attributes are its fields, everything else
    # passed in (or found in config.json) goes through `__post_init__(**kwargs)` and becomes a plain attribute.
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None -> n_heads (plain multi-head attention)
    mlp_hidden_size: int | None = 12288  # None -> mlp_ratio * d_model, as in the original code
    mlp_ratio: int = 4
    vocab_size: int = 126464
    embedding_size: int | None = 126464  # rows of wte / ff_out; None -> vocab_size
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rope_full_precision: bool = True
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    include_bias: bool = False
    include_qkv_bias: bool = False
    bias_for_layer_norm: bool | None = None  # None -> include_bias
    layer_norm_with_affine: bool = True
    scale_logits: bool = False
    input_emb_norm: bool = False
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0
    init_std: float = 0.02
    # Architecture selectors of the original (OLMo-derived) code; only the LLaDA-8B combination is implemented.
    block_type: str = "llama"
    activation_type: str = "silu"
    layer_norm_type: str = "rms"
    rope: bool = True
    alibi: bool = False
    attention_layer_norm: bool = False
    block_group_size: int = 1
    use_cache: bool = False  # kept so a real config.json round-trips; LLaDA has no KV cache here
    # Special tokens of the LLaDA-8B tokenizer.
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081
    mask_token_id: int | None = LLADA_MASK_TOKEN_ID
    # Variants used by models adapted from an autoregressive LM (dllm_sparse.models.adapt). Both are off for LLaDA.
    # logit_shift: Dream's convention, the logits at position i come from the hidden state at i - 1 (position 0
    # keeps its own), so the AR head's "next token" prediction is reused as "this (masked) token". Applied in
    # LLaDAModelLM.forward, so every consumer (samplers, likelihood, sparsifier) sees already-shifted logits.
    logit_shift: bool = False
    # causal: lower-triangular attention. Only for checking a conversion against the original causal LM.
    causal: bool = False

    def __post_init__(self, **kwargs):
        # Let the base class apply aliases (`hidden_size=...`) and unknown keys first, then resolve defaults
        # that depend on other fields, then check shapes.
        super().__post_init__(**kwargs)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.mlp_ratio * self.d_model
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        self.check_shapes()

    def to_dict(self) -> dict:
        # Tools that read a config as a dict look for the standard name (peft, for one, ties a trainable
        # embedding row to the head only when it finds tie_word_embeddings); the alias alone is not in the dict.
        out = super().to_dict()
        out["tie_word_embeddings"] = self.weight_tying
        return out

    def check_shapes(self) -> None:
        """Raise ``ValueError`` when the head layout cannot be built."""
        if self.n_heads <= 0 or self.d_model % self.n_heads != 0:
            raise ValueError(
                f"LLaDAConfig: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
                "change n_heads to a divisor of d_model (or d_model to a multiple of n_heads)."
            )
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"LLaDAConfig: n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads}); "
                "set n_kv_heads to a divisor of n_heads (n_kv_heads == n_heads for plain multi-head attention)."
            )
        if (self.d_model // self.n_heads) % 2 != 0:
            raise ValueError(
                f"LLaDAConfig: head dim d_model // n_heads = {self.d_model // self.n_heads} must be even for "
                "rotary embeddings; change d_model or n_heads."
            )
        if self.embedding_size < self.vocab_size:
            raise ValueError(
                f"LLaDAConfig: embedding_size ({self.embedding_size}) must be >= vocab_size ({self.vocab_size}); "
                "set embedding_size=None to use vocab_size."
            )


def tiny_llada_config(**overrides) -> LLaDAConfig:
    """A tiny LLaDA config for tests: 2 layers, d_model 64, 4 query heads over 2 kv heads, vocab 100.

    Token 99 is the mask token; eos/pad are 98. Any field can be overridden by keyword.
    """
    fields = {
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "mlp_hidden_size": 128,
        "vocab_size": 100,
        "embedding_size": 100,
        "max_sequence_length": 128,
        "rope_theta": 10000.0,
        "mask_token_id": 99,
        "eos_token_id": 98,
        "pad_token_id": 98,
    }
    fields.update(overrides)
    return LLaDAConfig(**fields)


#: Fields that the official ``LLaDAConfig`` writes (every field of its ``ModelConfig``) and the native model does not
#: read, with the values under which not reading them changes nothing (None: any value). Each is one that the
#: official modelling code itself ignores at inference, or reads only in a branch refused below:
#: ``init_fn`` / ``init_cutoff_factor`` / ``init_device`` pick the initialiser and where it runs;
#: ``precision`` records the training precision; ``flash_attention`` picks a kernel;
#: ``train_max_sequence_length`` is the training length (the official modelling code never reads it; the rotary
#: tables follow ``max_sequence_length``); ``alibi_bias_max`` and ``attention_layer_norm_with_affine`` matter only
#: with ALiBi or QK-norm (both refused by :func:`check_supported`); ``multi_query_attention=True`` means one key/value
#: head, which is what ``n_kv_heads == 1`` already says.
IGNORED_FIELDS: dict[str, tuple | None] = {
    "alibi_bias_max": None, "attention_layer_norm_with_affine": None, "flash_attention": None,
    "init_cutoff_factor": None, "init_device": None, "init_fn": None, "precision": None,
    "train_max_sequence_length": None,
    "multi_query_attention": (None, False),
}
#: Bookkeeping keys of a saved config (transformers' own, the checkpoint's, peft's / this package's notes).
_BOOKKEEPING = ("auto_map", "architectures", "transformers_version", "torch_dtype", "dtype", "model_type",
                "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "base_model_name_or_path")


def unread_fields(config: LLaDAConfig) -> dict[str, object]:
    """Fields of ``config`` that the native model neither reads nor knows to be harmless (for instance ``rope_scaling``
    or ``clip_qkv`` from another OLMo-derived model): a model built from it would silently compute something else.
    Names starting with ``dllm_sparse`` are this package's own notes and are allowed."""
    known = set(LLaDAConfig.__dataclass_fields__) | set(PretrainedConfig().to_dict()) | set(_BOOKKEEPING)
    known |= set(LLaDAConfig.attribute_map)
    out = {}
    for key, value in config.to_dict().items():
        if key in IGNORED_FIELDS:
            allowed = IGNORED_FIELDS[key]
            if allowed is not None and value not in allowed and not (key == "multi_query_attention"
                                                                      and config.n_kv_heads == 1):
                out[key] = value
        elif key not in known and not key.startswith("dllm_sparse"):
            out[key] = value
    return out


def check_supported(config: LLaDAConfig) -> None:
    """Refuse architecture variants of the original OLMo-derived code that this file does not implement, and
    fields it would silently ignore (:func:`unread_fields`)."""
    expected = {
        "block_type": "llama",
        "activation_type": "silu",
        "layer_norm_type": "rms",
        "rope": True,
        "alibi": False,
        "attention_layer_norm": False,
        "block_group_size": 1,
    }
    wrong = {k: getattr(config, k) for k, v in expected.items() if getattr(config, k) != v}
    # Some forks add YaRN rope scaling under this key. (`flash_attention` only picks a kernel: ignored.)
    if getattr(config, "yarn", False):
        wrong["yarn"] = True
    if wrong:
        raise ValueError(
            f"dllm_sparse.models.llada implements only the LLaDA-8B block layout ({expected}); this config has "
            f"{wrong}. Load it with the checkpoint's own code (trust_remote_code=True, without importing "
            "dllm_sparse.models.llada)."
        )
    unread = unread_fields(config)
    if unread:
        raise ValueError(
            f"dllm_sparse.models.llada does not read the config field(s) {unread}: a model built from this config "
            "would ignore them and compute something else. Remove them from config.json when they do not apply, or "
            "load the checkpoint with its own code (trust_remote_code=True, its modelling file next to config.json)."
        )
    config.check_shapes()
