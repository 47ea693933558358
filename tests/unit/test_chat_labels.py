"""Which tokens a conversation trains on: the assistant's answers and their end-of-turn token, nothing else."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

from mixloop.data.tokenizer import CHATML_TEMPLATE, encode_chats, encode_texts
from mixloop.errors import DataError

CONVERSATIONS = {
    "one turn": [
        {"role": "user", "content": "hello cat"},
        {"role": "assistant", "content": "the cat sat on a mat."},
    ],
    "system and two turns": [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "why is the sun far?"},
        {"role": "assistant", "content": " 42 planets!"},
        {"role": "user", "content": "how"},
        {"role": "assistant", "content": "orbit light\nmoon  "},
    ],
    "non-ascii": [
        {"role": "user", "content": "héllo ✨"},
        {"role": "assistant", "content": "日本 star"},
    ],
    "empty assistant turn first": [
        {"role": "user", "content": "yes?"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "no!"},
        {"role": "assistant", "content": "dark moon"},
    ],
    "assistant first (a greeting)": [
        {"role": "assistant", "content": "hello! why?"},
        {"role": "user", "content": "the sun"},
        {"role": "assistant", "content": "is far."},
    ],
    "assistant only": [{"role": "assistant", "content": "the moon"}],
    "ends with a user turn": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b c"},
        {"role": "user", "content": "what is 7?"},
    ],
}


def without_markers(tokenizer):
    """The tokenizer with its template's {% generation %} markers taken out: the same text, but the
    assistant's tokens must then be found by rendering prefixes."""
    unmarked = copy.deepcopy(tokenizer)
    unmarked.chat_template = re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", tokenizer.chat_template)
    return unmarked


@pytest.mark.parametrize("conversation", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_prefix_rendering_finds_what_transformers_generation_markers_mark(trained_tokenizer, conversation):
    assert trained_tokenizer.chat_template == CHATML_TEMPLATE
    reference = trained_tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    for tok in (trained_tokenizer, without_markers(trained_tokenizer)):  # markers read, or prefixes rendered
        [[(ids, supervised)]] = encode_chats(tok, [conversation])
        assert ids.tolist() == list(reference["input_ids"])
        assert supervised.astype(int).tolist() == list(reference["assistant_masks"])


def test_generation_markers_decide_which_tokens_train(trained_tokenizer):
    tok = copy.deepcopy(trained_tokenizer)  # this template marks the answer but not its end-of-turn token
    tok.chat_template = CHATML_TEMPLATE.replace(
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}",
    )
    assert tok.chat_template != CHATML_TEMPLATE
    [[(ids, mask)]] = encode_chats(tok, [CONVERSATIONS["one turn"]])
    answer = CONVERSATIONS["one turn"][-1]["content"]
    assert tok.decode(ids[mask].tolist()) == answer  # the marked answer, without <|im_end|>


def test_batch_encoding_equals_one_by_one(trained_tokenizer):
    batch = encode_chats(trained_tokenizer, list(CONVERSATIONS.values()))
    for [(ids, mask)], conversation in zip(batch, CONVERSATIONS.values()):
        [[(one_ids, one_mask)]] = encode_chats(trained_tokenizer, [conversation])
        assert np.array_equal(ids, one_ids) and np.array_equal(mask, one_mask)


def _supervised_runs(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """Maximal runs of consecutive supervised tokens."""
    runs, current = [], []
    for token, supervised in zip(ids.tolist(), mask.tolist()):
        if supervised:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


MINIMIND_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome is the capital of Italy."},
]


def test_minimind_supervises_exactly_each_answer_and_its_end_token(minimind_tokenizer):
    tok = minimind_tokenizer
    [[(ids, mask)]] = encode_chats(tok, [MINIMIND_CHAT])
    rendered = tok.decode(ids.tolist(), skip_special_tokens=False)
    assert "<think>\n\n</think>\n\n" in rendered  # the template's empty thinking block is there...

    runs = [tok.decode(run, skip_special_tokens=False) for run in _supervised_runs(ids, mask)]
    answers = [m["content"] for m in MINIMIND_CHAT if m["role"] == "assistant"]
    # ...but is not supervised: each answer is trained on from its first token to <|im_end|>.
    assert runs == [answer + "<|im_end|>" for answer in answers]


def test_minimind_supervises_no_prompt_text(minimind_tokenizer):
    tok = minimind_tokenizer
    [[(ids, mask)]] = encode_chats(tok, [MINIMIND_CHAT])
    unsupervised = tok.decode(ids[~mask].tolist(), skip_special_tokens=False)
    for message in MINIMIND_CHAT:
        if message["role"] != "assistant":
            assert message["content"] in unsupervised
    supervised = tok.decode(ids[mask].tolist(), skip_special_tokens=False)
    for text in ("France?", "Italy?", "helpful", "<|im_start|>", "user", "system", "<think>"):
        assert text not in supervised


def test_minimind_newline_after_end_of_turn_is_not_supervised(minimind_tokenizer):
    tok = minimind_tokenizer
    [[(ids, mask)]] = encode_chats(tok, [MINIMIND_CHAT])
    end_positions = np.flatnonzero(ids == tok.convert_tokens_to_ids("<|im_end|>"))
    answer_ends = [p for p in end_positions if mask[p]]
    assert len(answer_ends) == 2
    for position in answer_ends:
        assert tok.decode([int(ids[position + 1])]) == "\n"
        assert not mask[position + 1]


def test_minimind_trains_on_a_greeting_that_opens_the_chat(minimind_tokenizer):
    tok = minimind_tokenizer
    greeting = [{"role": "assistant", "content": "Hello! Ask me anything."}] + MINIMIND_CHAT[1:3]
    [[(ids, mask)]] = encode_chats(tok, [greeting])
    assert tok.decode(ids.tolist(), skip_special_tokens=False).startswith("<|im_start|>assistant\n<think>\n\n</think>")
    runs = [tok.decode(run, skip_special_tokens=False) for run in _supervised_runs(ids, mask)]
    assert runs == ["Hello! Ask me anything.<|im_end|>", "The capital of France is Paris.<|im_end|>"]


def test_minimind_answers_with_a_think_block_before_the_end_cannot_be_located(minimind_tokenizer):
    # The template renders such an answer's <think> block unlike the empty one of its generation prompt.
    chat = MINIMIND_CHAT[:2] + [{"role": "assistant", "content": "<think>Paris.</think>Paris."}] + MINIMIND_CHAT[3:]
    with pytest.raises(DataError, match="opens assistant turn 2 differently from its generation prompt"):
        encode_chats(minimind_tokenizer, [chat])


def test_a_template_that_refuses_a_conversation_says_why(trained_tokenizer):
    tok = copy.deepcopy(trained_tokenizer)
    tok.chat_template = (
        "{% if messages[0]['role'] == 'assistant' %}"
        "{{ raise_exception('a conversation opens with the user') }}{% endif %}" + CHATML_TEMPLATE
    )
    [[(ids, _)]] = encode_chats(tok, [CONVERSATIONS["one turn"]])
    assert len(ids) > 0
    with pytest.raises(DataError, match="^chat template failed: a conversation opens with the user$"):
        encode_chats(tok, [CONVERSATIONS["assistant first (a greeting)"]])


@pytest.mark.parametrize("tokenizer_fixture", ["trained_tokenizer", "minimind_tokenizer"])
def test_text_documents_end_with_eos_and_train_on_every_token(request, tokenizer_fixture):
    tok = request.getfixturevalue(tokenizer_fixture)
    texts = ["the cat sat on a mat.", "hello world", "x"]
    encoded = encode_texts(tok, texts)
    assert len(encoded) == len(texts)
    for text, [(ids, mask)] in zip(texts, encoded):
        assert ids[-1] == tok.eos_token_id
        assert (ids[:-1] != tok.eos_token_id).all()
        assert tok.decode(ids[:-1].tolist()) == text
        assert mask.dtype == bool and mask.all() and len(mask) == len(ids)


# Like Qwen3's: an answer before the last user turn is rendered without its reasoning.
DROPS_EARLIER_REASONING = (
    "{%- set ns = namespace(last_user=0) -%}"
    "{%- for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}"
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in m['content'] -%}"
    "{{ m['content'].split('</think>')[-1].lstrip('\\n') }}"
    "{%- else -%}{{ m['content'] }}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)


def test_a_template_that_rewrites_history_gives_one_document_per_answer_as_the_model_sees_it(trained_tokenizer):
    tok = copy.deepcopy(trained_tokenizer)
    tok.chat_template = DROPS_EARLIER_REASONING
    chat = [
        {"role": "user", "content": "why is the sun far?"},
        {"role": "assistant", "content": "<think>it is a star</think>\n\nthe sun is far."},
        {"role": "user", "content": "and the moon?"},
        {"role": "assistant", "content": "<think>the moon is near</think>\n\nthe moon is near."},
    ]
    [documents] = encode_chats(tok, [chat])
    assert len(documents) == 2
    for turn, (ids, mask) in zip((1, 3), documents):
        rendered = tok.apply_chat_template(chat[: turn + 1], tokenize=False)
        assert tok.decode(ids.tolist()) == rendered  # the conversation up to that answer, as rendered then
        assert _supervised_runs(ids, mask) == [
            tok(chat[turn]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ]
    second = tok.decode(documents[1][0].tolist())
    assert "<think>it is a star" not in second and "the sun is far." in second  # earlier reasoning dropped
    assert "<think>the moon is near</think>" in second  # the supervised answer keeps its own


def test_padding_and_truncation_saved_in_tokenizer_json_do_not_reach_the_encoders(trained_tokenizer, tmp_path):
    from mixloop.data.tokenizer import load_tokenizer

    saved = copy.deepcopy(trained_tokenizer)
    saved.backend_tokenizer.enable_padding(pad_id=saved.pad_token_id, length=64)
    saved.backend_tokenizer.enable_truncation(max_length=4)
    saved.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    text = "a document much longer than four tokens, said in many words"
    [[(ids, supervised)]] = encode_texts(tokenizer, [text])
    assert ids.tolist() == trained_tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert supervised.all()
    conversation = [{"role": "user", "content": "hi there, how are you"}, {"role": "assistant", "content": "fine"}]
    assert (
        encode_chats(tokenizer, [conversation])[0][0][0].tolist()
        == encode_chats(trained_tokenizer, [conversation])[0][0][0].tolist()
    )
