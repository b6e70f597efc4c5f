"""atomic.py, the one implementation of "old or new, never half": files, folders, removal, and the
clean-up after a writer killed outright. The writers' own tests (test_checkpoints, test_runs,
test_data, test_interop) check that each of them goes through it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gpt2kit import atomic
from gpt2kit.atomic import atomic_folder, default_permissions, remove_folder, remove_stale, write_atomically


def contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "a.txt"
    write_atomically(path, lambda tmp: tmp.write_text("one"))

    def crash(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError):
        write_atomically(path, crash)
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"] and path.read_text() == "one"


def test_a_folder_replaces_the_old_one_and_leaves_nothing_hidden(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("old")
        (tmp / "stale").write_text("old")
    with atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.partial-") and not any(tmp.iterdir())
        (tmp / "a").write_text("new")
    assert contents(target) == {"a": "new"}  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_an_error_keeps_the_old_folder_and_removes_the_new_one(tmp_path):
    target = tmp_path / "nested" / "model"  # parents are made
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("old")
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error):
            with atomic_folder(target) as tmp:
                (tmp / "a").write_text("new")
                raise error()
    assert contents(target) == {"a": "old"} and [p.name for p in target.parent.iterdir()] == ["model"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("old")
    real, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 3:  # tmp -> model (refused: not empty), model -> aside, then tmp -> model
            raise OSError(28, "No space left on device")
        real(src, dst)
    monkeypatch.setattr(atomic.os, "replace", second_rename_fails)
    with pytest.raises(OSError):
        with atomic_folder(target) as tmp:
            (tmp / "a").write_text("new")
    assert contents(target) == {"a": "old"} and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_keep_leaves_a_good_existing_folder_alone(tmp_path):
    target = tmp_path / "entry"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("first")
    with atomic_folder(target, keep=lambda folder: (folder / "a").is_file()) as tmp:
        (tmp / "a").write_text("second")
    assert contents(target) == {"a": "first"}
    with atomic_folder(target, keep=lambda folder: False) as tmp:  # not good: replaced
        (tmp / "a").write_text("third")
    assert contents(target) == {"a": "third"} and [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_remove_folder_and_stale_temporaries(tmp_path):
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "x").write_text("x")
    remove_folder(tmp_path / "gone")
    # What writers killed outright leave: a partial file and folder, a folder moved aside whose
    # replacement is in place (delete it), and one whose replacement never arrived (restore it).
    (tmp_path / ".a.txt.partial-0123abcd").write_text("half")
    (tmp_path / ".m.partial-0123abcd").mkdir()
    for name in ("replaced", ".replaced.old-0123abcd", ".lost.old-89abcdef"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w").write_text(name)
    (tmp_path / ".mine.partial").write_text("not ours")  # no 8-hex suffix: not our naming
    remove_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mine.partial", "lost", "replaced"]
    assert (tmp_path / "lost" / "w").read_text() == ".lost.old-89abcdef"
    remove_stale(tmp_path / "missing")  # nothing to do


def test_default_permissions_follow_the_umask(tmp_path):
    path = tmp_path / "w"
    path.write_bytes(b"")
    os.chmod(path, 0o600)  # as safetensors creates its files
    old = os.umask(0o027)
    try:
        default_permissions(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
