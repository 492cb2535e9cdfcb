"""Writes gemma_ft/data/chess_sample.csv: a deterministic sample in the ChessInstruct shape.

Every answer is computed from its input, so the data is correct by construction:
  * the destination / origin square of a move in UCI notation (e2e4 -> e4 / e2),
  * the piece that moves in a SAN move (Nf3 -> knight, exd5 -> pawn),
  * the colour of a square (a1 -> dark).

    python -m gemma_ft.data.make_chess_sample            # rewrites the packaged CSV
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

FILES = "abcdefgh"
PIECES = {"N": "knight", "B": "bishop", "R": "rook", "Q": "queen", "K": "king", "": "pawn"}
TASKS = {
    "destination": "You are a chess assistant. Given a move in UCI notation, answer with the square the piece moves to.",
    "origin": "You are a chess assistant. Given a move in UCI notation, answer with the square the piece moves from.",
    "piece": "You are a chess assistant. Given a move in SAN notation, answer with the name of the piece that moves.",
    "colour": "You are a chess assistant. Given a square, answer whether it is light or dark.",
}


def square(file: int, rank: int) -> str:
    return f"{FILES[file]}{rank + 1}"


def random_move(rng: random.Random) -> tuple[str, str]:
    """A geometrically valid move of a random piece, as (origin, destination)."""
    while True:
        f, r = rng.randrange(8), rng.randrange(8)
        kind = rng.choice("NBRQKP")
        if kind == "N":
            df, dr = rng.choice([(1, 2), (2, 1), (-1, 2), (-2, 1), (1, -2), (2, -1), (-1, -2), (-2, -1)])
        elif kind == "K":
            df, dr = rng.choice([(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)])
        elif kind == "P":
            df, dr = 0, rng.choice([1, 2]) if r == 1 else 1
        else:
            step = rng.randrange(1, 8)
            straight = [(step, 0), (-step, 0), (0, step), (0, -step)]
            diagonal = [(step, step), (step, -step), (-step, step), (-step, -step)]
            df, dr = rng.choice({"B": diagonal, "R": straight, "Q": straight + diagonal}[kind])
        if 0 <= f + df < 8 and 0 <= r + dr < 8:
            return square(f, r), square(f + df, r + dr)


def make_row(task: str, rng: random.Random) -> dict[str, str]:
    if task in ("destination", "origin"):
        origin, destination = random_move(rng)
        return {"input": origin + destination, "expected_output": destination if task == "destination" else origin}
    if task == "piece":
        letter = rng.choice(list(PIECES))
        capture = "x" if rng.random() < 0.3 else ""
        target = square(rng.randrange(8), rng.randrange(8))
        prefix = letter if letter else (rng.choice(FILES) if capture else "")
        return {"input": f"{prefix}{capture}{target}", "expected_output": PIECES[letter]}
    file, rank = rng.randrange(8), rng.randrange(8)
    return {"input": square(file, rank), "expected_output": "dark" if (file + rank) % 2 == 0 else "light"}


def make_rows(n: int, seed: int = 3407) -> list[dict[str, str]]:
    rng = random.Random(seed)
    tasks = list(TASKS)
    rows = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        rows.append({"task": TASKS[task], **make_row(task, rng)})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["task", "input", "expected_output"])
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("chess_sample.csv"))
    args = parser.parse_args()
    write_csv(args.out, make_rows(args.rows, args.seed))
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
