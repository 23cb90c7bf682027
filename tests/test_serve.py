"""The OpenAI-compatible server, driven over HTTP by the official `openai` client and by raw requests."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import soundfile as sf
import uvicorn
from helpers import clip

from diffa2.audio import decode_audio_bytes
from diffa2.chat import AudioRef, Conversation, Turn
from diffa2.diffusion.decoding import DecodeConfig
from diffa2.inference import AudioQA
from diffa2.serve.app import ServeOptions, create_app
from diffa2.serve.cli import build_parser, request_limits, served_name
from diffa2.serve.schema import Limits
from diffa2.validation import parse_checked

MODEL = "tiny"
QUESTION = "What is the pitch of the tone?"
LIMITS = Limits(max_body_bytes=300_000, max_audio_seconds=2.0, max_question_chars=100, max_n=3, max_gen_length=64)


def wav_bytes(seconds: float, freq: float = 440.0) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, clip(seconds, freq), 16000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def encoded(seconds: float, container: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, clip(seconds, 440.0), 16000, format=container)
    return buffer.getvalue()


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def user(*parts: dict, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


class Server:
    """uvicorn on a free port of 127.0.0.1, in a thread."""

    def __init__(self, qa: AudioQA, options: ServeOptions) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.app = create_app(qa, options)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()


@pytest.fixture(scope="module")
def qa(checkpoint) -> AudioQA:
    return AudioQA.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def server(qa):
    running = Server(qa, ServeOptions(MODEL, limits=LIMITS, max_batch=4, max_wait_ms=20))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def expected(qa: AudioQA, data: bytes, config: DecodeConfig, seed: int = 0) -> str:
    return qa.answer([decode_audio_bytes(data)], [QUESTION], config, seed=seed).texts[0]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{server.url}/health").json()
    assert health == {"status": "ok", "model": MODEL, "active": 0, "queued": 0}


def test_text_and_audio_answer_equals_audioqa(client, qa):
    data = wav_bytes(1.0)
    reply = client.chat.completions.create(model=MODEL, messages=user(audio_part(data)), max_tokens=16,
                                           extra_body={"decode_mode": "reference"})
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    assert len(reply.choices) == 1
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected(qa, data, DecodeConfig(gen_length=16, block_length=16,
                                                                                steps=16))
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_two_turn_conversation_with_two_clips_equals_audioqa(client, qa):
    first, second = wav_bytes(0.6, freq=300), wav_bytes(0.9, freq=900)
    messages = [*user(audio_part(first)), {"role": "assistant", "content": "low"},
                {"role": "user", "content": [{"type": "text", "text": "Which clip is higher?"}, audio_part(second)]}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                           extra_body={"decode_mode": "reference"})
    conversation = Conversation((Turn("user", (AudioRef(), QUESTION)), Turn("assistant", ("low",)),
                                 Turn("user", (AudioRef(), "Which clip is higher?"))))
    waves = [decode_audio_bytes(first), decode_audio_bytes(second)]
    answer = qa.answer([waves], [conversation], DecodeConfig(gen_length=16, block_length=16, steps=16))
    assert reply.choices[0].message.content == answer.texts[0]
    ids, _ = qa.chat.encode_conversation(conversation)
    assert reply.usage.prompt_tokens == len(ids) + int(qa.speech(waves).lengths.sum())


def test_extra_body_decoding_settings(client, qa):
    data = wav_bytes(0.8, freq=600)
    reply = client.chat.completions.create(
        model=MODEL, messages=user(audio_part(data)),
        extra_body={"decode_mode": "parallel", "gen_length": 24, "block_length": 8, "steps": 12, "threshold": 0.5})
    config = DecodeConfig.preset("parallel", gen_length=24, block_length=8, steps=12, threshold=0.5)
    assert reply.choices[0].message.content == expected(qa, data, config)


def test_streaming_deltas_add_up_to_the_answer(client):
    data = wav_bytes(1.0)
    kwargs = {"model": MODEL, "messages": user(audio_part(data)), "max_tokens": 16,
              "extra_body": {"decode_mode": "reference"}}
    plain = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(contents) == plain.message.content
    assert len(contents) >= 2  # the answer arrives as it is unmasked, not in one piece
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + [plain.finish_reason]


def test_n_answers_use_consecutive_seeds(client, qa):
    data = wav_bytes(1.0, freq=300)
    reply = client.chat.completions.create(model=MODEL, messages=user(audio_part(data)), n=2, temperature=0.8,
                                           seed=3, max_tokens=16, extra_body={"decode_mode": "reference"})
    config = DecodeConfig(gen_length=16, block_length=16, steps=16, temperature=0.8)
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.message.content for c in reply.choices] == [expected(qa, data, config, seed=s) for s in (3, 4)]
    assert reply.choices[0].message.content != reply.choices[1].message.content


def test_streaming_n_answers(client):
    data = wav_bytes(0.5)
    kwargs = {"model": MODEL, "messages": user(audio_part(data)), "n": 2, "temperature": 0.5, "max_tokens": 8}
    plain = client.chat.completions.create(**kwargs)
    texts = ["", ""]
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        texts[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert texts == [c.message.content for c in plain.choices]


def test_concurrent_requests_share_forwards_and_keep_their_answers(client, server, qa):
    lengths = [8, 16, 24, 32]
    datas = [wav_bytes(0.4 + 0.2 * i, freq=250 + 100 * i) for i in range(len(lengths))]
    replies: dict[int, str] = {}

    def ask(i: int) -> None:
        reply = client.chat.completions.create(model=MODEL, messages=user(audio_part(datas[i])),
                                               max_tokens=lengths[i], extra_body={"decode_mode": "reference"})
        replies[i] = reply.choices[0].message.content

    server.app.state.batcher.trace.clear()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(lengths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for i, n in enumerate(lengths):
        assert replies[i] == expected(qa, datas[i], DecodeConfig(gen_length=n, block_length=n, steps=n))
    trace = list(server.app.state.batcher.trace)
    assert sum(len(record.left) for record in trace) == 4
    assert max(len(record.rows) for record in trace) >= 2  # rows at different steps shared forwards
    assert len(trace) < sum(lengths)  # fewer forwards than one-by-one decoding (80)


def test_health_answers_while_a_forward_runs(client, server):
    data = wav_bytes(1.0)
    done = threading.Event()
    request = threading.Thread(target=lambda: (client.chat.completions.create(
        model=MODEL, messages=user(audio_part(data)), max_tokens=64,
        extra_body={"decode_mode": "reference"}), done.set()))
    request.start()
    seen = []
    while not done.is_set():
        seen.append(httpx.get(f"{server.url}/health").json()["active"])
    request.join(60)
    assert 1 in seen  # /health was answered while the request was being decoded


GOOD = {"model": MODEL, "messages": user(audio_part(wav_bytes(0.5)))}
BAD_REQUESTS = [
    ("not json", b"{", 400, "not JSON"),
    ("unknown field", {**GOOD, "gen_lenght": 8}, 400, "unknown field 'gen_lenght'"),
    ("unknown model", {**GOOD, "model": "gpt-4o"}, 404, "'gpt-4o' is not served"),
    ("bad base64", {**GOOD, "messages": user({"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}})},
     400, "not valid base64"),
    ("bad format", {**GOOD, "messages": user({"type": "input_audio", "input_audio": {"data": "", "format": "ogg"}})},
     400, "format"),
    ("not audio", {**GOOD, "messages": user(audio_part(b"hello, not a wav file"))}, 400, "cannot be decoded"),
    ("too long clip", {**GOOD, "messages": user(audio_part(wav_bytes(2.5)))}, 400, "limit of 2 s"),
    ("five clips", {**GOOD, "messages": user(*[audio_part(wav_bytes(0.1))] * 5)}, 400,
     "5 input_audio parts: a request carries at most 4 clips"),
    ("no clip", {**GOOD, "messages": [{"role": "user", "content": QUESTION}]}, 400, "no input_audio part"),
    ("audio in a system message", {**GOOD, "messages": [{"role": "system", "content": [audio_part(wav_bytes(0.3))]},
                                                       *GOOD["messages"]]}, 400, "audio goes in a user message"),
    ("ends with an assistant turn", {**GOOD, "messages": [*GOOD["messages"], {"role": "assistant", "content": "hi"}]},
     400, "the last turn must be the user turn to answer, got 'assistant'"),
    ("audio in an assistant message", {**GOOD, "messages": [*GOOD["messages"], {"role": "assistant", "content": [
        audio_part(wav_bytes(0.3))]}, *user()]}, 400, "messages[1] is an assistant message with an input_audio part"),
    ("system message", {**GOOD, "messages": [{"role": "system", "content": "Be brief."}, *GOOD["messages"]]}, 400,
     "the model's system prompt is fixed by the checkpoint"),
    ("long question", {**GOOD, "messages": user(audio_part(wav_bytes(0.3)), text="x" * 101)}, 400,
     "101 characters; the limit is 100"),
    ("body too large", {**GOOD, "messages": user(audio_part(b"\0" * 300_000))}, 413, "over the limit of 300000"),
    ("n over the limit", {**GOOD, "n": 4}, 400, "n 4 is over the limit of 3"),
    ("gen length over the limit", {**GOOD, "max_tokens": 65}, 400, "max_tokens 65 is over the limit of 64"),
    ("kv-cache mode", {**GOOD, "decode_mode": "fast"}, 400, "not covered by continuous batching"),
    ("inconsistent lengths", {**GOOD, "max_tokens": 8, "gen_length": 16}, 400, "disagree"),
    ("steps over gen_length", {**GOOD, "max_tokens": 8, "steps": 16}, 400, "steps 16 > gen_length 8"),
    ("negative temperature", {**GOOD, "temperature": -1}, 400, "temperature"),
    ("truncated wav", {**GOOD, "messages": user(audio_part(wav_bytes(0.5)[:4000]))}, 400,
     "input_audio.data is a truncated WAV file: its data chunk lacks 28080 of the bytes its header declares"),
    ("mp3 declared as wav", {**GOOD, "messages": user(audio_part(encoded(0.5, "MP3"), "wav"))}, 400,
     "input_audio.format is 'wav' but the data is a MP3 file: send format 'mp3'"),
    ("0-sample clip", {**GOOD, "messages": user(audio_part(wav_bytes(0.0)))}, 400,
     "contains no samples (zero-length audio); expected at least one sample"),
    ("huge n", {**GOOD, "n": 10**30}, 400, "n 1000000000000000000000000000000 is over the limit of 3"),
    ("n as a string", {**GOOD, "n": "2"}, 400, "n: Input should be a valid integer"),
    ("negative max_tokens", {**GOOD, "max_tokens": -8}, 400, "max_tokens: Input should be greater than or equal to 1"),
    ("infinite temperature", json.dumps({**GOOD, "temperature": float("inf")}).encode(), 400,
     "temperature: Input should be a finite number"),
    ("JSON array body", b"[1, 2]", 400, "body: Input should be a valid dictionary"),
]


@pytest.mark.parametrize(("body", "status", "message"), [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_its_4xx_and_the_server_keeps_answering(server, client, body, status, message):
    url = f"{server.url}/v1/chat/completions"
    response = httpx.post(url, content=body) if isinstance(body, bytes) else httpx.post(url, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert client.chat.completions.create(max_tokens=8, **GOOD).choices[0].message.content is not None


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_body_declared_as_not_json_gets_415(server, content_type):
    response = httpx.post(f"{server.url}/v1/chat/completions", content=json.dumps(GOOD).encode(),
                          headers={"content-type": content_type})
    assert response.status_code == 415
    assert response.json()["error"]["message"] == (f"Content-Type {content_type!r} is not application/json: send "
                                                   "the body as JSON with 'Content-Type: application/json'")


def test_official_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="unknown field 'stepz'"):
        client.chat.completions.create(max_tokens=8, extra_body={"stepz": 4}, **GOOD)


def test_bearer_token(qa):
    guarded = Server(qa, ServeOptions(MODEL, api_key="s3cret"))
    try:
        anonymous = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="wrong API key"):
            anonymous.models.list()
        with pytest.raises(openai.AuthenticationError):
            anonymous.chat.completions.create(max_tokens=8, **GOOD)
        assert httpx.get(f"{guarded.url}/v1/models").status_code == 401
        keyed = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in keyed.models.list().data] == [MODEL]
        assert keyed.chat.completions.create(max_tokens=8, **GOOD).choices[0].finish_reason in ("stop", "length")
        assert httpx.get(f"{guarded.url}/health").status_code == 200  # liveness stays open
    finally:
        guarded.close()


def test_max_clips_flag_sets_the_limit_a_request_is_refused_over(qa):
    args = parse_checked(build_parser(), ["--max-clips", "2"])
    limits = request_limits(args, window=2.0)
    assert (limits.max_clips, limits.max_audio_seconds, request_limits(parse_checked(build_parser(), []), 2.0).max_clips
            ) == (2, 2.0, 4)
    with pytest.raises(SystemExit):
        parse_checked(build_parser(), ["--max_clips", "0"])
    limited = Server(qa, ServeOptions(MODEL, limits=limits))
    try:
        url = f"{limited.url}/v1/chat/completions"
        over = httpx.post(url, json={**GOOD, "messages": user(*[audio_part(wav_bytes(0.2))] * 3), "max_tokens": 8})
        assert over.status_code == 400
        assert over.json()["error"] == {"message": "3 input_audio parts: a request carries at most 2 clips",
                                        "type": "invalid_request_error", "param": "messages",
                                        "code": "too_many_clips"}
        within = httpx.post(url, json={**GOOD, "messages": user(*[audio_part(wav_bytes(0.2))] * 2), "max_tokens": 8})
        assert within.status_code == 200
    finally:
        limited.close()


def test_cli_defaults_and_names(tmp_path):
    args = parse_checked(build_parser(), ["--max-batch", "4"])
    assert (args.host, args.port, args.max_batch, args.decode_mode, args.api_key) == ("127.0.0.1", 8000, 4,
                                                                                      "parallel", None)
    with pytest.raises(SystemExit):
        parse_checked(build_parser(), ["--max_batch", "0"])
    (tmp_path / "sft" / "final").mkdir(parents=True)
    assert served_name(tmp_path / "sft" / "final") == "sft"
    assert served_name(tmp_path / "sft") == "sft"
