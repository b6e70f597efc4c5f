"""Generated one-liner jokes in the shape of the canonical fine-tuning data set, onelinefun.csv.

The tests need a CSV like the one users fine-tune on (columns `ID` and `Joke`, 2,950 rows, every
Joke quoted, some holding commas, doubled quotes and ellipses, 20-400 characters), but a fresh
clone has only what the repository ships, and the real file's jokes were scraped from a web site
under no stated licence, so they are not copied here. These are built from templates instead:
deterministic, distinct, and as learnable as the real ones (a tiny model trained on them gets
confident, which the int8 agreement test needs).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

ROWS = 2950  # as many as onelinefun.csv

WHO = ["my wife", "my husband", "my boss", "my dentist", "my neighbour", "the waiter", "my doctor",
       "a penguin", "my grandmother", "the mechanic", "my cat", "a pirate", "the librarian",
       "my landlord", "a ghost", "my therapist", "the plumber", "my barber", "an astronaut",
       "my lawyer", "the baker", "my accountant", "a skeleton", "the magician"]
THING = ["a ladder", "a sandwich", "a calendar", "a broken pencil", "a cheese grater", "a map",
         "an umbrella", "a parrot", "a clock", "a tuba", "a bag of flour", "a trampoline",
         "a dictionary", "a lamp", "a spoon", "a kite", "a cactus", "a pair of socks", "a mirror",
         "a toaster"]
PLACE = ["the gym", "the library", "the zoo", "the bank", "a wedding", "the beach", "the dentist",
         "the museum", "a job interview", "the bakery", "the airport", "a funeral", "the moon",
         "the supermarket", "the cinema", "a tax office"]
REPLY = ["it was a step up", "it wasn't my cup of tea", "the rest is history", "I never looked back",
         "nobody's laughing now", "I took it personally", "it was all downhill from there",
         "I'm still recovering", "it went right over my head", "that was the last straw",
         "I couldn't put it down", "we're still not speaking", "it really grew on me",
         "I stand corrected", "it had no point", "time flies"]
TEMPLATES = [
    "I asked {who} for {thing}... {reply}.",
    "{Who} told me to take {thing} to {place}, so I did, and {reply}.",
    "Why did {who} bring {thing} to {place}? Because {reply}.",
    "I used to hate {thing}, but then {who} said \"{reply}\", and {reply2}.",
    "My therapist says I have a problem with {thing}. I told her {reply}.",
    "They laughed when I said I'd take {thing} to {place}. Well, {reply}.",
    "{Who} and I went to {place} with {thing}. {Reply}.",
    "I'm reading a book about {thing}; {reply}.",
    "Never trust {who} with {thing}: {reply}.",
    "When {who} fell off {thing} at {place}, {reply}, and {reply2}.",
]


def make_jokes(rows: int = ROWS, seed: int = 0) -> list[str]:
    """`rows` distinct jokes, the same ones for the same seed."""
    rng = random.Random(seed)
    jokes: dict[str, None] = {}
    while len(jokes) < rows:
        reply, reply2 = rng.sample(REPLY, 2)
        who = rng.choice(WHO)
        joke = rng.choice(TEMPLATES).format(
            who=who, Who=who[0].upper() + who[1:], thing=rng.choice(THING), place=rng.choice(PLACE),
            reply=reply, Reply=reply[0].upper() + reply[1:], reply2=reply2)
        jokes[joke] = None
    return list(jokes)


def write_jokes_csv(path: Path, rows: int = ROWS) -> Path:
    """The jokes as onelinefun.csv lays them out: `"ID","Joke"`, numbers bare, text quoted."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
        writer.writerow(["ID", "Joke"])
        writer.writerows((i, joke) for i, joke in enumerate(make_jokes(rows), start=1))
    return path
