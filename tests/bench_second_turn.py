#!/usr/bin/env python3
"""Second turn of a conversation through the swarm, with and without remembering the chosen
answer: how many of the turn-2 prompt tokens are decoded again, and the turn-2 time to first
token. The text goes through the chat template both times, as a client's history does. Not a
test; results go to BENCHMARKS.md.   python tests/bench_second_turn.py [--model FILE.gguf]
"""
import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import localswarm as ls  # noqa: E402


class WithoutRemember:
    """The engine as the swarm saw it before answers were remembered: no `remember`."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        if name == "remember":
            raise AttributeError(name)
        return getattr(self._engine, name)


def conversation(swarm, task: int, answer_tokens: int) -> dict:
    first = [{"role": "user", "content": f"Task {task}: write a Python function that parses a CSV line "
                                          "into fields, handling quoted fields. Explain it."}]
    a1 = swarm.answer(ls.ChatRequest(messages=first, params=ls.SamplingParams(temperature=0.7),
                                     max_tokens_requested=answer_tokens))
    turn2 = first + [{"role": "assistant", "content": a1.text}, {"role": "user", "content": "Now add type hints."}]
    a2 = swarm.answer(ls.ChatRequest(messages=turn2, params=ls.SamplingParams(), max_tokens_requested=1))
    return {"answer": a1.completion_tokens, "prompt2": a2.prompt_tokens, "decoded2": a2.prompt_tokens - a2.cached_tokens,
            "ttft2": max(r.ttft for r in a2.results)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=ls.starter_model_path())
    ap.add_argument("--voters", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--answer-tokens", type=int, default=150)
    args = ap.parse_args()
    eng = ls.LlamaCppEngine(args.model, args.voters, 8192)
    print(f"| swarm ({args.voters} voters, {args.tasks} conversations) | turn-2 prompt tokens | decoded again "
          "| chosen-answer tokens | turn-2 TTFT, mean |\n|---|---|---|---|---|")
    for label, engine in (("prompt cache only (before)", WithoutRemember(eng)), ("chosen answer remembered", eng)):
        rows = [conversation(ls.Swarm(engine), t, args.answer_tokens) for t in range(args.tasks)]
        total = lambda k: sum(r[k] for r in rows)  # noqa: E731
        print(f"| {label} | {total('prompt2')} | {total('decoded2')} | {total('answer')} "
              f"| {statistics.mean(r['ttft2'] for r in rows):.3f} s |", flush=True)
    eng.close()


if __name__ == "__main__":
    main()
