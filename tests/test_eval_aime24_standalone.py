"""recipe.retool.eval_aime24_standalone: pass@k maths, tool formats, resume, retries, outputs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from math import comb

import pytest
from stub_openai_server import Script, StubServer

from recipe.retool import PACKAGE_DIR
from recipe.retool.data import rl_row, write_parquet
from recipe.retool.eval_aime24_standalone import EvalConfig, evaluate, pass_at_k, samples_path
from recipe.retool.sandbox.local import free_port


def test_pass_at_k_against_hand_computed_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(32, 3, 8) == pytest.approx(1 - comb(29, 8) / comb(32, 8))
    assert pass_at_k(5, 3, 3) == 1.0  # fewer wrong samples than k
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 4)


@pytest.fixture
def problems_parquet(tmp_path):
    rows = [rl_row(f"Problem alpha {i}: compute.", str(100 + i), "aime24", i, "test", "code_interpreter")
            for i in range(3)]
    path = tmp_path / "aime.parquet"
    write_parquet(rows, path)
    return path


def stub(script: Script) -> StubServer:
    return StubServer(script, free_port())


def config(tmp_path, llm, sandbox, data, **kw) -> EvalConfig:
    kw = {"samples": 4, "concurrency": 8, "max_retries": 3, **kw}
    return EvalConfig(model="stub", output=str(tmp_path / "out" / "aime.json"), base_url=llm.url,
                      sandbox_url=sandbox.url, data=str(data), **kw)


@pytest.mark.parametrize("mode", ["native", "hermes"])
def test_end_to_end_pass_at_k_and_outputs(tmp_path, sandbox_server, problems_parquet, mode):
    quotas = {"alpha 0": 0, "alpha 1": 1, "alpha 2": 4}
    llm = stub(Script({k: (str(100 + int(k[-1])), q) for k, q in quotas.items()}, mode=mode))
    try:
        cfg = config(tmp_path, llm, sandbox_server, problems_parquet)
        summary = asyncio.run(evaluate(cfg))
    finally:
        llm.stop()
    # hand-computed: problem pass@1 = 0, 1/4, 1 → 41.67%; pass@2 = 0, 1/2, 1 → 50%; pass@4 = 0, 1, 1 → 66.67%
    assert summary["pass_at_k"] == {"pass@1": 41.67, "pass@2": 50.0, "pass@4": 66.67}
    assert summary["mean_turns"] == 2 and summary["mean_tool_calls"] == 1 and summary["code_error_rate"] == 0
    assert summary["error_rate"] == 0 and summary["num_samples"] == 12
    assert [p["correct"] for p in summary["per_problem"]] == [0, 1, 4]
    assert summary["tokens"] == {"prompt": 12 * 2 * 10, "completion": 12 * 2 * 5}
    out = tmp_path / "out"
    assert json.loads((out / "aime.json").read_text())["pass_at_k"] == summary["pass_at_k"]
    assert (out / "aime.png").stat().st_size > 1000
    lines = samples_path(cfg.output).read_text().splitlines()
    assert len(lines) == 12
    rec = json.loads(lines[0])
    assert rec["transcript"][1]["role"] == "tool" and rec["transcript"][1]["content"].startswith("10")


def test_resume_never_repeats_or_loses_a_sample(tmp_path, sandbox_server, problems_parquet):
    script = Script({f"alpha {i}": (str(100 + i), 4) for i in range(3)})
    llm = stub(script)
    try:
        cfg = config(tmp_path, llm, sandbox_server, problems_parquet)
        first = asyncio.run(evaluate(EvalConfig(**{**cfg.__dict__, "limit": 2})))  # "killed" after 2 problems
        assert first["num_samples"] == 8
        path = samples_path(cfg.output)
        with path.open("a") as fh:
            fh.write('{"problem": 2, "sample": 0, "status": "ok", "cor')  # torn last line of a killed run
        before = script.requests
        summary = asyncio.run(evaluate(cfg))
        assert script.requests - before == 4 * 2  # only problem 2's four samples, two requests each
        assert summary["num_samples"] == 12 and summary["pass_at_k"]["pass@1"] == 100.0
        keys = [(r["problem"], r["sample"]) for r in map(json.loads, path.read_text().splitlines())]
        assert len(keys) == len(set(keys)) == 12  # every line parses: the torn line was cut, nothing lost
    finally:
        llm.stop()


def test_5xx_retried_and_persistent_failure_is_an_error_not_a_wrong_answer(tmp_path, sandbox_server, problems_parquet):
    script = Script({f"alpha {i}": (str(100 + i), 4) for i in range(3)}, fail_first=3, fail_always="alpha 2")
    llm = stub(script)
    try:
        cfg = config(tmp_path, llm, sandbox_server, problems_parquet, max_retries=2)
        summary = asyncio.run(evaluate(cfg))
    finally:
        llm.stop()
    per = {p["index"]: p for p in summary["per_problem"]}
    assert per[0]["correct"] == 4 and per[1]["correct"] == 4  # the first three 500s were retried away
    assert per[2]["n"] == 0 and per[2]["errors"] == 4 and per[2]["solve_rate"] is None
    assert summary["error_rate"] == round(4 / 12, 4)
    assert summary["pass_at_k"]["pass@1"] == 100.0  # errors are excluded, not counted wrong


def test_shell_wrapper_and_bad_data(tmp_path, sandbox_server):
    bad = tmp_path / "bad.parquet"
    write_parquet([{"question": "q"}], bad)
    proc = subprocess.run(["bash", str(PACKAGE_DIR / "evaluate_model.sh"), "m", str(tmp_path / "o.json"),
                           "http://127.0.0.1:9/v1", sandbox_server.url, "EMPTY", "--data", str(bad)],
                          capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "bad.parquet: missing column 'prompt'" in proc.stderr
