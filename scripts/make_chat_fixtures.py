"""Chat-template fixtures: transformers' `apply_chat_template` renders a 3-turn conversation with a
system prompt through templates in the style of each supported family, and the Rust test
(crates/infer-core/tests/chat_templates.rs) checks that infer's renderer gives the same string.

    .venv-ref/bin/python scripts/make_chat_fixtures.py

The templates are written here (not copied from model repositories); each uses the Jinja features its
family's real template relies on: namespaces and reversed loops with string methods (Qwen3 style),
`raise_exception` on bad role order and a system prompt folded into the first user turn (Gemma and
Mistral styles), `bos_token`/`eos_token`, whitespace control, `loop` variables, `tojson`.
Writes tests/fixtures/chat/templates.json.
"""
import json
import os

from transformers import PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "chat", "templates.json")

TEMPLATES = {
    # ChatML with reasoning blocks: the last query is found by a reversed loop, earlier assistant
    # turns lose their <think> part.
    "qwen3-style": """{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(last_query=messages|length - 1) %}
{%- for m in messages[::-1] %}{%- set i = (messages|length - 1) - loop.index0 %}
{%- if m.role == 'user' and ns.last_query == messages|length - 1 and i < messages|length - 1 %}{%- set ns.last_query = i %}{%- endif %}
{%- endfor %}
{%- for m in messages %}
{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
{%- elif m.role == 'assistant' %}
{%- set content = m.content %}
{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}
{{- '<|im_start|>assistant\\n' + content.strip() + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}""",
    # Phi-3 style: role tags closed by <|end|>.
    "phi3-style": """{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}""",
    # Gemma style: no system role (folded into the first user turn), strict alternation, model role.
    "gemma-style": """{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}
{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}
{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}
{%- for message in loop_messages -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}""",
    # Mistral/Mixtral style: [INST] blocks, the system prompt joined to the last user turn.
    "mistral-style": """{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}
{%- else %}{%- set loop_messages = messages %}{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{- raise_exception('After the optional system message, roles must alternate user/assistant') }}{%- endif %}
{%- if message['role'] == 'user' %}
{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}
{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}
{%- endfor %}""",
}

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant. Answer in one line."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nParis."},
    {"role": "user", "content": "And of Italy? \"Quote\" & <tags>"},
    {"role": "assistant", "content": "  Rome.  "},
    {"role": "user", "content": "Thanks — merci, ありがとう!"},
]

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}


def main():
    tok_file = os.path.join(ROOT, "tests", "fixtures", "tiny-qwen2", "tokenizer.json")
    cases = []
    for name, template in TEMPLATES.items():
        tok = PreTrainedTokenizerFast(tokenizer_file=tok_file, **SPECIAL)
        tok.chat_template = template
        for gen in (True, False):
            text = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen)
            cases.append({"name": name, "template": template, **SPECIAL, "messages": CONVERSATION,
                          "add_generation_prompt": gen, "expected": text})
        # Templates that refuse a bad role order: record transformers' refusal.
        bad = [CONVERSATION[0], CONVERSATION[1], CONVERSATION[1]]
        try:
            tok.apply_chat_template(bad, tokenize=False, add_generation_prompt=True)
            refused = False
        except Exception:
            refused = True
        cases.append({"name": name, "template": template, **SPECIAL, "messages": bad,
                      "add_generation_prompt": True, "expected": None if refused else
                      tok.apply_chat_template(bad, tokenize=False, add_generation_prompt=True)})
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(cases, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"{OUT}: {len(cases)} cases")


if __name__ == "__main__":
    main()
