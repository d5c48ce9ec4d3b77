"""dllm_sparse.atomic: the temporary file is created exclusively (no planted symlink followed, no two writers
sharing one), the result has the mode a plain open would give, and a failed block leaves the target as it was."""

from __future__ import annotations

import os
import tempfile
import threading

import pytest

from dllm_sparse.atomic import atomic_open, atomic_write_text


def test_a_symlink_planted_at_the_temporary_name_is_not_followed(tmp_path, monkeypatch):
    """The first name mkstemp tries is a planted symlink to a victim file: it is skipped (O_EXCL), the victim
    keeps its content, the target gets the text."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "out.json"
    planted = tmp_path / f".{target.name}.planted.tmp"
    planted.symlink_to(victim)
    names = iter(["planted", "fresh1", "fresh2"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)

    atomic_write_text(target, "new text")
    assert target.read_text() == "new text"
    assert victim.read_text() == "precious"
    assert planted.is_symlink() and os.readlink(planted) == str(victim)  # left as it was, never written through
    # the old fixed name (<name>.<pid>.tmp) is not used either
    old_style = tmp_path / f"{target.name}.{os.getpid()}.tmp"
    old_style.symlink_to(victim)
    atomic_write_text(target, "again")
    assert target.read_text() == "again" and victim.read_text() == "precious"


def test_two_concurrent_writers_of_one_file_do_not_collide(tmp_path):
    """Two writers in one process (so one pid) hold their temporary files open at the same time: each writes its
    own file, both renames succeed, and the target is one complete text."""
    target = tmp_path / "rows.json"
    both_open = threading.Barrier(2)
    texts = {i: f"writer {i}\n" * 1000 for i in range(2)}
    errors = []

    def write(i):
        try:
            with atomic_open(target) as f:
                f.write(texts[i][: len(texts[i]) // 2])
                both_open.wait(timeout=30)
                f.write(texts[i][len(texts[i]) // 2:])
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_text() in texts.values()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary file left behind


def test_mode_is_what_open_gives_under_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "b.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o640


def test_a_failed_block_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]
