#!/usr/bin/env bash
# benchmark.sh: which local model should run my agents? Speed and quality, measured
# through the proxy on agent-like work.
#
#   ./benchmark.sh [--models a,b] [--repeat N] [--timeout S] [--ollama URL] [--proxy URL]
#   ./benchmark.sh --openai http://127.0.0.1:8080/v1      # an OpenAI-compatible server instead
#   ./benchmark.sh overhead [--repeat N] [--tokens N]   # the proxy's own cost
#   ./benchmark.sh --list-tasks                         # the tasks, as JSON
#
# Needs bash, python3 and the proxy's own dependency (aiohttp). PYTHON picks the
# interpreter (default: the project's .venv if present, else python3).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-$([ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3)}
export CLP_PROXY_SCRIPT="$here/claude_local_proxy.py"

read -r -d '' PROGRAM <<'PY' || true
import argparse, asyncio, csv, datetime, json, os, re, socket, statistics, subprocess, sys, tempfile, time
import aiohttp
from aiohttp import web

PROXY_SCRIPT = os.environ["CLP_PROXY_SCRIPT"]
COLUMNS = ["model", "size", "quant", "task", "kind", "passed", "score", "gen_tok_s", "prompt_tok_s",
           "ttft_s", "total_s", "load_s", "output_tokens", "error"]


def say(*parts):
    print(*parts, file=sys.stderr, flush=True)


# -- tasks ----------------------------------------------------------------------
# Code tasks: the model's code is run in a subprocess against hidden asserts; the
# score is the fraction that pass. `reference` is a correct answer (for self-checks).
CODE_TASKS = [
    {"task": "palindrome", "prompt": "Write a Python function `is_palindrome(s: str) -> bool` that says whether "
     "s reads the same backwards, ignoring case and every character that is not a letter or digit.",
     "asserts": ["is_palindrome('') is True", "is_palindrome('A man, a plan, a canal: Panama') is True",
                 "is_palindrome('race a car') is False", "is_palindrome('No lemon, no melon') is True",
                 "is_palindrome('ab') is False", "is_palindrome('0P') is False"],
     "reference": "import re\ndef is_palindrome(s):\n    t = re.sub(r'[^a-z0-9]', '', s.lower())\n    return t == t[::-1]\n"},
    {"task": "merge_intervals", "prompt": "Write a Python function `merge_intervals(intervals)` that takes a list "
     "of [start, end] pairs (unsorted, possibly empty) and returns the merged, sorted list of [start, end] pairs, "
     "where touching intervals like [1,2] and [2,3] merge.",
     "asserts": ["merge_intervals([]) == []", "merge_intervals([[1,3],[2,6],[8,10],[15,18]]) == [[1,6],[8,10],[15,18]]",
                 "merge_intervals([[1,4],[4,5]]) == [[1,5]]", "merge_intervals([[5,6],[1,2]]) == [[1,2],[5,6]]",
                 "merge_intervals([[1,10],[2,3]]) == [[1,10]]"],
     "reference": "def merge_intervals(intervals):\n    out = []\n    for s, e in sorted(intervals):\n"
                  "        if out and s <= out[-1][1]:\n            out[-1][1] = max(out[-1][1], e)\n"
                  "        else:\n            out.append([s, e])\n    return out\n"},
    {"task": "fix_bug", "prompt": "This function should return the second largest distinct value in a list, or "
     "None when there is none, but it has bugs. Return the corrected function.\n\n```python\n"
     "def second_largest(xs):\n    xs.sort()\n    return xs[-2]\n```",
     "asserts": ["second_largest([3, 1, 2]) == 2", "second_largest([5, 5, 4]) == 4", "second_largest([7]) is None",
                 "second_largest([]) is None", "second_largest([2, 2]) is None", "second_largest([-1, -5, -3]) == -3"],
     "reference": "def second_largest(xs):\n    d = sorted(set(xs))\n    return d[-2] if len(d) > 1 else None\n"},
    {"task": "stack_class", "prompt": "Write a Python class `Stack` with methods push(x), pop(), peek(), "
     "is_empty() and size(). pop() and peek() on an empty stack must raise IndexError.",
     "asserts": ["Stack().is_empty() is True", "(lambda s: (s.push(1), s.push(2), s.pop())[-1])(Stack()) == 2",
                 "(lambda s: (s.push('a'), s.peek(), s.size())[1:])(Stack()) == ('a', 1)",
                 "(lambda s: (s.push(1), s.pop(), s.is_empty())[-1])(Stack()) is True",
                 "__raises(lambda: Stack().pop(), IndexError)", "__raises(lambda: Stack().peek(), IndexError)"],
     "reference": "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
                  "        self.items.append(x)\n    def pop(self):\n        if not self.items:\n"
                  "            raise IndexError('empty')\n        return self.items.pop()\n    def peek(self):\n"
                  "        if not self.items:\n            raise IndexError('empty')\n        return self.items[-1]\n"
                  "    def is_empty(self):\n        return not self.items\n    def size(self):\n"
                  "        return len(self.items)\n"},
    {"task": "parse_duration", "prompt": "Write a Python function `parse_duration(text: str) -> int` that turns "
     "durations like '1h30m', '45s', '2h', '1h2m3s' into a number of seconds, and raises ValueError for "
     "anything else (including the empty string).",
     "asserts": ["parse_duration('45s') == 45", "parse_duration('1h30m') == 5400", "parse_duration('2h') == 7200",
                 "parse_duration('1h2m3s') == 3723", "__raises(lambda: parse_duration(''), ValueError)",
                 "__raises(lambda: parse_duration('abc'), ValueError)"],
     "reference": "import re\ndef parse_duration(text):\n    m = re.fullmatch(r'(?:(\\d+)h)?(?:(\\d+)m)?(?:(\\d+)s)?', text)\n"
                  "    if not text or not m:\n        raise ValueError(text)\n"
                  "    h, mi, s = (int(g or 0) for g in m.groups())\n    return h * 3600 + mi * 60 + s\n"},
]

WEATHER = {"name": "get_weather", "description": "Get the current weather for a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                            "required": ["city"]}}
READ_FILE = {"name": "read_file", "description": "Read a text file from the project.",
             "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}
MULTIPLY = {"name": "multiply", "description": "Multiply two integers exactly.",
            "input_schema": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                             "required": ["a", "b"]}}
LIST_DIR = {"name": "list_dir", "description": "List the files in a directory.",
            "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}
# Tool tasks: score 0.5 for a valid call of the right tool (arguments satisfy the schema
# and carry the expected values), 0.5 for a final answer that uses the tool's result.
TOOL_TASKS = [
    {"task": "tool_weather", "prompt": "What is the weather in Lisbon right now?", "tools": [WEATHER, READ_FILE],
     "tool": "get_weather", "expect": {"city": "lisbon"}, "result": "14 degrees Celsius, light rain", "uses": "14"},
    {"task": "tool_read_file", "prompt": "Which port does config.yaml in the project root set? Use the tools.",
     "tools": [LIST_DIR, READ_FILE], "tool": "read_file", "expect": {"path": "config.yaml"},
     "result": "server:\n  host: 0.0.0.0\n  port: 8443\n", "uses": "8443"},
    {"task": "tool_multiply", "prompt": "Use the multiply tool to compute 1234 times 5678, then tell me the result.",
     "tools": [MULTIPLY, WEATHER], "tool": "multiply", "expect": {"a": 1234, "b": 5678},
     "result": "7006652", "uses": "7006652"},
]
SYSTEM_SECTION = ("You are a coding agent working in a large repository. Follow the project's conventions, read "
                  "files before editing them, prefer small focused changes, run the tests after each change, and "
                  "explain what you did in one short paragraph. Never invent file contents; use the tools. ")


def big_prompt():
    """A Claude-Code-sized request: ~15k tokens of system text and tool schemas."""
    tools = []
    for i in range(12):
        props = {f"param_{j}": {"type": "string", "description": f"Parameter {j} of tool {i}: " + "details " * 12}
                 for j in range(12)}
        tools.append({"name": f"tool_{i}", "description": f"Tool number {i}. " + SYSTEM_SECTION * 3,
                      "input_schema": {"type": "object", "properties": props, "required": ["param_0"]}})
    system = "\n\n".join(f"## Section {i}\n" + SYSTEM_SECTION * 6 for i in range(16))
    return {"system": system, "tools": tools, "prompt": "Reply with the single word OK."}


# -- scoring -----------------------------------------------------------------------
HARNESS = """
import json, sys
def __raises(f, kind):
    try:
        f()
    except kind:
        return True
    except Exception:
        return False
    return False
ns = {"__raises": __raises}
passed = 0
try:
    exec(compile(open(sys.argv[1]).read(), "answer.py", "exec"), ns)
    for a in json.loads(sys.argv[2]):
        try:
            passed += bool(eval(a, ns))
        except Exception:
            pass
except Exception as e:
    print(json.dumps({"passed": 0, "error": type(e).__name__}))
    sys.exit()
print(json.dumps({"passed": passed}))
"""


def extract_code(text):
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", text, re.S)
    return "\n\n".join(blocks) if blocks else text


def score_code(task, text, timeout=10):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "answer.py")
        with open(path, "w") as f:
            f.write(extract_code(text))
        try:
            out = subprocess.run([sys.executable, "-I", "-c", HARNESS, path, json.dumps(task["asserts"])],
                                 capture_output=True, text=True, timeout=timeout, cwd=folder)
            passed = json.loads(out.stdout.strip().splitlines()[-1])["passed"]
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            passed = 0
    return passed / len(task["asserts"])


def schema_ok(schema, value):
    if not isinstance(value, dict):
        return False
    types = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}
    for name in schema.get("required", []):
        if name not in value:
            return False
    for name, v in value.items():
        kind = schema.get("properties", {}).get(name, {}).get("type")
        if kind and not isinstance(v, types.get(kind, object)) or (kind == "integer" and isinstance(v, bool)):
            return False
    return True


def call_ok(task, block):
    if not block or block.get("name") != task["tool"]:
        return False
    tool = next(t for t in task["tools"] if t["name"] == task["tool"])
    args = block.get("input") or {}
    if not schema_ok(tool["input_schema"], args):
        return False
    return all(str(v).lower() in str(args.get(k, "")).lower() for k, v in task["expect"].items())


# -- talking to the proxy -----------------------------------------------------------
async def stream_message(session, proxy, body, timeout):
    """Stream one request; returns (message, ttft_s, total_s). The time to first token
    is when the first content delta arrived at this client."""
    started = time.perf_counter()
    ttft, message, partial = None, None, {}
    async with session.post(proxy + "/v1/messages", json=dict(body, stream=True),
                            timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        event = None
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
                continue
            if not line.startswith("data: "):
                continue
            data = json.loads(line[6:])
            if event == "error":
                raise RuntimeError(data["error"]["message"])
            if event == "message_start":
                message = data["message"]
            elif event == "content_block_start":
                message["content"].append(dict(data["content_block"]))
            elif event == "content_block_delta":
                ttft = ttft or time.perf_counter() - started
                block, delta = message["content"][data["index"]], data["delta"]
                if delta["type"] == "text_delta":
                    block["text"] += delta["text"]
                elif delta["type"] == "thinking_delta":
                    block["thinking"] += delta["thinking"]
                elif delta["type"] == "input_json_delta":
                    partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
            elif event == "content_block_stop" and data["index"] in partial:
                message["content"][data["index"]]["input"] = json.loads(partial.pop(data["index"]) or "{}")
            elif event == "message_delta":
                message.update(data["delta"])
                message["usage"].update(data["usage"])
    total = time.perf_counter() - started
    return message, ttft or total, total


def text_of(message):
    return "".join(b.get("text", "") for b in message["content"] if b["type"] == "text")


def speeds(message, ttft, total):
    usage = message["usage"]
    out = usage.get("output_tokens") or 0
    gen = out / (total - ttft) if total > ttft and out > 1 else None
    prompt = usage.get("input_tokens", 0) / ttft if ttft else None
    return gen, prompt, out


async def run_task(session, proxy, model, task, timeout):
    """One task once: a CSV row (without model/size/quant/load)."""
    row = {"task": task["task"], "kind": task["kind"], "passed": 0, "score": 0.0, "error": ""}
    try:
        if task["kind"] == "code":
            body = {"model": model, "max_tokens": 2048, "messages": [{"role": "user", "content": task["prompt"] +
                    "\nAnswer with the complete code in one ```python block."}]}
            message, ttft, total = await stream_message(session, proxy, body, timeout)
            row["score"] = score_code(task, text_of(message))
        elif task["kind"] == "tool":
            messages = [{"role": "user", "content": task["prompt"]}]
            body = {"model": model, "max_tokens": 1024, "tools": task["tools"], "messages": messages}
            message, ttft, total = await stream_message(session, proxy, body, timeout)
            calls = [b for b in message["content"] if b["type"] == "tool_use"]
            score = 0.5 if call_ok(task, calls[0] if calls else None) else 0.0
            if calls:
                follow = messages + [{"role": "assistant", "content": message["content"]},
                                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": c["id"],
                                      "content": task["result"] if c is calls[0] else "unavailable"} for c in calls]}]
                answer, _, _ = await stream_message(session, proxy, dict(body, messages=follow), timeout)
                score += 0.5 if task["uses"] in text_of(answer) else 0.0
            row["score"] = score
        else:  # speed: a Claude-Code-sized prompt
            big = task["body"]
            # a fresh first line each run: a prompt cached from an earlier run would make it look fast
            system = f"Run {time.time_ns()}.\n\n" + big["system"]
            body = {"model": model, "max_tokens": 64, "system": system, "tools": big["tools"],
                    "messages": [{"role": "user", "content": big["prompt"]}]}
            message, ttft, total = await stream_message(session, proxy, body, timeout)
            row["score"] = 1.0 if text_of(message).strip() or message["content"] else 0.0
        gen, prompt, out = speeds(message, ttft, total)
        row.update(gen_tok_s=gen, prompt_tok_s=prompt, ttft_s=ttft, total_s=total, output_tokens=out)
    except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as e:
        row["error"] = (str(e) or type(e).__name__).replace("\n", " ")[:200]
    row["passed"] = int(row["score"] >= 0.999)
    return row


def median(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def mean(values):
    return float(statistics.mean(values)) if values else None


def fmt(v, digits=2):
    return "" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


async def list_ollama_models(session, ollama):
    async with session.get(ollama + "/api/tags") as resp:
        tags = (await resp.json())["models"]
    out = []
    for m in tags:
        async with session.post(ollama + "/api/show", json={"model": m["name"]}) as resp:
            caps = (await resp.json()).get("capabilities") or ["completion"]
        details = m.get("details") or {}
        out.append({"name": m["name"], "request": m["name"], "size": details.get("parameter_size", ""),
                    "quant": details.get("quantization_level", ""), "capabilities": caps})
    return out


async def list_openai_models(session, base):
    """Models of an OpenAI-compatible server, each reached through the proxy's `openai` kind
    under its own tier name (benchmodel0, benchmodel1...)."""
    async with session.get(base + "/models") as resp:
        listed = (await resp.json()).get("data") or []
    out = []
    for i, m in enumerate(listed):
        meta = m.get("meta") or {}
        params = meta.get("n_params")
        size = f"{params / 1e9:.1f}B" if params and params >= 1e9 else f"{params / 1e6:.0f}M" if params else ""
        name = os.path.basename(m["id"]) if m["id"].endswith(".gguf") else m["id"]  # llama-server: a path
        out.append({"name": name, "request": f"benchmodel{i}", "size": size, "quant": meta.get("ftype", ""),
                    "capabilities": ["completion"], "target": f"openai:{base}#{m['id']}"})
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_proxy(env_extra):
    port = free_port()
    env = dict(os.environ, PROXY_PORT=str(port), PROXY_HOST="127.0.0.1", PROXY_LOG_LEVEL="WARNING", **env_extra)
    process = await asyncio.create_subprocess_exec(sys.executable, PROXY_SCRIPT, "--env-file", os.devnull, env=env,
                                                   stdout=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(url + "/"):
                    return process, url
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    process.kill()
    raise SystemExit("the proxy did not start")


async def benchmark(args):
    ollama = args.ollama.rstrip("/")
    wanted = [m for m in args.models.split(",") if m]
    async with aiohttp.ClientSession() as session:
        models = await (list_openai_models(session, args.openai.rstrip("/")) if args.openai
                        else list_ollama_models(session, ollama))
    missing = set(wanted) - {m["name"] for m in models}
    if missing:
        say(f"not found: {', '.join(sorted(missing))}")
    models = [m for m in models if not wanted or m["name"] in wanted]
    process = None
    proxy = args.proxy
    if not proxy:  # our own proxy; a fixed context size so no task makes the model reload
        env = {"OLLAMA_BASE_URL": ollama, "OLLAMA_CONTEXT_SIZE_DEFAULT": "32768",
               "PROXY_FIRST_BYTE_TIMEOUT": str(args.timeout)}
        env.update({f"OLLAMA_MODEL_MAP_{m['request'].upper()}": m["target"] for m in models if "target" in m})
        process, proxy = await start_proxy(env)
    tasks = ([dict(t, kind="code") for t in CODE_TASKS] + [dict(t, kind="tool") for t in TOOL_TASKS]
             + [{"task": "claude_code_prompt", "kind": "speed", "body": big_prompt()}])
    chosen = [t for t in args.tasks.split(",") if t]
    tasks = [t for t in tasks if not chosen or t["task"] in chosen]
    rows = []
    try:
        async with aiohttp.ClientSession() as session:
            for info in models:
                model = info["name"]
                base = {"model": model, "size": info["size"], "quant": info["quant"]}
                if "completion" not in info["capabilities"]:
                    say(f"{model}: skipped (no completion capability: an embedding model)")
                    rows.append(dict(base, task="-", kind="skipped", passed=0, score="",
                                     error="skipped: embedding-only model"))
                    continue
                say(f"{model}: warming up (loading the model)")
                try:
                    _, _, load = await stream_message(session, proxy, {"model": info["request"], "max_tokens": 1,
                                                                       "messages": [{"role": "user", "content": "Hi"}]},
                                                      args.timeout)
                except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                    say(f"{model}: warm-up failed: {e}")
                    rows.append(dict(base, task="warmup", kind="load", passed=0, score=0.0, error=str(e)[:200]))
                    continue
                for task in tasks:
                    runs = [await run_task(session, proxy, info["request"], task, args.timeout)
                            for _ in range(args.repeat)]
                    row = dict(base, **runs[0], load_s=load)
                    for key in ("score", "gen_tok_s", "prompt_tok_s", "ttft_s", "total_s", "output_tokens"):
                        row[key] = median([r.get(key) for r in runs])
                    row["passed"] = int(row["score"] is not None and row["score"] >= 0.999)
                    row["error"] = next((r["error"] for r in runs if r["error"]), "")
                    rows.append(row)
                    say(f"{model}: {task['task']:<20} {'pass' if row['passed'] else 'FAIL'} score={fmt(row['score'])} "
                        f"gen={fmt(row.get('gen_tok_s'), 1)} tok/s ttft={fmt(row.get('ttft_s'))}s "
                        f"{row['error'][:80]}")
    finally:
        if process:
            process.terminate()
            await process.wait()
    return rows


def write_report(rows, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, datetime.datetime.now().strftime("%Y%m%d_%H%M%S") + ".csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: fmt(row.get(k), 3) if isinstance(row.get(k), float) else row.get(k, "")
                             for k in COLUMNS})
    return path


def summary(rows):
    models = {}
    for row in rows:
        models.setdefault(row["model"], []).append(row)
    table = []
    for model, mine in models.items():
        graded = [r for r in mine if r["kind"] in ("code", "tool")]
        if not graded:
            continue
        quality = mean([r["score"] or 0 for r in graded])
        code = mean([r["score"] or 0 for r in graded if r["kind"] == "code"])
        tools = mean([r["score"] or 0 for r in graded if r["kind"] == "tool"])
        big = next((r for r in mine if r["kind"] == "speed"), {})
        table.append({"model": model, "quality": quality, "code": code, "tools": tools,
                      "gen": median([r.get("gen_tok_s") for r in mine]),
                      "prompt": big.get("prompt_tok_s"), "ttft": big.get("ttft_s"), "load": mine[0].get("load_s")})
    table.sort(key=lambda t: (-round(t["quality"], 2), -(t["gen"] or 0)))
    width = max([28] + [len(t["model"]) for t in table])
    lines = [f"{'model':<{width}} {'quality':>7} {'code':>5} {'tools':>5} {'gen tok/s':>9} {'prompt tok/s':>12} "
             f"{'ttft 15k':>8} {'load s':>6}"]
    for t in table:
        lines.append(f"{t['model']:<{width}} {t['quality']:>7.2f} {fmt(t['code']):>5} {fmt(t['tools']):>5} "
                     f"{fmt(t['gen'], 1):>9} {fmt(t['prompt'], 0):>12} {fmt(t['ttft'], 1):>8} {fmt(t['load'], 1):>6}")
    usable = [t for t in table if (t["tools"] is None or t["tools"] >= 0.5) and t["quality"] >= 0.5]
    if usable:
        best = usable[0]
        lines.append(f"Recommendation: OLLAMA_MODEL_MAP_SONNET={best['model']} (quality {best['quality']:.2f}, "
                     f"{fmt(best['gen'], 1)} tok/s) for the worker tier.")
    else:
        lines.append("Recommendation: none of these models reaches 0.5 in both overall quality and tool use; "
                     "Claude Code's workers need both.")
    return "\n".join(lines)


# -- overhead: the proxy's own cost against a synthetic backend ----------------------
async def synthetic_backend(port, tokens):
    """An Ollama that streams `tokens` one-token chunks as fast as it can."""
    compact = json.JSONEncoder(separators=(",", ":")).encode  # as Ollama (Go) writes it
    lines = [compact({"model": "synthetic", "created_at": "2025-11-20T10:00:01.000000Z", "message": {
        "role": "assistant", "content": f" tok{i}"}, "done": False}).encode() + b"\n" for i in range(tokens)]
    final = compact({"model": "synthetic", "created_at": "2025-11-20T10:00:02.000000Z", "message": {
        "role": "assistant", "content": ""}, "done": True, "done_reason": "stop", "prompt_eval_count": 12,
        "eval_count": tokens, "eval_duration": 1}).encode() + b"\n"

    async def chat(request):
        count = min(tokens, ((await request.json()).get("options") or {}).get("num_predict", tokens))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for line in lines[:count]:  # a write per token, like a real server flushing each token
            await response.write(line)
        await response.write(final)
        return response

    async def show(request):
        return web.json_response({"capabilities": ["completion", "tools"],
                                  "model_info": {"general.architecture": "x", "x.context_length": 131072}})

    async def tags(request):
        return web.json_response({"models": [{"name": "synthetic"}]})
    app = web.Application()
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/show", show)
    app.router.add_get("/api/tags", tags)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


DIRECT = (b'"content":" tok', b'"done":true')  # first token, end: Ollama NDJSON
PROXIED = (b"text_delta", b"message_stop")  # the same, as Anthropic SSE


async def tcp_relay(port, upstream_port):
    """A do-nothing TCP relay: the floor for any extra hop through a process on this machine."""
    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(client_reader, client_writer):
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    await server.serve_forever()


async def timed_fetch(session, url, body, markers):
    """(time to the first token, time to the end of the reply) for one streamed request."""
    first_marker, end_marker = markers
    started = time.perf_counter()
    first = None
    async with session.post(url, json=body) as resp:
        tail = b""
        async for data in resp.content.iter_any():
            if first is None and first_marker in tail[-20:] + data:
                first = time.perf_counter()
            tail = (tail + data)[-200:]
        assert end_marker in tail, tail
    return first - started, time.perf_counter() - started


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def overhead(args):
    port = free_port()
    backend = await asyncio.create_subprocess_exec(sys.executable, "-c", PROGRAM_SOURCE, "_backend", str(port),
                                                   str(args.tokens))
    relay_port = free_port()
    relay = await asyncio.create_subprocess_exec(sys.executable, "-c", PROGRAM_SOURCE, "_relay", str(relay_port),
                                                 str(port))
    process, proxy = await start_proxy({"OLLAMA_BASE_URL": f"http://127.0.0.1:{port}",
                                        "OLLAMA_MODEL_MAP_DEFAULT": "synthetic"})
    direct_url, proxy_url = f"http://127.0.0.1:{port}/api/chat", proxy + "/v1/messages"
    relay_url = f"http://127.0.0.1:{relay_port}/api/chat"
    direct_body = {"model": "synthetic", "messages": [{"role": "user", "content": "go"}], "stream": True}
    proxy_body = {"model": "claude-sonnet-5-5", "max_tokens": args.tokens * 2, "stream": True,
                  "messages": [{"role": "user", "content": "go"}]}
    results = {}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for url in (direct_url, relay_url):  # wait for the backend and the relay to listen
                for _ in range(100):
                    try:
                        await timed_fetch(session, url, direct_body, DIRECT)
                        break
                    except (aiohttp.ClientError, AssertionError):
                        await asyncio.sleep(0.1)
            ways = (("direct", direct_url, direct_body, DIRECT), ("relay", relay_url, direct_body, DIRECT),
                    ("proxy", proxy_url, proxy_body, PROXIED))
            for streams in (1, 8):
                samples = {name: ([], [], []) for name, *_ in ways}  # ttfts, reply times, rates
                for name, url, body, marker in ways:
                    for _ in range(2):  # warm-up
                        await timed_fetch(session, url, body, marker)
                for _ in range(args.repeat):
                    for name, url, body, marker in ways:  # interleaved, so drift in the machine hits all alike
                        ttfts, totals, rates = samples[name]
                        started = time.perf_counter()
                        done = await asyncio.gather(*(timed_fetch(session, url, body, marker) for _ in range(streams)))
                        wall = time.perf_counter() - started
                        ttfts += [d[0] for d in done]
                        totals += [d[1] for d in done]
                        rates.append(streams * args.tokens / wall)
                for name, (ttfts, totals, rates) in samples.items():
                    results[(name, streams)] = (statistics.median(ttfts), statistics.median(totals),
                                                statistics.median(rates))
            # the proxy's own first-token cost: 1-token replies, no flood of tokens competing for the CPU
            quiet = {"direct": [], "proxy": []}
            for _ in range(args.repeat * 5):
                quiet["direct"].append((await timed_fetch(
                    session, direct_url, dict(direct_body, options={"num_predict": 1}), DIRECT))[0])
                quiet["proxy"].append((await timed_fetch(session, proxy_url, dict(proxy_body, max_tokens=1),
                                                         PROXIED))[0])
            quiet = {name: statistics.median(ttfts) for name, ttfts in quiet.items()}
            # memory: 32 concurrent streams, then a long run of requests
            rss_idle = rss_mb(process.pid)
            peak = rss_idle

            async def sample():
                nonlocal peak
                while True:
                    peak = max(peak, rss_mb(process.pid))
                    await asyncio.sleep(0.01)
            sampler = asyncio.create_task(sample())
            await asyncio.gather(*(timed_fetch(session, proxy_url, proxy_body, PROXIED) for _ in range(32)))
            sampler.cancel()
            small = dict(proxy_body, max_tokens=20)  # the backend honours num_predict: short replies
            rss_after = []
            for _ in range(args.leak_rounds):
                for _ in range(20):  # 1000 requests a round, 50 at a time
                    await asyncio.gather(*(timed_fetch(session, proxy_url, small, PROXIED)
                                           for _ in range(50)))
                rss_after.append(rss_mb(process.pid))
    finally:
        for child in (process, backend, relay):
            child.terminate()
            await child.wait()
    print(f"proxy overhead, synthetic backend streaming {args.tokens}-token replies, medians of {args.repeat} runs:")
    print(f"{'streams':>7} {'direct reply s':>14} {'proxied reply s':>15} {'ratio':>6} {'direct tok/s':>12} "
          f"{'proxied tok/s':>13} {'ratio':>6} {'added ttft ms':>13}")
    for streams in (1, 8):
        d, p = results[("direct", streams)], results[("proxy", streams)]
        print(f"{streams:>7} {d[1]:>14.4f} {p[1]:>15.4f} {p[1] / d[1]:>6.2f} {d[2]:>12.0f} {p[2]:>13.0f} "
              f"{d[2] / p[2]:>6.2f} {(p[0] - d[0]) * 1000:>13.2f}")
    print("reference, a do-nothing TCP relay process in the same place: added ttft " + ", ".join(
        f"{(results[('relay', n)][0] - results[('direct', n)][0]) * 1000:.2f} ms ({n} stream{'s' * (n > 1)})"
        for n in (1, 8)))
    print(f"added ttft with 1-token replies (the proxy's own cost, no CPU contention): "
          f"{(quiet['proxy'] - quiet['direct']) * 1000:.2f} ms")
    print(f"proxy RSS: {rss_idle:.1f} MB idle, {peak:.1f} MB peak with 32 concurrent streams, after each 1000 "
          f"more requests: {', '.join(f'{r:.1f}' for r in rss_after)} MB")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_backend":
        asyncio.run(synthetic_backend(int(sys.argv[2]), int(sys.argv[3])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_relay":
        asyncio.run(tcp_relay(int(sys.argv[2]), int(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(prog="benchmark.sh", description="Speed and quality of your local models, "
                                     "measured through claude_local_proxy.")
    parser.add_argument("mode", nargs="?", default="models", choices=["models", "overhead"])
    parser.add_argument("--models", default="", help="comma-separated model names (default: every model)")
    parser.add_argument("--tasks", default="", help="comma-separated task names (default: all; see --list-tasks)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per task (medians are reported)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per call")
    parser.add_argument("--ollama", default=os.environ.get("OLLAMA_BASE_URL", "http://localhost:11434"))
    parser.add_argument("--openai", default="", help="benchmark the models of this OpenAI-compatible server "
                        "(llama-server, vLLM, LM Studio), e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--proxy", default="", help="use this running proxy instead of starting one")
    parser.add_argument("--out", default="benchmark-reports", help="folder for the CSV report")
    parser.add_argument("--tokens", type=int, default=2000, help="overhead: tokens per synthetic reply")
    parser.add_argument("--leak-rounds", type=int, default=10, help="overhead: rounds of 1000 requests for RSS")
    parser.add_argument("--list-tasks", action="store_true", help="print the tasks as JSON and exit")
    args = parser.parse_args()
    if args.list_tasks:
        print(json.dumps({"code": CODE_TASKS, "tool": TOOL_TASKS}, indent=1))
        return
    if args.mode == "overhead":
        args.repeat = max(args.repeat, 5)
        asyncio.run(overhead(args))
        return
    rows = asyncio.run(benchmark(args))
    path = write_report(rows, args.out)
    print(summary(rows))
    print(f"CSV: {path}")


PROGRAM_SOURCE = os.environ.get("CLP_PROGRAM", "")
main()
PY
export CLP_PROGRAM="$PROGRAM"
exec "$PYTHON" -c "$PROGRAM" "$@"
