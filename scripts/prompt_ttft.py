"""Time to first token the way an mlx_lm user meets it: `mlx_lm.stream_generate` on a flash
dir, against llama.cpp's `eval` of the same prompt on the GGUF, in one run (issue 20).

Both contenders run in this process, one after the other, uncapped, with the compute threads
given (OMP_NUM_THREADS for mlx-flash's kernels, n_threads for llama.cpp). Each prompt is the
chat-templated request (a short one, and a long one of ~430 tokens); each is timed --runs
times and the best is kept. The flash model's first run also fills its neuron cache, so the
best run is a prompt over a full cache, as every later prompt of a session is.

  python scripts/prompt_ttft.py --model DIR --gguf MODEL.gguf --threads 1
"""

from __future__ import annotations

import argparse
import os
import time

SHORT = "Write a Python function that checks whether a number is prime."
LONG = SHORT + " " + " ".join(f"Also explain step {i} of the algorithm in detail, with an "
                              "example." for i in range(25))


def flash_ttft(model_dir: str, runs: int) -> dict[str, tuple[list[int], float]]:
    """{prompt name: (prompt ids, best seconds to the first token)} through mlx_lm."""
    from mlx_lm import stream_generate

    from mlx_flash import load

    model, tokenizer = load(model_dir)
    out = {}
    for name, text in (("short", SHORT), ("long", LONG)):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True)
        best = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            for _ in stream_generate(model, tokenizer, ids, max_tokens=1):
                pass
            best = min(best, time.perf_counter() - start)
        out[name] = (ids, best)
    return out


def llama_ttft(gguf: str, threads: int, runs: int, prompts: dict[str, list[int]]
               ) -> dict[str, tuple[list[int], float]]:
    """The same prompt ids (the flash tokenizer's template) through llama.cpp's eval."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                verbose=False)
    out = {}
    for name, ids in prompts.items():
        best = float("inf")
        for _ in range(runs):
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            best = min(best, time.perf_counter() - start)
        out[name] = (ids, best)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="flash model dir")
    p.add_argument("--gguf", help="the GGUF it was converted from (llama.cpp contender)")
    p.add_argument("--threads", type=int, default=1, help="compute threads of each contender")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before the kernels load
    rows = {"mlx-flash": flash_ttft(args.model, args.runs)}
    if args.gguf:
        prompts = {name: ids for name, (ids, _) in rows["mlx-flash"].items()}
        rows["llama.cpp"] = llama_ttft(args.gguf, args.threads, args.runs, prompts)
    print("| contender | " + " | ".join(f"{name} ({len(ids)} tokens)" for name, (ids, _)
                                        in rows["mlx-flash"].items()) + " |")
    print("|---" * (1 + len(rows["mlx-flash"])) + "|")
    for contender, cells in rows.items():
        print(f"| {contender} | " + " | ".join(f"{t:.2f} s" for _, t in cells.values()) + " |")


if __name__ == "__main__":
    main()
