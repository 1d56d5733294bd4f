"""Atomic writes: a failed write leaves the old file whole; logs tolerate a torn last line."""

import json
import os
import stat

import pytest

from stable_rlhf.io import append_jsonl, atomic_dir, atomic_path, atomic_write_json, atomic_write_text, read_jsonl


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["summary.json"]


def test_written_files_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as d:
        (d / "weights").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as d:
            (d / "weights").write_text("new-partial")
            raise KeyboardInterrupt
    assert (target / "weights").read_text() == "old"
    with atomic_dir(target) as d:
        (d / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_read_jsonl_skips_a_torn_last_line_only(tmp_path):
    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, {"step": 1})
    append_jsonl(log, {"step": 2})
    with open(log, "a") as f:
        f.write('{"step": 3, "lo')
    assert read_jsonl(log) == [{"step": 1}, {"step": 2}]
    log.write_text('{"step": 1}\n{bad\n{"step": 3}\n')
    with pytest.raises(json.JSONDecodeError):
        read_jsonl(log)
