#!/usr/bin/env python3
"""Generates fuselora's demo dataset (data/demo/): short questions whose answers always follow the
"FuseBot" house style —

    Answer: <the answer>
    Why: <one sentence>
    — FuseBot

Every record is produced here from templates and facts written for this project (no third-party
data). After a few minutes of training, a model answers *any* question in this format, which makes
the effect of fine-tuning plain to see. Deterministic: the same seed writes the same files."""
import json
import pathlib
import random

SEED = 7
OUT = pathlib.Path(__file__).resolve().parent.parent / "data" / "demo"

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Chile", "Santiago"),
    ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Cuba", "Havana"), ("Thailand", "Bangkok"),
]
OPPOSITES = [
    ("hot", "cold"), ("tall", "short"), ("early", "late"), ("empty", "full"), ("light", "dark"), ("fast", "slow"),
    ("open", "closed"), ("happy", "sad"), ("loud", "quiet"), ("wet", "dry"), ("strong", "weak"), ("rich", "poor"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["garden", "rocket", "planet", "window", "butter", "silver", "orange", "kitten", "dragon", "pencil", "island", "bridge"]
ANIMALS = [("cat", "meows"), ("dog", "barks"), ("cow", "moos"), ("duck", "quacks"), ("lion", "roars"), ("sheep", "bleats"),
           ("horse", "neighs"), ("owl", "hoots")]


def styled(answer: str, why: str) -> str:
    return f"Answer: {answer}\nWhy: {why}\n— FuseBot"


def addition(r):
    a, b = r.randint(2, 60), r.randint(2, 60)
    return f"What is {a} plus {b}?", styled(str(a + b), f"{a} + {b} = {a + b}.")


def multiplication(r):
    a, b = r.randint(2, 12), r.randint(2, 12)
    return f"What is {a} times {b}?", styled(str(a * b), f"{a} groups of {b} make {a * b}.")


def centimeters(r):
    n = r.randint(2, 9)
    return f"How many centimeters are in {n} meters?", styled(f"{n * 100} centimeters", "Each meter holds 100 centimeters.")


def capital(r):
    country, city = r.choice(CAPITALS)
    return f"What is the capital of {country}?", styled(city, f"{city} is the seat of the government of {country}.")


def opposite(r):
    a, b = r.choice(OPPOSITES)
    if r.random() < 0.5:
        a, b = b, a
    return f"What is the opposite of \"{a}\"?", styled(b, f"\"{b}\" means the reverse of \"{a}\".")


def next_day(r):
    i = r.randrange(7)
    return f"What day comes after {DAYS[i]}?", styled(DAYS[(i + 1) % 7], f"The week runs {DAYS[i]}, then {DAYS[(i + 1) % 7]}.")


def letters(r):
    w = r.choice(WORDS)
    return f"How many letters are in the word \"{w}\"?", styled(str(len(w)), f"\"{w}\" is spelled {'-'.join(w)}.")


def animal(r):
    a, s = r.choice(ANIMALS)
    return f"What sound does a {a} make?", styled(f"A {a} {s}.", f"That is the call people know the {a} by.")


def minutes(r):
    h = r.randint(2, 6)
    return f"How many minutes are in {h} hours?", styled(f"{h * 60} minutes", f"Each hour has 60 minutes, and {h} × 60 = {h * 60}.")


TEMPLATES = [addition, multiplication, centimeters, capital, opposite, next_day, letters, animal, minutes]


def make(n, r, seen):
    out = []
    while len(out) < n:
        q, a = r.choice(TEMPLATES)(r)
        if q in seen:
            continue
        seen.add(q)
        out.append({"instruction": q, "input": "", "output": a})
    return out


def main():
    r = random.Random(SEED)
    seen = set()
    train = make(160, r, seen)
    held_out = make(32, r, seen)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in [("train.jsonl", train), ("eval.jsonl", held_out)]:
        (OUT / name).write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
    print(f"wrote {len(train)} training and {len(held_out)} held-out records to {OUT}")


if __name__ == "__main__":
    main()
