"""The journal: durable appends, torn last lines tolerated, corruption refused; atomic snapshots."""

import pytest

from evomerge.search.journal import Journal, JournalError, read_snapshot, write_snapshot


def test_round_trip_in_order(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        for i in range(5):
            j.append({"kind": "ask", "id": i, "x": [0.1 * i, float("inf")]})
    records = Journal(path).read()
    assert [r["id"] for r in records] == list(range(5))
    assert records[3]["x"] == [pytest.approx(0.3), float("inf")]
    assert path.read_text().count("\n") == 5


def test_torn_last_line_is_skipped_then_cut_before_the_next_append(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        j.append({"kind": "start"})
        j.append({"kind": "ask", "id": 0})
    with open(path, "ab") as f:
        f.write(b'{"kind": "result", "id": 0, "sco')  # a crash in the middle of a write
    assert [r["kind"] for r in Journal(path).read()] == ["start", "ask"]
    with Journal(path) as j:
        j.append({"kind": "result", "id": 0})
    assert [r["kind"] for r in Journal(path).read()] == ["start", "ask", "result"]
    assert "sco" not in path.read_text()


def test_corruption_before_the_end_is_refused(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"kind": "start"}\nnot json\n{"kind": "end"}\n')
    with pytest.raises(JournalError, match="line 2"):
        Journal(path).read()
    path.write_text('{"kind": "start"}\n[1, 2]\n')
    with pytest.raises(JournalError, match="not a journal record"):
        Journal(path).read()


def test_record_needs_a_kind(tmp_path):
    with Journal(tmp_path / "j.jsonl") as j, pytest.raises(ValueError, match="kind"):
        j.append({"id": 1})


def test_missing_journal_reads_empty(tmp_path):
    assert Journal(tmp_path / "none.jsonl").read() == []


def test_snapshot_atomic_replace(tmp_path):
    path = tmp_path / "snapshot.json"
    assert read_snapshot(path) is None
    write_snapshot(path, {"a": 1})
    write_snapshot(path, {"a": 2, "nested": {"x": [1.5]}})
    assert read_snapshot(path) == {"a": 2, "nested": {"x": [1.5]}}
    assert not (tmp_path / "snapshot.json.tmp").exists()
    (tmp_path / "snapshot.json.tmp").write_text("{half")  # a crash before the rename
    assert read_snapshot(path)["a"] == 2
    path.write_text("{broken")
    with pytest.raises(JournalError, match="snapshot"):
        read_snapshot(path)
