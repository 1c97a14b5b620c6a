"""The status of an LLM answer (interp_assets.labels.answers), unit by unit."""

from __future__ import annotations

import pytest

from interp_assets.labels.answers import (
    STATUSES,
    AnswerError,
    echoes_prompt,
    failure_status,
    json_status,
    looks_like_refusal,
    restates_prompt,
    worst,
)
from interp_assets.labels.labeling import LABEL_SYSTEM_PROMPT, LabelResponseError, read_label_answer
from interp_assets.labels.scoring import read_score_answer
from resources.llm import LLMBudgetExhausted, LLMError, LLMRefusal, LLMTruncated

PROMPT = [
    {"role": "system", "content": LABEL_SYSTEM_PROMPT},
    {
        "role": "user",
        "content": "Texts where the feature fires (marked tokens are where it fires):\n"
        "1. we are <<sorry>> for the long wait today\n2. I <<apologize>> for the confusion\n\n"
        'Reply with the JSON object {"label": ..., "description": ...} only.',
    },
]


def test_worst_and_json_status() -> None:
    assert worst(["ok", "parsed_from_prose", "out_of_range"]) == "out_of_range"
    assert worst([]) == "ok" and worst(["refused", "budget_exhausted"]) == "budget_exhausted"
    assert STATUSES[-1] == "ok"
    assert json_status(' {"label": "x"}\n') == "ok"
    assert (
        json_status('Here: {"label": "x"}')
        == json_status('```json\n{"label": "x"}\n```')
        == "parsed_from_prose"
    )


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I cannot assist with this request.", True),
        ("As an AI, I am unable to label this.", True),
        ('{"label": "apologies"}', False),
        ("The feature fires on apologies such as 'sorry'.", False),
    ],
)
def test_looks_like_refusal(text: str, refusal: bool) -> None:
    assert looks_like_refusal(text) is refusal


@pytest.mark.parametrize(
    ("label", "restates"),
    [
        ("apologies", False),
        ("apologies for waiting", False),
        ("sorry for the long wait", False),  # part of an excerpt: a phrase, not the prompt
        ("we are sorry for the long wait today", True),  # a whole excerpt
        ("<<sorry>>", True),
        ("<2-6 words>", True),
        ("...", True),
        ("<b>sorry</b>", False),  # markup in a label is escaped where shown, not a restatement
        ("texts where the feature fires", True),  # the instructions
        ("the concept that the marked tokens share", True),
    ],
)
def test_restates_prompt(label: str, restates: bool) -> None:
    assert restates_prompt(label, PROMPT) is restates


def test_read_label_answer_statuses() -> None:
    good = '{"label": "apologies", "description": "Apologies."}'
    assert read_label_answer(good, PROMPT) == ("apologies", "Apologies.", "ok")
    assert read_label_answer(f"Sure!\n```json\n{good}\n```", PROMPT)[2] == "parsed_from_prose"
    for text, status in [
        ("I'm sorry, I can't do that.", "refused"),
        ('{"label": "<<sorry>>"}', "restated_prompt"),
        ("It is about apologies.", "invalid"),
        ('{"description": "no label"}', "invalid"),
    ]:
        with pytest.raises(LabelResponseError) as info:
            read_label_answer(text, PROMPT)
        assert info.value.status == status, text


def test_read_score_answer_statuses() -> None:
    messages = [
        {"role": "user", "content": "Explanation: x\n\nTexts:\n1. the parcel arrived broken in two pieces"}
    ]
    assert read_score_answer("[1, 0]", 2, messages) == ([1, 0], "ok")
    assert read_score_answer("Answer: [1, 0]", 2, messages) == ([1, 0], "parsed_from_prose")
    for text, status in [
        ("[1, 5]", "out_of_range"),
        ("[0.7, 0.2]", "out_of_range"),
        ('["1", "2"]', "out_of_range"),
        ("[1]", "invalid"),
        ('["yes", "no"]', "invalid"),
        ("I can't help with that.", "refused"),
        ("1. the parcel arrived broken in two pieces: yes", "restated_prompt"),
    ]:
        with pytest.raises(AnswerError) as info:
            read_score_answer(text, 2, messages)
        assert info.value.status == status, text
    assert echoes_prompt("the parcel arrived broken in two pieces", messages, n=5)


def test_failure_status_of_client_errors() -> None:
    assert failure_status(LLMBudgetExhausted("spent")) == "budget_exhausted"
    assert failure_status(LLMRefusal("no")) == "refused"
    assert failure_status(LLMTruncated("cut", "par")) == "truncated"
    assert failure_status(LLMError("HTTP 500")) == "failed"
    assert failure_status(AnswerError("x", "out_of_range")) == "out_of_range"
    assert failure_status(ConnectionError("another client's error")) == "failed"
