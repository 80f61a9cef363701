"""The response cache through the official SDKs: a hit stored from one surface answers the
other, and a streamed hit is a stream each SDK parses, usage included."""

from __future__ import annotations

import uuid


def _prompt() -> list[dict]:
    # Unique per test: entries never leak between tests sharing the gateway.
    return [{"role": "user", "content": f"cache me {uuid.uuid4()}"}]


def test_openai_sdk_hits_whole_and_streamed(client):
    messages = _prompt()
    raw = client.chat.completions.with_raw_response.create(model="@cached", messages=messages, max_tokens=20)
    assert raw.headers["x-modelux-cache"] == "MISS"
    first = raw.parse().choices[0].message.content
    raw = client.chat.completions.with_raw_response.create(model="@cached", messages=messages, max_tokens=20)
    assert raw.headers["x-modelux-cache"] == "HIT"
    assert raw.headers["x-modelux-cost-usd"] == "0"
    assert raw.headers["x-modelux-cache-similarity"] == "1.0"
    hit = raw.parse()
    assert hit.choices[0].message.content == first
    assert hit.usage is not None and hit.usage.completion_tokens > 0

    raw = client.chat.completions.with_raw_response.create(
        model="@cached", messages=messages, max_tokens=20, stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["x-modelux-cache"] == "HIT"
    text, usage = "", None
    for chunk in raw.parse():
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == first
    assert usage is not None and usage.completion_tokens == hit.usage.completion_tokens


def test_anthropic_sdk_hits_what_the_openai_sdk_stored(client, aclient):
    messages = _prompt()
    first = client.chat.completions.create(model="@cached", messages=messages, max_tokens=20)
    expected = first.choices[0].message.content

    raw = aclient.messages.with_raw_response.create(model="@cached", messages=messages, max_tokens=20)
    assert raw.headers["x-modelux-cache"] == "HIT"
    message = raw.parse()
    assert message.content[0].text == expected
    assert message.usage.output_tokens > 0

    with aclient.messages.stream(model="@cached", messages=messages, max_tokens=20) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == expected
    assert final.usage.output_tokens == message.usage.output_tokens
    assert final.stop_reason == message.stop_reason
