"""The official `anthropic` Python client against a running `infer serve` (SmolLM2-135M-Instruct
Q4_1) through `/v1/messages`: a plain message, its stream (same text, Anthropic's event order), stop
sequences, a forced and a free tool call (20 samples at temperature 1, all valid `tool_use` blocks),
tool calls streamed as `input_json_delta`, a tool result round trip, errors in Anthropic's shape and
the key sent as `x-api-key`.

(This SDK version has no `temperature` argument: tests pass it through `extra_body`.)

Usage: python anthropic_client.py BASE_URL API_KEY
"""
import sys
import time

import anthropic
from anthropic import Anthropic

BASE, KEY = sys.argv[1], sys.argv[2]
client = Anthropic(base_url=BASE, api_key=KEY, max_retries=0, timeout=600)
import openai  # noqa: E402  (only to learn the served model's id)

MODEL = openai.OpenAI(base_url=f"{BASE}/v1", api_key=KEY).models.list().data[0].id
N = 20
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def check(name, fn):
    t0 = time.time()
    fn()
    print(f"ok   {name} ({time.time() - t0:.1f}s)")


def plain():
    m = client.messages.create(model=MODEL, max_tokens=24, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_"), m
    assert m.content[0].type == "text" and "Paris" in m.content[0].text, m
    assert m.stop_reason in ("end_turn", "max_tokens"), m.stop_reason
    assert m.usage.input_tokens > 10 and 0 < m.usage.output_tokens <= 24, m.usage
    return m


def streamed():
    want = plain()
    kinds = []
    with client.messages.stream(model=MODEL, max_tokens=24, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": "What is the capital of France?"}]) as s:
        for ev in s:
            kinds.append(ev.type)
        final = s.get_final_message()
    assert final.content[0].text == want.content[0].text, (final, want)
    assert final.stop_reason == want.stop_reason and final.usage.output_tokens == want.usage.output_tokens
    raw = [k for k in kinds if k in ("message_start", "content_block_start", "content_block_stop", "message_delta", "message_stop")]
    assert raw == ["message_start", "content_block_start", "content_block_stop", "message_delta", "message_stop"], kinds
    assert "content_block_delta" in kinds or "text" in kinds, kinds


def stop_sequences():
    m = client.messages.create(model=MODEL, max_tokens=64, extra_body={"temperature": 0}, stop_sequences=["Paris"],
                                messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert m.stop_reason == "stop_sequence" and "Paris" not in m.content[0].text, m


def forced_tool():
    for i in range(N):
        m = client.messages.create(model=MODEL, max_tokens=96, extra_body={"temperature": 1}, tools=[WEATHER],
                                    tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}, messages=ASK)
        uses = [b for b in m.content if b.type == "tool_use"]
        assert uses and m.stop_reason == "tool_use", m
        u = uses[0]
        assert u.name == "get_weather" and u.id, u
        assert isinstance(u.input, dict) and isinstance(u.input.get("city"), str) and u.input.get("unit") in ("celsius", "fahrenheit"), u


def any_tool_streamed():
    with client.messages.stream(model=MODEL, max_tokens=96, extra_body={"temperature": 0}, tools=[WEATHER],
                                tool_choice={"type": "any", "disable_parallel_tool_use": True}, messages=ASK) as s:
        kinds = [ev.type for ev in s]
        final = s.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert uses and final.stop_reason == "tool_use", final
    assert isinstance(uses[0].input.get("city"), str), uses[0]
    assert "input_json" in kinds or "content_block_delta" in kinds, kinds


def round_trip():
    m = client.messages.create(model=MODEL, max_tokens=96, extra_body={"temperature": 0}, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}, messages=ASK)
    use = next(b for b in m.content if b.type == "tool_use")
    follow = ASK + [
        {"role": "assistant", "content": [b.model_dump() for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees and sunny"}]},
    ]
    r = client.messages.create(model=MODEL, max_tokens=48, extra_body={"temperature": 0}, tools=[WEATHER], messages=follow)
    assert r.content and r.content[0].type in ("text", "tool_use"), r


def errors():
    try:
        client.messages.create(model=MODEL, max_tokens=0, messages=ASK)
        raise AssertionError("max_tokens 0 was accepted")
    except anthropic.BadRequestError as e:
        assert e.status_code == 400 and e.body["type"] == "error", e.body
        assert e.body["error"]["type"] == "invalid_request_error" and "max_tokens" in e.body["error"]["message"], e.body
    try:
        client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
        raise AssertionError("an image was accepted")
    except anthropic.BadRequestError as e:
        assert "messages[0].content[0].type" in e.body["error"]["message"], e.body
    try:
        Anthropic(base_url=BASE, api_key="wrong", max_retries=0).messages.create(model=MODEL, max_tokens=8, messages=ASK)
        raise AssertionError("a wrong key was accepted")
    except anthropic.AuthenticationError as e:
        assert e.status_code == 401 and e.body["error"]["type"] == "authentication_error", e.body
    try:
        client.messages.create(model="no-such-model", max_tokens=8, messages=ASK)
        raise AssertionError("an unknown model was accepted")
    except anthropic.NotFoundError as e:
        assert e.body["error"]["type"] == "not_found_error", e.body


for name, fn in [("plain message", plain), ("stream = message", streamed), ("stop sequences", stop_sequences),
                 (f"forced tool x{N} at T=1", forced_tool), ("tool call streamed", any_tool_streamed),
                 ("tool result round trip", round_trip), ("errors", errors)]:
    check(name, fn)
print("anthropic client: all checks passed")
