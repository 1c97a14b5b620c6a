"""Tests of resources.llm.LLMResource against a local OpenAI-compatible server (tests/llm_server.py), and
labeling + scoring end to end through it. The real `openai` client code runs; only the server is local."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

import dagster as dg
import polars as pl
import pytest

from interp_assets.labels.answers import ASKED_AGAIN
from interp_assets.labels.evidence import split_evidence, text_hash
from interp_assets.labels.labeling import LABEL_SYSTEM_PROMPT, LabelCache, label_features
from interp_assets.labels.scoring import DETECTION_SYSTEM_PROMPT, FUZZ_SYSTEM_PROMPT, score_features
from resources.llm import LLMBudgetExhausted, LLMError, LLMRefusal, LLMResource, LLMTruncated

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llm_server import (  # noqa: E402
    Answer,
    Delay,
    FakeLLMServer,
    Malformed,
    RateLimited,
    Refusal,
    ServerError,
    Truncated,
    fenced,
    in_prose,
)

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-SECRET-0123456789abcdef"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def server() -> FakeLLMServer:
    with FakeLLMServer(answer="fine") as s:
        yield s


def resource(server: FakeLLMServer, **kw: object) -> LLMResource:
    defaults = dict(
        base_url=server.base_url,
        model="fake-model",
        api_key=KEY,
        backoff_base_s=0.02,
        backoff_max_s=5.0,
        timeout_s=5.0,
        max_retries=3,
        max_calls=100,
    )
    return LLMResource(**(defaults | kw))


# ------------------------------------------------------------------------------------ the resource


def test_enabled_only_with_base_url_and_model() -> None:
    assert not LLMResource().enabled
    assert not LLMResource(base_url="http://127.0.0.1:9/v1").enabled
    assert not LLMResource(model="m").enabled
    assert LLMResource(base_url="http://127.0.0.1:9/v1", model="m").enabled
    with pytest.raises(LLMError, match="not configured"):
        LLMResource(model="m").chat_json(HELLO)


def test_chat_json_sends_the_key_only_in_the_authorization_header(server: FakeLLMServer) -> None:
    llm = resource(server)
    assert llm.chat_json(HELLO) == "fine"
    (req,) = server.requests
    assert req.path == "/v1/chat/completions"
    assert req.body["model"] == "fake-model" and req.body["messages"] == HELLO
    assert req.headers["authorization"] == f"Bearer {KEY}"
    others = {k: v for k, v in req.headers.items() if k != "authorization"}
    assert KEY not in json.dumps(others) and KEY.encode() not in req.raw_body and KEY not in req.path
    assert llm.calls_made == 1


def test_server_errors_are_retried_with_growing_backoff(server: FakeLLMServer) -> None:
    server.enqueue(ServerError(500), ServerError(502), ServerError(503))
    llm = resource(server, backoff_base_s=0.1)
    assert llm.chat_json(HELLO) == "fine"
    assert len(server.requests) == 4 and llm.calls_made == 4
    gaps = [b.received_at - a.received_at for a, b in zip(server.requests, server.requests[1:], strict=False)]
    # equal jitter: attempt i waits between base * 2**i / 2 and base * 2**i
    for i, gap in enumerate(gaps):
        assert 0.1 * 2**i / 2 - 0.01 <= gap <= 0.1 * 2**i + 1.0, gaps


@pytest.mark.parametrize(("status", "hint"), [(400, "Check the request"), (401, "Check the API key")])
def test_client_errors_are_not_retried(server: FakeLLMServer, status: int, hint: str) -> None:
    server.enqueue(ServerError(status, "nope"))
    with pytest.raises(LLMError, match=f"HTTP {status}.*not retried.*{hint}"):
        resource(server).chat_json(HELLO)
    assert len(server.requests) == 1


def test_retry_after_is_honoured(server: FakeLLMServer) -> None:
    server.enqueue(RateLimited(retry_after=1.0))
    assert resource(server, backoff_base_s=0.01).chat_json(HELLO) == "fine"
    first, second = server.requests
    assert second.received_at - first.received_at >= 1.0


def test_retry_after_longer_than_backoff_max_fails_fast(server: FakeLLMServer) -> None:
    server.enqueue(RateLimited(retry_after=120))
    start = time.monotonic()
    with pytest.raises(LLMError, match="asked to wait 120 s, more than backoff_max_s=5"):
        resource(server).chat_json(HELLO)
    assert time.monotonic() - start < 2 and len(server.requests) == 1


def test_timeouts_are_retried_then_reported(server: FakeLLMServer) -> None:
    server.enqueue(Delay(1.0))
    llm = resource(server, timeout_s=0.3)
    assert llm.chat_json(HELLO) == "fine" and llm.calls_made == 2
    server.enqueue(*[Delay(1.0)] * 3)
    with pytest.raises(LLMError, match=r"failed after 3 attempts; last error: timed out after 0\.3 s"):
        resource(server, timeout_s=0.3, max_retries=2).chat_json(HELLO)


def test_malformed_json_is_retried_then_reported(server: FakeLLMServer) -> None:
    server.enqueue(Malformed())
    assert resource(server).chat_json(HELLO) == "fine"
    server.enqueue(*[Malformed()] * 2)
    with pytest.raises(LLMError, match="failed after 2 attempts; last error: malformed response"):
        resource(server, max_retries=1).chat_json(HELLO)


def test_budget_is_never_exceeded_under_concurrency(server: FakeLLMServer) -> None:
    server.answer = lambda messages: messages[-1]["content"].upper()
    server.enqueue(ServerError(500), ServerError(500), ServerError(500))
    llm = resource(server, max_calls=7, max_concurrency=4, max_retries=2)
    requests = [[{"role": "user", "content": f"q{i}"}] for i in range(20)]
    results = llm.map_chat(requests)
    assert len(server.requests) == 7 and llm.calls_made == 7
    answers = [r for r in results if isinstance(r, str)]
    assert len(answers) == 4  # 7 attempts, 3 of them answered 500
    assert all(r == f"Q{i}" for i, r in enumerate(results) if isinstance(r, str))  # order kept
    failed = [r for r in results if not isinstance(r, str)]
    assert all(isinstance(r, LLMError) for r in failed)
    exhausted = [r for r in failed if isinstance(r, LLMBudgetExhausted)]
    assert len(exhausted) >= len(failed) - 1  # at most one request can have spent all its attempts on 500s
    assert all("budget exhausted: all 7 calls" in str(r) and "raise max_calls" in str(r) for r in exhausted)
    with pytest.raises(LLMBudgetExhausted):
        llm.chat_json(HELLO)
    assert len(server.requests) == 7


def test_map_chat_bounds_concurrency(server: FakeLLMServer) -> None:
    server.enqueue(*[Delay(0.2, Answer("slow"))] * 9)
    results = resource(server, max_concurrency=3).map_chat([HELLO] * 9)
    assert results == ["slow"] * 9
    assert server.max_in_flight == 3


def test_an_interrupt_returns_at_once_and_sends_nothing_more(server: FakeLLMServer) -> None:
    """Ctrl-C (or a stopped run) while two slow requests are in flight and 18 are queued: the call stops
    without waiting for the two (up to timeout_s each, with retries) and the queued ones are never sent.
    Before, this call returned after 25.8 s: the wait for a result never saw a signal delivered to a worker
    thread, and leaving the pool waited for the requests in flight."""
    server.enqueue(*[Delay(5.0, Answer("slow"))] * 20)
    llm = resource(server, max_concurrency=2)
    ctrl_c = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    ctrl_c.start()
    with pytest.raises(KeyboardInterrupt):
        llm.map_chat([HELLO] * 20)
    assert time.monotonic() - started < 3.0  # 0.3 s to the interrupt; the requests in flight take 5 s
    threading.Event().wait(1.0)  # a queued request, were any still to be sent, would have been by now
    assert len(server.requests) <= 2


def test_api_key_never_in_logs_reprs_or_errors(
    server: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpcore", "resources.llm"):
        caplog.set_level(logging.DEBUG, logger=name)
    llm = resource(server, timeout_s=0.3, max_retries=1)
    messages: list[str] = []
    server.enqueue(ServerError(401, f"Incorrect API key provided: {KEY}."))
    server.enqueue(ServerError(500, f"upstream said {KEY}"), ServerError(500, f"upstream said {KEY}"))
    server.enqueue(Delay(1.0), Delay(1.0))
    for _ in range(3):
        with pytest.raises(LLMError) as info:
            llm.chat_json(HELLO)
        messages += [str(info.value), repr(info.value)]
    assert "***" in messages[0]  # the echoed key was redacted
    assert any("retrying" in r.getMessage() for r in caplog.records)
    assert caplog.records and KEY not in caplog.text
    assert all(KEY not in m for m in messages)
    assert KEY not in repr(llm) and KEY not in str(llm)


def test_env_var_api_key_outside_and_inside_dagster(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTERP_LLM_API_KEY", KEY)
    configured = LLMResource(
        base_url=server.base_url, model="fake-model", api_key=dg.EnvVar("INTERP_LLM_API_KEY")
    )
    assert configured.chat_json(HELLO) == "fine"  # used directly, e.g. in a notebook

    @dg.asset
    def probe(llm: LLMResource) -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"answer": llm.chat_json(HELLO), "llm_calls": llm.calls_made})

    result = dg.materialize([probe], resources={"llm": configured})
    assert result.success
    metadata = result.asset_materializations_for_node("probe")[0].metadata
    assert metadata["answer"].value == "fine" and metadata["llm_calls"].value == 1
    assert KEY not in str(metadata)
    assert [r.headers["authorization"] for r in server.requests] == [f"Bearer {KEY}"] * 2


# -------------------------------------------------------------------------- labeling + scoring, e2e


FAMILIES = {
    0: ("sorry", "apologize", "apologies"),
    1: ("refund", "reimbursement", "chargeback"),
    2: ("rain", "snow", "storm"),
}
# every sentence carries the document's number {i} near its middle, so no two documents share a sentence
# or an 8-word shingle: a content-grouped split treats them as independent documents
FILLERS = [
    "the order {i} is late",
    "my account {i} was opened",
    "the courier {i} came Tuesday",
    "please check form {i} attached",
    "the office {i} is upstairs",
    "thanks for reply {i}",
]
PHRASES = {
    0: [
        "we are sorry, case {i}, for the wait",
        "I apologize for case {i} confusion",
        "our apologies, case {i}, for this",
    ],
    1: ["I would like refund {i} now", "the reimbursement {i} is pending", "the bank opened chargeback {i}"],
    2: ["the rain {i} delayed the truck", "snow closed road {i}", "a storm hit depot {i}"],
}


def corpus(n: int = 360) -> pl.DataFrame:
    texts = []
    for i in range(n):
        parts = [FILLERS[i // 3 % 6].format(i=i)]  # fillers independent of the feature (i % 3)
        if i % 4 in (0, 1):
            parts.append(PHRASES[i % 3][i // 3 % 3].format(i=i))
        parts.append(FILLERS[(i // 18 + 1) % 6].format(i=i))
        texts.append(". ".join(parts).capitalize() + ".")
    return pl.DataFrame(
        {
            "dataset": "support",
            "doc_id": pl.Series(range(n), dtype=pl.Int32),
            "doc_hash": [text_hash(t) for t in texts],
            "text": texts,
        }
    )


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("label_scores", ROOT / "benchmarks" / "label_scores.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


MARK = re.compile(r"<<(.*?)>>")
LINE = re.compile(r"^(\d+)\. (.*)$", re.MULTILINE)


@pytest.fixture(scope="module")
def support(bench: ModuleType) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The support corpus and its rule-based activations (FAMILIES), built once for the module."""
    docs = corpus()
    return docs, bench.rule_based_activations(docs, FAMILIES)


def first_user_message(messages: list[dict]) -> str:
    """The prompt's user message (a follow-up that asks again comes after it)."""
    return next(m["content"] for m in messages if m["role"] == "user")


def oracle(messages: list[dict]) -> str:
    """A stand-in LLM that reads the prompts the way a model would: label = the most marked words;
    detection = does the text contain a label word; fuzz = is a highlighted word a label word."""
    system, user = messages[0]["content"], first_user_message(messages)  # also when asked again
    if system == LABEL_SYSTEM_PROMPT:
        firing = user.split("does NOT fire")[0]
        if "<<rain>>" in firing:  # the weather feature gets a malformed answer
            return "I am not sure what this feature does."
        words = Counter(w.lower() for m in MARK.findall(firing) for w in re.findall(r"\w+", m))
        top = [w for w, _ in words.most_common(3)]
        return f'Sure:\n```json\n{{"label": "{", ".join(top)}", "description": "Mentions of {top[0]}."}}\n```'
    label = user.splitlines()[0].removeprefix("Explanation: ").split(". ")[0]
    terms = set(re.findall(r"\w+", label.lower())) - {"topic", "syntax", "position"}  # words of any label
    texts = [t for _, t in LINE.findall(user.split("Texts:", 1)[1])]
    if system == DETECTION_SYSTEM_PROMPT:
        answers = [int(bool(terms & set(re.findall(r"\w+", t.lower())))) for t in texts]
    else:
        assert system == FUZZ_SYSTEM_PROMPT
        answers = [
            int(any(w in terms for m in MARK.findall(t) for w in re.findall(r"\w+", m.lower())))
            for t in texts
        ]
    return json.dumps(answers)


def test_label_and_score_end_to_end(
    server: FakeLLMServer, bench: ModuleType, support: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    server.answer = oracle
    docs, acts = support
    llm = resource(server, max_calls=1000)
    cache = LabelCache(tmp_path / "labels.parquet")
    params = dict(n_evidence=10, n_holdout=20)
    errors: list[str] = []
    labels = label_features(
        acts,
        docs,
        [0, 1, 2],
        dataset="support",
        sae_id="rules",
        llm=llm,
        cache=cache,
        errors=errors,
        **params,
    )
    by_feature = {r["feature"]: r for r in labels.iter_rows(named=True)}
    assert by_feature[0]["source"] == "llm:fake-model" and "sorry" in by_feature[0]["label"]
    assert by_feature[1]["source"] == "llm:fake-model" and "refund" in by_feature[1]["label"]
    assert by_feature[2]["source"] == "offline:log-odds"  # malformed answer: offline label kept instead
    assert [by_feature[f]["status"] for f in (0, 1, 2)] == ["parsed_from_prose"] * 2 + ["invalid"]
    assert len(errors) == 1 and errors[0].startswith("feature 2: LLM label failed") and "no JSON" in errors[0]
    # 2 LLM labels + feature 2 asked twice (its malformed answer is asked again once); its offline label
    assert len(server.requests) == 4 and len(cache) == 3
    follow = server.requests[-1].messages
    assert follow[-2] == {"role": "assistant", "content": "I am not sure what this feature does."}
    assert follow[-1]["role"] == "user" and "could not be used: no JSON" in follow[-1]["content"]
    # the labeler saw only evidence documents
    label_prompt = next(r for r in server.requests if "<<sorry>>" in r.messages[-1]["content"]).messages[-1][
        "content"
    ]
    heldout = split_evidence(acts, docs, 0, **params).heldout_doc_ids
    assert not any(docs["text"][d] in label_prompt for d in heldout)

    # a second run is served from the cache: no request, same labels
    again = label_features(
        acts, docs, [0, 1, 2], dataset="support", sae_id="rules", llm=llm, cache=cache, **params
    )
    assert len(server.requests) == 6  # only feature 2 (not cached) asked again (and once more)
    assert again.filter(pl.col("feature") < 2).equals(labels.filter(pl.col("feature") < 2))

    before = len(server.requests)
    scores = score_features(labels, acts, docs, llm=llm, n_boot=100, **params)
    assert set(scores["method"]) == {"embedding", "detection", "fuzz"}
    assert len(server.requests) - before == 2 * 3 * 4  # 2 LLM methods x 3 features x 40 excerpts / 10
    swapped, _ = bench.swapped_labels(labels)
    wrong = score_features(swapped, acts, docs, llm=llm, n_boot=100, **params)
    for method in ("detection", "fuzz"):
        good = scores.filter(method=method).sort("feature")
        bad = wrong.filter(method=method).sort("feature")
        assert (good["f1"] > bad["f1"] + 0.3).all(), (method, good["f1"].to_list(), bad["f1"].to_list())
        assert (good["precision"] > 0.9).all()
    assert KEY not in str(scores.to_dicts()) + str(labels.to_dicts())


def test_budget_exhaustion_keeps_partial_labels_and_scores(
    server: FakeLLMServer, support: tuple[pl.DataFrame, pl.DataFrame]
) -> None:
    server.answer = oracle
    docs, acts = support
    llm = resource(server, max_calls=1, max_concurrency=1)
    errors: list[str] = []
    labels = label_features(
        acts,
        docs,
        [0, 1],
        dataset="support",
        sae_id="rules",
        llm=llm,
        errors=errors,
        n_evidence=10,
        n_holdout=20,
    )
    assert len(server.requests) == 1
    assert sorted(labels["source"].to_list()) == ["llm:fake-model", "offline:log-odds"]
    assert sorted(labels["status"].to_list()) == ["budget_exhausted", "parsed_from_prose"]
    assert len(errors) == 1 and "budget exhausted" in errors[0]
    score_errors: list[str] = []
    scores = score_features(
        labels, acts, docs, llm=llm, n_evidence=10, n_holdout=20, n_boot=50, errors=score_errors
    )
    assert len(server.requests) == 1  # nothing left to spend
    assert scores["method"].to_list() == ["embedding", "embedding"]  # offline scores still computed
    assert score_errors and all("budget exhausted" in e for e in score_errors)


# ------------------------------------------------------------------ answers the way real models go wrong

GOOD_LABEL = '{"label": "apologies", "description": "Apologies to customers."}'


def test_a_refusal_is_not_retried(server: FakeLLMServer) -> None:
    server.enqueue(Refusal())
    llm = resource(server)
    with pytest.raises(LLMRefusal, match="refused"):
        llm.chat_json(HELLO)
    server.enqueue(Answer("", finish_reason="content_filter"))
    with pytest.raises(LLMRefusal, match="content_filter"):
        llm.chat_json(HELLO)
    assert len(server.requests) == 2 and llm.calls_made == 2


def test_a_truncated_answer_is_asked_again_once_with_twice_the_tokens(server: FakeLLMServer) -> None:
    server.answer = GOOD_LABEL
    server.enqueue(Truncated())
    llm = resource(server, max_tokens=100)
    assert llm.chat_json(HELLO) == GOOD_LABEL
    assert [r.body["max_tokens"] for r in server.requests] == [100, 200] and llm.calls_made == 2
    server.enqueue(Truncated(), Truncated())
    with pytest.raises(LLMTruncated, match="cut off at max_tokens=200") as info:
        llm.chat_json(HELLO)
    assert info.value.partial == GOOD_LABEL[: len(GOOD_LABEL) // 2]
    assert llm.calls_made == 4  # the retry is paid from the budget
    server.enqueue(Truncated())
    with pytest.raises(LLMTruncated):  # no attempt left for the retry
        resource(server, max_retries=0).chat_json(HELLO)


def restated(text: str) -> Answer:
    return Answer(json.dumps({"label": text, "description": "x"}))


def twice(bad: Answer) -> list[Answer]:
    """Feature 0's first answer, feature 1's (good), then feature 0's answer when asked again."""
    return [bad, Answer(GOOD_LABEL), bad]


LABEL_MODES = {
    "prose": ([Answer(in_prose(GOOD_LABEL))], "parsed_from_prose", True, 1),
    "fence": ([Answer(fenced(GOOD_LABEL))], "parsed_from_prose", True, 1),
    "refusal": ([Refusal()], "refused", False, 1),
    "refusal_in_prose": ([Refusal(as_text=True)], "refused", False, 1),
    "refusal_in_label": ([restated("I cannot determine this")], "refused", False, 1),
    "truncated_once": ([Truncated()], "ok", True, 2),
    "truncated": ([Truncated(), Truncated()], "truncated", False, 2),
    # rejected answers are asked again once, after feature 1's request: bad twice keeps the status ...
    "restates_markers": (twice(restated("<<sorry>> for the wait")), "restated_prompt", False, 2),
    "restates_instructions": (twice(restated("texts where the feature fires")), "restated_prompt", False, 2),
    "restates_placeholder": (twice(restated("<2-6 words>")), "restated_prompt", False, 2),
    "no_json": (twice(Answer("This feature is about customers and their orders.")), "invalid", False, 2),
    "empty_label": (twice(Answer('{"label": "", "description": "x"}')), "invalid", False, 2),
    # ... and a good second answer is used
    "no_json_then_good": ([Answer("This feature is about customers.")], "ok", True, 2),
    "restates_then_good": ([restated("<2-6 words>")], "ok", True, 2),
    "http_400": ([ServerError(400, "bad request")], "failed", False, 1),
}


@pytest.mark.parametrize("mode", sorted(LABEL_MODES))
def test_label_status_for_each_way_an_answer_goes_wrong(
    server: FakeLLMServer, support: tuple[pl.DataFrame, pl.DataFrame], mode: str
) -> None:
    behaviours, status, from_llm, requests = LABEL_MODES[mode]
    server.answer = GOOD_LABEL
    server.enqueue(*behaviours)  # feature 0's request comes first (one request at a time)
    docs, acts = support
    errors: list[str] = []
    labels = label_features(
        acts,
        docs,
        [0, 1],
        dataset="support",
        sae_id="rules",
        llm=resource(server, max_concurrency=1),
        errors=errors,
        n_evidence=10,
        n_holdout=20,
    )
    first, second = labels.sort("feature").iter_rows(named=True)
    assert first["status"] == status
    assert first["source"] == ("llm:fake-model" if from_llm else "offline:log-odds")
    assert (first["label"] == "apologies") == from_llm
    assert second["status"] == "ok" and second["label"] == "apologies"  # the other feature is untouched
    assert len(server.requests) == requests + 1
    if from_llm:
        assert not errors
    else:
        assert len(errors) == 1 and errors[0].startswith(f"feature 0: LLM label failed ({status})")


def detection_answer(messages: list[dict]) -> str:
    n = int(re.search(r"exactly (\d+) integers", first_user_message(messages)).group(1))
    return json.dumps([1] * n)


def out_of_range(values: list) -> Answer:
    return Answer(
        lambda m: json.dumps((values * 10)[: int(re.search(r"exactly (\d+)", first_user_message(m))[1])])
    )


SCORE_MODES = {
    "prose": (Answer(lambda m: in_prose(detection_answer(m))), "parsed_from_prose", 40),
    "fence": (Answer(lambda m: fenced(detection_answer(m))), "parsed_from_prose", 40),
    "refusal": (Refusal(), "refused", 30),
    "refusal_in_prose": (Refusal(as_text=True), "refused", 30),
    "truncated": (Truncated(), "truncated", 30),  # and again with twice the tokens: still cut off
    "scale_answers": (out_of_range([0, 2, 1]), "out_of_range", 30),
    "probabilities": (out_of_range([0.9, 0.1]), "out_of_range", 30),
    "negative": (out_of_range(["-1", 1]), "out_of_range", 30),
    "echoes_the_texts": (Answer(first_user_message), "restated_prompt", 30),
    "too_few_answers": (Answer("[1, 0]"), "invalid", 30),
    "words": (Answer('["yes", "no"]'), "invalid", 30),
    "server_error": (ServerError(503), "failed", 30),  # with max_retries=0
}


@pytest.mark.parametrize("mode", sorted(SCORE_MODES))
def test_score_status_for_each_way_a_reply_goes_wrong(
    server: FakeLLMServer, support: tuple[pl.DataFrame, pl.DataFrame], mode: str
) -> None:
    behaviour, status, n_examples = SCORE_MODES[mode]
    docs, acts = support
    labels = label_features(
        acts, docs, [0, 1], dataset="support", sae_id="rules", n_evidence=10, n_holdout=20
    )
    server.answer = detection_answer
    # feature 0's first batch (a truncated answer is asked again at once; a reply in ASKED_AGAIN after
    # the other 7 batches, and gets the same behaviour again)
    if status in ASKED_AGAIN:
        server.enqueue(behaviour, *[Answer(detection_answer)] * 7, behaviour)
    else:
        server.enqueue(behaviour, *([behaviour] if mode == "truncated" else []))
    errors: list[str] = []
    counts: dict[str, int] = {}
    scores = score_features(
        labels,
        acts,
        docs,
        methods=["detection"],
        llm=resource(server, max_concurrency=1, max_retries=0 if mode == "server_error" else 3),
        n_evidence=10,
        n_holdout=20,
        n_boot=20,
        errors=errors,
        counts=counts,
    )
    first, second = scores.sort("feature").iter_rows(named=True)
    assert (first["status"], first["n_examples"]) == (status, n_examples)
    assert (second["status"], second["n_examples"]) == ("ok", 40)  # the other feature is untouched
    assert counts[f"answers_{status}"] == 1 and counts.get("answers_ok", 0) == 3 + 4 - (status == "ok")
    assert counts["asked_again"] == (status in ASKED_AGAIN)
    if n_examples == 40:
        assert not errors
    else:
        assert len(errors) == 1 and errors[0].startswith(
            f"feature 0 (detection): 10 excerpts not scored ({status})"
        )


def test_a_feature_whose_every_reply_fails_does_not_drop_the_others(
    server: FakeLLMServer, support: tuple[pl.DataFrame, pl.DataFrame]
) -> None:
    docs, acts = support
    labels = label_features(
        acts, docs, [0, 1], dataset="support", sae_id="rules", n_evidence=10, n_holdout=20
    )
    server.answer = detection_answer
    good = Answer(detection_answer)
    # feature 0's 4 batches, feature 1's 4, then feature 0's invalid and out-of-range batches asked again
    server.enqueue(Refusal(), Answer("no idea"), Truncated(), Truncated(), out_of_range([3]), *[good] * 4)
    server.enqueue(Answer("still no idea"), out_of_range([3]))
    errors: list[str] = []
    counts: dict[str, int] = {}
    scores = score_features(
        labels,
        acts,
        docs,
        methods=["detection"],
        llm=resource(server, max_concurrency=1),
        n_evidence=10,
        n_holdout=20,
        n_boot=20,
        errors=errors,
        counts=counts,
    )
    assert scores["feature"].to_list() == [1] and scores["status"].to_list() == ["ok"]
    assert [e.split(": ")[1].split(" (")[0] for e in errors] == ["10 excerpts not scored"] * 4
    assert {k: v for k, v in counts.items() if k.startswith("answers_")} == {
        "answers_refused": 1,
        "answers_invalid": 1,
        "answers_truncated": 1,
        "answers_out_of_range": 1,
        "answers_ok": 4,
    }
