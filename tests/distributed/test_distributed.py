"""Beyond one process, on CPU: verl's trainers at 2 ranks (gloo collectives on the CPU platform), on
2 nodes of this machine joined by ``recipe.retool.cluster`` (the code the cloud path runs, given the
cluster information Modal would give), and the sharded checkpoints they write: saved, resumed and
merged, checked by value."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_runs import run_sft, sft_command, sft_losses

from recipe.retool.metrics import parse_records
from recipe.retool.processes import free_port
from recipe.retool.stages import merge_command, run_dir

ROOT = Path(__file__).resolve().parents[2]
# fp32 on both sides; 2 ranks reduce the same sums in another order: agreement to rounding
LOSS_TOLERANCE = 1e-5
STEPS = 3
TWO_NODES = "127.0.0.1,127.0.0.1"  # what Modal's cluster_info.container_ips would list, here one host twice


def _data_dir(sample_data) -> Path:
    return Path(sample_data["sft"]).parents[1]


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir, sample_data, tmp_path_factory):
    """The reference: the miniature's SFT in one process, 3 steps, checkpoint at the end."""
    out = tmp_path_factory.mktemp("one_rank")
    losses = run_sft(tiny_model_dir, _data_dir(sample_data), out, "r1", STEPS, [f"trainer.save_freq={STEPS}"])
    assert sorted(losses) == [1, 2, 3]
    return losses, Path(run_dir(out, "sft", "r1"))


def _assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=LOSS_TOLERANCE), (got, want)


def _merge(shard_dir: Path, target: Path) -> Path:
    proc = subprocess.run(merge_command(shard_dir, target, python=sys.executable), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


def _load(model_dir: Path, dtype: torch.dtype | None = torch.float32):
    """A Hugging Face model from a directory, in ``dtype`` (None: as saved)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or "auto").eval()


def _shards(step_dir: Path, world_size: int) -> list[Path]:
    shards = sorted(step_dir.glob("model_world_size_*_rank_*.pt"))
    assert [p.name for p in shards] == [f"model_world_size_{world_size}_rank_{r}.pt" for r in range(world_size)]
    return shards


def _score(model, tokenizer_dir: Path) -> float:
    """The model's mean next-token loss on a fixed text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok("Compute 17 * 23 with the tool, then answer \\boxed{391}.", return_tensors="pt").input_ids
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _full_weights(step_dir: Path, world_size: int) -> dict[str, torch.Tensor]:
    """A checkpoint's parameters in the dtype they were trained in, joined from its shards (FSDP2
    shards each parameter along its first dimension): the test's own reading, beside verl's merger."""
    shards = [torch.load(p, map_location="cpu", weights_only=False) for p in _shards(step_dir, world_size)]
    return {name: torch.cat([s[name].to_local() if hasattr(s[name], "to_local") else s[name] for s in shards], dim=0)
            for name in shards[0]}


def _assert_merge_joins_the_shards(step_dir: Path, merged: dict[str, torch.Tensor]) -> None:
    """verl's merger output is the checkpoint's shards joined, value for value. verl 0.9.1's merger
    writes bfloat16 whatever the training dtype (docs/verl_patches.md), so the comparison is in bf16."""
    full = _full_weights(step_dir, 2)
    assert set(full) == set(merged)
    for name, tensor in full.items():
        assert merged[name].dtype == torch.bfloat16 and tensor.shape == merged[name].shape, name
        assert torch.equal(tensor.to(torch.bfloat16), merged[name]), name


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sft_at_two_ranks_matches_one_rank_and_its_shards_resume_and_merge(one_rank, tiny_model_dir, sample_data,
                                                                             tmp_path):
    want, one_rank_dir = one_rank
    data, two = _data_dir(sample_data), ["trainer.n_gpus_per_node=2"]
    # uninterrupted: 3 steps at 2 ranks
    straight = run_sft(tiny_model_dir, data, tmp_path, "straight", STEPS, [*two, f"trainer.save_freq={STEPS}"])
    _assert_same_losses(straight, want)
    # interrupted: 2 steps with a checkpoint of 2 shards, then a second launch resumes it for the third
    run_sft(tiny_model_dir, data, tmp_path, "resumed", 2, [*two, "trainer.save_freq=2"], log="first")
    run = Path(run_dir(tmp_path, "sft", "resumed"))
    _shards(run / "global_step_2", 2)
    resumed = run_sft(tiny_model_dir, data, tmp_path, "resumed", STEPS, [*two, f"trainer.save_freq={STEPS}"])
    latest = (run / "metrics.jsonl").read_text().splitlines(keepends=True)  # the second launch's file
    assert list(parse_records(latest, "metrics.jsonl")) == [3]  # it trained step 3 only
    # weights, optimizer state and data position came back whole: the same run, bit for bit
    assert resumed == straight
    final = _full_weights(run / f"global_step_{STEPS}", 2)
    straight_final = _full_weights(Path(run_dir(tmp_path, "sft", "straight")) / f"global_step_{STEPS}", 2)
    assert all(torch.equal(final[k], v) for k, v in straight_final.items())

    # verl's merger joins the 2 shards into a Hugging Face model that loads and scores as the
    # one-rank run's merged model does
    merged_dir = _merge(run / f"global_step_{STEPS}", tmp_path / "merged_resumed")
    _assert_merge_joins_the_shards(run / f"global_step_{STEPS}", _load(merged_dir, None).state_dict())
    reference_dir = _merge(one_rank_dir / f"global_step_{STEPS}", tmp_path / "merged_one_rank")
    assert _score(_load(merged_dir), tiny_model_dir) == pytest.approx(_score(_load(reference_dir), tiny_model_dir),
                                                                      rel=1e-4)
    # the trained fp32 weights of 1 and 2 ranks: rounding of another reduction order, which Adam
    # enlarges only where it divides a near-zero gradient by its near-zero scale; training itself
    # moved the weights 50 times as far
    one = _full_weights(one_rank_dir / f"global_step_{STEPS}", 1)
    assert one.keys() == final.keys()
    assert max(float((final[k] - v).abs().max()) for k, v in one.items()) < 1e-4
    base = _load(tiny_model_dir).state_dict()
    assert max(float((v - base[k]).abs().max()) for k, v in one.items() if k in base) > 5e-3


def _experiment(**kw):
    from recipe.retool.cloud.launcher import load_experiment

    return load_experiment(ROOT / "config" / "experiments" / "default.yaml", [f"{k}={v}" for k, v in kw.items()],
                           environ={})


def _node(stage: str, rank: int, port: int, cmd: list[str], env: dict, log: Path, **node) -> subprocess.Popen:
    """One node of a two-node cluster on this machine: the command a Modal cluster's container runs
    (``launcher.node_command``), given the rank and addresses Modal would give it."""
    from recipe.retool.cloud.launcher import node_command

    args = node_command(_experiment(gpus=1, nodes=2), stage, rank, TWO_NODES.split(","), cmd, port=port, **node)
    return subprocess.Popen([sys.executable, *args[1:]], cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def _finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:  # SIGTERM first: the runner then stops its Ray processes and its command
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
    tails = "\n".join(f"--- {log.name}\n" + log.read_text()[-3000:] for log in logs)
    assert codes == [0] * len(procs), tails


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sft_on_two_nodes_through_the_cluster_runner(one_rank, tiny_model_dir, sample_data, tmp_path):
    """torchrun's multi-node rendezvous on this machine: 2 nodes of 1 rank each, started by the
    same join code as Modal's clustered SFT; the losses are the one-rank run's."""
    want, _ = one_rank
    cmd = sft_command(tiny_model_dir, _data_dir(sample_data), tmp_path, "n2", STEPS,
                      ["trainer.nnodes=2", "trainer.n_gpus_per_node=1", f"trainer.save_freq={STEPS}"])
    port, logs = free_port(), [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    procs = [_node("sft", rank, port, cmd, dict(os.environ), logs[rank]) for rank in (0, 1)]
    _finish(procs, logs, timeout=500)
    run = Path(run_dir(tmp_path, "sft", "n2"))
    _shards(run / f"global_step_{STEPS}", 2)
    _assert_same_losses(sft_losses(run), want)


def _mini_grpo(out: Path, *args: str) -> list[str]:
    return [sys.executable, "scripts/lab/mini_grpo.py", "--out", str(out), "--device", "cpu", "--steps", "1", *args]


@pytest.mark.slow
@pytest.mark.root  # mini_grpo starts our sandbox server
@pytest.mark.timeout(1200)
def test_grpo_at_two_ranks_shards_resumes_and_merges(tmp_path):
    """verl's GRPO loop with the actor and reference over 2 ranks and 2 rollout replicas (hf_dev),
    our tool, sandbox and reward: a checkpoint of 2 shards, a resumed launch, a merged model."""
    # 4 prompts a step (8 trajectories): verl's balancer sends a new trajectory to the least busy
    # replica, at random among equals, so a handful of requests in a row could all land on one
    proc = subprocess.run(_mini_grpo(tmp_path, "--extra", "trainer.n_gpus_per_node=2", "ray_kwargs.ray_init.num_gpus=2",
                                     "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4"),
                          cwd=ROOT, capture_output=True, text=True, timeout=1150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["checkpoints"] == ["global_step_1", "global_step_2"]
    launches = (summary["run1"], summary["run2_resumed"])
    for run, step in zip(launches, ("1", "2")):
        # two replicas, both generated; the tool reached our sandbox; the reward scored
        assert len(run["requests_per_replica"]) == 2 and min(run["requests_per_replica"]) > 0, run
        assert run["sandbox_code_runs"] > 0 and -1.0 < run["steps"][step]["critic/score/max"] <= 1.0
        # the rollout's log-probs are the actor's: in the resumed launch, the actor restored from its
        # 2 shards and the weights the replicas were sent agree to fp32 rounding
        assert run["steps"][step]["training/rollout_probs_diff_max"] < 1e-3

    actor = tmp_path / "ckpt" / "grpo-experiments" / "mini" / "global_step_2" / "actor"
    _assert_merge_joins_the_shards(actor, _load(_merge(actor, tmp_path / "merged"), None).state_dict())


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.timeout(1200)
def test_grpo_on_a_ray_cluster_of_two_nodes(tmp_path):
    """A Ray cluster of two nodes on this machine (a head and a worker, one trainer slot each), joined
    by the cluster runner with the information Modal gives; verl's GRPO loop with trainer.nnodes=2
    needs both nodes' slots, and runs our tool, sandbox and reward across them."""
    env = {**os.environ, "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    port, logs = free_port(), [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    # gpus=1: one logical trainer slot per node (the CPU platform's GPU); cpus: Ray's scheduling slots
    worker = _node("grpo", 1, port, [], env, logs[1], cpus=8)
    head = _node("grpo", 0, port, _mini_grpo(tmp_path / "run", "--skip-resume", "--extra", "trainer.nnodes=2",
                                              "trainer.n_gpus_per_node=1"), env, logs[0], cpus=8)
    _finish([head, worker], logs, timeout=1100)
    text = logs[0].read_text()
    assert "2 nodes joined (16 CPU, 2 GPU)" in text and "Ray head stopped" in text
    assert "the head is gone; leaving" in logs[1].read_text()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    run = summary["run1"]
    assert "1" in run["steps"] and run["sandbox_code_runs"] > 0, run
    assert len(run["requests_per_replica"]) == 2, run  # a rollout replica on each node's slot
    assert run["steps"]["1"]["training/rollout_probs_diff_max"] < 1e-3
