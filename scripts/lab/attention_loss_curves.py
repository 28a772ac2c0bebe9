"""Loss curves of two training paths through verl's SFT trainer, on the same data and seed.

    python scripts/lab/attention_loss_curves.py --out OUT [--candidate packed|fused] [--device cpu|gpu] [--steps 300]
                                            [--dtype fp32|bf16] [--tol T]

Runs ``python -m recipe.retool.train sft`` three times with the miniature's SFT config
(``recipe/retool/dev/config/mini_sft[_gpu].yaml``): once as configured (SDPA over padded
micro-batches, verl's log-probs from the full logits), once through the candidate path, and once as
configured with the learning rate moved by 1e-4 (relative): the noise floor, how far two runs drift
apart from a rounding-sized change alone. The candidates:

- ``packed``: ``retool_packed`` over verl's remove-padding rows (the micro-batch's sequences
  concatenated in one row, attended within each sequence). On CPU the packed path runs SDPA once per
  sequence, so the comparison covers verl's packing and our sequence boundaries (fp32: the curves
  should agree to rounding); on a GPU in bf16 it also covers PyTorch's varlen flash-attention kernel
  (and cuDNN's, for a micro-batch of one sequence on Hopper).
- ``fused``: verl's fused log-prob kernel, which never builds the logits (``retool.kernels``): its
  torch backend on CPU over padded batches; on a GPU, what the recipe runs there — its Triton
  backend plus Liger's kernels over packed rows (``retool_packed``), so packing changes too.

Every run passes ``retool.kernels=off``: the baseline keeps verl's defaults, and each candidate sets
its own switches.

Prints the losses side by side, how many leading steps agree to rounding, the mean losses over
windows of steps, and writes OUT/summary.json; exits 1 when the first step already differs or a
window's mean differs by more than the noise floor's largest window difference (or ``--tol``, if larger).

Without ``--model`` / ``--data`` it builds the miniature's task data (seeded, ReTool-SFT format,
through the recipe's converters and prefilter) and a random-init model of the miniature's shape.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from recipe.retool.perf.kernels import PACKED_SFT, fused_sft_overrides  # noqa: E402

CANDIDATES = {"packed": lambda device: PACKED_SFT, "fused": fused_sft_overrides}


def sft_losses(model: Path, data_dir: Path, out: Path, name: str, config: Path, steps: int,
               extra: list[str], timeout: float = 3600) -> dict[int, float]:
    """Per-step training losses of one run of verl's SFT trainer (from its metrics file)."""
    from recipe.retool.metrics import read_metrics
    from recipe.retool.stages import run_dir, train_command

    cmd = train_command("sft", str(model), data_dir, out / name, name, str(config),
                        [f"trainer.total_training_steps={steps}", *extra], python=sys.executable)
    log = out / f"{name}.log"
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: verl's SFT trainer exited {proc.returncode}; last lines of {log}:\n"
                           + "\n".join(text.splitlines()[-25:]))
    metrics = read_metrics(run_dir(out / name, "sft", name))
    losses = {step: m["train/loss"] for step, m in metrics.items() if "train/loss" in m}
    if sorted(losses) != list(range(1, steps + 1)):
        raise RuntimeError(f"{name}: expected losses for steps 1..{steps} in its metrics file, found {len(losses)}")
    return losses


def compare(a: dict[int, float], b: dict[int, float], window: int = 50, same: float = 1e-5) -> dict[str, float]:
    """Step by step, and over windows of ``window`` steps. Two runs that differ only in rounding
    agree step by step until the difference, amplified by every update, moves them onto different
    (equally good) trajectories; from there single steps differ by the batch-to-batch noise, and only
    windowed means are comparable. ``steps_same``: leading steps within ``same`` (relative)."""
    steps = sorted(a)
    rel = {s: abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in steps}
    worst = max(steps, key=rel.get)
    steps_same = next((i for i, s in enumerate(steps) if rel[s] > same), len(steps))
    windows = []
    for lo in range(0, len(steps), window):
        chunk = steps[lo:lo + window]
        ma, mb = (sum(r[s] for s in chunk) / len(chunk) for r in (a, b))
        windows.append({"steps": f"{chunk[0]}-{chunk[-1]}", "a": ma, "b": mb, "rel_diff": abs(ma - mb) / max(abs(ma), 1e-12)})
    return {"steps": len(steps), "steps_same": steps_same, "max_abs_diff": max(abs(a[s] - b[s]) for s in steps),
            "max_rel_diff": rel[worst], "worst_step": worst, "mean_rel_diff": sum(rel.values()) / len(rel),
            "windows": windows, "max_window_rel_diff": max(w["rel_diff"] for w in windows)}


def build_inputs(out: Path, device: str, seed: int) -> tuple[Path, Path]:
    """The miniature's task data (converted and prefiltered) and a random-init model of its shape."""
    from recipe.retool.dev.miniature import Miniature, MiniSettings

    run = Miniature(out / "mini", MiniSettings(seed=seed, device=device))
    for stage in (run.stage_task, run.stage_data, run.stage_model, run.stage_prefilter):
        stage()
    return run.base, out / "mini" / "data"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/lab/attention_loss_curves.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="default: %(default)s")
    p.add_argument("--steps", type=int, default=300, help="SFT steps per run (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="task seed (default: %(default)s)")
    p.add_argument("--window", type=int, default=50, help="steps per window of mean losses (default: %(default)s)")
    p.add_argument("--tol", type=float, default=0.03,
                   help="relative difference of windowed mean losses always allowed; more is allowed up to the noise floor's (default: %(default)s)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="FSDP compute dtype of both runs (default: fp32 on cpu, bf16 on gpu; verl's default is bf16)")
    p.add_argument("--candidate", choices=sorted(CANDIDATES), default="packed",
                   help="the path compared with padded SDPA: packed = retool_packed over remove-padding rows; "
                        "fused = verl's fused log-prob kernel (torch backend on cpu; on gpu Triton, plus Liger: what "
                        "retool.kernels=auto turns on) (default: %(default)s)")
    p.add_argument("--model", type=Path, help="model directory (default: a random-init model of the miniature's shape)")
    p.add_argument("--data", type=Path, help="data directory holding sft/train.parquet (default: the miniature's task)")
    args = p.parse_args(argv)
    tol = args.tol
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    # retool.kernels=off: the baseline keeps verl's defaults on a GPU too (auto would turn the fused
    # kernels on in every run); the candidate sets its own switches
    common = [f"++engine.mixed_precision.param_dtype={dtype}", "retool.kernels=off"]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    from recipe.retool import PACKAGE_DIR

    config = PACKAGE_DIR / "dev" / "config" / f"mini_sft{'_gpu' if args.device == 'gpu' else ''}.yaml"
    if args.model and args.data:
        model, data = args.model.resolve(), args.data.resolve()
    else:
        built_model, built_data = build_inputs(out, args.device, args.seed)
        model, data = (args.model or built_model), (args.data or built_data)
    from recipe.retool.train import compose, split_config_arg

    config_name, config_dir = split_config_arg(str(config))
    lr = float(compose(config_name, [], config_dir).optim.lr)
    # the noise floor: the baseline again with the learning rate moved by 1e-4 (relative), a change
    # of the same kind as rounding; its distance from the baseline is what chaos alone gives
    cand = args.candidate
    plans = [("padded_sdpa", []), (cand, CANDIDATES[cand](args.device)),
             ("padded_sdpa_lr_nudged", [f"optim.lr={lr * (1 + 1e-4)!r}"])]
    runs: dict[str, dict[int, float]] = {}
    seconds: dict[str, float] = {}
    for name, extra in plans:
        print(f"[{name}] {args.steps} steps of verl's SFT trainer …", flush=True)
        t0 = time.time()
        runs[name] = sft_losses(model, data, out, name, config, args.steps, [*common, *extra])
        seconds[name] = round(time.time() - t0, 1)
        print(f"[{name}] done in {seconds[name]:.0f}s: loss {runs[name][1]:.4f} → {runs[name][args.steps]:.4f}", flush=True)
    stats = compare(runs["padded_sdpa"], runs[cand], args.window)
    noise = compare(runs["padded_sdpa"], runs["padded_sdpa_lr_nudged"], args.window)
    print(f"\n| step | padded SDPA | {cand} | rel. diff |\n|---|---|---|---|")
    shown = sorted({1, stats["steps_same"], *range(max(1, args.steps // 10), args.steps + 1, max(1, args.steps // 10)), args.steps})
    for s in (s for s in shown if s in runs["padded_sdpa"]):
        a, b = runs["padded_sdpa"][s], runs[cand][s]
        print(f"| {s} | {a:.5f} | {b:.5f} | {abs(a - b) / max(abs(a), 1e-12):.1e} |")
    print(f"\n| steps | mean loss, padded SDPA | {cand} | rel. diff | padded, lr × (1 + 1e-4) | rel. diff (noise floor) |"
          "\n|---|---|---|---|---|---|")
    for w, n in zip(stats["windows"], noise["windows"], strict=True):
        print(f"| {w['steps']} | {w['a']:.4f} | {w['b']:.4f} | {w['rel_diff']:.1e} | {n['b']:.4f} | {n['rel_diff']:.1e} |")
    print(f"\n{dtype}: the first {stats['steps_same']} steps agree within 1e-5 (relative); then single steps differ by "
          f"up to {stats['max_rel_diff']:.1e} (step {stats['worst_step']}); windowed means by up to "
          f"{stats['max_window_rel_diff']:.1e} (tolerance {tol:g}); the nudged baseline agrees for "
          f"{noise['steps_same']} steps and its windowed means differ by up to {noise['max_window_rel_diff']:.1e}")
    summary = {"device": args.device, "dtype": dtype, "candidate": cand, "steps": args.steps, "seed": args.seed, "tolerance": tol, "seconds": seconds,
               **stats, "noise_floor": noise, "losses": {k: {str(s): v for s, v in r.items()} for k, r in runs.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    # the candidate must move the curve no further than a rounding-sized change does (or than --tol)
    ok = stats["steps_same"] >= 1 and stats["max_window_rel_diff"] <= max(tol, noise["max_window_rel_diff"])
    print("agree" if ok else "DISAGREE", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
