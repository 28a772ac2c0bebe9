"""The miniature's task generator: seeded, disjoint splits, right answers, real source formats."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from recipe.retool.data import prepare_all
from recipe.retool.dev.mini_task import KINDS, generate, write_sources


def test_same_seed_same_files_other_seed_other_problems(tmp_path):
    a = write_sources(tmp_path / "a", seed=3, sft=50, rl=20, test=10)
    b = write_sources(tmp_path / "b", seed=3, sft=50, rl=20, test=10)
    c = write_sources(tmp_path / "c", seed=4, sft=50, rl=20, test=10)
    for key in a:
        assert open(a[key]).read() == open(b[key]).read()
    assert open(a["aime24"]).read() != open(c["aime24"]).read()


def test_splits_are_disjoint_and_cover_every_kind():
    splits = generate(0, {"sft": 300, "rl": 100, "test": 50})
    texts = {name: {p.text for p in probs} for name, probs in splits.items()}
    assert sum(len(t) for t in texts.values()) == 450  # distinct within and across splits
    assert not (texts["sft"] & texts["test"]) and not (texts["rl"] & texts["test"]) and not (texts["sft"] & texts["rl"])
    for probs in splits.values():
        assert {p.kind for p in probs} == set(KINDS)


def test_answers_are_what_the_code_prints(capsys):
    for p in generate(1, {"test": 40})["test"]:
        exec(p.code, {})  # our own generated one-liners
        assert capsys.readouterr().out.strip() == str(p.answer), p


def test_sources_go_through_the_real_converters(tmp_path):
    paths = write_sources(tmp_path / "src", seed=0, sft=40, rl=20, test=10, tool_share=0.5)
    out = prepare_all(tmp_path / "data", paths)
    sft = pd.read_parquet(out["sft"])
    calls = sft["extra_info"].map(lambda e: e["num_tool_calls"])
    assert len(sft) == 40 and 0 < (calls > 0).sum() < 40  # both behaviours, as a base model would
    with_tool = sft[calls > 0].iloc[0]["messages"]
    assert [m["role"] for m in with_tool] == ["user", "assistant", "tool", "assistant"]
    assert with_tool[1]["tool_calls"][0]["function"]["arguments"]["code"].startswith("print(")
    rl, test = pd.read_parquet(out["rl"]), pd.read_parquet(out["aime24"])
    assert len(rl) == 20 and len(test) == 10
    assert "Answer:" not in rl.iloc[0]["prompt"][0]["content"]  # DAPO's wrapper stripped by the converter
    task = json.loads((tmp_path / "src" / "task.json").read_text())
    assert task["seed"] == 0 and task["tool_share"] == 0.5


def test_tool_share_bounds(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="tool_share"):
        write_sources(tmp_path, tool_share=1.5)


@pytest.mark.slow  # tens of seconds: a real trainer launch or a CLI in its own process
def test_asking_for_more_problems_than_exist_is_an_error_not_a_hang():

    with pytest.raises(ValueError, match="distinct problems"):
        generate(0, {"test": 10**6})


def test_default_sizes_leave_every_kind_in_the_test_split():
    from recipe.retool.dev.miniature import MiniSettings

    s = MiniSettings()
    splits = generate(s.seed, {"sft": s.sft_traces, "rl": s.rl_prompts, "test": s.test_problems})
    assert {p.kind for p in splits["test"]} == set(KINDS)
