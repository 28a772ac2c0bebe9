"""A stand-in for pretraining: teach a random-init model to copy, before the miniature's SFT.

    python -m recipe.retool.dev.pretrain_copy MODEL_DIR [--steps 1500] [--lr 2e-3] [--seed 0]

ReTool starts from a pretrained language model, and the one skill of a pretrained model that the
recipe relies on most is copying: numbers from the problem into the program, the interpreter's
output into the answer. A random-init model has no such skill, and learning it from a few hundred
SFT steps is out of reach on a CPU (the "induction heads" that copy form late). So the miniature's
base model is pretrained here, briefly, on a generic objective with nothing of the task in it:
random token spans, some filler, the span again — only the repetition is predictable, so the loss
teaches copying and nothing else. Plain PyTorch (short sequences, large batches: a few minutes on
two CPU cores); the result is saved in place, in Hugging Face format.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def copy_batch(rng: random.Random, vocab: list[int], digits: list[int], batch: int, max_span: int = 12,
               max_filler: int = 10):
    """(input_ids, labels, attention_mask): span, filler, span again; loss on the second span only."""
    import torch

    rows = []
    for _ in range(batch):
        pool = digits if rng.random() < 0.5 else vocab  # numbers are what the task copies most
        span = [rng.choice(pool) for _ in range(rng.randint(4, max_span))]
        filler = [rng.choice(vocab) for _ in range(rng.randint(0, max_filler))]
        rows.append((span + filler + span, len(span) + len(filler)))
    width = max(len(seq) for seq, _ in rows)
    ids = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), -100, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, (seq, start) in enumerate(rows):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, start : len(seq)] = torch.tensor(seq[start:])
        mask[i, : len(seq)] = 1
    return ids, labels, mask


def pretrain_copy(model_dir: str | Path, steps: int = 1500, lr: float = 2e-3, batch: int = 64, seed: int = 0,
                  device: str = "cpu", log_every: int = 100) -> dict[str, float]:
    """Train ``model_dir`` in place on the copy objective; returns the first and last losses."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).train()
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    first = last = float("nan")
    started = time.time()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 50)
        ids, labels, mask = (t.to(device) for t in copy_batch(rng, vocab, digits, batch))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = float(loss.detach())
        first = last if step == 1 else first
        if step % log_every == 0 or step == steps:
            print(f"  [pretrain] step {step}/{steps} copy loss {last:.3f} ({time.time() - started:.0f}s)", flush=True)
    model.save_pretrained(model_dir)
    return {"steps": steps, "first_loss": round(first, 3), "final_loss": round(last, 3)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m recipe.retool.dev.pretrain_copy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    print(pretrain_copy(a.model_dir, a.steps, a.lr, seed=a.seed, device=a.device))


if __name__ == "__main__":
    main()
