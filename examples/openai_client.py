"""Talk to `pymorph-edge serve` with the official OpenAI client.

Start the server first:   pymorph-edge serve --kv-budget 1024        (binds 127.0.0.1:8000)
then:                     python examples/openai_client.py
"""

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="not-needed-on-loopback")
messages = [{"role": "user", "content": "Write a haiku about a lighthouse."}]
stream = client.chat.completions.create(model="local", messages=messages, max_tokens=120, stream=True)
reply = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
print(reply)

# The next turn extends the conversation, so the server continues on its compressed cache.
messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Now one about the sea."}]
r = client.chat.completions.create(model="local", messages=messages, max_tokens=120)
print(r.choices[0].message.content)
print("prompt tokens reused from the cache:", r.usage.prompt_tokens_details.cached_tokens, "of", r.usage.prompt_tokens)
