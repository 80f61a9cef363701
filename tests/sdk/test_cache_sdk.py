"""The response cache through the official SDKs: a hit stored from one surface answers the
other, and a streamed hit is a stream each SDK parses, usage included."""

from __future__ import annotations

import struct
import uuid


def _f32(vectors) -> list[list[float]]:
    # base64 answers decode to float32 values, float answers to the shortest text of
    # them: compare both as float32.
    return [[struct.unpack("f", struct.pack("f", x))[0] for x in v] for v in vectors]


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


def test_openai_sdk_embeddings_hit_in_either_encoding(client):
    text = f"embed me {uuid.uuid4()}"
    raw = client.embeddings.with_raw_response.create(model="@cached_embed", input=[text, "and me"])
    assert raw.headers["x-modelux-cache"] == "MISS"
    first = raw.parse()
    # The SDK asks for base64 by default; a float request is the same entry.
    raw = client.embeddings.with_raw_response.create(
        model="@cached_embed", input=[text, "and me"], encoding_format="float"
    )
    assert raw.headers["x-modelux-cache"] == "HIT"
    assert raw.headers["x-modelux-cost-usd"] == "0"
    hit = raw.parse()
    assert _f32(d.embedding for d in hit.data) == _f32(d.embedding for d in first.data)
    assert hit.usage.prompt_tokens == first.usage.prompt_tokens
    raw = client.embeddings.with_raw_response.create(model="@cached_embed", input=[text, "and me"])
    assert raw.headers["x-modelux-cache"] == "HIT"
    assert [d.embedding for d in raw.parse().data] == [d.embedding for d in first.data]  # both base64
    # Other inputs are another entry.
    raw = client.embeddings.with_raw_response.create(model="@cached_embed", input=[text])
    assert raw.headers["x-modelux-cache"] == "MISS"


def _semantic(vec: str, system: str) -> list[dict]:
    # The mock embeds `[[vec:…]]` to exactly that vector; the system prompt keeps this
    # test's partition its own.
    return [{"role": "system", "content": system}, {"role": "user", "content": f"question [[vec:{vec}]]"}]


def test_semantic_hits_across_sdks_at_or_above_the_threshold(client, aclient):
    system = f"semantic {uuid.uuid4()}"
    raw = client.chat.completions.with_raw_response.create(
        model="@semantic", messages=_semantic("1,0,0", system), max_tokens=20
    )
    assert raw.headers["x-modelux-cache"] == "MISS"
    first = raw.parse()

    raw = client.chat.completions.with_raw_response.create(
        model="@semantic", messages=_semantic("0.96,0.28,0", system), max_tokens=20
    )
    assert raw.headers["x-modelux-cache"] == "HIT"
    assert raw.headers["x-modelux-cache-similarity"] == "0.96"
    assert raw.headers["x-modelux-cost-usd"] == "0"
    assert raw.parse().id == first.id

    msgs = _semantic("0.97,0.2431,0", system)
    with aclient.messages.stream(model="@semantic", system=msgs[0]["content"], messages=msgs[1:], max_tokens=20) as stream:
        text = "".join(stream.text_stream)
    assert text == first.choices[0].message.content

    raw = client.chat.completions.with_raw_response.create(
        model="@semantic", messages=_semantic("0.9,0.43589,0", system), max_tokens=20
    )
    assert raw.headers["x-modelux-cache"] == "MISS"
    assert raw.parse().id != first.id
