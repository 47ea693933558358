"""Corpora mixloop writes itself, so the quickstart needs no download.

A small fixed "world" of facts (people and animals for `general`, planets for
`astronomy`) is told as text documents and asked about in chats, so a model
can learn facts from text and the chat format from conversations, and a
domain corpus brings facts the general one never mentions.
"""

from __future__ import annotations

import json
import random

from mixloop.storage.fs import exists, join, read_text, write_text

NAMES = ["Ada", "Bram", "Chen", "Dora", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kira", "Lars"]
JOBS = ["baker", "pilot", "doctor", "farmer", "teacher", "painter", "sailor", "miner"]
CITIES = ["Oslo", "Lima", "Kyoto", "Accra", "Quito", "Perth", "Turin", "Hanoi"]
ANIMALS = ["fox", "owl", "otter", "badger", "heron", "lynx", "mole", "crane"]
FOODS = ["berries", "fish", "mice", "seeds", "beetles", "roots", "frogs", "worms"]
HOMES = ["forest", "river", "marsh", "meadow", "cliff", "cave", "lake", "hill"]
PLANETS = ["Veld", "Orra", "Tamsin", "Kepra", "Ulmo", "Zarek", "Ithil", "Moraine"]
COLOURS = ["red", "blue", "amber", "grey", "green", "violet", "white", "golden"]
STARS = ["Arden", "Belis", "Corvane", "Dusk"]


def _world_facts(topic: str) -> list[tuple[str, str, str]]:
    """(statement, question, answer) triples; fixed for a topic whatever the seed."""
    rng = random.Random(f"world/{topic}")
    facts = []
    if topic == "general":
        for name in NAMES:
            job, city = rng.choice(JOBS), rng.choice(CITIES)
            facts.append((f"{name} is a {job} who lives in {city}.", f"What does {name} do?", f"{name} is a {job}."))
            facts.append((f"{name} lives in {city}.", f"Where does {name} live?", f"{name} lives in {city}."))
        for animal in ANIMALS:
            food, home = rng.choice(FOODS), rng.choice(HOMES)
            facts.append((f"The {animal} eats {food}.", f"What does the {animal} eat?", f"The {animal} eats {food}."))
            facts.append(
                (
                    f"The {animal} lives near the {home}.",
                    f"Where does the {animal} live?",
                    f"The {animal} lives near the {home}.",
                )
            )
    else:
        for planet in PLANETS:
            moons, colour, star = rng.randint(0, 9), rng.choice(COLOURS), rng.choice(STARS)
            facts.append(
                (
                    f"The planet {planet} has {moons} moons.",
                    f"How many moons does {planet} have?",
                    f"{planet} has {moons} moons.",
                )
            )
            facts.append(
                (
                    f"{planet} looks {colour} through a telescope.",
                    f"What colour is {planet}?",
                    f"{planet} looks {colour}.",
                )
            )
            facts.append(
                (f"{planet} orbits the star {star}.", f"Which star does {planet} orbit?", f"{planet} orbits {star}.")
            )
    return facts


def _text_document(facts, rng: random.Random) -> dict:
    return {"text": " ".join(statement for statement, _, _ in rng.sample(facts, rng.randint(3, 7)))}


def _chat_document(facts, rng: random.Random) -> dict:
    turns = []
    for _statement, question, answer in rng.sample(facts, rng.randint(1, 3)):
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"conversations": turns}


def write_corpus(out_dir: str, kind: str, topic: str, documents: int, eval_documents: int, seed: int) -> dict[str, str]:
    """Write train.jsonl and eval.jsonl (same world, different draws); returns their paths."""
    facts = _world_facts(topic)
    make = _text_document if kind == "text" else _chat_document
    paths = {}
    for split, count in (("train", documents), ("eval", eval_documents)):
        rng = random.Random(f"{topic}/{kind}/{split}/{seed}")
        path = join(out_dir, f"{split}.jsonl")
        content = "".join(json.dumps(make(facts, rng)) + "\n" for _ in range(count))
        if not exists(path) or read_text(path) != content:  # rewriting would invalidate the packed cache
            write_text(path, content)
        paths[split] = path
    return paths
