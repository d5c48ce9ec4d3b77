"""The names of the sparsification rules, without the rules themselves.

Command lines offer these as ``--rule`` choices while building their parsers; this module imports nothing, so a
parser (and ``--help``) does not load torch. :mod:`dllm_sparse.sparsity.rules` checks at import that its registry
holds exactly these names, in this order.
"""

RULE_NAMES = ("top_p", "top_k", "max_p", "paper_top_p")
#: A rule's scopes (defined in :mod:`dllm_sparse.sparsity.rules`): per token (the paper's), per sample over
#: tokens x features (the paper's LLaDA scripts), and keep-sets shared by the tokens of a forward call.
SCOPES = ("token", "sequence", "step", "step_wina")
SHARED_SCOPES = ("step", "step_wina")

__all__ = ["RULE_NAMES", "SCOPES", "SHARED_SCOPES"]
