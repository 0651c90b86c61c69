"""tuneline/artifacts.py: atomic outs, stale temporaries, sizes."""

import os

import pytest

from tuneline.artifacts import atomic_dir, atomic_file, parse_size
from tuneline.errors import TunelineError


# -------------------------------------------------------------------------------------------- artifacts


class TestArtifacts:
    def test_atomic_dir_exception_leaves_target_absent(self, tmp_path):
        target = tmp_path / "out" / "models" / "base"
        with pytest.raises(KeyboardInterrupt):
            with atomic_dir(target) as tmp:
                (tmp / "half.bin").write_bytes(b"x" * 100)
                raise KeyboardInterrupt  # a BaseException, as when a stage is killed by Ctrl-C
        assert not target.exists()
        assert list(target.parent.iterdir()) == []

    def test_atomic_dir_success_replaces_existing(self, tmp_path):
        target = tmp_path / "base"
        target.mkdir()
        (target / "old.txt").write_text("old")
        with atomic_dir(target) as tmp:
            assert tmp != target and tmp.parent == target.parent and list(tmp.iterdir()) == []
            (tmp / "new.txt").write_text("new")
            assert (target / "old.txt").exists()  # the old out stays complete until the new one is done
        assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no *.tmp-* or *.tmp-old left

    def test_temporaries_of_killed_writers_are_removed_by_the_next_writer(self, tmp_path):
        import subprocess

        dead = subprocess.Popen(["true"])
        dead.wait()  # a PID that no longer runs, like a stage killed with SIGKILL
        target = tmp_path / "base"
        (tmp_path / f"base.tmp-{dead.pid}-x1").mkdir()  # a killed atomic_dir
        (tmp_path / f"base.tmp-{dead.pid}-old").mkdir()  # killed between the two renames
        (tmp_path / f"base.tmp-{dead.pid}-x2").write_text("half")  # a killed atomic_file
        (tmp_path / f"base.tmp-{os.getppid()}-x3").mkdir()  # a writer still running: left alone
        (tmp_path / "base2.tmp-1-x").mkdir()  # another out's: left alone
        with atomic_dir(target) as tmp:
            (tmp / "f").write_text("1")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base", f"base.tmp-{os.getppid()}-x3", "base2.tmp-1-x"]

    def test_atomic_dir_creates_new(self, tmp_path):
        target = tmp_path / "a" / "b"
        with atomic_dir(target) as tmp:
            (tmp / "f").write_text("1")
        assert (target / "f").read_text() == "1"
        assert (target.stat().st_mode & 0o777) != 0o700  # not left private like a mkdtemp dir

    def test_atomic_file(self, tmp_path):
        target = tmp_path / "metrics" / "m.json"
        with pytest.raises(ValueError):
            with atomic_file(target) as tmp:
                tmp.write_text("partial")
                raise ValueError
        assert list(target.parent.iterdir()) == []
        with atomic_file(target) as tmp:
            tmp.write_text("done")
        assert target.read_text() == "done" and list(target.parent.iterdir()) == [target]

    @pytest.mark.parametrize(
        "text, expected",
        [("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("500MiB", 500 * 2**20), ("1.5gb", 1_500_000_000),
         ("64 KB", 64_000), ("100B", 100)],
    )
    def test_parse_size(self, text, expected):
        assert parse_size(text, "convert.max_shard_size") == expected

    def test_parse_size_error_names_key(self):
        with pytest.raises(TunelineError, match=r"convert\.max_shard_size: 'two gigs' is not a size"):
            parse_size("two gigs", "convert.max_shard_size")
