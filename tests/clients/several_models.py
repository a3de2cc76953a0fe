"""The official openai and anthropic clients against `infer serve chat=MODEL embed=tests/fixtures/tiny-bert
--keep-alive 3s`: both models listed with their state, chat (also streamed, also through the Messages API)
and embeddings at once, the model's errors in each API's shape, and unloading after the keep-alive.

usage: several_models.py BASE_URL API_KEY
"""

import sys
import threading
import time

import anthropic
import openai

base, key = sys.argv[1], sys.argv[2]
o = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=600)
a = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=600)


def states():
    return {m.id: m.model_extra["status"]["value"] for m in o.models.list().data}


assert states() == {"chat": "unloaded", "embed": "unloaded"}, states()

# The first requests for both models at once: four chats wait for the one load of `chat`.
answers, errors = {}, []


def chat(i):
    try:
        r = o.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0)
        answers[i] = r.choices[0].message.content
        assert r.model == "chat", r.model
    except Exception as e:  # noqa: BLE001 - reported below
        errors.append(e)


threads = [threading.Thread(target=chat, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
e = o.embeddings.create(model="embed", input=["hello", "world"])
for t in threads:
    t.join()
assert not errors, errors
assert len(answers) == 4 and len(set(answers.values())) == 1, answers
assert len(e.data) == 2 and e.model == "embed", e
assert states() == {"chat": "loaded", "embed": "loaded"}, states()

streamed = "".join(
    c.choices[0].delta.content or ""
    for c in o.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0, stream=True
    )
    if c.choices
)
assert streamed == answers[0], (streamed, answers[0])
m = a.messages.create(model="chat", max_tokens=8, extra_body={"temperature": 0}, messages=[{"role": "user", "content": "Say hi"}])
assert m.model == "chat" and m.content[0].text == answers[0], m
with a.messages.stream(model="chat", max_tokens=8, extra_body={"temperature": 0}, messages=[{"role": "user", "content": "Say hi"}]) as s:
    assert "".join(s.text_stream) == answers[0]

try:
    o.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    raise AssertionError("an unknown model was served")
except openai.NotFoundError as err:
    assert err.body["code"] == "model_not_found" and err.body["param"] == "model" and "nope" in err.body["message"], err.body
try:
    o.chat.completions.create(model="embed", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    raise AssertionError("an embedding model chatted")
except openai.BadRequestError as err:
    assert err.body["param"] == "model", err.body
try:
    o.embeddings.create(model="", input="x")
    raise AssertionError("no model was accepted")
except openai.BadRequestError as err:
    assert err.body["param"] == "model" and "`chat`, `embed`" in err.body["message"], err.body
try:
    a.messages.create(model="nope", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    raise AssertionError("an unknown model was served")
except anthropic.NotFoundError as err:
    assert err.body["type"] == "error" and "nope" in err.body["error"]["message"], err.body
try:
    openai.OpenAI(base_url=f"{base}/v1", api_key="wrong").models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    pass

deadline = time.time() + 20
while states() != {"chat": "unloaded", "embed": "unloaded"}:
    assert time.time() < deadline, states()
    time.sleep(0.1)
r = o.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0)
assert r.choices[0].message.content == answers[0]
print("several models: ok")
