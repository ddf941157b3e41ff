"""kvae.files: atomic writes, JSON objects read back, and a killed writer's leftovers removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvae import files


def test_atomic_write_json_writes_indented_json_with_a_final_newline(tmp_path):
    path = tmp_path / "sub" / "result.json"
    files.atomic_write_json(path, {"nll": 90.5, "k": [1, 2]})
    assert path.read_text() == json.dumps({"nll": 90.5, "k": [1, 2]}, indent=2) + "\n"
    files.atomic_write_json(path, {"a": 1}, indent=None)
    assert path.read_text() == '{"a": 1}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]  # no temporary left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    files.atomic_write_json(path, {"old": True})
    with pytest.raises(TypeError):
        files.atomic_write_json(path, {"new": object()})  # not JSON: fails before anything is written
    with pytest.raises(RuntimeError):
        with files.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_read_json_object(tmp_path):
    assert files.read_json_object(tmp_path / "missing.json") == {}
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="is not a JSON object"):
        files.read_json_object(tmp_path / "list.json")
    with pytest.raises(ValueError, match="cannot read"):
        files.read_json_object(tmp_path / "bad.json")


@pytest.mark.skipif(os.name == "nt", reason="uses a POSIX process id")
def test_remove_stale_temps_removes_only_the_temporaries_of_finished_processes(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f".tmp-{done.stdout.strip()}-abc-model.keras"
    live = tmp_path / f".tmp-{os.getpid()}-def-model.keras"
    kept = tmp_path / "model.keras"
    for path in (stale, live, kept):
        path.write_text("x")
    assert files.remove_stale_temps(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, kept.name])
