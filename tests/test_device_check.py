"""experiments/device_check.sh --smoke end to end on the CPU (tiny shapes), checked against the device's return rules
(<= 8 files, none deeper than $OUT/a/b/file, no symlinks, each <= 16 MiB); the preflight's refusals; the package shim
(also under pytest, for the kernel tests); the plan's refusals; the lock, reruns and stopping a part's process group."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def _module():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "experiments" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def returned_problems(out: Path) -> list[str]:
    """The device's return rules, written out independently of the script's own check."""
    problems, files = [], []
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if os.path.islink(p):
                problems.append(f"symlink {p}")
            elif p.is_file():
                files.append(p)
                if len(p.relative_to(out).parts) > 3:
                    problems.append(f"too deep {p}")
                if p.stat().st_size > 16 * MiB:
                    problems.append(f"too big {p}")
    if len(files) > 8:
        problems.append(f"{len(files)} files")
    return problems


def test_smoke_run_of_the_shell_script(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "DLLM_SPARSE_FORCE_SHIM": "1"}
    proc = subprocess.run(["bash", str(ROOT / "experiments" / "device_check.sh"), "--smoke", "--work-dir", str(work)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # What would come back: four plain files, within the rules.
    assert sorted(p.name for p in out.iterdir()) == ["device_check.log", "results.tar.gz", "rows.jsonl",
                                                     "summary.json"]
    assert returned_problems(out) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["return_check"] == "ok" and summary["state"] == "finished"
    outcomes = {k: v["outcome"] for k, v in summary["parts"].items()}
    assert outcomes == {"kernel_tests": "ok", "kernels": "ok", "decode": "ok", "frontier": "ok"}, summary
    assert summary["preflight"]["package_from"].startswith("working tree via")  # the shim served every part
    assert summary["environment"]["torch"] and "driver" in summary["environment"]
    # The kernel tests ran under the shim (pytest outside the repository root) and passed.
    log = (out / "device_check.log").read_text()
    assert f"dllm_sparse.kernels imported from {work.resolve() / '.pkg'}" in log
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
        junit = tar.extractfile("kernel_tests/junit.xml").read().decode()
        frontier = json.loads(tar.extractfile("frontier/trajectory_frontier.json").read())
    assert 'failures="0"' in junit and 'errors="0"' in junit and 'tests="0"' not in junit
    assert {r["strategy"] for r in frontier["rows"]} >= {"dense", "delta-input:0.25/0.5@block_start"}
    assert frontier["env"]["torch"] and "backend" in frontier["env"]
    assert any(n.startswith("kernels/") and n.endswith(".jsonl") for n in names)
    assert any(n.startswith("decode/") and n.endswith(".json") for n in names)
    assert not any(".pkg" in n for n in names)
    # Rows were appended as they finished, each with the environment; the kernel rows carry the H100 bound.
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {r.get("table") for r in rows} >= {"one_token", "tokens", "shared"}
    assert {r.get("measure") for r in rows} >= {"dense_step", "sparse_step", "dense_loop", "sparse_loop"}
    for r in rows:
        assert {"device", "driver", "torch", "triton", "backend"} <= set(r["env"]), r
    one = [r for r in rows if r.get("table") == "one_token"]
    assert one and all(r["column_sparse_bound_us"] > 0 and r["dense_bound_us"] > 0 for r in one)
    steps = [r for r in rows if r.get("measure") in ("dense_step", "sparse_step")]
    assert all(r.get("timing") == "cpu" and r["ms"] > 0 for r in steps), steps
    # A rerun into the same work folder is refused, naming --resume and --fresh.
    again = subprocess.run(["bash", str(ROOT / "experiments" / "device_check.sh"), "--smoke", "--work-dir", str(work)],
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "--resume" in again.stderr and "--fresh" in again.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "two"])
def test_train_minutes_must_be_finite_and_positive(value, capsys):
    with pytest.raises(SystemExit):
        _module().build_parser().parse_args(["--train-minutes", value])
    assert "--train-minutes" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--frontier-layers", "0"], "--frontier-layers"),
    (["--budget-s", "nan"], "--budget-s"),
    (["--resume", "--fresh"], "not allowed with"),
    (["--parts", "kernels", "kernels"], "twice"),
])
def test_other_bad_options(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _module().main(argv + ["--output-dir", str(tmp_path / "o"), "--work-dir", str(tmp_path / "w")])
    assert message in capsys.readouterr().err


def test_work_and_output_folders_must_be_apart(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _module().main(["--output-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")])
    assert "must not contain each other" in capsys.readouterr().err


def test_default_plan_fits_one_shot_and_the_refusals(tmp_path):
    mod = _module()
    args = mod.build_parser().parse_args(["--work-dir", str(tmp_path / "w"), "--output-dir", str(tmp_path / "o")])
    args.explicit_parts, args.parts = None, list(mod.DEFAULT_PARTS)
    plan = [mod.plan_part(p, args, tmp_path / "w", tmp_path / "o") for p in args.parts]
    assert mod.refuse_plan(plan, 560, smoke=False) is None
    total = sum(p.limit_s for p in plan)
    assert total <= 560
    for p in plan:  # a limit is the estimate with its margin
        assert p.limit_s == pytest.approx(p.estimate_s * mod.MARGIN + mod.LIMIT_FLOOR_S)
    too_long = mod.refuse_plan(plan, total - 1, smoke=False)
    assert "add up to" in too_long and "--parts" in too_long
    big = mod.Part("kernels", [["true"]], 10, 17 * MiB)
    assert "MiB" in mod.refuse_plan([big], 560, smoke=False)


def test_kernel_bench_work_counts_timed_calls():
    mod = _module()
    # One shape pair (gate/up + down), one sparsity, tokens (1, 4), two sources: calls = 2*(2+2) + 2*2*4 + 2*2*2 = 32.
    seconds, nbytes = mod.kernel_bench_work(["smollm2-135m"], [0.5], [1, 4], mod.KERNEL_SOURCES[:2])
    randn = (576 * 1536 * 2) * 3 + (576 * 1536 * 2) * 2
    r = mod.RATES
    assert seconds == pytest.approx(r["startup_s"] + 12 * r["compile_s"] + 32 * r["timed_call_s"]
                                    + randn / r["cpu_randn_per_s"])
    assert nbytes == (2 * 1 + 2 * 2 * 3 + 2 * 2 * 1) * 3000 + 200_000


def test_return_violations_and_pack(tmp_path):
    mod = _module()
    out = tmp_path / "out"
    (out / "a" / "b" / "c").mkdir(parents=True)
    for i in range(8):
        (out / f"f{i}.txt").write_text("x")
    (out / "a" / "b" / "c" / "deep.txt").write_text("x")
    (out / "link").symlink_to(out / "f0.txt")
    with open(out / "big.bin", "wb") as f:
        f.truncate(17 * MiB)  # sparse: no disk used
    problems = mod.return_violations(out)
    assert any("symlink" in p for p in problems) and any("deeper" in p for p in problems)
    assert any("big.bin" in p and "16 MiB" in p for p in problems) and any("10 files" in p for p in problems)
    assert returned_problems(out) and mod.return_violations(tmp_path / "missing") == []

    work, back = tmp_path / "work", tmp_path / "back"
    (work / "part").mkdir(parents=True)
    back.mkdir()
    (work / "part" / "rows.jsonl").write_text('{"a": 1}\n')
    (work / "part" / "adapter_model.safetensors").write_bytes(b"0" * 100)
    (work / "part" / "noise.dat").write_bytes(os.urandom(17 * MiB))  # cannot fit, even compressed
    mod.package_path(work, force=True)
    packed = mod.pack(work, back)
    assert packed["stays_on_device"] == ["part/adapter_model.safetensors"]
    assert packed["left_out_to_fit"] == ["part/noise.dat"]
    with tarfile.open(back / "results.tar.gz") as tar:
        assert tar.getnames() == ["part/rows.jsonl"]
    assert mod.return_violations(back) == []


def _sleeper(tag: str) -> subprocess.Popen:
    # argv carries "device_check" so the lock's liveness check (pid + command line) recognises it as a holder.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"device_check-{tag}"])
    deadline = time.monotonic() + 30
    while f"device_check-{tag}".encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    mod = _module()
    live = _sleeper("live")
    try:
        (tmp_path / mod.LOCK).write_text(json.dumps({"pid": live.pid, "started": "then"}))
        with pytest.raises(SystemExit, match=f"kill -TERM {live.pid}"):
            mod.take_lock(tmp_path)
    finally:
        live.kill()
        live.wait()
    # The same pid, now dead: taken over, saying so, and the lock holds this process.
    note = mod.take_lock(tmp_path)
    assert note and f"pid {live.pid}" in note and "no longer running" in note
    assert json.loads((tmp_path / mod.LOCK).read_text())["pid"] == os.getpid()
    mod.release_lock(tmp_path)
    assert not (tmp_path / mod.LOCK).exists()
    assert mod.take_lock(tmp_path) is None  # a free folder: no note
    mod.release_lock(tmp_path)


def test_previous_run_refused_resumed_or_removed(tmp_path):
    mod = _module()
    parser = mod.build_parser()
    (tmp_path / "kernels").mkdir()
    (tmp_path / "summary.json").write_text(json.dumps({"parts": {"kernels": {"outcome": "ok"},
                                                                 "decode": {"outcome": "stopped by SIGTERM"}}}))
    with pytest.raises(SystemExit, match="kernels ok, decode stopped by SIGTERM.*--resume.*--fresh"):
        mod.previous_run(tmp_path, parser.parse_args([]))
    kept = mod.previous_run(tmp_path, parser.parse_args(["--resume"]))
    assert kept == {"kernels": {"outcome": "ok"}}
    assert mod.previous_run(tmp_path, parser.parse_args(["--fresh"])) == {}
    assert list(tmp_path.iterdir()) == []


GRANDCHILD = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              "print('grandchild', p.pid, flush=True); time.sleep(120)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is dead


def test_a_part_past_its_limit_is_stopped_with_its_children(tmp_path):
    mod = _module()
    log = mod.Log(tmp_path / "log.txt")
    rc = mod.run_command([sys.executable, "-u", "-c", GRANDCHILD], dict(os.environ), tmp_path, 3.0, log)
    assert rc == "timeout"
    text = (tmp_path / "log.txt").read_text()
    pid = int(text.split("grandchild")[1].split()[0])
    deadline = time.monotonic() + 10
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(pid), "the part's own child outlived the part's limit"


def test_a_part_dies_with_a_killed_device_check(tmp_path):
    """SIGKILL reaches no handler: the part (in its own process group) must still not outlive device_check."""
    code = ("import importlib.util, os, sys; "
            f"spec = importlib.util.spec_from_file_location('dc', {str(ROOT / 'experiments' / 'device_check.py')!r}); "
            "m = importlib.util.module_from_spec(spec); sys.modules['dc'] = m; spec.loader.exec_module(m); "
            "from pathlib import Path; log = m.Log(Path(sys.argv[1])); "
            "m.run_command([sys.executable, '-u', '-c', 'import os, time; print(\"part\", os.getpid(), flush=True); "
            "time.sleep(120)'], dict(os.environ), Path(sys.argv[2]), 120, log)")
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "log.txt"), str(tmp_path)])
    try:
        deadline = time.monotonic() + 120
        while "part" not in ((tmp_path / "log.txt").read_text() if (tmp_path / "log.txt").exists() else ""):
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.1)
        part = int((tmp_path / "log.txt").read_text().split("part")[1].split()[0])
        parent.kill()
        parent.wait()
    finally:
        if parent.poll() is None:
            parent.kill()
    deadline = time.monotonic() + 10
    while _pid_alive(part) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(part), "the part outlived a SIGKILLed device_check"


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_sigterm_stops_the_running_part_and_packs(tmp_path):
    """Killing device_check.py alone used to leave its running part alive: now the part's process group goes too."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DLLM_SPARSE_FORCE_SHIM": "1"}
    parent = subprocess.Popen([sys.executable, "-u", str(ROOT / "experiments" / "device_check.py"), "--smoke",
                               "--parts", "decode", "--output-dir", str(out), "--work-dir", str(work)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        child = None
        while child is None and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.2)
            kids = _children(parent.pid)
            child = kids[0] if kids else None
        assert child is not None, "the decode part never started"
        time.sleep(1.0)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if parent.poll() is None:
            parent.kill()
    deadline = time.monotonic() + 15
    while _pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(child), "the running part outlived device_check.py"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parts"]["decode"]["outcome"] == "stopped by SIGTERM"
    assert summary["state"] == "stopped by SIGTERM" and (out / "results.tar.gz").is_file()
    assert not (work / _module().LOCK).exists()  # released on the way out


def test_preflight_refuses_without_cuda_outside_smoke():
    info = _module().preflight(smoke=False)
    import torch

    if not torch.cuda.is_available():
        assert set(info["refused"]) == {"kernel_tests", "kernels", "decode", "frontier", "train"}
        assert "no CUDA device" in info["refused"]["kernels"]
    assert info["versions"]["torch"] == torch.__version__


def test_version_floors_are_compared_as_numbers():
    mod = _module()
    assert mod._version_tuple("2.11.0+cu128") < mod._version_tuple("2.13")
    assert mod._version_tuple("5.17.1") < mod._version_tuple("5.23") < mod._version_tuple("5.24.0")
    assert mod._version_tuple("3.10.0") > mod._version_tuple("3.9")


def test_shim_maps_the_subpackages(tmp_path):
    shim = _module().package_path(tmp_path, force=True)
    code = ("import dllm_sparse, dllm_sparse.samplers, dllm_sparse.kernels; "
            "print(dllm_sparse.__file__); print(dllm_sparse.samplers.__file__); "
            "print(dllm_sparse.kernels.accelerate_ffn.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": shim})
    assert proc.returncode == 0, proc.stderr[-2000:]
    init, samplers, ffn_module = proc.stdout.split()
    # Imported through the shim (first on the path), not through the installed copy; the files are the tree's own.
    assert init.startswith(shim) and samplers.startswith(shim) and ffn_module == "dllm_sparse.kernels.sparse_ffn"
    assert Path(samplers).resolve() == (ROOT / "samplers" / "__init__.py").resolve()


def test_pytest_from_the_repository_root_would_shadow_the_shim(tmp_path):
    """Why the kernel_tests part runs pytest from the work folder: `python -m pytest` (like `python -c`) puts the
    current folder first on sys.path, and in the repository root the bare dllm_sparse/ (no samplers, no kernels
    inside) is found before the shim."""
    shim = _module().package_path(tmp_path, force=True)
    code = "import importlib.util; print(importlib.util.find_spec('dllm_sparse').origin)"

    def origin(cwd: Path) -> str:
        proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**os.environ, "PYTHONPATH": shim},
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert Path(origin(ROOT)).resolve() == (ROOT / "dllm_sparse" / "__init__.py").resolve()
    assert not (ROOT / "dllm_sparse" / "samplers").exists() and not (ROOT / "dllm_sparse" / "kernels").exists()
    assert origin(tmp_path / ".pkg").startswith(shim) and origin(tmp_path).startswith(shim)


def test_shell_script_falls_back_to_python3(tmp_path):
    """The device image has `python3` and no `python`: with no $PYTHON and no .venv the script runs python3,
    unbuffered, passing $OUT and the options on."""
    (tmp_path / "repo" / "experiments").mkdir(parents=True)
    script = tmp_path / "repo" / "experiments" / "device_check.sh"
    script.write_text((ROOT / "experiments" / "device_check.sh").read_text())
    (tmp_path / "repo" / "experiments" / "device_check.py").write_text(
        "import sys; print(*sys.orig_argv)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    (bin_dir / "dirname").symlink_to("/usr/bin/dirname")
    env = {"PATH": str(bin_dir), "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["/bin/bash", str(script), "--smoke"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    exe, unbuffered, script_path, *argv = proc.stdout.split()
    assert (exe, unbuffered, script_path) == ("python3", "-u", "experiments/device_check.py")
    assert argv == ["--output-dir", str(tmp_path / "out"), "--smoke"]
