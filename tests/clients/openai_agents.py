"""What agent frameworks send, through the official `openai` Python client, against a running
`infer serve` (SmolLM2-135M-Instruct Q4_1): tool calls forced, named, refused and streamed, a tool
result round trip, `chat.completions.parse` with a pydantic model, regex and choice constraints,
JSON mode, and invalid schemas. Every sampled check runs 20 samples at temperature 1; all must be
valid.

Usage: python openai_agents.py BASE_URL API_KEY
"""
import json
import re
import sys
import time
from typing import Annotated, List, Literal

import openai
from openai import OpenAI
from pydantic import BaseModel, Field

BASE, KEY = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{BASE}/v1", api_key=KEY, max_retries=0, timeout=600)
MODEL = client.models.list().data[0].id
N = 20

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 24},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the current time in a time zone",
            "parameters": {
                "type": "object",
                "properties": {"timezone": {"type": "string", "maxLength": 24}},
                "required": ["timezone"],
            },
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def check(name, fn):
    t0 = time.time()
    fn()
    print(f"ok   {name} ({time.time() - t0:.1f}s)")


def valid_call(call, names=("get_weather", "get_time")):
    assert call.type == "function" and call.id.startswith("call_"), call
    assert call.function.name in names, call
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit"), args
    else:
        assert set(args) == {"timezone"} and isinstance(args["timezone"], str), args
    return args


def required():
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1, n=N, max_tokens=400)
    assert len(r.choices) == N
    for c in r.choices:
        assert c.finish_reason == "tool_calls", c
        assert c.message.tool_calls, c
        for call in c.message.tool_calls:
            valid_call(call)


def named():
    choice = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=1, n=N, max_tokens=400)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls, c
        for call in c.message.tool_calls:
            valid_call(call, names=("get_time",))


def none():
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=40)
    c = r.choices[0]
    assert not c.message.tool_calls and c.message.content, c
    assert c.finish_reason in ("stop", "length"), c


def streamed():
    for seed in range(N):
        stream = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1, seed=seed, max_tokens=400, stream=True
        )
        calls, finish = {}, None
        for chunk in stream:
            ch = chunk.choices[0]
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                if d.index not in calls:
                    assert d.id and d.function.name and d.type == "function", d  # id and name come first
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    assert d.id is None and d.function.name is None, d
                    calls[d.index]["arguments"] += d.function.arguments or ""
        assert finish == "tool_calls" and calls, (finish, calls)
        for c in calls.values():
            args = json.loads(c["arguments"])
            assert c["name"] in ("get_weather", "get_time") and isinstance(args, dict), c


def round_trip():
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200)
    msg = r.choices[0].message
    call = msg.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in msg.tool_calls]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "unit": "celsius", "sky": "sunny"})},
    ]
    r2 = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0, max_tokens=60)
    c = r2.choices[0]
    assert c.finish_reason in ("stop", "tool_calls", "length"), c
    assert c.message.content or c.message.tool_calls, c


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population_millions: float
    landmarks: List[Annotated[str, Field(max_length=30)]] = Field(max_length=3)
    climate: Literal["temperate", "tropical", "arid", "cold"]


def parse():
    r = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City,
        temperature=1,
        n=N,
        max_tokens=300,
    )
    for c in r.choices:
        assert c.finish_reason == "stop", c
        assert isinstance(c.message.parsed, City), c


def regex_and_choice():
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a date."}],
        temperature=1,
        n=N,
        max_tokens=30,
        extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"}},
    )
    for c in r.choices:
        assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", c.message.content), c.message.content
    options = ["positive", "negative", "neutral"]
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Sentiment of: I love this movie!"}],
        temperature=1,
        n=N,
        max_tokens=10,
        extra_body={"structured_outputs": {"choice": options}},
    )
    for c in r.choices:
        assert c.message.content in options and c.finish_reason == "stop", c
    # llama.cpp's field, a GBNF grammar.
    r = client.completions.create(
        model=MODEL, prompt="Answer:", temperature=1, n=N, max_tokens=10, extra_body={"grammar": 'root ::= ("yes" | "no") "."'}
    )
    for c in r.choices:
        assert c.text in ("yes.", "no."), c.text


def json_mode():
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
        response_format={"type": "json_object"},
        temperature=1,
        n=N,
        max_tokens=300,
    )
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict), c.message.content
    assert sum(c.finish_reason == "stop" for c in r.choices) >= N // 2


def invalid():
    for fmt, param, words in [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "response_format.json_schema.schema", "strin"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}, "response_format.json_schema.schema", "not"),
        ({"type": "xml"}, "response_format.type", "xml"),
    ]:
        try:
            client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt)
            raise AssertionError(f"{fmt} accepted")
        except openai.BadRequestError as e:
            assert e.body["param"] == param and words in e.body["message"], e.body
    try:
        client.chat.completions.create(model=MODEL, messages=ASK, extra_body={"structured_outputs": {"regex": "a("}})
        raise AssertionError("bad regex accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "structured_outputs.regex", e.body
    try:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
        raise AssertionError("unknown tool accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "tool_choice", e.body


for name, fn in [
    ("tools: required (20 samples, T=1)", required),
    ("tools: named function (20 samples, T=1)", named),
    ("tools: none", none),
    ("tools: streamed deltas (20 samples, T=1)", streamed),
    ("tools: result round trip", round_trip),
    ("parse with pydantic (20 samples, T=1)", parse),
    ("regex, choice, GBNF grammar (20 samples each, T=1)", regex_and_choice),
    ("json_object (20 samples, T=1)", json_mode),
    ("invalid schemas and tools", invalid),
]:
    check(name, fn)
print(json.dumps({"openai": openai.__version__, "model": MODEL, "result": "agents: all passed"}))
