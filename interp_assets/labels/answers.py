"""What happened to an LLM answer: one status per label or score, from the reply text or the error.

Statuses, from worst to best (a score made of several answers takes the worst of them):

- `budget_exhausted`: the LLM resource's call budget was spent before this request was sent;
- `failed`: the request failed for good (HTTP error, timeouts, malformed responses, after retries);
- `refused`: the model refused (the API's refusal field, or a refusal in prose with no JSON);
- `truncated`: the answer was cut off at max_tokens, even after one retry with twice the tokens;
- `restated_prompt`: the answer repeats the prompt (its markers, instructions or a whole excerpt)
  instead of answering it;
- `out_of_range`: a score answer holds values other than 0 and 1;
- `invalid`: no usable JSON (none, the wrong shape, the wrong number of answers, an empty label);
- `parsed_from_prose`: usable JSON, but inside prose or a code fence;
- `ok`: the answer was the JSON asked for.

An answer rejected as `invalid`, `out_of_range` or `restated_prompt` is asked again once (`ask_and_read`),
as a follow-up turn that shows the model its reply and what was wrong with it; the status is then the
second answer's. A refusal is not asked again (it would refuse again), a truncated answer already was
(with twice the tokens), and a failed request already went through the client's retries.
A label or score whose answer failed falls back (labels: the offline label) or leaves its examples out
(scores); the other features' answers are kept either way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from interp_assets.labels.content_split import normalize_text

STATUSES = (
    "budget_exhausted",
    "failed",
    "refused",
    "truncated",
    "restated_prompt",
    "out_of_range",
    "invalid",
    "parsed_from_prose",
    "ok",
)
USABLE = frozenset({"ok", "parsed_from_prose"})
ASKED_AGAIN = frozenset({"invalid", "out_of_range", "restated_prompt"})
"""Statuses of an answer that is asked again once, with the reason, before the status stands."""
_REFUSAL_RE = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i can(?:'|no)?t|i cannot|i am unable|i'?m unable|i won'?t|"
    r"as an ai|not able to (?:help|assist|comply))\b",
    re.IGNORECASE,
)
_MARKERS = ("<<", ">>")
_ECHO_WORDS = 4  # a label holding this many consecutive words of the instructions restates them
_NUMBERED = re.compile(r"^\d+\.\s")


class AnswerError(ValueError):
    """An LLM answer that cannot be used; `status` says why (one of `STATUSES`)."""

    def __init__(self, message: str, status: str = "invalid"):
        super().__init__(message)
        self.status = status


def worst(statuses: Iterable[str]) -> str:
    """The worst of `statuses` in `STATUSES` order (`ok` for none)."""
    return min(statuses, key=STATUSES.index, default="ok")


def json_status(text: str) -> str:
    """`ok` when the whole answer is JSON, else `parsed_from_prose` (JSON was found around other text)."""
    try:
        json.loads(text.strip())
    except ValueError:
        return "parsed_from_prose"
    return "ok"


def looks_like_refusal(text: str) -> bool:
    """A reply that declines ("I'm sorry, but I can't ...") rather than answering."""
    return bool(_REFUSAL_RE.search(text[:300]))


def failure_status(exc: BaseException) -> str:
    """The status of a failed request or answer: the exception's `status` (`AnswerError`, and the LLM
    client's errors: `budget_exhausted`, `refused`, `truncated`, `failed`), else `failed`."""
    status = getattr(exc, "status", None)
    return status if status in STATUSES else "failed"


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", normalize_text(text))


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def restates_prompt(label: str, messages: list[dict[str, Any]]) -> bool:
    """The label repeats the prompt instead of naming a concept: it holds the `<< >>` markers or a
    placeholder of the system prompt (`<2-6 words>`, `...`), `_ECHO_WORDS` consecutive words of the
    instructions (system message, the user message's unnumbered lines), or is a whole excerpt."""
    system = [str(m.get("content") or "") for m in messages if m.get("role") == "system"]
    placeholders = {p for text in system for p in re.findall(r"<[^<>]+>", text) if "<<" not in p}
    if any(m in label for m in (*_MARKERS, *placeholders)):
        return True
    words = _words(label)
    if not words:
        return True  # "...", as in the prompt's {"label": ...}
    instructions: list[str] = []
    excerpts: set[str] = set()
    for message in messages:
        content = str(message.get("content") or "")
        if message.get("role") == "system":
            instructions.append(content)
            continue
        for line in content.splitlines():
            if _NUMBERED.match(line):
                excerpts.add(" ".join(_words(_NUMBERED.sub("", line).replace("<<", "").replace(">>", ""))))
            else:
                instructions.append(line)
    if " ".join(words) in excerpts:
        return True
    echo = set().union(*(_ngrams(_words(t), _ECHO_WORDS) for t in instructions))
    return bool(_ngrams(words, _ECHO_WORDS) & echo)


def echoes_prompt(text: str, messages: list[dict[str, Any]], n: int = 8) -> bool:
    """A reply that repeats `n` consecutive words of the user message (its texts or instructions)."""
    prompt = " ".join(str(m.get("content") or "") for m in messages if m.get("role") != "system")
    return bool(_ngrams(_words(text), n) & _ngrams(_words(prompt), n))


T = TypeVar("T")


def follow_up(messages: list[dict[str, Any]], reply: str, problem: str) -> list[dict[str, Any]]:
    """`messages` continued by the model's unusable `reply` and a user turn saying what was wrong."""
    problem = " ".join(problem.split())
    problem = problem if len(problem) <= 300 else problem[:300] + "…"
    return [
        *messages,
        {"role": "assistant", "content": reply},
        {
            "role": "user",
            "content": f"That reply could not be used: {problem}. Answer again with only the JSON asked for.",
        },
    ]


def ask_and_read(
    llm: Any, requests: Sequence[list[dict[str, Any]]], read: Callable[[int, str], T]
) -> tuple[list[T | Exception], int]:
    """Ask every request (`llm.map_chat`) and read reply i with `read(i, reply)`. A reply that `read`
    rejects with an `AnswerError` in `ASKED_AGAIN` is asked again once, as a `follow_up` turn, and read
    again (`read` still judges it against the original request). Returns, per request, what `read`
    returned or the exception of the last attempt, and how many requests were asked again."""

    def attempt(i: int, reply: str | Exception) -> T | Exception:
        try:
            if isinstance(reply, Exception):
                raise reply
            return read(i, reply)
        except Exception as exc:  # noqa: BLE001 - returned per request, the others are kept
            return exc

    replies = llm.map_chat(list(requests))
    out = [attempt(i, reply) for i, reply in enumerate(replies)]
    again = {
        i: follow_up(list(requests[i]), reply, str(got))
        for i, (reply, got) in enumerate(zip(replies, out, strict=True))
        if isinstance(got, AnswerError) and got.status in ASKED_AGAIN and isinstance(reply, str)
    }
    if again:
        for i, reply in zip(again, llm.map_chat(list(again.values())), strict=True):
            out[i] = attempt(i, reply)
    return out, len(again)
