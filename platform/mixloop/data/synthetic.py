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


MOON_COUNTS = [str(count) for count in range(10)]


def _world_blanks(topic: str) -> list[tuple[str, str, list[str]]]:
    """(statement's start, the word that completes it, every word it could be) for each fact of the world.
    The draws replay `_world_facts`'s, in its order, so both tell the same world (a test checks that)."""
    rng = random.Random(f"world/{topic}")
    blanks = []
    if topic == "general":
        for name in NAMES:
            job, city = rng.choice(JOBS), rng.choice(CITIES)
            blanks += [(f"{name} is a", job, JOBS), (f"{name} lives in", city, CITIES)]
        for animal in ANIMALS:
            food, home = rng.choice(FOODS), rng.choice(HOMES)
            blanks += [(f"The {animal} eats", food, FOODS), (f"The {animal} lives near the", home, HOMES)]
    else:
        for planet in PLANETS:
            moons, colour, star = rng.randint(0, 9), rng.choice(COLOURS), rng.choice(STARS)
            blanks += [
                (f"The planet {planet} has", str(moons), MOON_COUNTS),
                (f"{planet} looks", colour, COLOURS),
                (f"{planet} orbits the star", star, STARS),
            ]
    return blanks


def choice_questions(topic: str, choices: int = 4) -> list[dict]:
    """Multiple-choice probes of a world's facts: a statement's start, and the word that completes it
    among others of the same kind (so chance is 1 / choices), as mixloop's probe files hold them."""
    rng = random.Random(f"probes/{topic}")
    questions = []
    for prompt, right, pool in _world_blanks(topic):
        options = [right, *rng.sample([word for word in pool if word != right], choices - 1)]
        rng.shuffle(options)
        questions.append({"prompt": prompt, "choices": options, "answer": options.index(right)})
    return questions


def answer_questions(topic: str) -> list[dict]:
    """Every question of a world's chats once, with the answer its chats give."""
    return [{"question": question, "answer": answer} for _, question, answer in _world_facts(topic)]


def write_probes(out_dir: str, kind: str, topic: str) -> str:
    """Write probes.jsonl beside a generated corpus: multiple choice for a text corpus (its statements
    completed), questions and answers for a chat corpus; returns its path."""
    records = choice_questions(topic) if kind == "text" else answer_questions(topic)
    path = join(out_dir, "probes.jsonl")
    content = "".join(json.dumps(record) + "\n" for record in records)
    if not exists(path) or read_text(path) != content:  # an unchanged file keeps its mtime
        write_text(path, content)
    return path
