"""Likelihood scoring: exact autoregressive log-likelihood, the masked-diffusion ELBO, the greedy check, the Scorer."""
