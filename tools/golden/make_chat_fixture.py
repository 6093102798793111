"""Writes crates/tokenizer/tests/fixtures/chat_templates.json: chat templates in the styles of
published models (ChatML, Llama-3, Zephyr, Kiln's default) rendered by transformers'
`apply_chat_template` for a few conversations, with and without the generation prompt.

Needs a directory with a tokenizer (any; only its special tokens matter):
  KILN_EXPORT_DIR=/tmp/k cargo test -p kiln-model --test golden kiln_dir_for_transformers
  python tools/golden/make_chat_fixture.py /tmp/k
"""
import json
import os
import sys

from transformers import AutoTokenizer

TEMPLATES = {
    "kiln_default": None,  # the template saved in tokenizer_config.json
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "llama3": "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    "zephyr": "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token }}{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}",
    "pycompat": "{% for m in messages %}{% if m.role == 'system' %}[SYS] {{ m['content'].strip() }}{% else %}{{ m.role.upper() }}: {{ m.content.strip() }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}",
}

CONVERSATIONS = [
    [{"role": "user", "content": "What color does Mira like?"}, {"role": "assistant", "content": "Mira likes blue."}],
    [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Add 2 and 3."},
     {"role": "assistant", "content": "2 plus 3 is 5."}, {"role": "user", "content": "héllo 🦀"}],
]

tok = AutoTokenizer.from_pretrained(sys.argv[1])
default = tok.chat_template
cases = []
for name, tpl in TEMPLATES.items():
    tpl = tpl or default
    for conv in CONVERSATIONS:
        for gen in (False, True):
            text = tok.apply_chat_template(conv, chat_template=tpl, tokenize=False, add_generation_prompt=gen)
            cases.append({"name": name, "template": tpl, "messages": conv, "add_generation_prompt": gen, "expected": text})
out = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "tokenizer", "tests", "fixtures", "chat_templates.json")
json.dump({"bos_token": tok.bos_token, "eos_token": tok.eos_token, "cases": cases}, open(out, "w"), indent=1, ensure_ascii=False)
print(len(cases), "cases")
