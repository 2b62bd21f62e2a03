"""Real SDKs against the gateway's key checks; prints what each got as JSON.

Env: TOLLGATE_URL (http://host:port), TOLLGATE_KEY (valid), TOLLGATE_REVOKED_KEY, TOLLGATE_MODEL.
"""
import json
import os
import sys

import anthropic
import openai

url = os.environ["TOLLGATE_URL"]
model = os.environ["TOLLGATE_MODEL"]
out = {}


def openai_chat(key):
    c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)
    try:
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        return {"ok": True, "content": r.choices[0].message.content}
    except openai.APIStatusError as e:
        return {"ok": False, "status": e.status_code, "type": type(e).__name__, "body": e.body}


out["openai_valid"] = openai_chat(os.environ["TOLLGATE_KEY"])
out["openai_revoked"] = openai_chat(os.environ["TOLLGATE_REVOKED_KEY"])

# The Anthropic SDK sends the key as x-api-key.
a = anthropic.Anthropic(base_url=url, api_key=os.environ["TOLLGATE_KEY"], max_retries=0, timeout=30)
try:
    m = a.messages.create(model=model, max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    out["anthropic_valid"] = {"ok": True, "text": m.content[0].text}
except anthropic.APIStatusError as e:
    out["anthropic_valid"] = {"ok": False, "status": e.status_code, "body": e.body}

json.dump(out, sys.stdout)
