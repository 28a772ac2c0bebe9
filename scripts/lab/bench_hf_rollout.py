"""Decode speed of the ``hf_dev`` rollout engine against transformers' own ``generate``, side by side.

    python scripts/lab/bench_hf_rollout.py [--device cpu|cuda] [--batch 1 8] [--new-tokens 64] [--hidden 64 --layers 2]

Same random-init Qwen2 model, same prompts, greedy decoding with no early stop, each measured after
a warm-up; prints tokens/s for both and their ratio per batch size.
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    import torch

    from recipe.retool.dev.hf_rollout import DevGenerator, Sampling
    from recipe.retool.dev.tokenizer import build_dev_tokenizer, save_tiny_qwen2

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ray", action="store_true", help="also time the same requests through an HFDevServer Ray actor")
    args = p.parse_args()

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    tmp = tempfile.mkdtemp()
    save_tiny_qwen2(tmp, build_dev_tokenizer(), hidden=args.hidden, layers=args.layers)
    engine = DevGenerator(tmp, device=args.device, dtype=dtype)
    server = _ray_server(tmp, args) if args.ray else None
    engine.eos_ids = [-1]  # never stop early: both sides decode exactly --new-tokens
    model = engine.model
    greedy = Sampling(temperature=0.0)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()  # warm-up
        sync()
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - start)
        return best

    print(f"device={args.device} dtype={dtype} hidden={args.hidden} layers={args.layers} "
          f"prompt={args.prompt_tokens} new={args.new_tokens}")
    for batch in args.batch:
        prompts = [[(7 * i + j) % 1000 + 10 for j in range(args.prompt_tokens)] for i in range(batch)]
        ids = torch.tensor(prompts, device=args.device)
        ours = timed(lambda p=prompts: engine.generate(p, [args.new_tokens] * len(p), greedy))
        theirs = timed(lambda i=ids: model.generate(input_ids=i, attention_mask=torch.ones_like(i), do_sample=False,
                                                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                    pad_token_id=0, eos_token_id=None))
        n = batch * args.new_tokens
        if server is not None:
            actor = timed(lambda p=prompts: _ray_generate(server, p, args.new_tokens))
            print(f"batch {batch:3d}: hf_dev in a Ray actor {n / actor:9.1f} tok/s ({actor * 1000 / args.new_tokens:6.2f} "
                  f"ms/step), in-process is {actor / ours:5.2f}x faster")
        print(f"batch {batch:3d}: hf_dev {n / ours:9.1f} tok/s ({ours * 1000 / args.new_tokens:6.2f} ms/step)   "
              f"transformers.generate {n / theirs:9.1f} tok/s ({theirs * 1000 / args.new_tokens:6.2f} ms/step)   "
              f"ratio {theirs / ours:5.2f}x")


def _ray_server(model_dir: str, args):
    import ray

    from recipe.retool.dev.hf_rollout import HFDevServer

    ray.init(num_cpus=4, include_dashboard=False)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    server = ray.remote(HFDevServer).options(max_concurrency=1000, num_cpus=0, num_gpus=1 if device == "cuda" else 0)
    return server.remote(model_dir, prompt_length=4096, response_length=args.new_tokens, max_model_len=None,
                         device=device, dtype="bfloat16" if device == "cuda" else "float32")


def _ray_generate(server, prompts, new_tokens: int) -> None:
    import ray

    params = {"temperature": 0, "top_p": 1.0, "top_k": -1, "max_tokens": new_tokens}
    ray.get([server.generate.remote(p, dict(params), f"r{i}") for i, p in enumerate(prompts)])


if __name__ == "__main__":
    main()
