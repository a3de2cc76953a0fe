"""The official `openai` Python client against a running `infer serve` (SmolLM2-135M-Instruct Q4_1).

Usage: python openai_client.py BASE_URL API_KEY
Every check asserts; the script exits non-zero on the first failure.
"""
import json
import sys
import time
import urllib.request

import openai
from openai import OpenAI

BASE, KEY = sys.argv[1], sys.argv[2]
FRANCE = "What is the capital of France? Answer in one sentence."
client = OpenAI(base_url=f"{BASE}/v1", api_key=KEY, max_retries=0, timeout=300)


def metric(name):
    text = urllib.request.urlopen(f"{BASE}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} missing")


def check(name, fn):
    t0 = time.time()
    fn()
    print(f"ok   {name} ({time.time() - t0:.1f}s)")


models = client.models.list()
MODEL = models.data[0].id


def models_list():
    assert len(models.data) == 1 and MODEL.endswith(".gguf"), models
    assert client.models.retrieve(MODEL).id == MODEL


def chat():
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": FRANCE}], temperature=0)
    assert r.choices[0].message.content == "The capital of France is Paris.", r
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (42, 8, 50), r.usage
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def chat_stream():
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": FRANCE}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text, text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"], finishes
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens > 0


def completions_n_stop_seed():
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=16, temperature=0, n=2)
    assert [c.text for c in r.choices] == [" with a quick brown bear.\n\nThe original sentence is a classic example of"] * 2, r
    assert r.usage.completion_tokens == 32 and r.usage.prompt_tokens == 4
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=16, temperature=0, stop=[" bear"])
    assert r.choices[0].text == " with a quick brown" and r.choices[0].finish_reason == "stop", r
    a = client.completions.create(model=MODEL, prompt="Write a story about a dragon.", max_tokens=20, temperature=1.0, seed=123)
    b = client.completions.create(model=MODEL, prompt="Write a story about a dragon.", max_tokens=20, temperature=1.0, seed=123)
    assert a.choices[0].text == b.choices[0].text


def chat_logprobs():
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": FRANCE}], temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)


def errors():
    try:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body
    try:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=5)
        raise AssertionError("temperature 5 accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "temperature", e.body
    try:
        client.completions.create(model=MODEL, prompt="word " * 9000)
        raise AssertionError("oversized prompt accepted")
    except openai.BadRequestError as e:
        assert e.body["code"] == "context_length_exceeded", e.body
    bad = OpenAI(base_url=f"{BASE}/v1", api_key="wrong-key", max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("wrong key accepted")
    except openai.AuthenticationError:
        pass


def disconnect():
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=1500, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert metric("infer_running_sequences") == 1
    stream.close()
    t0 = time.time()
    while metric("infer_running_sequences") != 0 or metric("infer_kv_blocks_used") != 0:
        assert time.time() - t0 < 20, "closing the stream did not free its sequence"
        time.sleep(0.05)


def embeddings():
    texts = ["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue grew 8%."]
    r = client.embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64 and decodes it
    assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens > 10, r.usage
    v = [d.embedding for d in r.data]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    assert all(abs(dot(x, x) - 1) < 1e-4 for x in v)
    assert dot(v[0], v[1]) > dot(v[0], v[2])
    f = client.embeddings.create(model=MODEL, input=texts[1], encoding_format="float").data[0].embedding
    assert max(abs(a - b) for a, b in zip(f, v[1])) < 1e-4
    assert len(client.embeddings.create(model=MODEL, input=texts[0], dimensions=32).data[0].embedding) == 32
    try:
        client.embeddings.create(model=MODEL, input=texts[0], dimensions=100000)
        raise AssertionError("dimensions beyond the model were accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "dimensions", e.body


for name, fn in [
    ("models", models_list),
    ("embeddings", embeddings),
    ("chat", chat),
    ("chat stream + usage", chat_stream),
    ("completions n / stop / seed", completions_n_stop_seed),
    ("chat logprobs", chat_logprobs),
    ("errors", errors),
    ("disconnect frees blocks", disconnect),
]:
    check(name, fn)
print(json.dumps({"openai": openai.__version__, "model": MODEL, "result": "all passed"}))
