"""Audio and images through the gateway with the official `openai` SDK: transcriptions
and translations (multipart, model routed and rewritten in the form), speech (binary audio
streamed back) and image generation (priced from its usage where the table has the model)."""

from __future__ import annotations

import openai
import pytest

AUDIO = bytes(i % 256 for i in range(32_000))


def test_transcription_translation_and_default_model(client):
    t = client.audio.transcriptions.create(model="openai/gpt-4o-transcribe", file=("a.wav", AUDIO))
    assert t.text == f"mock transcript of {len(AUDIO)} bytes"
    assert t.usage.type == "tokens" and t.usage.input_tokens > 0
    text = client.audio.transcriptions.create(model="openai/whisper-1", file=("a.wav", AUDIO),
                                              response_format="text")
    assert text.strip() == f"mock transcript of {len(AUDIO)} bytes"
    tr = client.audio.translations.create(model="openai/whisper-1", file=("a.wav", AUDIO))
    assert tr.text == f"mock translation of {len(AUDIO)} bytes"


def test_speech_streams_binary_audio(client):
    with client.audio.speech.with_streaming_response.create(model="openai/tts-1", voice="alloy",
                                                            input="hello there") as r:
        assert r.headers["content-type"] == "audio/mpeg"
        assert r.headers["x-modelux-provider-used"] == "openai"
        data = b"".join(r.iter_bytes())
    assert data.startswith(b"ID3") and len(data) == 10 + 11 * 4096


def test_images_generate(client):
    img = client.images.generate(model="gpt-image-1", prompt="a cat in a hat")
    assert img.data[0].b64_json
    assert img.usage.output_tokens == 1056
    url = client.images.generate(model="openai/dall-e-3", prompt="a dog", response_format="url")
    assert url.data[0].url.startswith("https://")
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="anthropic/claude-sonnet-4-5", prompt="x")
    assert e.value.body["code"] == "unsupported_provider"
