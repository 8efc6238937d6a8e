"""Fast unit tests of the pure pieces: chunk encoding, Last-Event-ID, request validation, settings, logs."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest

from services.api.errors import BadRequest
from services.api.openai_schemas import ChatCompletionRequest, unsupported_params
from services.api.routes.common import validate
from services.api.settings import ApiSettings, SettingsError, load_settings
from services.api.streaming.replay import LastEventIdError, parse_last_event_id
from services.api.streaming.translate import DONE, ChunkEncoder, final_chunks
from services.protocol.events import ErrorInfo, Finished, Usage
from services.protocol.logs import JsonFormatter


def test_chunks_share_id_and_created_and_are_valid_json() -> None:
    enc = ChunkEncoder("chatcmpl-1", 42, 'mod"el')
    chunks = [enc.role(), enc.reasoning('th"ink\n'), enc.content("ünï"), enc.finish("stop")]
    chunks.append(enc.usage({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}))
    parsed = [json.loads(c) for c in chunks]
    assert {(p["id"], p["created"], p["model"], p["object"]) for p in parsed} == {
        ("chatcmpl-1", 42, 'mod"el', "chat.completion.chunk")
    }
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert parsed[1]["choices"][0]["delta"] == {"reasoning_content": 'th"ink\n'}
    assert parsed[2]["choices"][0]["delta"] == {"content": "ünï"}
    assert parsed[3]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert parsed[4]["choices"] == [] and parsed[4]["usage"]["total_tokens"] == 3
    assert all("usage" not in p for p in parsed[:4])


def test_with_include_usage_every_chunk_before_the_last_has_null_usage() -> None:
    # the OpenAI reference: with stream_options.include_usage, all chunks but the last carry "usage": null
    enc = ChunkEncoder("c", 1, "m", include_usage=True)
    chunks = [enc.role(), enc.reasoning("a"), enc.content("b"), enc.finish("length")]
    assert all(json.loads(c)["usage"] is None for c in chunks)
    last = json.loads(enc.usage({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}))
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 2
    assert all("\n" not in c for c in chunks)  # one SSE data line each


def test_final_chunks_per_finish_reason() -> None:
    enc = ChunkEncoder("c", 1, "m")
    usage = Usage(prompt_tokens=3, completion_tokens=4)
    chunks, status, reason = final_chunks(enc, Finished(seq=5, finish_reason="cancelled", usage=usage), True)
    assert status == "cancelled" and reason == "cancelled" and len(chunks) == 3 and chunks[-1] == DONE
    chunks, status, _ = final_chunks(enc, Finished(seq=5, finish_reason="length", usage=usage), False)
    assert status == "completed" and len(chunks) == 2
    err = Finished(seq=5, finish_reason="error", usage=usage, error=ErrorInfo(code="boom", message="bad"))
    chunks, status, reason = final_chunks(enc, err, True)
    assert status == "failed" and reason is None
    error = json.loads(chunks[0])["error"]
    assert error["code"] == "boom" and chunks[1] == DONE
    assert "bad" not in error["message"]  # the model's own text names internals: logged, not sent


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, (None, -1)),
        ("", (None, -1)),
        ("7", (None, 7)),
        ("abc:3", ("abc", 3)),
        ("a-b_c:-1", ("a-b_c", -1)),
        (" abc:9223372036854775807 ", ("abc", 2**63 - 1)),
    ],
)
def test_last_event_id_forms(value: str | None, expected: tuple[str | None, int]) -> None:
    assert parse_last_event_id(value, None) == expected


@pytest.mark.parametrize(
    "value",
    [
        "x",
        "abc:",
        "abc:x",
        "-2",
        "other:3",
        "a:b:-1",  # ":" is not a session-id character
        "1" * 4301,  # past Python's int-parsing digit limit
        "²",  # a Unicode digit: str.isdigit() accepts it, int() does not
        "abc:²",
        "abc:٣",
        "9223372036854775808",  # 2^63: beyond int64
        "abc:" + "9" * 20,
        "x" * 8192 + ":1",
        "abc:+3",
        "abc:3 4",
    ],
)
def test_bad_last_event_ids(value: str) -> None:
    with pytest.raises(LastEventIdError):
        parse_last_event_id(value, "abc")


def req(**body: object) -> ChatCompletionRequest:
    return validate(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], **body})


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"logit_bias": {"15": 5}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"web_search_options": {}}, "web_search_options"),
    ],
)
def test_unsupported_parameters_are_named(body: dict[str, object], param: str) -> None:
    assert unsupported_params(req(**body)) == param


def test_harmless_values_and_unknown_fields_pass() -> None:
    r = req(
        n=1,
        logprobs=False,
        response_format={"type": "text"},
        user="u",
        metadata={"a": 1},
        tool_choice="none",
        logit_bias={},
        modalities=["text"],
        store=False,
    )
    assert unsupported_params(r) is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"session_id": "bad id!"}, "session_id"),
        ({"session_id": "x" * 129}, "session_id"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        # integers are strict like booleans (OpenAI: "expected an integer"): no strings, floats or booleans
        ({"n": "2"}, "n"),
        ({"max_tokens": "16"}, "max_tokens"),
        ({"max_completion_tokens": 16.0}, "max_completion_tokens"),
        ({"seed": True}, "seed"),
        ({"top_k": "5"}, "top_k"),
        ({"top_logprobs": "3", "logprobs": True}, "top_logprobs"),
        ({"max_reasoning_tokens": 1.5}, "max_reasoning_tokens"),
        ({"mm_processor_kwargs": {"max_frames": "8"}}, "mm_processor_kwargs.max_frames"),
        # numbers likewise (an integer is a number: temperature 1 stays valid)
        ({"temperature": "0.5"}, "temperature"),
        ({"top_p": True}, "top_p"),
        ({"presence_penalty": "1"}, "presence_penalty"),
        ({"mm_processor_kwargs": {"fps": "2"}}, "mm_processor_kwargs.fps"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": False, "stream_options": {}}, "stream_options"),
    ],
)
def test_validation_errors_name_the_parameter(body: dict[str, object], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        req(**body)
    assert info.value.param is not None and info.value.param.startswith(param)


def test_integers_are_numbers() -> None:
    r = req(temperature=1, top_p=1, repetition_penalty=2, mm_processor_kwargs={"fps": 2})
    assert r.temperature == 1.0 and r.mm_processor_kwargs is not None and r.mm_processor_kwargs.fps == 2.0


def test_stream_null_is_false_and_stream_options_go_with_stream() -> None:
    assert req(stream=None).stream is False
    assert req(stream=True, stream_options={"include_usage": True}).include_usage


def test_token_limits_and_parts() -> None:
    r = req(max_tokens=5, max_completion_tokens=9, stop="x")
    assert r.effective_max_tokens() == 9 and r.stop_list() == ["x"]
    content = [
        {"type": "input_image", "image_url": "data:image/png;base64,AA"},
        {"type": "input_video", "input_video": {"url": "https://v"}},
        {"type": "video_url", "video_url": {"url": "https://w"}},
    ]
    r = req(messages=[{"role": "developer", "content": content}])
    parts = r.messages[0].content
    assert isinstance(parts, list)
    assert [(p.kind, p.media_url()) for p in parts] == [
        ("image", "data:image/png;base64,AA"),
        ("video", "https://v"),
        ("video", "https://w"),
    ]


def test_settings_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANCEL_AFTER_DISCONNECT_SECONDS", "-1")
    monkeypatch.setenv("API_KEYS", "sekrit-value")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "CANCEL_AFTER_DISCONNECT_SECONDS" in str(info.value) and "sekrit" not in str(info.value)
    monkeypatch.setenv("CANCEL_AFTER_DISCONNECT_SECONDS", "5")
    monkeypatch.setenv("MODEL_SERVICE_URL", "ftp://x")
    with pytest.raises(SettingsError, match="MODEL_SERVICE_URL"):
        load_settings()


def test_settings_keys_and_secrets() -> None:
    s = ApiSettings(api_keys=" k1 , k2 ,", model_service_url="http://a:1/, http://b:2")  # type: ignore[arg-type]
    assert s.key_hashes() == {hashlib.sha256(b"k1").hexdigest(), hashlib.sha256(b"k2").hexdigest()}
    assert s.model_urls() == ["http://a:1", "http://b:2"]
    assert "k1" not in s.secrets()  # too short to redact without mangling every log line
    assert ApiSettings(api_keys="").key_hashes() == frozenset()  # type: ignore[arg-type]


def test_logs_redact_secrets_bearer_tokens_and_url_passwords() -> None:
    formatter = JsonFormatter(["hf_secret_token_123"])
    record = logging.LogRecord(
        "x",
        logging.INFO,
        __file__,
        1,
        "t=%s auth=%s db=%s",
        ("hf_secret_token_123", "Bearer abc.def", "postgresql://u:pw@h/db"),
        None,
    )
    line = formatter.format(record)
    assert "hf_secret_token_123" not in line and "abc.def" not in line and ":pw@" not in line
    assert json.loads(line)["msg"].startswith("t=[REDACTED]")


def test_model_errors_count_the_model_services_failures_not_the_clients_input() -> None:
    from services.api.metrics import ApiMetrics
    from services.protocol import errors

    metrics = ApiMetrics()
    refused = (errors.PromptTooLong, errors.InvalidMedia, errors.InvalidSchema, errors.InvalidValue)
    for kind in (*refused, errors.InvalidRequest, errors.Overloaded):  # 400s and 429: not a failure
        metrics.model_error(kind("x"))
    for kind in (errors.NotReady, errors.NotFound, errors.ModelServiceError):
        metrics.model_error(kind("x"))
    counted = {
        s.labels["reason"]: s.value
        for family in metrics.registry.collect()
        if family.name == "api_model_errors"
        for s in family.samples
        if s.name == "api_model_errors_total"
    }
    assert {reason for reason, value in counted.items() if value} == {"not_ready", "not_found", "internal"}
    assert all(value in (0.0, 1.0) for value in counted.values())


def test_every_counted_model_error_reason_has_its_series_from_the_start() -> None:
    """``MODEL_ERROR_REASONS`` is written by hand: a new error kind of the model service must be in it."""
    from services.api.metrics import MODEL_ERROR_REASONS
    from services.protocol import errors

    def kinds(cls: type) -> list[type]:
        return [cls, *(k for sub in cls.__subclasses__() for k in kinds(sub))]

    counted = {
        k.code
        for k in kinds(errors.ModelServiceError)
        if not issubclass(k, (errors.InvalidRequest, errors.Overloaded))
    }
    assert set(MODEL_ERROR_REASONS) == counted | {"stream_broken", "generation_error"}


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ("messages[1].content[2]: image could not be decoded (truncated)", "messages[1].content[2]"),
        (
            "messages[0].content[0]: the request's media have more than 9 decoded pixels in all",
            "messages[0].content[0]",
        ),
        ("the request has 17 images; at most 16 are allowed", "messages"),  # a whole-request limit
        ("messages[1].content[2].x: near miss", "messages"),
        ("messages[1]: no part", "messages"),
        ("tools[0].function.parameters: not media", "messages"),
    ],
)
def test_a_model_media_error_names_the_part_it_starts_with(message: str, param: str) -> None:
    from services.api.errors import from_model_error
    from services.protocol.errors import InvalidMedia

    error = from_model_error(InvalidMedia(message), retry_after=1)
    assert isinstance(error, BadRequest) and error.code == "invalid_media"
    assert error.param == param and error.message == message


def test_labelled_api_counters_have_their_series_from_the_start() -> None:
    """A dashboard shows 0, not "no data", before the first cancel or model failure."""
    from services.api.metrics import MODEL_ERROR_REASONS, ApiMetrics

    page = ApiMetrics().exposition()[0].decode()
    for kind in ("manual", "auto"):
        assert f'api_cancels_total{{kind="{kind}"}} 0.0' in page
    for reason in MODEL_ERROR_REASONS:
        assert f'api_model_errors_total{{reason="{reason}"}} 0.0' in page


def test_the_session_store_is_named_without_credentials() -> None:
    from services.api.main import describe_store

    pg = ApiSettings(database_url="postgresql://app:s3cret@db.internal:6432/sessions?sslmode=require")
    assert describe_store(pg) == "postgres db.internal:6432/sessions"
    kv = ApiSettings(database_url="host=/var/run/postgresql dbname=app user=u password=s3cret")
    assert describe_store(kv) == "postgres /var/run/postgresql:default/app"
    assert describe_store(ApiSettings(database_url="postgresql:///app")) == "postgres default:default/app"
    # a password with an unescaped / or @ makes libpq split the URL wrongly: no piece of it is shown
    for url in (
        "postgresql://user:s3cr3t/word@localhost/db",
        "postgresql://user:ab+c/d=@127.0.0.1:5432/db",
        "postgresql://user:s3c@r3t@localhost/db",
        "postgresql://u:Tr0ub4dor,mysecretpart/Q@h/db",
        "postgresql://u:1234?x@h/db",
    ):
        said = describe_store(ApiSettings(database_url=url))
        assert said == "postgres (DATABASE_URL not shown: percent-encode / ? @ in its password)", (url, said)
    # ... while ordinary URLs show in full, whatever their password (percent-encoded where it must be)
    for url, said in (
        ("postgresql://postgres:postgres@postgres:5432/postgres", "postgres postgres:5432/postgres"),
        ("postgresql://u:5432@h:5432/db", "postgres h:5432/db"),
        ("postgresql://u:p%2Fq%40r@h1:5432,h2:5433/db", "postgres h1,h2:5432,5433/db"),
        ("postgresql://u:p@[fe80::1%25eth0]:5432/donn%C3%A9es", "postgres fe80::1%eth0:5432/données"),
    ):
        assert describe_store(ApiSettings(database_url=url)) == said
    bad = ApiSettings(database_url="postgresql://u:s3cret@[::1:5432/x")
    assert "s3cret" not in describe_store(bad) and describe_store(bad).startswith("postgres")
    assert describe_store(ApiSettings(sessions_db_path="/data/s.db")) == "sqlite /data/s.db"
    assert describe_store(ApiSettings(persist_sessions=False)).startswith("memory")
