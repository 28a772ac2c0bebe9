"""verl's metrics read from its file logger: records merge per step, launches of a resumed run add up,
bad lines are named, a file being written is followed line by line."""

from __future__ import annotations

import json

import pytest

from recipe.retool.metrics import MetricsTail, metrics_path, parse_records, read_metrics, set_aside


def _write(path, records, end="\n"):
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:-1]) + json.dumps(records[-1]) + end)


def test_records_of_a_step_merge_and_only_numbers_are_kept(tmp_path):
    _write(metrics_path(tmp_path), [{"step": 1, "data": {"train/loss": 2.5, "note": "text", "ok": True}},
                                    {"step": 1, "data": {"val-core/x/acc/mean@4": 0.25}},
                                    {"step": 2, "data": {"train/loss": "nan"}}])
    m = read_metrics(tmp_path)
    assert m[1] == {"train/loss": 2.5, "ok": 1.0, "val-core/x/acc/mean@4": 0.25}
    assert list(m) == [1, 2] and m[2]["train/loss"] != m[2]["train/loss"]  # nan


def test_a_resumed_run_keeps_the_earlier_launches(tmp_path):
    path = metrics_path(tmp_path)
    _write(path, [{"step": 1, "data": {"a": 1}}, {"step": 2, "data": {"a": 2}}])
    assert set_aside(path).name == "metrics.1.jsonl" and not path.exists()
    _write(path, [{"step": 2, "data": {"a": 20}}, {"step": 3, "data": {"a": 3}}])
    assert set_aside(path).name == "metrics.2.jsonl"
    _write(path, [{"step": 4, "data": {"a": 4}}])
    assert {s: m["a"] for s, m in read_metrics(path).items()} == {1: 1, 2: 20, 3: 3, 4: 4}


def test_a_bad_line_names_the_file_and_line(tmp_path):
    path = metrics_path(tmp_path)
    path.write_text('{"step": 1, "data": {"a": 1}}\nstep:2 - a:2\n{"step": 3, "data": {}}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON line"):
        read_metrics(path)
    with pytest.raises(ValueError, match=r"x:1: expected"):
        parse_records(['{"data": {}}\n'], "x")


def test_a_torn_last_line_is_skipped_and_the_tail_follows_the_writer(tmp_path):
    path = metrics_path(tmp_path)
    tail = MetricsTail(path)
    assert tail.new() == []
    with path.open("w") as fh:
        fh.write('{"step": 1, "data": {"a": 1}}\n{"step": 2, "da')
        fh.flush()
        assert read_metrics(path) == {1: {"a": 1.0}}
        assert tail.new() == [(1, {"a": 1.0})]
        fh.write('ta": {"a": 2}}\n')
        fh.flush()
        assert tail.new() == [(2, {"a": 2.0})] and tail.new() == []


def test_the_tail_of_a_resumed_launch_skips_the_earlier_file_and_survives_its_set_aside(tmp_path):
    """A resumed launch's tail starts while the earlier launch's file is still there; the launch then
    renames it (set_aside) and writes a new one, possibly between the tail's looks."""
    path = metrics_path(tmp_path)
    _write(path, [{"step": 1, "data": {"a": 1}}, {"step": 2, "data": {"a": 2}}])
    tail = MetricsTail(path)
    assert tail.new() == []  # the earlier launch's records are not news
    set_aside(path)
    assert tail.new() == []  # the file is gone for a moment: no error
    _write(path, [{"step": 3, "data": {"a": 3}}])
    assert tail.new() == [(3, {"a": 3.0})]  # read from the top of the new file, not the old offset
    with path.open("a") as fh:
        fh.write(json.dumps({"step": 4, "data": {"a": 4}}) + "\n")
    assert tail.new() == [(4, {"a": 4.0})] and tail.new() == []
