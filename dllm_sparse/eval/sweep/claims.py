"""Claims: several processes sharing one sweep folder's units. A plain run claims each unit under the folder's lock
before computing it (``.claims.json``), so sweeps into one folder split the work; a killed claimer's claims are
taken over (:func:`process_start` tells a reused pid from the claimer); :class:`ClaimWait` says what a run waits
for when a holder runs on another machine."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dllm_sparse.eval.rows import atomic_write_json
from dllm_sparse.eval.sweep.config import Unit
from dllm_sparse.eval.sweep.store import folder_lock

__all__ = ["CLAIMS_NAME", "process_start", "stat_start_time", "claim", "next_model", "release", "ClaimWait"]

#: Which process computes which unit: {first key of the unit: {"pid", "host", "start"}}, read and written under
#: the lock (``start``: :func:`process_start`, which tells a reused pid from the process that claimed).
CLAIMS_NAME = ".claims.json"


def _read_claims(out: Path) -> dict[str, dict]:
    try:
        data = json.loads((out / CLAIMS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def process_start(pid: int) -> str | None:
    """Who a pid is: ``"<boot id>:<start time>"`` of the process running as ``pid`` now (Linux: the kernel's boot
    id and field 22 of ``/proc/<pid>/stat``, the start time in clock ticks after boot), so that a pid reused by
    another process after the claimer ended (or after a restart) reads differently. None when ``pid`` does not
    run, or where ``/proc`` cannot be read (not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = _BOOT_ID.read_text().strip()
    except OSError:
        return None
    return f"{boot}:{stat_start_time(stat)}"


def stat_start_time(stat: str) -> str:
    """Field 22 (``starttime``) of a ``/proc/<pid>/stat`` line. Field 2, the command name in parentheses, may
    hold spaces and parentheses itself, so the fields are counted from the last ')'."""
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19]  # fields[0] is field 3 (the state), so field 22 is fields[19]


def _this_claim() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid())}


def _claim_alive(claim: Any, start_of: Callable[[int], str | None] = process_start) -> bool:
    """Whether the process that made a claim still runs (a killed sweep's claims are taken over).

    On this host, with ``/proc``: alive iff ``claim["pid"]`` runs and is the same process (its :func:`process_start`
    equals the claim's ``start``): a pid reused by an unrelated process after a kill or a restart is recognised
    as dead, and so is a claim without ``start`` (written by an older version, which cannot be told from a
    reused pid: at worst that unit is computed twice, and its rows are written once). Without ``/proc``: whether
    the pid runs (``os.kill(pid, 0)``). A claim made on another machine (a shared file system) counts as alive:
    its process cannot be asked (the waiting sweep says so, see :class:`ClaimWait`)."""
    if not isinstance(claim, dict) or not isinstance(claim.get("pid"), int) or isinstance(claim.get("pid"), bool):
        return False
    if claim.get("host") != socket.gethostname():
        return True
    if start_of(os.getpid()) is not None:  # /proc is readable
        now = start_of(claim["pid"])
        return now is not None and claim.get("start") is not None and now == claim["start"]
    try:
        os.kill(claim["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _live_claims(out: Path) -> dict[str, dict]:
    return {k: c for k, c in _read_claims(out).items() if _claim_alive(c) and c.get("pid") != os.getpid()}


def next_model(out: Path, units: Sequence[Unit]) -> int | None:
    """The model index of the first unit no other live process has claimed, or None."""
    with folder_lock(out):
        taken = _live_claims(out) if out.is_dir() else {}
    return next((u.model_index for u in units if u.keys[0] not in taken), None)


def claim(out: Path, units: Sequence[Unit]) -> Unit | None:
    """Claim the first of ``units`` that no other live process has claimed (stale claims are dropped); None when
    every one is taken."""
    with folder_lock(out):
        claims = _live_claims(out)
        unit = next((u for u in units if u.keys[0] not in claims), None)
        if unit is not None:
            claims[unit.keys[0]] = _this_claim()
            atomic_write_json(out / CLAIMS_NAME, claims)
    return unit


class ClaimWait:
    """The wait of a sweep whose remaining units are all claimed by other processes: a pause per call, and, once
    it has waited ``first`` seconds and then every ``every`` seconds, when a holder is on another machine, a
    message (``say``, default: a warning on the ``dllm_sparse.eval.sweep.claims`` logger) naming the claim file, each
    holder (pid and host, and whether this run can see it running) and how to release a claim whose holder is
    gone: delete the claim file (or its entries). A claim made on another machine cannot be checked from here, so
    without that message such a wait would be silent and endless; claims of this host are checked alive (the
    usual wait for workers' last units) and need no message. ``clock`` / ``sleep`` are injectable (tests)."""

    def __init__(self, out: Path, *, first: float = 60.0, every: float = 600.0, pause: float = 0.5,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 say: Callable[[str], None] | None = None):
        self.out, self.first, self.every, self.pause = Path(out), first, every, pause
        self.clock, self.sleep = clock, sleep
        self.say = say if say is not None else logging.getLogger(__name__).warning
        self.since: float | None = None
        self.next_note: float | None = None

    def message(self, keys: Sequence[str], waited: float) -> str | None:
        """What this run waits for: the holders of ``keys`` (the first keys of the units left); None when every
        holder runs on this host (checked alive: such a wait ends with them, e.g. the workers' last units)."""
        with folder_lock(self.out):
            claims = _live_claims(self.out) if self.out.is_dir() else {}
        host = socket.gethostname()
        holders: dict[tuple, int] = {}
        for k in keys:
            c = claims.get(k)
            if c is not None:
                where = (c.get("pid"), c.get("host"))
                holders[where] = holders.get(where, 0) + 1
        if all(h == host for _, h in holders):
            return None
        parts = [f"pid {pid} on this host ({n} unit(s); it runs: its units finish there)" if h == host else
                 f"pid {pid} on host {h!r} ({n} unit(s); another machine: this run cannot check that it still runs)"
                 for (pid, h), n in holders.items()]
        path = self.out / CLAIMS_NAME
        return (f"sweep {self.out}: waiting {waited / 60:.0f} min for {len(keys)} unit(s) that other processes "
                f"claimed in {path}: {'; '.join(parts) or 'none any more'}. If a holder no longer runs (killed, or "
                f"its machine restarted), release its claims by deleting {path} (or its entries): this run then "
                "computes those units (a unit whose holder does still run may then be computed twice; its rows are "
                "written once).")

    def __call__(self, keys: Sequence[str]) -> None:
        now = self.clock()
        if self.since is None:
            self.since, self.next_note = now, now + self.first
        if now >= self.next_note:
            text = self.message(keys, now - self.since)
            if text is not None:
                self.say(text)
            self.next_note = now + self.every
        self.sleep(self.pause)


def release(out: Path, unit: Unit) -> None:
    with folder_lock(out):
        claims = _live_claims(out)
        claims.pop(unit.keys[0], None)
        atomic_write_json(out / CLAIMS_NAME, claims)
