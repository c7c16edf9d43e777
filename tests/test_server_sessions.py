"""Several conversations on one server: each continues on its own kept state (`--max-sessions`)."""

import json
import urllib.request

import openai
from test_server import BAN, start_server


def test_two_clients_alternating_each_decode_only_their_new_messages(gqa_model, tmp_path):
    proc, port = start_server(gqa_model, "--max-sessions", "2")
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        talks = {name: [{"role": "user", "content": f"I am {name}. " * 30}] for name in ("ann", "bob")}
        ids, seen = {}, {}
        for rnd in range(3):
            for name, msgs in talks.items():
                r = c.chat.completions.create(model="x", messages=msgs, max_tokens=20, temperature=0, logit_bias=BAN)
                usage = r.model_dump()["usage"]
                conv = usage["conversation"]
                cached = usage["prompt_tokens_details"]["cached_tokens"]
                if rnd == 0:
                    assert conv["resumed_from"] == "new" and cached == 0
                    ids[name] = conv["id"]
                else:
                    # the other client ran in between: this one's state came back from memory
                    assert conv == {"id": ids[name], "resumed_from": "memory"}
                    # everything of the previous turn, its answer included, was cached: only new messages decoded
                    assert cached >= seen[name] - 1, usage
                seen[name] = usage["prompt_tokens"] + usage["completion_tokens"]
                msgs += [{"role": "assistant", "content": r.choices[0].message.content}]
                msgs += [{"role": "user", "content": f"round {rnd}, go on"}]
        assert ids["ann"] != ids["bob"]
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read())
        assert health["sessions"]["kept"] == 2 and health["sessions"]["bytes"] > 0
    finally:
        proc.terminate()
        proc.wait(10)


def test_least_recently_used_conversations_go_to_the_session_dir_and_come_back(gqa_model, tmp_path):
    proc, port = start_server(gqa_model, "--max-sessions", "1", "--session-dir", str(tmp_path))
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        ann = [{"role": "user", "content": "I am ann. " * 30}]
        r = c.chat.completions.create(model="x", messages=ann, max_tokens=20, temperature=0, logit_bias=BAN)
        ann += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "more"}]
        c.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "I am bob"}], max_tokens=5, logit_bias=BAN
        )
        # max-sessions 1 keeps only the conversation in the cache: ann's went to disk, not away
        assert [p.suffix for p in tmp_path.iterdir()] == [".session"]
        r = c.chat.completions.create(model="x", messages=ann, max_tokens=5, temperature=0, logit_bias=BAN)
        usage = r.model_dump()["usage"]
        assert usage["conversation"]["resumed_from"] == "disk"
        assert usage["prompt_tokens_details"]["cached_tokens"] > usage["prompt_tokens"] / 2
    finally:
        proc.terminate()
        proc.wait(10)
