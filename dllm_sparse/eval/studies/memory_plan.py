"""The memory plan: per-phase peaks measured at 1 and 2 layers, extrapolated to the published 32.

Formula (one model, one phase, no gradients): a forward pass holds every layer's weights and, at any moment, the
transients of one layer (the residual stream and that layer's activations; the LM head's logits at the end), so
adding a layer adds its weights and nothing else:

    peak(L) = peak(1) + (L - 1) * per_layer_weight_bytes

``per_layer_weight_bytes`` is counted on the meta device (:func:`dllm_sparse.models.shapes.weight_bytes`), not
fitted. The check of the formula: predict peak(2) from peak(1) and compare with the measured peak(2) (target:
within 10 %). On a GPU the process baseline (interpreter, libraries: ``baseline_rss`` on the CPU) is not in device
memory, but the CUDA context and the caching allocator's slack are: the GPU estimate is
``peak(32) - baseline_rss + CUDA_OVERHEAD``, with ``CUDA_OVERHEAD`` a stated allowance, not a measurement.

A phase that keeps state per layer (``accelerate_ffn``'s packed kept rows, the step-delta FFN's per-position
caches) grows by more than the weights per layer; with a 2-layer measurement the estimate also extrapolates the
measured slope, ``peak(1) + (L - 1) * (peak(2) - peak(1))``, and the larger of the two is used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["extrapolate", "fits_table", "gpu_estimate", "GPU_SIZES_GB", "CUDA_OVERHEAD_GB"]

GPU_SIZES_GB = (24, 48, 80, 141)
#: Allowance for the CUDA context, cuBLAS workspaces and allocator fragmentation on a GPU (not measured here).
CUDA_OVERHEAD_GB = 2.0


def extrapolate(one: dict, two: dict | None, layers: int = 32) -> list[dict[str, Any]]:
    """Per phase of a 1-layer result ``one`` (:func:`dllm_sparse.eval.studies.shape_check.run_phases`), the predicted
    peak at 2 layers against the measured ``two`` (None: not measured) and the estimate at ``layers`` layers, in
    bytes."""
    per_layer = one["weights"]["per_layer"]
    measured_two = {r["phase"]: r for r in (two or {}).get("rows", [])}
    out = []
    for r in one["rows"]:
        if r.get("error") or "skipped" in (r.get("details") or {}):  # a phase that did not run for this model
            continue
        pred2 = r["rss_peak"] + per_layer
        row = {"phase": r["phase"], "peak_1": r["rss_peak"], "predicted_2": pred2,
               f"peak_{layers}": r["rss_peak"] + (layers - 1) * per_layer,
               f"gpu_{layers}": r["rss_peak"] - one["baseline_rss"] + (layers - 1) * per_layer
               + int(CUDA_OVERHEAD_GB * 1e9)}
        two_row = measured_two.get(r["phase"])
        if two_row is not None and not two_row.get("error"):
            row["peak_2"] = two_row["rss_peak"]
            row["error_2"] = pred2 / two_row["rss_peak"] - 1
            # A phase that keeps per-layer state (packed weights, step-delta caches) grows by more than the
            # weights: the measured 1 -> 2 layer slope extrapolates it, and the larger estimate is the one used.
            slope = max(two_row["rss_peak"] - r["rss_peak"], per_layer)
            row[f"gpu_{layers}_slope"] = (r["rss_peak"] - one["baseline_rss"] + (layers - 1) * slope
                                          + int(CUDA_OVERHEAD_GB * 1e9))
        out.append(row)
    return out


def gpu_estimate(row: dict, layers: int = 32) -> int:
    """The larger of the weights-only and the measured-slope estimates of a row of :func:`extrapolate`."""
    return max(row[f"gpu_{layers}"], row.get(f"gpu_{layers}_slope", 0))


def fits_table(rows: list[dict], layers: int = 32) -> dict[str, list[str]]:
    """Phase -> for each of :data:`GPU_SIZES_GB`, "yes" or "no" by :func:`gpu_estimate`."""
    return {r["phase"]: ["yes" if gpu_estimate(r, layers) <= g * 1e9 else "no" for g in GPU_SIZES_GB] for r in rows}
