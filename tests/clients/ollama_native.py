"""The real `ollama` Python client through the gateway; prints what it got as JSON.

Env: TOLLGATE_URL (http://host:port), TOLLGATE_API_KEY, TOLLGATE_MODEL.
"""
import json
import os
import sys

import ollama

client = ollama.Client(host=os.environ["TOLLGATE_URL"],
                       headers={"Authorization": "Bearer " + os.environ["TOLLGATE_API_KEY"]})
model = os.environ["TOLLGATE_MODEL"]
out = {}

r = client.chat(model=model, messages=[{"role": "user", "content": "hello there"}], stream=False)
out["chat"] = {"content": r.message.content, "prompt_eval_count": r.prompt_eval_count, "eval_count": r.eval_count}

pieces, last = [], None
for part in client.chat(model=model, messages=[{"role": "user", "content": "hello there"}], stream=True):
    pieces.append(part.message.content)
    last = part
out["chat_stream"] = {"content": "".join(pieces), "eval_count": last.eval_count, "done": last.done}

r = client.generate(model=model, prompt="one two three")
out["generate"] = {"response": r.response, "eval_count": r.eval_count}

r = client.embed(model=model, input=["a b", "c"])
out["embed"] = {"count": len(r.embeddings)}

out["list"] = sorted(m.model for m in client.list().models)

try:
    client.pull(model)
    out["pull"] = {"ok": True}
except ollama.ResponseError as e:
    out["pull"] = {"status": e.status_code, "error": str(e.error)}

json.dump(out, sys.stdout)
