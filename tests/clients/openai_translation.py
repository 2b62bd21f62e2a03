"""The real `openai` SDK through the gateway; prints what it got as JSON.

Env: TOLLGATE_BASE_URL (…/v1), TOLLGATE_API_KEY, TOLLGATE_MODEL, TOLLGATE_CASES (comma list of
chat, chat_stream, chat_stream_usage, completion, embeddings, models).
"""
import json
import os
import sys

from openai import OpenAI, APIStatusError

client = OpenAI(base_url=os.environ["TOLLGATE_BASE_URL"], api_key=os.environ["TOLLGATE_API_KEY"],
                max_retries=0, timeout=30)
model = os.environ["TOLLGATE_MODEL"]
cases = os.environ["TOLLGATE_CASES"].split(",")
messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say hello to the gateway"}]
out = {}


def stream(**extra):
    pieces, finish, usage, chunks, ids = [], None, None, 0, set()
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True, **extra):
        chunks += 1
        ids.add(chunk.id)
        if chunk.usage:
            usage = chunk.usage.model_dump()
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    return {"content": "".join(pieces), "finish_reason": finish, "usage": usage, "chunks": chunks, "ids": len(ids)}


for case in cases:
    try:
        if case == "chat":
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=50, temperature=0.2)
            out[case] = {"content": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason,
                         "usage": r.usage.model_dump() if r.usage else None, "object": r.object}
        elif case == "chat_stream":
            out[case] = stream()
        elif case == "chat_stream_usage":
            out[case] = stream(stream_options={"include_usage": True})
        elif case == "completion":
            r = client.completions.create(model=model, prompt="once upon a time", max_tokens=20)
            out[case] = {"text": r.choices[0].text, "usage": r.usage.model_dump() if r.usage else None}
        elif case == "embeddings":
            r = client.embeddings.create(model=model, input=["alpha beta", "gamma"])
            out[case] = {"count": len(r.data), "dims": len(r.data[0].embedding),
                         "usage": r.usage.model_dump() if r.usage else None}
        elif case == "models":
            out[case] = sorted(m.id for m in client.models.list())
    except APIStatusError as e:
        out[case] = {"error": e.status_code, "body": e.body}

json.dump(out, sys.stdout)
