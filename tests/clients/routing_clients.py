"""The real `openai` and `ollama` clients against the model-routing example; prints JSON.

Env: TOLLGATE_URL (http://host:port), TOLLGATE_BASE_URL (…/v1), TOLLGATE_API_KEY.
Assertions live in tests/tests/routing.rs; this script only reports.
"""
import json
import os
import sys

import ollama
from openai import OpenAI, APIStatusError

key = os.environ["TOLLGATE_API_KEY"]
client = OpenAI(base_url=os.environ["TOLLGATE_BASE_URL"], api_key=key, max_retries=0, timeout=30)
messages = [{"role": "user", "content": "route me"}]
out = {"models": sorted(m.id for m in client.models.list())}

for model in ["chat-default", "chat-hosted", "llama3.1:8b", "qwen2:0.5b"]:
    c = client.chat.completions.create(model=model, messages=messages)
    pieces = []
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
    out[model] = {"model": c.model, "content": c.choices[0].message.content,
                  "usage": c.usage.total_tokens if c.usage else None, "stream": "".join(pieces)}

try:
    client.chat.completions.create(model="chat-small", messages=messages)
    out["chat-small"] = {"status": 200}
except APIStatusError as e:
    out["chat-small"] = {"status": e.status_code, "code": e.body.get("code") if isinstance(e.body, dict) else None}

native = ollama.Client(host=os.environ["TOLLGATE_URL"], headers={"Authorization": "Bearer " + key})
out["ollama_list"] = sorted(m.model for m in native.list().models)
r = native.chat(model="chat-default", messages=messages, stream=False)
out["ollama_chat"] = {"content": r.message.content, "eval_count": r.eval_count}
json.dump(out, sys.stdout)
