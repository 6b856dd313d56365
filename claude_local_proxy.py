#!/usr/bin/env python3
"""claude_local_proxy: the Anthropic Messages API, served by your local models.

Point Claude Code (or any Anthropic client) at this proxy and each request is
translated to a local model server (Ollama by default, or any OpenAI-compatible
server such as llama.cpp's llama-server or vLLM) and back: streaming, tool use,
thinking and images included. Any tier can instead pass through untouched to
the real Anthropic API, so a lead agent can plan in the cloud while its workers
run locally.

    python claude_local_proxy.py
    ANTHROPIC_BASE_URL=http://localhost:8082 ANTHROPIC_API_KEY=proxy claude

The file reads top to bottom: configuration, request translation (pure),
response translation (pure), backends, HTTP handlers, main(). aiohttp is the
only dependency.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import string
import sys
import time
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

__version__ = "0.1.0"

log = logging.getLogger("claude_local_proxy")


# ---------------------------------------------------------------------------
# Configuration: environment, then .env, then command-line flags
# ---------------------------------------------------------------------------

DEFAULT_OLLAMA_URL = "http://localhost:11434"
DEFAULT_UPSTREAM_URL = "https://api.anthropic.com"
MAP_PREFIX = "OLLAMA_MODEL_MAP_"
CONTEXT_PREFIX = "OLLAMA_CONTEXT_SIZE_"
TARGET_KINDS = ("ollama", "openai", "anthropic")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one tier's requests go: a kind of backend, its base URLs and a model."""

    kind: str  # "ollama", "openai" or "anthropic"
    urls: tuple[str, ...]
    model: str  # "": the default model, picked at request time (first tools-capable one)

    def describe(self) -> str:
        if self.kind == "anthropic":
            return f"anthropic ({', '.join(self.urls)})"
        return f"{self.model or '<first tools-capable model>'} on {self.kind} {','.join(self.urls)}"


@dataclasses.dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 8082
    ollama_url: str = DEFAULT_OLLAMA_URL
    model_map: dict[str, Target] = dataclasses.field(default_factory=dict)  # lower-cased key
    context_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    max_concurrency: int = 0  # per backend host; 0 = unlimited
    connect_timeout: float = 10.0
    first_byte_timeout: float = 600.0  # a model load on a home GPU can take minutes
    idle_timeout: float = 300.0
    ping_interval: float = 5.0
    max_body_bytes: int = 32 * 1024 * 1024
    upstream_url: str = DEFAULT_UPSTREAM_URL
    upstream_api_key: str = ""
    proxy_api_key: str = ""
    allow_public: bool = False
    log_level: str = "INFO"


class ConfigError(Exception):
    """A setting that cannot be used; main() prints it and exits."""


def parse_dotenv(text: str) -> dict[str, str]:
    """Parse .env text: comments, blank lines, `export X=`, single and double quotes."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            continue
        value = value.strip()
        if value[:1] in ("'", '"') and value[:1] in value[1:]:
            quote = value[0]
            value = value[1:value.index(quote, 1)] if quote == "'" else _unquote_double(value)
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        values[key] = value
    return values


def _unquote_double(value: str) -> str:
    out, i = [], 1
    escapes = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "$": "$"}
    while i < len(value) and value[i] != '"':
        if value[i] == "\\" and i + 1 < len(value):
            out.append(escapes.get(value[i + 1], "\\" + value[i + 1]))
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def normalize_ollama_url(value: str) -> str:
    """Accept OLLAMA_HOST's forms (`0.0.0.0:11434`, `host`, `:11434`, a URL) and give a URL."""
    value = value.strip().rstrip("/")
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    host = parts.hostname or "localhost"
    if host in ("0.0.0.0", "::"):  # a listen address; connect to this machine instead
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or (11434 if parts.scheme == "http" else 443)
    return f"{parts.scheme}://{host}:{port}{parts.path}"


def parse_target(value: str, default_ollama_url: str, upstream_url: str) -> Target:
    """`qwen3:8b`, `anthropic`, or `KIND:URL[,URL...]#MODEL` (e.g. `openai:http://gpu:8000/v1#qwen3`)."""
    value = value.strip()
    if value.lower() == "anthropic":
        return Target("anthropic", (upstream_url,), "")
    kind, sep, rest = value.partition(":")
    if sep and kind.lower() in TARGET_KINDS and rest.startswith(("http://", "https://")):
        urls_text, _, model = rest.partition("#")
        urls = tuple(u.strip().rstrip("/") for u in urls_text.split(",") if u.strip())
        if kind.lower() != "anthropic" and not model:
            raise ConfigError(f"{value!r}: name the model after '#', e.g. {kind}:{urls_text}#qwen3:8b")
        return Target(kind.lower(), urls, model)
    if not value:
        raise ConfigError("a model map entry is empty")
    return Target("ollama", (default_ollama_url,), value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="claude-local-proxy",
        description="Serve the Anthropic Messages API from local models (Ollama, llama.cpp, vLLM...).",
        epilog="Settings come from the environment, then .env; flags beat both. See README.md.",
    )
    parser.add_argument("--host", help="listen address (PROXY_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (PROXY_PORT, default 8082)")
    parser.add_argument("--env-file", help="read settings from this file instead of ./.env")
    parser.add_argument("--allow-public", action="store_true",
                        help="listen on a non-loopback address without PROXY_API_KEY")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_args(argv)


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    args = parse_args(argv)
    environ = dict(os.environ if environ is None else environ)
    env_file = args.env_file or ".env"
    env: dict[str, str] = {}
    if os.path.exists(env_file):
        with open(env_file, encoding="utf-8") as f:
            env = parse_dotenv(f.read())
    elif args.env_file:
        raise ConfigError(f"--env-file {args.env_file}: no such file")
    env.update(environ)  # an exported variable beats the file

    def number(name: str, default, kind=float):
        raw = env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
        if not value >= 0:  # also refuses nan
            raise ConfigError(f"{name}={raw!r} must be a number >= 0")
        return value

    ollama_raw = env.get("OLLAMA_BASE_URL") or env.get("OLLAMA_HOST") or DEFAULT_OLLAMA_URL
    config = Config(
        host=args.host or env.get("PROXY_HOST") or "127.0.0.1",
        port=args.port if args.port is not None else number("PROXY_PORT", 8082, int),
        ollama_url=normalize_ollama_url(ollama_raw),
        max_concurrency=number("OLLAMA_MAX_CONCURRENCY", 0, int),
        connect_timeout=number("PROXY_CONNECT_TIMEOUT", 10.0),
        first_byte_timeout=number("PROXY_FIRST_BYTE_TIMEOUT", 600.0),
        idle_timeout=number("PROXY_IDLE_TIMEOUT", 300.0),
        ping_interval=number("PROXY_PING_INTERVAL", 5.0) or 5.0,
        max_body_bytes=number("PROXY_MAX_BODY_BYTES", 32 * 1024 * 1024, int),
        upstream_api_key=env.get("ANTHROPIC_UPSTREAM_API_KEY", "").strip(),
        proxy_api_key=env.get("PROXY_API_KEY", "").strip(),
        allow_public=args.allow_public,
        log_level=(env.get("PROXY_LOG_LEVEL") or "INFO").upper(),
    )
    config.upstream_url = choose_upstream_url(env, config.host, config.port)
    for name, value in sorted(env.items()):
        if name.startswith(MAP_PREFIX) and len(name) > len(MAP_PREFIX):
            config.model_map[name[len(MAP_PREFIX):].lower()] = parse_target(
                value, config.ollama_url, config.upstream_url)
        elif name.startswith(CONTEXT_PREFIX) and len(name) > len(CONTEXT_PREFIX):
            config.context_sizes[name[len(CONTEXT_PREFIX):].lower()] = number(name, 0, int)
    return config


def choose_upstream_url(env: dict[str, str], proxy_host: str, proxy_port: int) -> str:
    """ANTHROPIC_UPSTREAM_URL, else ANTHROPIC_BASE_URL unless that points back at this proxy."""
    if env.get("ANTHROPIC_UPSTREAM_URL"):
        return env["ANTHROPIC_UPSTREAM_URL"].rstrip("/")
    base = env.get("ANTHROPIC_BASE_URL", "").strip().rstrip("/")
    if not base:
        return DEFAULT_UPSTREAM_URL
    parts = urlsplit(base if "://" in base else "http://" + base)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if port == proxy_port and (is_loopback(parts.hostname or "") or parts.hostname == proxy_host):
        log.warning("ignoring ANTHROPIC_BASE_URL=%s: it points at this proxy (exported for Claude Code?); "
                    "cloud tiers use %s. Set ANTHROPIC_UPSTREAM_URL to choose another.",
                    base, DEFAULT_UPSTREAM_URL)
        return DEFAULT_UPSTREAM_URL
    return base


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def longest_key_match(table: dict, model: str):
    """The entry whose key is the longest substring of the model name ("default" never matches)."""
    name = model.lower()
    keys = [k for k in table if k != "default" and k in name]
    if not keys:
        return None, None
    key = max(keys, key=len)
    return key, table[key]


def resolve_target(config: Config, model: str) -> tuple[str, Target]:
    """Map a requested model name to (tier, target). Target.model "" = the auto default."""
    key, target = longest_key_match(config.model_map, model)
    if target is not None:
        return key, target
    if not model.lower().startswith("claude"):
        return "verbatim", Target("ollama", (config.ollama_url,), model)
    if "default" in config.model_map:
        return "default", config.model_map["default"]
    return "default", Target("ollama", (config.ollama_url,), "")


# ---------------------------------------------------------------------------
# Errors, in Anthropic's shape
# ---------------------------------------------------------------------------

STATUS_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                      403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                      413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                      502: "api_error", 503: "api_error", 504: "timeout_error",
                      529: "overloaded_error"}


class ProxyError(Exception):
    """An error the client gets as `{"type":"error","error":{...}}` (or `event: error`)."""

    def __init__(self, status: int, error_type: str, message: str, *, retry: bool = True):
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message
        self.retry = retry  # False adds `x-should-retry: false` so SDKs do not loop on it

    def body(self) -> dict:
        return {"type": "error", "error": {"type": self.error_type, "message": self.message}}


def invalid(message: str) -> ProxyError:
    return ProxyError(400, "invalid_request_error", message, retry=False)


def prompt_too_long(tokens: int, maximum: int) -> ProxyError:
    # Claude Code reacts to exactly this text by compacting the conversation.
    return invalid(f"prompt is too long: {tokens} tokens > {maximum} maximum")


# ---------------------------------------------------------------------------
# Request translation: Anthropic Messages -> Ollama /api/chat (pure)
# ---------------------------------------------------------------------------

BILLING_HEADER = "x-anthropic-billing-header:"
ROLES = ("user", "assistant", "system")
TOOL_CHOICES = ("auto", "any", "tool", "none")
EFFORTS = ("low", "medium", "high")
IMAGE_TOKENS = 1600  # what a typical image costs a vision model, for estimates


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and value == value and abs(value) != float("inf"))


def validate_request(body, *, count_tokens: bool = False) -> dict:
    """Check the top-level fields; blocks are checked while they are translated."""
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("model: field required (a non-empty string)")
    if not count_tokens:
        max_tokens = body.get("max_tokens")
        if not _is_int(max_tokens) or max_tokens < 1:
            raise invalid("max_tokens: field required (an integer >= 1)")
        if not isinstance(body.get("stream", False), bool):
            raise invalid("stream: must be a boolean")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: field required (a non-empty list)")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages.{i}: must be an object with role and content")
        if message.get("role") not in ROLES:
            raise invalid(f"messages.{i}.role: must be one of {', '.join(ROLES)}, "
                          f"got {message.get('role')!r}")
        content = message.get("content", [] if message.get("role") == "system" else None)
        if not isinstance(content, (str, list)):
            raise invalid(f"messages.{i}.content: must be a string or a list of blocks")
    for name in ("temperature", "top_p"):
        if name in body and not _is_number(body[name]):
            raise invalid(f"{name}: must be a number")
    if "top_k" in body and not _is_int(body["top_k"]):
        raise invalid("top_k: must be an integer")
    stops = body.get("stop_sequences", [])
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop_sequences: must be a list of strings")
    if "tools" in body and not isinstance(body["tools"], list):
        raise invalid("tools: must be a list")
    for name in ("thinking", "tool_choice", "output_config", "metadata"):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise invalid(f"{name}: must be an object")
    choice = body.get("tool_choice") or {}
    if choice and choice.get("type") not in TOOL_CHOICES:
        raise invalid(f"tool_choice.type: must be one of {', '.join(TOOL_CHOICES)}")
    if choice.get("type") == "tool" and not isinstance(choice.get("name"), str):
        raise invalid("tool_choice.name: required when tool_choice.type is 'tool'")
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise invalid("system: must be a string or a list of text blocks")
    return body


def _blocks(content, path: str) -> list[tuple[dict, str]]:
    """Content as (block, path) pairs; a plain string is one text block."""
    if isinstance(content, str):
        return [({"type": "text", "text": content}, path)]
    if not isinstance(content, list):
        raise invalid(f"{path}: must be a string or a list of blocks")
    pairs = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise invalid(f"{path}.{j}: each block must be an object with a string 'type'")
        pairs.append((block, f"{path}.{j}"))
    return pairs


def _field(block: dict, name: str, path: str, kind=str):
    value = block.get(name)
    if not isinstance(value, kind):
        raise invalid(f"{path}.{name}: field required ({kind.__name__})")
    return value


def text_of(content, path: str) -> str:
    """The text blocks of a content value, joined; other blocks are skipped."""
    return "\n\n".join(_field(b, "text", p) for b, p in _blocks(content, path) if b["type"] == "text")


def system_prompt(system, path: str = "system") -> str:
    """A system prompt (string or text blocks) as one string, without Claude Code's per-version
    billing line (it would change the prompt's first tokens and defeat the prefix cache)."""
    if system is None:
        return ""
    parts = []
    for text in ([system] if isinstance(system, str) else
                 [_field(b, "text", p) for b, p in _blocks(system, path) if b["type"] == "text"]):
        kept = "\n".join(line for line in text.split("\n") if not line.startswith(BILLING_HEADER))
        if kept.strip():
            parts.append(kept)
    return "\n\n".join(parts)


def image_data(block: dict, path: str) -> str:
    """Raw base64 of an image block (url sources were inlined by `inline_url_images`)."""
    source = _field(block, "source", path, dict)
    if source.get("type") == "base64":
        data = _field(source, "data", f"{path}.source")
        return data.split(",", 1)[1] if data.startswith("data:") else data
    if source.get("type") == "url":
        raise invalid(f"{path}.source: url images could not be fetched by the proxy")
    raise invalid(f"{path}.source.type: must be 'base64' or 'url'")


def document_text(block: dict, path: str) -> str:
    source = _field(block, "source", path, dict)
    kind, media = source.get("type"), source.get("media_type", "")
    if kind == "text":
        text = _field(source, "data", f"{path}.source")
    elif kind == "content":
        text = text_of(source.get("content", ""), f"{path}.source.content")
    elif kind == "base64" and isinstance(media, str) and media.startswith("text/"):
        try:
            text = base64.b64decode(_field(source, "data", f"{path}.source")).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise invalid(f"{path}.source.data: not base64-encoded UTF-8 text") from None
    else:
        raise invalid(f"{path}: only plain-text documents can be sent to a local model "
                      f"(got {kind} {media or ''}); convert it to text first")
    title = block.get("title")
    return f"{title}\n\n{text}" if isinstance(title, str) and title else text


def tool_result_message(block: dict, path: str, calls: dict) -> tuple[int, dict]:
    """A tool_result block as an Ollama `tool` message, with its call's position."""
    call_id = _field(block, "tool_use_id", path)
    if call_id not in calls:
        raise invalid(f"{path}.tool_use_id: {call_id!r} matches no tool_use block "
                      f"in an earlier assistant message")
    name, position = calls[call_id]
    texts, images = [], []
    for b, p in _blocks(block.get("content", ""), f"{path}.content"):
        if b["type"] == "image":
            images.append(image_data(b, p))
        elif b["type"] == "document":
            texts.append(document_text(b, p))
        elif isinstance(b.get("text"), str):
            texts.append(b["text"])
    content = "\n\n".join(texts)
    if block.get("is_error") is True:
        content = "Error: " + content  # Ollama has no error flag; the model must still see it failed
    message = {"role": "tool", "content": content, "tool_name": name, "tool_call_id": call_id}
    if images:
        message["images"] = images
    return position, message


def user_messages(content, path: str, calls: dict) -> list[dict]:
    """One user turn: its tool results first (in call order), then its own text and images."""
    results, texts, images = [], [], []
    for block, p in _blocks(content, path):
        kind = block["type"]
        if kind == "text":
            texts.append(_field(block, "text", p))
        elif kind == "image":
            images.append(image_data(block, p))
        elif kind == "document":
            texts.append(document_text(block, p))
        elif kind == "tool_result":
            results.append(tool_result_message(block, p, calls))
        else:
            log.debug("skipping %s block at %s", kind, p)
    messages = [message for _, message in sorted(results, key=lambda r: r[0])]
    if texts or images or not messages:
        message = {"role": "user", "content": "\n\n".join(texts)}
        if images:
            message["images"] = images
        messages.append(message)
    return messages


def assistant_message(content, path: str, calls: dict) -> dict:
    """An assistant turn: text, thinking and tool_use blocks in one message."""
    texts, thinking, tool_calls = [], [], []
    for block, p in _blocks(content, path):
        kind = block["type"]
        if kind == "text":
            texts.append(_field(block, "text", p))
        elif kind == "thinking":
            thinking.append(_field(block, "thinking", p))
        elif kind == "tool_use":
            call_id, name = _field(block, "id", p), _field(block, "name", p)
            arguments = _field(block, "input", p, dict)
            calls[call_id] = (name, len(calls))
            tool_calls.append({"id": call_id, "function": {
                "index": len(tool_calls), "name": name, "arguments": arguments}})
        else:
            log.debug("skipping %s block at %s", kind, p)  # redacted_thinking, server tools...
    message = {"role": "assistant", "content": "\n\n".join(texts)}
    if thinking:
        message["thinking"] = "\n\n".join(thinking)
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def ollama_tools(body: dict) -> tuple[list[dict], str]:
    """The offered tools in Ollama's shape, and a system instruction when a call is required."""
    choice = body.get("tool_choice") or {}
    if choice.get("type") == "none":
        return [], ""
    tools = []
    for i, tool in enumerate(body.get("tools") or []):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise invalid(f"tools.{i}.name: field required (str)")
        schema = tool.get("input_schema")
        if tool.get("type", "custom") != "custom" or tool.get("defer_loading") or not isinstance(schema, dict):
            log.debug("not offering tool %s to the local model (server tool, deferred or no schema)",
                      tool["name"])
            continue
        if choice.get("type") == "tool" and tool["name"] != choice["name"]:
            continue
        description = tool.get("description")
        tools.append({"type": "function", "function": {
            "name": tool["name"],
            "description": description if isinstance(description, str) else "",
            "parameters": schema}})
    instruction = ""
    if choice.get("type") == "any" and tools:
        instruction = "You must answer by calling one of the available tools."
    elif choice.get("type") == "tool" and tools:
        instruction = f"You must answer by calling the tool {choice['name']}."
    return tools, instruction


def ollama_think(body: dict, capabilities) -> bool | str | None:
    """Ollama's `think` value, or None for a model that cannot think (think:true would 400)."""
    if "thinking" not in capabilities:
        return None
    thinking = body.get("thinking") or {}
    if thinking.get("type") not in ("enabled", "adaptive"):
        return False
    effort = (body.get("output_config") or {}).get("effort")
    if effort == "max":
        return "high"
    return effort if effort in EFFORTS else True


def ollama_format(body: dict):
    """output_config.format (Claude Code's title request) as Ollama's `format`."""
    fmt = (body.get("output_config") or {}).get("format")
    if not isinstance(fmt, dict):
        return None
    if isinstance(fmt.get("schema"), dict):
        return fmt["schema"]
    return "json" if fmt.get("type") in ("json", "json_object") else None


def anthropic_to_ollama(body: dict, model: str, *, capabilities=frozenset(),
                        num_ctx: int = 32768) -> dict:
    """Translate a validated Messages request into an Ollama /api/chat request.

    Deterministic: the same Anthropic prefix always renders the same Ollama
    messages (key order kept, nothing per-request added), so the backend can
    reuse its KV cache from one turn to the next.
    """
    messages = []
    system = system_prompt(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    calls: dict[str, tuple[str, int]] = {}  # tool_use id -> (name, position)
    for i, message in enumerate(body["messages"]):
        role, path = message["role"], f"messages.{i}.content"
        content = message.get("content", [])
        if role == "assistant":
            messages.append(assistant_message(content, path, calls))
        elif role == "system":
            text = system_prompt(content, path)
            if text:
                messages.append({"role": "system", "content": text})
        else:
            messages.extend(user_messages(content, path, calls))
    tools, instruction = ollama_tools(body)
    if instruction:
        messages.append({"role": "system", "content": instruction})

    options = {"num_ctx": num_ctx, "num_predict": min(body["max_tokens"], num_ctx)}
    for name in ("temperature", "top_p", "top_k"):
        if name in body:
            options[name] = body[name]
    # stop_sequences are matched by the proxy (ResponseTranslator), which can then say
    # which one matched; Ollama would strip it and report a plain "stop".
    request = {"model": model, "messages": messages, "stream": True, "options": options,
               "truncate": False}  # refuse, rather than silently drop the oldest messages
    if tools:
        request["tools"] = tools
    think = ollama_think(body, capabilities)
    if think is not None:
        request["think"] = think
    fmt = ollama_format(body)
    if fmt is not None:
        request["format"] = fmt
    return request


def estimate_tokens(body: dict) -> int:
    """Estimated input tokens: characters / 4 over the system prompt, every text, thinking
    and tool input in the messages, and the tools' JSON; 1,600 per image; 4 per message.

    Local models have no token-count endpoint; this is what count_tokens answers and
    what sizes the context."""
    chars = len(system_prompt(body.get("system"))) if isinstance(body.get("system"), (str, list)) else 0
    images = 0
    stack = [body.get("messages") or []]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if item.get("type") == "image":
                images += 1
            elif item.get("type") == "tool_use":
                chars += len(json.dumps(item.get("input"), ensure_ascii=False))
            else:
                stack.extend(v for k, v in item.items()
                             if k in ("content", "text", "thinking", "data", "name"))
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        chars += len(json.dumps(tools, ensure_ascii=False))
    messages = body.get("messages")
    count = len(messages) if isinstance(messages, list) else 0
    return -(-chars // 4) + images * IMAGE_TOKENS + 4 * count


CONTEXT_BUCKETS = (16384, 32768, 65536, 131072, 262144, 524288, 1048576)
REPLY_ROOM = 8192  # tokens kept free for the answer when sizing the context


def choose_num_ctx(prompt_tokens: int, max_tokens: int, model_max: int | None,
                   previous: int | None) -> int:
    """The context size for one request: room for the prompt and the reply, rounded up
    to a bucket, capped at what the model was trained for. The previous bucket is kept
    when it still fits, since every change of num_ctx makes Ollama reload the model."""
    if model_max and prompt_tokens > model_max:
        raise prompt_too_long(prompt_tokens, model_max)
    needed = prompt_tokens + min(max_tokens, REPLY_ROOM)
    if previous and needed <= previous and (not model_max or previous <= model_max):
        return previous
    bucket = next((b for b in CONTEXT_BUCKETS if b >= needed), CONTEXT_BUCKETS[-1])
    return min(bucket, model_max) if model_max else bucket


# ---------------------------------------------------------------------------
# Response translation: backend chunks -> Anthropic events (pure)
# ---------------------------------------------------------------------------
#
# Backend adapters (Ollama NDJSON, OpenAI SSE) turn their wire format into these
# tuples, and one ResponseTranslator turns them into Anthropic's event sequence:
#   (TEXT, str)  (THINKING, str)
#   (TOOL_CALL, name, arguments)        a whole call; arguments a dict or JSON text
#   (TOOL_CALL_PART, key, name, json)   a streamed call's first piece (name) or more JSON
#   (DONE, done_reason, input_tokens, output_tokens)
#   (ERROR, ProxyError)                 the backend failed mid-reply (after the chunks before it)

TEXT, THINKING, TOOL_CALL, TOOL_CALL_PART, DONE, ERROR = (
    "text", "thinking", "tool_call", "tool_call_part", "done", "error")
PING = ("ping",)
PING_EVENT = ("ping", {"type": "ping"})
BASE62 = string.digits + string.ascii_letters
STOP_REASONS = {"length": "max_tokens", "stop": "end_turn", "tool_calls": "tool_use",
                "max_tokens": "max_tokens", "end_turn": "end_turn"}


class ChunkList(list):
    """One batch of chunks, as an adapter builds it. Consecutive TEXT (or THINKING) pieces
    are joined into one chunk: tokens that arrived in one read leave as one delta, so a
    batch costs what a token did."""

    __slots__ = ("kind", "run")

    def __init__(self):
        super().__init__()
        self.kind, self.run = None, []

    def text(self, kind: str, piece: str) -> None:
        if kind != self.kind:
            self.close_run()
            self.kind = kind
        self.run.append(piece)

    def add(self, chunk: tuple) -> None:
        self.close_run()
        self.append(chunk)

    def close_run(self) -> "ChunkList":
        if self.run:
            self.append((self.kind, "".join(self.run)))
            self.run = []
        self.kind = None
        return self


def new_id(prefix: str) -> str:
    """prefix + 24 random base62 characters, like Anthropic's msg_/toolu_/req_ ids."""
    n = int.from_bytes(secrets.token_bytes(17), "big")  # 136 bits < 62**24
    chars = []
    for _ in range(24):
        n, digit = divmod(n, 62)
        chars.append(BASE62[digit])
    return prefix + "".join(chars)


# Tool calls written as text by models whose template the backend does not parse.
CALL_TAGS = (("<tool_call>", "</tool_call>"), ("<function=", "</function>"))
HOLD_LIMIT = 65536  # give up holding text back as a possible call past this size


def parse_call_object(obj, tool_names) -> tuple[str, dict] | None:
    """{"name": ..., "arguments"|"parameters"|"input": {...}} naming an offered tool."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    arguments = next((obj[k] for k in ("arguments", "parameters", "input") if k in obj), {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if name in tool_names and isinstance(arguments, dict):
        return name, arguments
    return None


def _parse_function_tag(inner: str, tool_names):
    """`<function=NAME>{json}` or `<function=NAME><parameter=k>v</parameter>...` (Qwen, Llama)."""
    name, _, rest = inner.partition(">")
    rest = rest.strip()
    if rest.startswith("{"):
        with contextlib.suppress(ValueError):
            return parse_call_object({"name": name.strip(), "arguments": json.loads(rest)}, tool_names)
        return None
    params = {}
    for key, value in re.findall(r"<parameter=([^>]+)>(.*?)</parameter>", rest, re.S):
        value = value.strip("\n")
        try:
            params[key.strip()] = json.loads(value)
        except ValueError:
            params[key.strip()] = value
    return parse_call_object({"name": name.strip(), "arguments": params}, tool_names)


def find_call_start(text: str, at_reply_start: bool) -> tuple[int, str]:
    """Where a tool call written as text may begin: (position, opener), or (-1, "")."""
    found = [(text.find(open_tag), open_tag) for open_tag, _ in CALL_TAGS if open_tag in text]
    if at_reply_start:
        stripped = len(text) - len(text.lstrip())
        if text[stripped:stripped + 3] == "```" or text[stripped:stripped + 1] == "{":
            found.append((stripped, text[stripped:stripped + 3] if text[stripped] == "`" else "{"))
    return min(found) if found else (-1, "")


def parse_text_call(text: str, opener: str, tool_names, final: bool):
    """Parse the call that `text` starts with. Returns (end, call): call is (name, arguments),
    or None when this is not a usable call; end is None while the call may be incomplete."""
    incomplete = (len(text), None) if final or len(text) > HOLD_LIMIT else (None, None)
    if opener == "{":
        body = text.lstrip()
        if body[1:].lstrip()[:1] not in ('"', ""):
            return len(text), None  # not a JSON object with keys: ordinary text
        try:
            obj, end = json.JSONDecoder().raw_decode(body)
        except ValueError:
            return incomplete
        return len(text) - len(body) + end, parse_call_object(obj, tool_names)
    if opener == "```":
        start = text.index("```")
        newline = text.find("\n", start)
        if newline < 0:
            return incomplete
        if text[start + 3:newline].strip().lower() not in ("", "json"):
            return len(text), None  # a code block in another language
        close = text.find("```", newline)
        if close < 0:
            return incomplete
        try:
            return close + 3, parse_call_object(json.loads(text[newline + 1:close]), tool_names)
        except ValueError:
            return close + 3, None
    close_tag = dict(CALL_TAGS)[opener]
    close = text.find(close_tag)
    if close < 0 and incomplete[0] is None:
        return incomplete
    end = len(text) if close < 0 else close + len(close_tag)
    inner = text[len(opener):close if close >= 0 else len(text)].strip()
    if opener == "<tool_call>" and inner.startswith("<function="):  # Qwen3-Coder wraps one in the other
        inner = inner[len("<function="):].removesuffix("</function>")
        opener = "<function="
    if opener == "<function=":
        return end, _parse_function_tag(inner, tool_names)
    try:
        return end, parse_call_object(json.loads(inner), tool_names)
    except ValueError:
        return end, None


def partial_suffix(text: str, markers) -> int:
    """Length of the longest end of `text` that could begin one of `markers`."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if marker.startswith(text[-n:]):
                best = n
                break
    return best


class ResponseTranslator:
    """Turns one reply's backend chunks into Anthropic stream events.

    Pure and synchronous: feed() takes a chunk and returns the events it causes,
    as (event name, data) pairs. Blocks are opened and closed so their indexes run
    0, 1, 2... whatever order thinking, text and tool calls arrive in. Text is held
    back only while it could still be a stop sequence or a tool call written as text.
    """

    def __init__(self, model: str, *, input_tokens: int, stop_sequences=(), tool_names=(),
                 single_tool_call: bool = False):
        self.model = model
        self.input_tokens = input_tokens
        self.stop_sequences = tuple(s for s in stop_sequences if s)
        self.tool_names = frozenset(tool_names)
        self.single_tool_call = single_tool_call
        self.holds_text = bool(self.stop_sequences or self.tool_names)
        self.index = -1  # index of the last block started
        self.open = None  # type of the open block, or None
        self.tool_calls = 0
        self.streamed_call = None  # key of a TOOL_CALL_PART call being streamed
        self.rejected = None  # (key, name, pieces) of a streamed call to a tool not offered
        self.pending = ""  # text held back
        self.text_started = False  # any non-blank text released yet
        self.chunks = 0
        self.stop_sequence = None
        self.done = False
        self.usage = {"input_tokens": input_tokens, "output_tokens": 0}

    # -- events ------------------------------------------------------------
    def start(self) -> list:
        return [("message_start", {"type": "message_start", "message": {
            "id": new_id("msg_"), "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0}}})]

    def _open_block(self, kind: str, block: dict, events: list) -> None:
        self._close_block(events)
        self.index += 1
        self.open = kind
        events.append(("content_block_start",
                       {"type": "content_block_start", "index": self.index, "content_block": block}))

    def _close_block(self, events: list) -> None:
        if self.open is None:
            return
        if self.open == "thinking":  # clients expect a signature before a thinking block ends
            events.append(("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                   "delta": {"type": "signature_delta", "signature": ""}}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        self.open = None
        self.streamed_call = None

    def _delta(self, delta: dict, events: list) -> None:
        events.append(("content_block_delta",
                       {"type": "content_block_delta", "index": self.index, "delta": delta}))

    def _text_events(self, text: str, events: list) -> None:
        if not text:
            return
        if self.open != "text":
            self._open_block("text", {"type": "text", "text": ""}, events)
        self._delta({"type": "text_delta", "text": text}, events)

    def _tool_use(self, name: str, arguments: dict, events: list) -> None:
        if self.single_tool_call and self.tool_calls:
            log.debug("dropping extra tool call %s (disable_parallel_tool_use)", name)
            return
        self.tool_calls += 1
        self._open_block("tool", {"type": "tool_use", "id": new_id("toolu_"), "name": name,
                                  "input": {}}, events)
        self._delta({"type": "input_json_delta",
                     "partial_json": json.dumps(arguments, ensure_ascii=False)}, events)
        self._close_block(events)

    # -- chunks --------------------------------------------------------------
    def feed(self, chunk: tuple) -> list:
        events: list = []
        kind = chunk[0]
        self.chunks += 1
        if self.rejected and kind != TOOL_CALL_PART:
            self._release_rejected(events)
        if kind == TEXT:
            if self.holds_text:
                self.pending += chunk[1]
                self._release(events, final=False)
            else:
                self._text_events(chunk[1], events)
        elif kind == THINKING:
            if self.open != "thinking":
                self._release(events, final=True)
                self._open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""}, events)
            self._delta({"type": "thinking_delta", "thinking": chunk[1]}, events)
        elif kind == TOOL_CALL:
            self._release(events, final=True)
            self._native_call(chunk[1], chunk[2], events)
        elif kind == TOOL_CALL_PART:
            self._release(events, final=True)
            self._call_part(chunk[1], chunk[2], chunk[3], events)
        elif kind == DONE:
            self._finish(chunk[1], chunk[2], chunk[3], events)
        if self.stop_sequence and not self.done:  # the reply ends at the matched sequence
            self._finish("stop_sequence", None, None, events)
        return events

    def _native_call(self, name, arguments, events: list) -> None:
        if arguments is None:
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                pass
        if name in self.tool_names and isinstance(arguments, dict):
            self._tool_use(name, arguments, events)
            return
        reason = "a tool that was not offered" if name not in self.tool_names else "unparseable arguments"
        log.warning("model called %r with %s; passing the call on as text", name, reason)
        text = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        self._text_events(f"<tool_call>{text}</tool_call>", events)

    def _call_part(self, key, name, piece: str, events: list) -> None:
        """A call streamed in pieces (OpenAI-style): open on its name, then pass JSON through."""
        if self.rejected and self.rejected[0] == key:
            self.rejected[2].append(piece)
            return
        if name is not None and key != self.streamed_call:
            self._release_rejected(events)
            if self.single_tool_call and self.tool_calls:
                log.debug("dropping extra tool call %s (disable_parallel_tool_use)", name)
                self._close_block(events)
                self.streamed_call = ("dropped", key)
                return
            if name not in self.tool_names:  # passed on as text once its arguments are complete
                log.warning("model called %r, a tool that was not offered; passing the call on as text", name)
                self._close_block(events)
                self.rejected = (key, name, [piece])
                return
            self.tool_calls += 1
            self._open_block("tool", {"type": "tool_use", "id": new_id("toolu_"), "name": name,
                                      "input": {}}, events)
            self.streamed_call = key
        if piece and self.streamed_call == key and self.open == "tool":
            self._delta({"type": "input_json_delta", "partial_json": piece}, events)

    def _release_rejected(self, events: list) -> None:
        if self.rejected:
            _, name, pieces = self.rejected
            self.rejected = None
            self._text_events(f'<tool_call>{{"name": {json.dumps(name)}, "arguments": '
                              f'{"".join(pieces) or "{}"}}}</tool_call>', events)

    def _release(self, events: list, final: bool) -> None:
        """Emit held text that can no longer become a stop sequence or a tool call."""
        if not self.pending:
            return
        text, self.pending = self.pending, ""
        if self.stop_sequences:
            hits = [(text.find(s), s) for s in self.stop_sequences if s in text]
            if hits:
                position, self.stop_sequence = min(hits)
                text, final = text[:position], True
            elif not final:
                keep = partial_suffix(text, self.stop_sequences)
                if keep:
                    text, self.pending = text[:-keep], text[-keep:]
        pieces = self._split_calls(text, final) if self.tool_names else ((TEXT, text),)
        for piece in pieces:
            if piece[0] == TEXT:
                self._text_events(piece[1], events)
                self.text_started = self.text_started or bool(piece[1].strip())
            else:
                self._tool_use(piece[1], piece[2], events)

    def _split_calls(self, text: str, final: bool) -> list:
        """Split tool calls written as text out of `text`: [(TEXT, s) | (TOOL_CALL, name, args)].
        Text that could still become a call goes back into self.pending."""
        pieces, held, started = [], "", self.text_started
        while text:
            position, opener = find_call_start(text, not started)
            if position < 0:
                keep = 0 if final else partial_suffix(text, [tag for tag, _ in CALL_TAGS])
                if not final and not started and not text.strip():
                    keep = len(text)  # leading blanks may still precede a call
                pieces.append((TEXT, text[:len(text) - keep]))
                held = text[len(text) - keep:]
                break
            end, call = parse_text_call(text[position:], opener, self.tool_names, final)
            if end is None:
                if started or text[:position].strip():
                    pieces.append((TEXT, text[:position]))
                    text = text[position:]
                held = text
                break
            if call is None:
                if opener in ("<tool_call>", "<function="):
                    log.warning("model wrote a tool call that names no offered tool or has bad "
                                "arguments (%r...); passing it on as text", text[position:position + 80])
                pieces.append((TEXT, text[:position + end]))
                started = started or bool(text[:position + end].strip())
            else:
                if text[:position].strip():
                    pieces.append((TEXT, text[:position]))
                    started = True
                pieces.append((TOOL_CALL, *call))
            text = text[position + end:]
        self.pending = held + self.pending
        return pieces

    def _finish(self, done_reason, input_tokens, output_tokens, events: list) -> None:
        self._release_rejected(events)
        self._release(events, final=True)
        self._close_block(events)
        if self.stop_sequence:
            stop_reason = "stop_sequence"
        elif self.tool_calls:
            stop_reason = "tool_use"
        else:
            stop_reason = STOP_REASONS.get(done_reason, "end_turn")
        if input_tokens is not None:
            self.usage["input_tokens"] = input_tokens
        self.usage["output_tokens"] = output_tokens if output_tokens is not None else self.chunks
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": stop_reason,
                                                   "stop_sequence": self.stop_sequence},
                                         "usage": dict(self.usage)}))
        events.append(("message_stop", {"type": "message_stop"}))
        self.done = True


# The event sent once per token, built from a template: only the text is JSON-escaped.
TEXT_DELTA_SSE = ('event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                  '"delta":{"type":"text_delta","text":%s}}\n\n')
compact_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode_sse(events) -> bytes:
    """Anthropic events as SSE bytes: every event has an `event:` line and a blank line after."""
    parts = []
    for name, data in events:
        delta = data.get("delta")
        if name == "content_block_delta" and delta["type"] == "text_delta":
            parts.append(TEXT_DELTA_SSE % (data["index"], json.encoder.encode_basestring(delta["text"])))
        else:
            parts.append(f"event: {name}\ndata: {compact_json(data)}\n\n")
    return "".join(parts).encode("utf-8", "replace")


def error_event(error: ProxyError) -> tuple[str, dict]:
    return ("error", error.body())


def message_from_events(events) -> dict:
    """Fold a stream's events into the non-streaming Message, as the SDKs' accumulators do."""
    message: dict = {}
    partial_json: dict[int, str] = {}
    for name, data in events:
        if name == "message_start":
            message = dict(data["message"], content=[], usage=dict(data["message"]["usage"]))
        elif name == "content_block_start":
            message["content"].append(dict(data["content_block"]))
        elif name == "content_block_delta":
            index, delta = data["index"], data["delta"]
            block = message["content"][index]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                partial_json[index] = partial_json.get(index, "") + delta["partial_json"]
        elif name == "content_block_stop" and data["index"] in partial_json:
            try:
                message["content"][data["index"]]["input"] = json.loads(partial_json.pop(data["index"]) or "{}")
            except ValueError:
                log.warning("a streamed tool call's arguments are not valid JSON; sending input {}")
        elif name == "message_delta":
            message.update(data["delta"])
            message["usage"].update(data["usage"])
    return message


# ---------------------------------------------------------------------------
# Backends: local model servers (Ollama, OpenAI-compatible) and the Anthropic API
# ---------------------------------------------------------------------------

JSON_HEADERS = {"Content-Type": "application/json"}
CONTEXT_OVERFLOW = re.compile(r"context (length|size|window)|exceeds the context|longer than the context", re.I)
# llama-server: "request (12031 tokens) exceeds the available context size (8192 tokens)"
OVERFLOW_COUNTS = re.compile(r"\((\d+) tokens\).*\((\d+) tokens\)")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    capabilities: frozenset
    context_length: int | None


class HostDown(Exception):
    """A host failed before sending any reply; the request may be retried elsewhere."""

    def __init__(self, error: ProxyError):
        super().__init__(error.message)
        self.error = error


class Host:
    """One server of a backend: its URL, requests in flight (queued included) and health."""

    def __init__(self, url: str, max_concurrency: int):
        self.url = url
        self.inflight = 0
        self.failures = 0  # consecutive failures; > 0 means down until a probe succeeds
        self.probe_at = 0.0
        self.last_error = ""
        self.limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    @property
    def healthy(self) -> bool:
        return self.failures == 0

    def mark_down(self, reason: str) -> None:
        """Take the host out of rotation; the prober tries it again after a growing pause."""
        self.failures += 1
        self.probe_at = time.monotonic() + min(0.5 * 2 ** self.failures, 60.0)
        self.last_error = reason

    def mark_up(self) -> None:
        if self.failures:
            log.info("%s is reachable again", self.url)
        self.failures, self.last_error = 0, ""

    @contextlib.asynccontextmanager
    async def slot(self):
        """Hold one of the host's request slots; waiters are served in arrival order."""
        self.inflight += 1
        try:
            if self.limit is None:
                yield
            else:
                async with self.limit:
                    yield
        finally:
            self.inflight -= 1

    def status(self) -> dict:
        return {"url": self.url, "healthy": self.healthy, "in_flight": self.inflight,
                "last_error": self.last_error or None}


async def read_line_batches(content: aiohttp.StreamReader, idle_timeout: float):
    """Lines of a streamed body, in batches: every line that arrived with one read.
    Reading in bulk keeps the proxy's cost per token low."""
    tail = b""
    while True:
        async with asyncio.timeout(idle_timeout or None):
            data = await content.readany()
        if not data:
            break
        lines = (tail + data).split(b"\n")
        tail = lines.pop()
        lines = [line for line in lines if line.strip()]
        if lines:
            yield lines
    if tail.strip():
        yield [tail]


def json_lines(lines: list[bytes]) -> tuple[list[dict], ProxyError | None]:
    """Decode a batch of JSON lines with one json.loads call (per-line calls cost more in
    Python overhead than in parsing). On a bad line: the objects before it, and the error."""
    try:
        objects = json.loads(b"[" + b",".join(lines) + b"]")
        if all(isinstance(o, dict) for o in objects):
            return objects, None
    except ValueError:
        pass
    objects = []
    for line in lines:
        try:
            data = json.loads(line)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return objects, ProxyError(502, "api_error", f"the backend sent a line that is not a JSON object: "
                                       f"{line[:120]!r}")
        objects.append(data)
    return objects, None


def error_text(raw: bytes) -> str:
    """The message of an error body: Ollama's {"error": str}, OpenAI's {"error": {"message"}}, or text."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        error = json.loads(text).get("error", text)
    except (ValueError, AttributeError):
        return text[:500] or "(empty body)"
    if isinstance(error, dict):
        error = error.get("message", json.dumps(error))
    return str(error)[:500]


class LocalBackend:
    """A local model server with one or more hosts. Subclasses speak its wire format."""

    kind = ""
    chat_path = ""  # streaming chat endpoint, under the host's URL
    probe_path = "/"  # a cheap GET that answers when the server is up
    start_hint = "is the server running?"
    truncates_silently = False  # drops what does not fit instead of refusing (Ollama)

    def __init__(self, urls, session: aiohttp.ClientSession, config: Config):
        self.hosts = [Host(url, config.max_concurrency) for url in urls]
        self.session = session
        self.config = config
        self.models: dict[str, ModelInfo] = {}  # /api/show results, cached per model
        self.num_ctx: dict[str, int] = {}  # last context size per model (a change reloads it)
        self.affinity: dict[str, Host] = {}  # conversation -> host holding its prompt cache
        self.default_model = ""

    # -- host choice ---------------------------------------------------------
    def pick_host(self, affinity: str | None = None, exclude=()) -> Host:
        """Least busy healthy host, but a conversation stays where its prefix is cached
        unless that host is down or much busier than the best one."""
        candidates = [h for h in self.hosts if h not in exclude] or self.hosts
        healthy = [h for h in candidates if h.healthy] or candidates
        best = min(healthy, key=lambda h: h.inflight)
        sticky = self.affinity.get(affinity) if affinity else None
        if sticky in healthy and sticky.inflight <= best.inflight + 2:
            best = sticky
        if affinity:
            if len(self.affinity) > 10000:  # forget old conversations
                self.affinity.clear()
            self.affinity[affinity] = best
        return best

    # -- requests ------------------------------------------------------------
    async def request_json(self, method: str, path: str, body=None, model: str = ""):
        """A small JSON request (model list, model details), tried on each host in turn."""
        timeout = aiohttp.ClientTimeout(total=max(self.config.connect_timeout, 60.0),
                                        sock_connect=self.config.connect_timeout)
        tried: list[Host] = []
        while True:
            host = self.pick_host(exclude=tried)
            tried.append(host)
            try:
                async with self.session.request(method, host.url + path, json=body, timeout=timeout) as resp:
                    raw = await resp.read()
                    if resp.status != 200:
                        raise self.http_error(resp.status, error_text(raw), model, host, 0, 0)
                    host.mark_up()
                    return json.loads(raw)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as e:
                host.mark_down(str(e) or type(e).__name__)
                if len(tried) == len(self.hosts):
                    raise self.unreachable(host, e) from None

    def unreachable(self, host: Host, error: Exception) -> ProxyError:
        return ProxyError(503, "api_error", f"cannot reach {self.kind} at {host.url} "
                          f"({type(error).__name__}: {error}); {self.start_hint}")

    async def probe_down_hosts(self) -> None:
        """Try each down host whose back-off has passed; one that answers is back in rotation."""
        for host in self.hosts:
            if host.healthy or time.monotonic() < host.probe_at:
                continue
            try:
                async with self.session.get(host.url + self.probe_path, timeout=aiohttp.ClientTimeout(
                        total=self.config.connect_timeout or None)) as resp:
                    ok = resp.status < 500
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                ok, host.last_error = False, str(e) or type(e).__name__
            if ok:
                host.mark_up()
            else:
                host.mark_down(host.last_error or "probe failed")

    def http_error(self, status: int, message: str, model: str, host: Host,
                   prompt_tokens: int, num_ctx: int) -> ProxyError:
        """An error status from the backend, as the Anthropic error that means the same."""
        if CONTEXT_OVERFLOW.search(message):
            counts = OVERFLOW_COUNTS.search(message)  # the server's own numbers beat our estimate
            return prompt_too_long(*map(int, counts.groups())) if counts else prompt_too_long(prompt_tokens, num_ctx)
        if status == 404 or "not found" in message.lower():
            return ProxyError(404, "not_found_error", self.not_found_message(model, host), retry=False)
        if status == 400:
            return invalid(f"{self.kind} at {host.url} rejected the request: {message}")
        if status in (429, 503):
            return ProxyError(529, "overloaded_error", f"{self.kind} at {host.url} is busy: {message}")
        return ProxyError(502, "api_error", f"{self.kind} at {host.url} failed (HTTP {status}): {message}")

    def not_found_message(self, model: str, host: Host) -> str:
        return f"model '{model}' not found on {self.kind} at {host.url}"

    async def chat(self, payload: dict, *, prompt_tokens: int = 0, affinity: str | None = None,
                   tool_choice: dict | None = None):
        """Stream a reply as batches of chunks. A host that fails before answering is
        marked down and the request is tried once more on another host."""
        host = self.pick_host(affinity)
        try:
            async for batch in self._chat_on(host, payload, prompt_tokens, tool_choice):
                yield batch
        except HostDown as failure:
            others = [h for h in self.hosts if h is not host and h.healthy]
            if not others:
                raise failure.error from None
            retry = self.pick_host(affinity, exclude=(host,))
            log.warning("%s; retrying on %s", failure.error.message, retry.url)
            try:
                async for batch in self._chat_on(retry, payload, prompt_tokens, tool_choice):
                    yield batch
            except HostDown as second:
                raise second.error from None

    async def _chat_on(self, host: Host, payload: dict, prompt_tokens: int, tool_choice: dict | None):
        model = payload["model"]
        # ASCII JSON: the encoder's fastest path, and a lone surrogate is escaped, not an error
        body = json.dumps(self.wire_request(payload, tool_choice)).encode()
        async with host.slot():
            try:
                async with asyncio.timeout(self.config.first_byte_timeout or None):
                    resp = await self.session.post(host.url + self.chat_path, data=body, headers=JSON_HEADERS)
            except asyncio.TimeoutError:
                raise ProxyError(529, "overloaded_error",
                                 f"{model} on {host.url} sent nothing for {self.config.first_byte_timeout:g}s "
                                 f"(still loading?); raise PROXY_FIRST_BYTE_TIMEOUT for slow hardware") from None
            except aiohttp.ClientConnectorError as e:
                host.mark_down(str(e))
                raise HostDown(self.unreachable(host, e)) from None
            except (aiohttp.ClientConnectionError, OSError) as e:
                host.mark_down(str(e) or type(e).__name__)
                raise HostDown(ProxyError(502, "api_error", f"{self.kind} at {host.url} closed the "
                                          f"connection before answering ({type(e).__name__})")) from None
            async with resp:
                if resp.status != 200:
                    raw = await resp.content.read(65536)
                    raise self.http_error(resp.status, error_text(raw), model, host,
                                          prompt_tokens, payload["options"]["num_ctx"])
                host.mark_up()
                parse = self.line_parser()
                try:
                    async for lines in read_line_batches(resp.content, self.config.idle_timeout):
                        chunks = parse(lines)
                        if chunks:
                            yield chunks
                except asyncio.TimeoutError:
                    raise ProxyError(504, "api_error", f"{self.kind} at {host.url} went silent for "
                                     f"{self.config.idle_timeout:g}s mid-reply (PROXY_IDLE_TIMEOUT)") from None
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
                    raise ProxyError(502, "api_error", f"lost the connection to {self.kind} at "
                                     f"{host.url} mid-reply ({type(e).__name__})") from None

    # -- per wire format -----------------------------------------------------
    def wire_request(self, payload: dict, tool_choice: dict | None) -> dict:
        raise NotImplementedError

    def line_parser(self):
        """A function turning one stream's line batches into chunk lists."""
        raise NotImplementedError

    async def model_info(self, model: str) -> ModelInfo:
        raise NotImplementedError

    async def list_models(self) -> list[str]:
        raise NotImplementedError


class OllamaBackend(LocalBackend):
    kind = "ollama"
    chat_path = "/api/chat"
    probe_path = "/api/version"
    truncates_silently = True
    start_hint = "start it with `ollama serve` (or set OLLAMA_BASE_URL)"

    def not_found_message(self, model: str, host: Host) -> str:
        return f"model '{model}' not found on Ollama at {host.url}; pull it with `ollama pull {model}`"

    def wire_request(self, payload: dict, tool_choice: dict | None) -> dict:
        return payload  # Ollama has no tool_choice: the translation added an instruction instead

    def line_parser(self):
        return self.parse_lines

    @staticmethod
    def parse_lines(lines: list[bytes]) -> list[tuple]:
        """Ollama NDJSON lines -> chunks. Content, thinking and tool calls may come on any
        line, the final `done` line included; an `error` line may end the stream."""
        chunks = ChunkList()
        objects, bad_line = json_lines(lines)
        for data in objects:
            if "error" in data:
                chunks.add((ERROR, ProxyError(500, "api_error", f"Ollama: {data['error']}")))
                return chunks
            message = data.get("message") or {}
            if message.get("thinking"):
                chunks.text(THINKING, message["thinking"])
            if message.get("content"):
                chunks.text(TEXT, message["content"])
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                chunks.add((TOOL_CALL, function.get("name"), function.get("arguments")))
            if data.get("done"):
                chunks.add((DONE, data.get("done_reason") or "stop",
                            data.get("prompt_eval_count"), data.get("eval_count")))
        if bad_line:
            chunks.add((ERROR, bad_line))
        return chunks.close_run()

    async def model_info(self, model: str) -> ModelInfo:
        if model not in self.models:
            data = await self.request_json("POST", "/api/show", {"model": model}, model)
            details = data.get("model_info") or {}
            context = details.get(f"{details.get('general.architecture')}.context_length")
            self.models[model] = ModelInfo(model, frozenset(data.get("capabilities") or ("completion",)),
                                           context if _is_int(context) else None)
        return self.models[model]

    async def list_models(self) -> list[str]:
        data = await self.request_json("GET", "/api/tags")
        return [m.get("name") or m.get("model") for m in data.get("models") or ()]


IMAGE_SIGNATURES = {"iVBOR": "image/png", "/9j/": "image/jpeg", "R0lGO": "image/gif", "UklGR": "image/webp"}


def ollama_to_openai(payload: dict, tool_choice: dict | None = None) -> dict:
    """The Ollama-shaped request as an OpenAI /chat/completions request (llama-server,
    vLLM, SGLang, LM Studio): the same messages in OpenAI's field names, and the client's
    tool_choice, which these servers enforce themselves."""
    messages = []
    for m in payload["messages"]:
        if m["role"] == "tool":
            messages.append({"role": "tool", "tool_call_id": m["tool_call_id"], "content": m["content"]})
            continue
        message = {"role": m["role"], "content": m["content"]}
        if m.get("images"):
            message["content"] = [{"type": "text", "text": m["content"]}] + [
                {"type": "image_url", "image_url": {"url": "data:%s;base64,%s" % (next(
                    (t for sig, t in IMAGE_SIGNATURES.items() if data.startswith(sig)), "image/png"), data)}}
                for data in m["images"]]
        if m.get("tool_calls"):
            message["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                "name": c["function"]["name"],
                "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
                for c in m["tool_calls"]]
        messages.append(message)
    options = payload["options"]
    request = {"model": payload["model"], "messages": messages, "stream": True,
               "stream_options": {"include_usage": True}, "max_tokens": options["num_predict"]}
    for name in ("temperature", "top_p", "top_k"):
        if name in options:
            request[name] = options[name]
    if payload.get("tools"):
        request["tools"] = payload["tools"]
        choice = tool_choice or {}
        if choice.get("type") == "any":
            request["tool_choice"] = "required"
        elif choice.get("type") == "tool":
            request["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        if choice.get("disable_parallel_tool_use") is True:
            request["parallel_tool_calls"] = False
    fmt = payload.get("format")
    if isinstance(fmt, dict):
        request["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt}}
    elif fmt == "json":
        request["response_format"] = {"type": "json_object"}
    return request


class OpenAIStreamParser:
    """OpenAI chat-completion SSE lines -> chunks. Tool calls arrive as fragments keyed by
    `index`; finish_reason and usage come in late chunks, so DONE waits for `[DONE]`."""

    def __init__(self):
        self.finish_reason = "stop"
        self.usage: dict = {}
        self.named: set = set()

    def __call__(self, lines: list[bytes]) -> list[tuple]:
        chunks = ChunkList()
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # comments, event names, keep-alives
            data = line[5:].strip()
            if data == b"[DONE]":
                chunks.add((DONE, self.finish_reason, self.usage.get("prompt_tokens"),
                            self.usage.get("completion_tokens")))
                continue
            try:
                event = json.loads(data)
                choices = event.get("choices") or ()
            except (ValueError, AttributeError):
                chunks.add((ERROR, ProxyError(502, "api_error", f"the OpenAI-compatible server sent data "
                                              f"that is not JSON: {data[:120]!r}")))
                return chunks
            if event.get("error"):
                chunks.add((ERROR, ProxyError(500, "api_error",
                                              f"backend: {error_text(json.dumps(event).encode())}")))
                return chunks
            if isinstance(event.get("usage"), dict):
                self.usage = event["usage"]
            for choice in choices:
                delta = choice.get("delta") or {}
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    chunks.text(THINKING, reasoning)
                if delta.get("content"):
                    chunks.text(TEXT, delta["content"])
                for call in delta.get("tool_calls") or ():
                    key = call.get("index", 0)
                    function = call.get("function") or {}
                    name = None
                    if key not in self.named and function.get("name"):
                        self.named.add(key)
                        name = function["name"]
                    chunks.add((TOOL_CALL_PART, key, name, function.get("arguments") or ""))
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
        return chunks.close_run()


class OpenAIBackend(LocalBackend):
    kind = "openai"
    chat_path = "/chat/completions"
    probe_path = "/models"
    start_hint = "is the server (llama-server, vLLM, LM Studio...) running at that URL?"

    def not_found_message(self, model: str, host: Host) -> str:
        return f"model '{model}' is not served by the OpenAI-compatible server at {host.url}"

    def wire_request(self, payload: dict, tool_choice: dict | None) -> dict:
        return ollama_to_openai(payload, tool_choice)

    def line_parser(self):
        return OpenAIStreamParser()

    async def model_info(self, model: str) -> ModelInfo:
        """OpenAI servers have no capability list: assume tools; take the context size
        from /models where the server reports it (vLLM max_model_len, llama-server n_ctx)."""
        if model not in self.models:
            listed = (await self.request_json("GET", "/models")).get("data") or []
            entry = next((m for m in listed if m.get("id") == model), listed[0] if listed else {})
            meta = entry.get("meta") or {}
            context = entry.get("max_model_len") or meta.get("n_ctx") or meta.get("n_ctx_train")
            self.models[model] = ModelInfo(model, frozenset({"completion", "tools"}),
                                           context if _is_int(context) else None)
        return self.models[model]

    async def list_models(self) -> list[str]:
        return [m.get("id") for m in (await self.request_json("GET", "/models")).get("data") or ()]


def client_keys(request: web.Request) -> tuple[str, str]:
    """The client's `x-api-key` and `Authorization: Bearer` values ("" when absent)."""
    bearer = request.headers.get("authorization", "")
    return (request.headers.get("x-api-key", ""),
            bearer[7:].strip() if bearer.lower().startswith("bearer ") else "")


class AnthropicUpstream:
    """Requests for cloud tiers go upstream untouched; the answer streams back untouched."""

    HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                            "proxy-authorization", "proxy-authenticate", "host", "content-length"})

    def __init__(self, session: aiohttp.ClientSession, config: Config):
        self.session = session
        self.config = config

    def credentials(self, request: web.Request) -> dict[str, str]:
        """The client's own Anthropic credential as it sent it, or the proxy's key when the
        client's is a placeholder (or the proxy's own PROXY_API_KEY)."""
        api_key, token = client_keys(request)
        if not self.config.proxy_api_key:
            if api_key.startswith("sk-ant-"):
                return {"x-api-key": api_key}
            if token.startswith("sk-ant-"):
                return {"authorization": f"Bearer {token}"}
        if self.config.upstream_api_key:
            return {"x-api-key": self.config.upstream_api_key}
        raise ProxyError(401, "authentication_error",
                         "this model tier passes through to the Anthropic API, but no Anthropic credential "
                         "was given: either start Claude Code with your real key (ANTHROPIC_API_KEY=sk-ant-... "
                         "or a Claude login token in ANTHROPIC_AUTH_TOKEN), or set ANTHROPIC_UPSTREAM_API_KEY "
                         "in the proxy's environment or .env", retry=False)

    async def forward(self, request: web.Request, raw_body: bytes, base_url: str) -> web.StreamResponse:
        """Send the request to `base_url` as it came. Anthropic credentials go only to the
        cloud upstream, never to another Anthropic-compatible server (llama-server, Ollama)."""
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in self.HOP_BY_HOP | {"x-api-key", "authorization", "accept-encoding"}}
        if base_url == self.config.upstream_url:
            headers.update(self.credentials(request))
        url = base_url + request.path_qs
        host = urlsplit(url).hostname
        try:
            upstream = await self.session.post(
                url, data=raw_body, headers=headers, skip_auto_headers=("Accept-Encoding",),
                timeout=aiohttp.ClientTimeout(sock_connect=self.config.connect_timeout,
                                              sock_read=self.config.first_byte_timeout or None))
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            status = 504 if isinstance(e, asyncio.TimeoutError) else 502
            raise ProxyError(status, "api_error", f"cannot reach the Anthropic API at {host} "
                             f"({type(e).__name__}: {e})") from None
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in self.HOP_BY_HOP | {"content-encoding"}:
                    response.headers.add(name, value)
            await response.prepare(request)
            try:
                async for data in upstream.content.iter_any():
                    await response.write(data)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                log.warning("upstream %s broke off mid-response: %s", host, type(e).__name__)
            await response.write_eof()
            return response


# ---------------------------------------------------------------------------
# Streaming: backend chunk batches -> Anthropic event batches -> SSE bytes
# ---------------------------------------------------------------------------

async def with_pings(batches, interval: float):
    """Yield PING every `interval` seconds until the first batch arrives, so clients
    keep waiting through a model load or a long prompt evaluation (or a queue)."""
    async with contextlib.aclosing(batches):
        first = asyncio.ensure_future(anext(batches, None))
        try:
            while not first.done():
                await asyncio.wait((first,), timeout=interval)
                if not first.done():
                    yield PING
        finally:
            if not first.done():
                first.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await first
        batch = first.result()
        if batch is None:
            return
        yield batch
        async for batch in batches:
            yield batch


async def anthropic_events(batches, translator: ResponseTranslator, stats: "RequestStats"):
    """Backend chunk batches -> batches of Anthropic events. message_start travels with the
    first batch (of tokens, or a ping), so nothing is committed before the backend answers:
    a backend that fails first gets a plain HTTP error status, as Anthropic's API does, and
    the first token leaves in the same write as the response headers."""
    opening = translator.start()
    async with contextlib.aclosing(batches):
        async for batch in batches:
            events = []
            if batch is PING:
                events.append(PING_EVENT)
            else:
                for chunk in batch:
                    if chunk[0] is ERROR:  # deliver what came before the failure, then report it
                        if events:
                            yield opening + events
                        raise chunk[1]
                    events += translator.feed(chunk)
            if events:
                if stats.first_token_at is None and translator.index >= 0:
                    stats.first_token_at = time.monotonic()
                yield opening + events
                opening = []
            if translator.done:  # finished, or cut at a stop sequence: stop the backend now
                break
    if not translator.done:
        raise ProxyError(502, "api_error", "the backend ended its reply without finishing it")


# ---------------------------------------------------------------------------
# HTTP: the Anthropic API surface
# ---------------------------------------------------------------------------

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclasses.dataclass
class RequestStats:
    """What the one log line per request reports."""

    route: str = "-"
    stream: bool = False
    started: float = dataclasses.field(default_factory=time.monotonic)
    first_token_at: float | None = None
    usage: dict = dataclasses.field(default_factory=dict)
    outcome: str = "ok"

    def line(self) -> str:
        total = time.monotonic() - self.started
        out = self.usage.get("output_tokens", 0)
        ttft = f"{self.first_token_at - self.started:.2f}s" if self.first_token_at else "-"
        gen_time = total - (self.first_token_at - self.started) if self.first_token_at else 0
        rate = f"{out / gen_time:.1f} tok/s" if gen_time > 0 and out else "- tok/s"
        return (f"{self.route} {'stream' if self.stream else 'sync'} in={self.usage.get('input_tokens', '-')} "
                f"out={out} ttft={ttft} total={total:.2f}s {rate} {self.outcome}")


def error_response(error: ProxyError) -> web.Response:
    response = web.json_response(error.body(), status=error.status)
    if not error.retry:
        response.headers["x-should-retry"] = "false"
    return response


def request_key(request: web.Request, body: dict) -> str:
    """Which conversation this is, to keep it on the host that caches its prefix."""
    session = request.headers.get("X-Claude-Code-Session-Id")
    if session:
        return session
    first = json.dumps([body.get("system"), body["messages"][0]], sort_keys=True, default=str)
    return hashlib.sha1(first.encode()).hexdigest()


async def inline_url_images(body: dict, session: aiohttp.ClientSession, max_bytes: int = 20 * 1024 * 1024):
    """Fetch `url` image sources and put them inline: local backends take base64 only."""
    for i, message in enumerate(body["messages"]):
        content = message.get("content")
        blocks = [(b, f"messages.{i}.content.{j}") for j, b in enumerate(content)] if isinstance(content, list) else []
        for block, path in list(blocks):
            if isinstance(block, dict) and isinstance(block.get("content"), list):  # tool_result
                blocks += [(b, f"{path}.content.{k}") for k, b in enumerate(block["content"])]
        for block, path in blocks:
            source = block.get("source") if isinstance(block, dict) and block.get("type") == "image" else None
            if not isinstance(source, dict) or source.get("type") != "url":
                continue
            url = source.get("url")
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise invalid(f"{path}.source.url: must be an http(s) URL")
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
                    data = await resp.content.read(max_bytes + 1)
                    media_type = resp.content_type
                    status = resp.status
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                raise invalid(f"{path}.source.url: could not fetch {url} ({type(e).__name__})") from None
            if status != 200 or not media_type.startswith("image/") or len(data) > max_bytes:
                raise invalid(f"{path}.source.url: {url} gave HTTP {status} {media_type}, {len(data)} bytes; "
                              f"need an image of at most {max_bytes} bytes")
            block["source"] = {"type": "base64", "media_type": media_type,
                               "data": base64.b64encode(data).decode()}


class Proxy:
    """The web app's state: settings, the shared HTTP client and the backends."""

    def __init__(self, config: Config):
        self.config = config
        self.session: aiohttp.ClientSession | None = None
        self.backends: dict[tuple, LocalBackend] = {}
        self.upstream: AnthropicUpstream | None = None

    async def startup(self, app: web.Application) -> None:
        # One client for every backend: connections are kept alive between requests.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout),
            auto_decompress=True)
        self.upstream = AnthropicUpstream(self.session, self.config)
        self.prober = asyncio.create_task(self.probe_forever())
        if "default" not in self.config.model_map:  # name the default model in the startup log
            backend = self.backend(Target("ollama", (self.config.ollama_url,), ""))
            try:
                await asyncio.wait_for(self.default_model(backend), 10)
            except (ProxyError, asyncio.TimeoutError) as e:
                log.warning("could not pick a default model yet (%s); will retry on the first request",
                            getattr(e, "message", "timed out"))

    async def cleanup(self, app: web.Application) -> None:
        self.prober.cancel()  # and let it finish, so no probe is left half-connected
        with contextlib.suppress(asyncio.CancelledError):
            await self.prober
        await self.session.close()

    async def probe_forever(self, interval: float = 0.5) -> None:
        """Bring failed hosts back once they answer again (in the background)."""
        while True:
            await asyncio.sleep(interval)
            for backend in list(self.backends.values()):
                await backend.probe_down_hosts()

    def backend(self, target: Target) -> LocalBackend:
        key = (target.kind, target.urls)
        if key not in self.backends:
            kind = {"ollama": OllamaBackend, "openai": OpenAIBackend}[target.kind]
            self.backends[key] = kind(target.urls, self.session, self.config)
        return self.backends[key]

    async def route(self, model: str) -> tuple[str, Target, LocalBackend | None]:
        """(tier, target, backend) for a requested model name; the auto default resolved."""
        tier, target = resolve_target(self.config, model)
        if target.kind == "anthropic":
            return tier, target, None
        backend = self.backend(target)
        if not target.model:
            target = dataclasses.replace(target, model=await self.default_model(backend))
        return tier, target, backend

    async def default_model(self, backend: LocalBackend) -> str:
        """The first model the backend lists that can use tools (Claude Code needs them)."""
        if not backend.default_model:
            names = await backend.list_models()
            for name in names:
                if "tools" in (await backend.model_info(name)).capabilities:
                    backend.default_model = name
                    break
            else:
                if not names:
                    raise ProxyError(404, "not_found_error",
                                     f"{backend.kind} at {backend.hosts[0].url} has no models; pull one "
                                     f"(e.g. `ollama pull qwen3-coder:30b`) or set OLLAMA_MODEL_MAP_DEFAULT",
                                     retry=False)
                backend.default_model = names[0]
                log.warning("no model on %s lists the tools capability; using %s",
                            backend.hosts[0].url, names[0])
            log.info("default model for claude-* names: %s", backend.default_model)
        return backend.default_model

    # -- middleware --------------------------------------------------------------
    @web.middleware
    async def middleware(self, request: web.Request, handler):
        try:
            if self.config.proxy_api_key and request.path.startswith("/v1/"):
                self.check_proxy_key(request)
            response = await handler(request)
        except (ProxyError, web.HTTPException) as e:
            error = self.as_proxy_error(request, e)
            log.info("%s %s -> %d %s: %s", request.method, request.path, error.status, error.error_type, error.message)
            response = error_response(error)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("internal error on %s %s", request.method, request.path)
            response = error_response(ProxyError(500, "api_error", "internal error in claude_local_proxy; "
                                                 "its log has the details"))
        if not response.prepared:
            response.headers["request-id"] = new_id("req_")
        return response

    def as_proxy_error(self, request: web.Request, error: Exception) -> ProxyError:
        """aiohttp's own errors (unknown path, wrong method, body too large) in Anthropic's terms."""
        if isinstance(error, ProxyError):
            return error
        if error.status == 413:
            message = (f"request body is larger than the proxy's limit of {self.config.max_body_bytes} bytes "
                       f"(PROXY_MAX_BODY_BYTES)")
        else:
            message = f"{request.method} {request.path}: {error.reason}"
        return ProxyError(error.status, STATUS_ERROR_TYPES.get(error.status, "api_error"), message)

    def check_proxy_key(self, request: web.Request) -> None:
        expected = self.config.proxy_api_key.encode()
        if not any(secrets.compare_digest(key.encode(), expected) for key in client_keys(request)):
            raise ProxyError(401, "authentication_error", "this proxy requires its PROXY_API_KEY "
                             "(send it as x-api-key or Authorization: Bearer)", retry=False)

    # -- handlers ----------------------------------------------------------------
    async def read_json(self, request: web.Request) -> tuple[bytes, dict]:
        raw = await request.read()
        try:
            return raw, json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise invalid(f"request body is not valid JSON: {e}") from None

    async def messages(self, request: web.Request) -> web.StreamResponse:
        stats = RequestStats()  # this handler writes the request's one log line, errors included
        try:
            raw, body = await self.read_json(request)
            validate_request(body)
            stats.route, stats.stream = body["model"], body.get("stream", False)
            tier, target, backend = await self.route(body["model"])
            stats.route = f"{body['model']} [{tier}] -> {target.model or target.urls[0]}"
            if backend is None:
                response = await self.upstream.forward(request, raw, target.urls[0])
                stats.outcome = f"passthrough {response.status}"
                return response
            return await self.local_messages(request, body, target, backend, stats)
        except (ProxyError, web.HTTPException) as e:
            error = self.as_proxy_error(request, e)
            stats.outcome = f"{error.status} {error.error_type}: {error.message}"
            return error_response(error)
        except asyncio.CancelledError:
            stats.outcome = "cancelled (client went away)"
            raise
        finally:
            log.info("%s", stats.line())

    async def local_messages(self, request, body, target: Target, backend: LocalBackend,
                             stats: RequestStats) -> web.StreamResponse:
        info = await backend.model_info(target.model)
        await inline_url_images(body, self.session)
        prompt_tokens = estimate_tokens(body)
        _, fixed_ctx = longest_key_match(self.config.context_sizes, body["model"])
        fixed_ctx = fixed_ctx or self.config.context_sizes.get("default")
        num_ctx = fixed_ctx or choose_num_ctx(prompt_tokens, body["max_tokens"], info.context_length,
                                              backend.num_ctx.get(target.model))
        backend.num_ctx[target.model] = num_ctx
        payload = anthropic_to_ollama(body, target.model, capabilities=info.capabilities, num_ctx=num_ctx)
        choice = body.get("tool_choice") or {}
        translator = ResponseTranslator(
            body["model"], input_tokens=prompt_tokens, stop_sequences=body.get("stop_sequences", ()),
            tool_names=[t["function"]["name"] for t in payload.get("tools", ())],
            single_tool_call=choice.get("disable_parallel_tool_use") is True)
        stats.usage = translator.usage  # the log line reports what is known, even after a failure
        affinity = request_key(request, body) if len(backend.hosts) > 1 else None
        batches = backend.chat(payload, prompt_tokens=prompt_tokens, affinity=affinity, tool_choice=choice)
        if body.get("stream"):
            response = await self.stream(request, anthropic_events(
                with_pings(batches, self.config.ping_interval), translator, stats), stats)
        else:
            events = []
            async with contextlib.aclosing(anthropic_events(batches, translator, stats)) as stream:
                async for batch in stream:
                    events += batch
            response = web.json_response(message_from_events(events))
        real = stats.usage.get("input_tokens")
        if backend.truncates_silently and _is_int(real) and prompt_tokens > 2000 and real < prompt_tokens / 2:
            log.warning("%s evaluated %d prompt tokens, far fewer than the ~%d sent: the backend "
                        "probably truncated the prompt (check its context size)", target.model, real, prompt_tokens)
        return response

    async def stream(self, request: web.Request, events, stats: RequestStats) -> web.StreamResponse:
        """Event batches -> SSE. The response is committed with the first batch; an error
        before it propagates as an HTTP error, one after it becomes an `error` event."""
        async with contextlib.aclosing(events):
            batch = await anext(events)
            response = web.StreamResponse(headers={**SSE_HEADERS, "request-id": new_id("req_")})
            await response.prepare(request)
            try:
                await response.write(encode_sse(batch))
                async for batch in events:
                    await response.write(encode_sse(batch))
            except ProxyError as e:
                stats.outcome = f"{e.status} {e.error_type} mid-stream: {e.message}"
                await response.write(encode_sse([error_event(e)]))
            except ConnectionResetError:
                stats.outcome = "cancelled (client went away)"
                return response
        await response.write_eof()
        return response

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        raw, body = await self.read_json(request)
        validate_request(body, count_tokens=True)
        tier, target = resolve_target(self.config, body["model"])
        if target.kind == "anthropic":
            return await self.upstream.forward(request, raw, target.urls[0])
        system_prompt(body.get("system"))  # validates the system blocks
        return web.json_response({"input_tokens": estimate_tokens(body)})

    async def list_models(self, request: web.Request) -> web.Response:
        names = []
        with contextlib.suppress(ProxyError):
            names = await self.backend(Target("ollama", (self.config.ollama_url,), "")).list_models()
        tiers = [key for key in self.config.model_map if key != "default"]
        data = [{"type": "model", "id": name, "display_name": name, "created_at": "1970-01-01T00:00:00Z"}
                for name in [*names, *(f"claude-{key}" for key in tiers)]]
        return web.json_response({"data": data, "has_more": False,
                                  "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None})

    async def health(self, request: web.Request) -> web.Response:
        default = self.backend(Target("ollama", (self.config.ollama_url,), ""))
        reachable = True
        with contextlib.suppress(ProxyError):
            await default.list_models()
        reachable = default.hosts[0].healthy
        routes = {key: target.describe() for key, target in self.config.model_map.items()}
        return web.json_response({
            "status": "ok" if reachable else "degraded", "version": __version__,
            "ollama": {"url": self.config.ollama_url, "reachable": reachable},
            "routes": routes,
            "backends": [{"kind": b.kind, "hosts": [h.status() for h in b.hosts]} for b in self.backends.values()],
        })

    async def hello(self, request: web.Request) -> web.Response:
        return web.Response(text="claude_local_proxy is running\n")


PROXY = web.AppKey("proxy", Proxy)


def make_app(config: Config) -> web.Application:
    proxy = Proxy(config)
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[proxy.middleware])
    app.on_startup.append(proxy.startup)
    app.on_cleanup.append(proxy.cleanup)
    app.router.add_post("/v1/messages", proxy.messages)
    app.router.add_post("/v1/messages/count_tokens", proxy.count_tokens)
    app.router.add_get("/v1/models", proxy.list_models)
    app.router.add_get("/health", proxy.health)
    for path in ("/", "/api/hello"):
        app.router.add_get(path, proxy.hello)  # GET also answers HEAD
    app[PROXY] = proxy
    return app


# ---------------------------------------------------------------------------
# main()
# ---------------------------------------------------------------------------

def banner(config: Config) -> str:
    url = f"http://{config.host if config.host not in ('0.0.0.0', '::') else 'localhost'}:{config.port}"
    lines = [f"claude_local_proxy {__version__} listening on {url}",
             f"  local backend: Ollama at {config.ollama_url}",
             f"  cloud tiers:   {config.upstream_url}"]
    for key, target in sorted(config.model_map.items()):
        lines.append(f"  tier {key:<10} -> {target.describe()}")
    if "default" not in config.model_map:
        lines.append("  other claude-* names -> the first tools-capable model Ollama lists")
    lines.append("  any other name -> that local model, verbatim")
    lines += ["Point Claude Code at it:",
              f"  export ANTHROPIC_BASE_URL={url}",
              f"  export ANTHROPIC_API_KEY={'<your PROXY_API_KEY>' if config.proxy_api_key else 'proxy'}"]
    return "\n".join(lines)


def check_exposure(config: Config) -> None:
    if not is_loopback(config.host) and not config.proxy_api_key and not config.allow_public:
        raise ConfigError(f"refusing to listen on {config.host} without PROXY_API_KEY: anyone on the network "
                          f"could use your GPU and, through cloud passthrough, your Anthropic account. "
                          f"Set PROXY_API_KEY, listen on 127.0.0.1, or pass --allow-public.")


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as e:
        print(f"claude-local-proxy: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, config.log_level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        check_exposure(config)
    except ConfigError as e:
        print(f"claude-local-proxy: {e}", file=sys.stderr)
        return 2
    print(banner(config), flush=True)
    web.run_app(make_app(config), host=config.host, port=config.port, print=None,
                handler_cancellation=True, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
