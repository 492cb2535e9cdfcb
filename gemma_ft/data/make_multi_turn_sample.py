"""Writes gemma_ft/data/multi_turn_sample.jsonl: deterministic multi-turn chess conversations in the `messages` form.

Each conversation asks about one move over two or three turns, every answer computed from the move (so the data is
correct by construction): the square it leaves, the square it reaches, and the colour of that square.

    python -m gemma_ft.data.make_multi_turn_sample            # rewrites the packaged JSONL
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from gemma_ft.data.make_chess_sample import FILES, random_move

SYSTEM = "You are a chess assistant. Answer each question about the move in as few words as possible."


def colour(square: str) -> str:
    return "dark" if (FILES.index(square[0]) + int(square[1]) - 1) % 2 == 0 else "light"


def make_conversation(rng: random.Random) -> dict:
    origin, destination = random_move(rng)
    questions = [
        (f"The move is {origin}{destination} in UCI notation. Which square does the piece leave?", origin),
        ("And which square does it move to?", destination),
        ("Is that square light or dark?", colour(destination)),
    ]
    turns = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    for question, answer in questions[:rng.choice([2, 3])]:
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": turns}


def make_conversations(n: int, seed: int = 3407) -> list[dict]:
    rng = random.Random(seed)
    return [make_conversation(rng) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=300)
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("multi_turn_sample.jsonl"))
    args = parser.parse_args()
    lines = [json.dumps(c, ensure_ascii=False) for c in make_conversations(args.conversations, args.seed)]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} conversations to {args.out}")


if __name__ == "__main__":
    main()
