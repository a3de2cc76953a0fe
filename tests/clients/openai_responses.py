"""The official `openai` Python client's Responses API (`client.responses.create` / `.stream`)
against a running `infer serve` (SmolLM2-135M-Instruct Q4_1): text, the same text streamed with the
event order the SDK accumulates, `max_output_tokens` ending as incomplete, a forced function call (20
samples at temperature 1, all valid), a function call streamed as argument deltas, a function output
round trip, `text.format` json_schema (20 samples, all valid), and errors naming the field.

Usage: python openai_responses.py BASE_URL API_KEY
"""
import json
import sys
import time

import openai
from openai import OpenAI

BASE, KEY = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{BASE}/v1", api_key=KEY, max_retries=0, timeout=600)
MODEL = client.models.list().data[0].id
N = 20
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
    },
}
ASK = "What is the weather like in Paris today?"


def check(name, fn):
    t0 = time.time()
    fn()
    print(f"ok   {name} ({time.time() - t0:.1f}s)")


def text():
    r = client.responses.create(model=MODEL, input="What is the capital of France?", temperature=0, max_output_tokens=24)
    assert r.object == "response" and r.id.startswith("resp_") and r.status in ("completed", "incomplete"), r
    assert "Paris" in r.output_text, r.output_text
    assert r.usage.input_tokens > 10 and 0 < r.usage.output_tokens <= 24, r.usage
    return r


def streamed():
    want = text()
    kinds = []
    with client.responses.stream(model=MODEL, input="What is the capital of France?", temperature=0, max_output_tokens=24) as s:
        deltas = []
        for ev in s:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
        final = s.get_final_response()
    assert final.output_text == want.output_text == "".join(deltas), (final.output_text, want.output_text)
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete"), kinds
    for k in ("response.output_item.added", "response.content_part.added", "response.output_text.done", "response.output_item.done"):
        assert k in kinds, (k, kinds)


def incomplete():
    r = client.responses.create(model=MODEL, input="Write a long story about a robot.", temperature=0, max_output_tokens=5)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens", r
    assert r.usage.output_tokens == 5


def forced_call():
    for _ in range(N):
        r = client.responses.create(model=MODEL, input=ASK, tools=[WEATHER], temperature=1, max_output_tokens=128,
                                    tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False)
        calls = [o for o in r.output if o.type == "function_call"]
        assert calls and calls[0].name == "get_weather" and calls[0].call_id, r.output
        args = json.loads(calls[0].arguments)
        assert isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit"), args


def call_streamed():
    deltas = []
    with client.responses.stream(model=MODEL, input=ASK, tools=[WEATHER], tool_choice="required", temperature=0,
                                 max_output_tokens=128, parallel_tool_calls=False) as s:
        for ev in s:
            if ev.type == "response.function_call_arguments.delta":
                deltas.append(ev.delta)
        final = s.get_final_response()
    calls = [o for o in final.output if o.type == "function_call"]
    assert calls and json.loads(calls[0].arguments)["city"], final.output
    assert "".join(deltas) == calls[0].arguments, (deltas, calls[0].arguments)


def round_trip():
    r = client.responses.create(model=MODEL, input=ASK, tools=[WEATHER], tool_choice="required", temperature=0,
                                max_output_tokens=128, parallel_tool_calls=False)
    call = next(o for o in r.output if o.type == "function_call")
    follow = [{"role": "user", "content": ASK},
              {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
              {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees and sunny"}]
    r2 = client.responses.create(model=MODEL, input=follow, tools=[WEATHER], temperature=0, max_output_tokens=48)
    assert r2.output, r2


def json_schema():
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    completed = 0
    for _ in range(N):
        r = client.responses.create(model=MODEL, input="Name a large city and its population as JSON.", temperature=1,
                                    max_output_tokens=96, text={"format": {"type": "json_schema", "name": "city", "schema": schema}})
        if r.status == "incomplete":
            # At T=1 the unbounded integer can run on in digits until max_output_tokens (about 1 in 150
            # samples): cut off, as the API reports it.
            assert r.incomplete_details.reason == "max_output_tokens", r
            continue
        completed += 1
        v = json.loads(r.output_text)
        assert isinstance(v["city"], str) and isinstance(v["population"], int) and set(v) == {"city", "population"}, v
    assert completed >= N // 2, f"{completed} of {N} completed"


def errors():
    for kwargs, field in [({"max_output_tokens": 0}, "max_output_tokens"), ({"previous_response_id": "resp_x"}, "previous_response_id"),
                          ({"tools": [{"type": "web_search"}]}, "tools[0].type")]:
        try:
            client.responses.create(model=MODEL, input="hi", **kwargs)
            raise AssertionError(f"{kwargs} was accepted")
        except openai.BadRequestError as e:
            assert e.status_code == 400 and e.body["param"] == field, (field, e.body)


for name, fn in [("text", text), ("stream = response", streamed), ("incomplete at max_output_tokens", incomplete),
                 (f"forced call x{N} at T=1", forced_call), ("call streamed", call_streamed), ("function output round trip", round_trip),
                 (f"text.format json_schema x{N} at T=1", json_schema), ("errors", errors)]:
    check(name, fn)
print("openai responses: all checks passed")
