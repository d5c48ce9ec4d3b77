"""How much do FFN keep-masks change from one generation step to the next?

    tracker = MaskOverlapTracker(layers=[0, 15, 31])
    sp = StepSparsity("input", TopP(0.9), mask_observers=[tracker])
    out = generate(model, tok, prompts, cfg, sparsity=sp, callbacks=[tracker])
    tracker.to_csv("overlap.csv"); tracker.heatmap("overlap.png")

The tracker is a mask observer of :func:`dllm_sparse.sparsity.hooks` (it receives every keep-mask) and a
generation callback (it learns the step, the block and which positions are prompt / still masked / already
decoded at each forward). At the end of every step it compares the fresh mask A of each tracked layer and
site with (a) the previous step's mask and (b) the mask of step 0 of the current block, position by
position: Jaccard |A∩B| / |A∪B| and recall of the fresh mask |A∩B| / |A| (both 1 when the denominator is
empty), averaged over the real positions of each token group (``all``, ``prompt``, ``masked``,
``decoded``; groups as seen by the step's forward input).

Positions are matched right-aligned, like the statistics' token groups: in a diffusion run every forward
covers the whole canvas, so a position is compared with itself; in a KV-cached AR run step t >= 1 feeds one
token, so its mask is compared with the previous step's last token (the previous decoded token, or the
last prompt token after the prefill) and, for "block start", with the prefill's last prompt token (an AR run
is one block whose step 0 is the prefill). With classifier-free guidance only the conditional rows are
tracked (``rows="cond"``).

Every step's masks are stored bit-packed (``numpy.packbits`` along the features: d/8 bytes per position and
layer) when ``store=True``: a LLaDA-8B run of 128 steps x 32 layers x 256 positions x 4096 features
(``input``) takes 0.5 GB, 1.6 GB for a d_ff = 12288 site; ``store=False`` keeps only what the overlaps need.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from dllm_sparse.atomic import atomic_open, atomic_write_text
from dllm_sparse.sparsity.hooks import MaskEvent
from dllm_sparse.sparsity.sites import FFNSite
from dllm_sparse.steps import GenerationCallback, StepState

__all__ = ["MaskOverlapTracker", "PackedMask", "mask_overlap"]

REFERENCES = ("previous", "block_start")
METRICS = ("jaccard", "recall")


@dataclass
class PackedMask:
    """A bool keep-mask [..., d] stored as ``numpy.packbits`` along the last dimension."""

    bits: np.ndarray  # uint8 [..., ceil(d / 8)]
    width: int  # d

    @classmethod
    def pack(cls, keep: torch.Tensor) -> PackedMask:
        arr = keep.detach().to("cpu", torch.bool).numpy()
        return cls(np.packbits(arr, axis=-1), int(keep.shape[-1]))

    def unpack(self) -> torch.Tensor:
        arr = np.unpackbits(self.bits, axis=-1, count=self.width)
        return torch.from_numpy(arr.astype(bool))

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)


def mask_overlap(fresh: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position (Jaccard, recall of ``fresh``) of two bool masks [..., d] (float64, 1 on empty sets)."""
    inter = (fresh & ref).sum(dim=-1, dtype=torch.float64)
    union = (fresh | ref).sum(dim=-1, dtype=torch.float64)
    n_fresh = fresh.sum(dim=-1, dtype=torch.float64)
    jac = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    rec = torch.where(n_fresh > 0, inter / n_fresh.clamp(min=1), torch.ones_like(inter))
    return jac, rec


def _right(m: torch.Tensor, n: int) -> torch.Tensor:
    return m[:, m.shape[1] - n:]


class MaskOverlapTracker(GenerationCallback):
    """Records keep-masks of the chosen ``layers`` and ``sites`` at every step and their step-to-step overlap.

    Use it both as a ``mask_observers`` entry of the sparsifier (e.g. ``StepSparsity(...,
    mask_observers=[tracker])``) and as a generation callback (``callbacks=[tracker]``).

    Routed experts (docs/moe.md): the tokens routed to an expert change from step to step, so a step-to-step
    overlap of an expert's masks is not defined. ``experts="refuse"`` (default) raises at the first expert mask;
    ``experts="skip"`` tracks the dense FFNs only and counts the expert masks it passed over in
    ``skipped_expert_events``. ``SparsityStats(record_masks=True)`` records expert masks with their tokens.
    """

    def __init__(self, layers: Iterable[int] | None = None, sites: Iterable[FFNSite | str] | None = None,
                 store: bool = True, rows: str = "cond", experts: str = "refuse"):
        if rows not in ("cond", "all"):
            raise ValueError(f"rows must be 'cond' or 'all', got {rows!r}")
        if experts not in ("refuse", "skip"):
            raise ValueError(f"experts must be 'refuse' or 'skip', got {experts!r}")
        self.experts = experts
        self.skipped_expert_events = 0
        if layers is not None:
            layers = list(layers)
            if not layers or any(isinstance(i, bool) or int(i) != i for i in layers):
                raise ValueError(f"layers must be a non-empty list of layer indices (or None for all), got {layers!r}")
        self.layers = None if layers is None else {int(i) for i in layers}
        self.sites = None if sites is None else {str(FFNSite.parse(s)) for s in sites}
        self.store = store
        self.rows = rows
        self.run = -1
        self.masks: dict[tuple[int, int, int, str], PackedMask] = {}  # (run, step, layer, site)
        self.steps: list[dict] = []  # one entry per (run, step): step, block, step_in_block, tag
        self.rows_: list[dict] = []
        self._batch = 0
        self._in_step = False
        self._current: dict[tuple[int, str], torch.Tensor] = {}
        self._groups: dict[str, torch.Tensor] = {}
        # (layer, site) -> (step, keep-mask) of the previous step and of step 0 of the current block
        self._prev: dict[tuple[int, str], tuple[int, torch.Tensor]] = {}
        self._block_ref: dict[tuple[int, str], tuple[int, torch.Tensor]] = {}
        self.ignored_events = 0
        self._seen_layers: set[int] = set()  # every layer whose masks reached this tracker (to check `layers`)

    # ---- mask observer ---------------------------------------------------------------------------------------
    def __call__(self, event: MaskEvent) -> None:
        layer, site = int(event.layer), str(event.site)
        if event.expert is not None:
            if self.experts == "refuse":
                raise ValueError(f"MaskOverlapTracker got the mask of routed expert {event.expert} of layer {layer}: "
                                 "the tokens routed to an expert change between steps, so their overlap is not "
                                 "defined. Pass MaskOverlapTracker(experts='skip') to track the dense FFNs only, "
                                 "or record expert masks with SparsityStats(record_masks=True)")
            self.skipped_expert_events += 1
            return
        self._seen_layers.add(layer)
        if self.layers is not None and layer not in self.layers:
            return
        if self.sites is not None and site not in self.sites:
            return
        if not self._in_step:
            self.ignored_events += 1
            return
        keep = event.keep
        if keep.dim() == 2:
            keep = keep[None]
        if keep.dim() != 3:
            raise ValueError(f"MaskOverlapTracker expects keep-masks [batch, tokens, d], got {tuple(keep.shape)}")
        if self.rows == "cond" and keep.shape[0] > self._batch > 0:
            keep = keep[: self._batch]
        self._current[(layer, site)] = keep.detach()

    # ---- generation callback ---------------------------------------------------------------------------------
    def on_generation_begin(self, state: StepState) -> None:
        self.run += 1
        self._batch = state.batch_size
        self._prev.clear()
        self._block_ref.clear()

    def on_step_begin(self, state: StepState) -> None:
        if getattr(state, "rows", None) is not None:
            raise ValueError(f"MaskOverlapTracker with a block cache: the step's forward computes only canvas rows "
                             f"{state.rows.start}..{state.rows.stop - 1}, so masks of consecutive steps cover "
                             "different positions; track masks with block_cache=None")
        self._in_step = True
        self._current = {}
        if state.first_step_of_block:
            self._block_ref.clear()
        n = state.batch_size if self.rows == "cond" else state.forward_batch
        groups: dict[str, torch.Tensor] = {}
        valid = state.for_forward(state.attention_mask.bool())  # classifier-free guidance: [cond; uncond]
        groups["all"] = valid[:n]
        for name, g in state.groups.items():
            g = g[:n].bool()
            groups[name] = _right(groups["all"], g.shape[1]) & g if g.shape[1] <= valid.shape[1] else g
        self._groups = groups

    def on_step_end(self, state: StepState) -> None:
        self._in_step = False
        if self.layers is not None and self._seen_layers and not self.layers <= self._seen_layers:
            # After one whole forward every sparsified layer has reported: a missing one does not exist.
            missing = sorted(self.layers - self._seen_layers)
            raise ValueError(f"MaskOverlapTracker(layers=...) asks for layers {missing} that the sparsifier "
                             f"never reported; the sparsified layers are {sorted(self._seen_layers)}")
        step, blk, sib = int(state.step), int(state.block), int(state.step_in_block)
        self.steps.append({"run": self.run, "step": step, "block": blk, "step_in_block": sib, "tag": state.tag})
        for (layer, site), keep in sorted(self._current.items()):
            refs = []
            if (layer, site) in self._prev:
                refs.append(("previous", *self._prev[(layer, site)]))
            if state.first_step_of_block:
                self._block_ref[(layer, site)] = (step, keep)
            if (layer, site) in self._block_ref:
                refs.append(("block_start", *self._block_ref[(layer, site)]))
            for ref_name, ref_step, ref in refs:
                n = min(keep.shape[1], ref.shape[1])
                jac, rec = mask_overlap(_right(keep, n), _right(ref.to(keep.device), n))
                names = list(self._groups)
                sel = torch.stack([_right(self._groups[g], n).to(jac.device) for g in names])  # [G, B, n]
                count = sel.sum(dim=(1, 2), dtype=torch.float64)
                jsum = (jac[None] * sel).sum(dim=(1, 2))
                rsum = (rec[None] * sel).sum(dim=(1, 2))
                kept = _right(keep, n).sum(dim=-1, dtype=torch.float64) / keep.shape[-1]
                ksum = (kept[None] * sel).sum(dim=(1, 2))
                sums = (count.tolist(), jsum.tolist(), rsum.tolist(), ksum.tolist())
                for g, c, js, rs, ks in zip(names, *sums, strict=True):
                    self.rows_.append({
                        "run": self.run, "step": step, "block": blk, "step_in_block": sib, "tag": state.tag,
                        "layer": layer, "site": site, "reference": ref_name, "ref_step": ref_step, "group": g,
                        "positions": int(c),
                        "jaccard": js / c if c else float("nan"),
                        "recall": rs / c if c else float("nan"),
                        "density": ks / c if c else float("nan"),
                    })
            self._prev[(layer, site)] = (step, keep)
            if self.store:
                self.masks[(self.run, step, layer, site)] = PackedMask.pack(keep)
        self._current = {}

    def on_generation_end(self, state: StepState) -> None:
        self._in_step = False
        self._current = {}

    # ---- access ------------------------------------------------------------------------------------------------
    def mask(self, step: int, layer: int, site: FFNSite | str, run: int | None = None) -> torch.Tensor:
        """The stored keep-mask [B, T, d] of one step (``store=True``)."""
        run = self.run if run is None else run
        key = (run, int(step), int(layer), str(FFNSite.parse(site)))
        if key not in self.masks:
            raise KeyError(f"no stored mask for run {run}, step {step}, layer {layer}, site {site}"
                           + ("" if self.store else " (the tracker was made with store=False)"))
        return self.masks[key].unpack()

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.masks.values())

    def records(self) -> list[dict]:
        """Tidy rows: run, step, block, step_in_block, tag, layer, site, reference, ref_step, group, positions,
        jaccard, recall, density (mean fraction of features kept by the fresh mask)."""
        return list(self.rows_)

    def select(self, metric: str = "jaccard", reference: str = "previous", group: str = "all",
               site: str | None = None, run: int | None = None) -> dict[tuple[Hashable, int], float]:
        """{(step, layer): value} for one metric / reference / group / site."""
        if metric not in METRICS + ("density",):
            raise ValueError(f"metric must be one of {METRICS + ('density',)}, got {metric!r}")
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        site = self._one_site(site)
        run = self.run if run is None else run
        return {(r["step"], r["layer"]): r[metric] for r in self.rows_
                if r["run"] == run and r["reference"] == reference and r["group"] == group and r["site"] == site}

    def per_step(self, metric: str = "jaccard", reference: str = "previous", group: str = "all",
                 site: str | None = None, run: int | None = None) -> dict[int, float]:
        """{step: mean over tracked layers} (NaN layers, e.g. an empty group, are skipped)."""
        acc: dict[int, list[float]] = {}
        for (step, _), v in self.select(metric, reference, group, site, run).items():
            if v == v:
                acc.setdefault(step, []).append(v)
        return {s: sum(v) / len(v) for s, v in sorted(acc.items())}

    def matrix(self, metric: str = "jaccard", reference: str = "previous", group: str = "all",
               site: str | None = None, run: int | None = None) -> tuple[list[int], list[int], np.ndarray]:
        """(layers, steps, values [layers, steps]) with NaN where there is no value."""
        data = self.select(metric, reference, group, site, run)
        steps = sorted({s for s, _ in data})
        layers = sorted({layer for _, layer in data})
        out = np.full((len(layers), len(steps)), np.nan)
        for (s, layer), v in data.items():
            out[layers.index(layer), steps.index(s)] = v
        return layers, steps, out

    def _one_site(self, site: str | None) -> str:
        if site is not None:
            return str(FFNSite.parse(site))
        sites = sorted({r["site"] for r in self.rows_})
        if len(sites) != 1:
            raise ValueError(f"the tracker holds sites {sites}; name one with site=...")
        return sites[0]

    # ---- export --------------------------------------------------------------------------------------------------
    def to_csv(self, path) -> None:
        rows = self.records()
        cols = ["run", "step", "block", "step_in_block", "tag", "layer", "site", "reference", "ref_step", "group",
                "positions", "jaccard", "recall", "density"]
        with atomic_open(path, newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)

    def to_json(self, path=None) -> str:
        text = json.dumps({"steps": self.steps, "records": self.records()}, default=str)
        if path is not None:
            atomic_write_text(path, text)
        return text

    def heatmap(self, path, metric: str = "jaccard", reference: str = "previous", group: str = "all",
                site: str | None = None, run: int | None = None, title: str | None = None) -> None:
        """Layers x steps heatmap of one metric (matplotlib, the caller's backend) saved to ``path``."""
        import matplotlib.pyplot as plt

        layers, steps, values = self.matrix(metric, reference, group, site, run)
        if not steps:
            raise ValueError("nothing to plot: no overlap rows for this selection")
        fig, ax = plt.subplots(figsize=(max(6.0, min(2 + 0.15 * len(steps), 16)), min(2 + 0.25 * len(layers), 10)))
        im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", origin="lower", vmin=0.0, vmax=1.0,
                       cmap="viridis", interpolation="nearest")
        ax.set_xlabel("step")
        ax.set_ylabel("layer")
        xt = list(range(0, len(steps), max(1, -(-len(steps) // 12))))
        ax.set_xticks(xt, [str(steps[i]) for i in xt])
        yt = list(range(0, len(layers), max(1, len(layers) // 16)))
        ax.set_yticks(yt, [str(layers[i]) for i in yt])
        fig.colorbar(im, ax=ax, label=metric)
        ax.set_title(title or f"{metric} vs {reference} step, site {self._one_site(site)}, group {group}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
