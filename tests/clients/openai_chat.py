"""Drives the real `openai` SDK against the gateway and prints what it got as JSON.

Env: TOLLGATE_BASE_URL (…/v1), TOLLGATE_API_KEY, TOLLGATE_MODEL.
Assertions live in the Rust e2e tests; this script only reports.
"""
import json
import os
import sys

from openai import OpenAI, APIStatusError

client = OpenAI(
    base_url=os.environ["TOLLGATE_BASE_URL"],
    api_key=os.environ["TOLLGATE_API_KEY"],
    max_retries=0,
    timeout=30,
)
model = os.environ["TOLLGATE_MODEL"]
messages = [{"role": "user", "content": "say hello to the gateway"}]
out = {}

try:
    r = client.chat.completions.with_raw_response.create(model=model, messages=messages)
    c = r.parse()
    out["plain"] = {
        "content": c.choices[0].message.content,
        "finish_reason": c.choices[0].finish_reason,
        "usage": c.usage.model_dump() if c.usage else None,
        "request_id": r.headers.get("x-request-id"),
    }

    pieces, finish, usage, chunks = [], None, None, 0
    stream = client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        chunks += 1
        if chunk.usage:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    out["stream"] = {"content": "".join(pieces), "finish_reason": finish, "usage": usage, "chunks": chunks}
except APIStatusError as e:
    out["error"] = {"status": e.status_code, "body": e.body}

json.dump(out, sys.stdout)
