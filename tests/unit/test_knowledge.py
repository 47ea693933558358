"""Knowledge scores: lm-eval tasks and probes scored by lm-eval's own evaluator on real (micro) versions,
one taught a few facts and chats, one untrained; the cache; and what validation says about benchmarks."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("topic", ["general", "astronomy"])
def test_generated_probes_ask_exactly_what_the_generated_corpora_state(topic):
    from mixloop.data.synthetic import _world_facts, answer_questions, choice_questions

    statements = [statement for statement, _, _ in _world_facts(topic)]
    for question in choice_questions(topic):
        completions = [f"{question['prompt']} {choice}" for choice in question["choices"]]
        stated = [any(s.startswith(c) and s[len(c)] in " ." for s in statements) for c in completions]
        assert len(completions) == 4 and stated == [i == question["answer"] for i in range(4)], question
    facts = [{"question": q, "answer": a} for _, q, a in _world_facts(topic)]
    assert answer_questions(topic) == facts and len(choice_questions(topic)) == len(facts)
