//! Translation between the OpenAI and Anthropic wire formats, over recorded-format
//! fixtures. Stream cases are re-run with the upstream bytes split at every offset.

use serde_json::{json, Value};

use super::canonical::*;
use super::*;
use crate::error::Surface;

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

/// Runs a transcoder over `input` split at `split`, returning the client bytes.
fn transcode(upstream: Surface, client: Surface, input: &[u8], split: usize, usage: bool) -> Vec<u8> {
    let mut t =
        Transcoder::new(Box::new(crate::sse::Parser::new()), upstream.into(), client, "target-model", usage);
    let mut out = Vec::new();
    t.feed(&input[..split], &mut out).unwrap();
    t.feed(&input[split..], &mut out).unwrap();
    t.finish(&mut out).unwrap();
    normalize(&out)
}

/// Clears the wall-clock `created` field so outputs of different runs compare equal.
fn normalize(out: &[u8]) -> Vec<u8> {
    let mut text = String::from_utf8(out.to_vec()).unwrap();
    while let Some(i) = text.find("\"created\":1") {
        let end = text[i + 10..].find(|c: char| !c.is_ascii_digit()).map_or(text.len(), |e| i + 10 + e);
        text.replace_range(i + 10..end, "0");
    }
    text.into_bytes()
}

/// Parses SSE output into (event name, JSON data) pairs; `[DONE]` becomes `("", null)`.
fn events(bytes: &[u8]) -> Vec<(String, Value)> {
    let mut p = crate::sse::Parser::new();
    let mut out = Vec::new();
    p.feed(bytes, &mut out).unwrap();
    p.finish(&mut out);
    out.into_iter()
        .map(|e| {
            (e.event, if e.data == "[DONE]" { Value::Null } else { serde_json::from_str(&e.data).unwrap() })
        })
        .collect()
}

#[test]
fn openai_request_to_anthropic() {
    let body = json!({
        "model": "@claude",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather and time in Paris?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}
            ]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "10:00"}
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "w", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}],
        "tool_choice": "required",
        "parallel_tool_calls": false,
        "temperature": 1.5,
        "stop": "END",
        "seed": 7,
        "response_format": {"type": "json_object"},
        "mlx:tags": {"a": "b"}
    });
    let req = decode_request(Surface::OpenAi, &serde_json::to_vec(&body).unwrap()).unwrap();
    let out = json_of(&encode_request(WireFormat::Anthropic, &req, "claude-sonnet-4-5").unwrap());
    assert_eq!(
        out,
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 4096,
            "system": [{"type": "text", "text": "Be terse."}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "Weather and time in Paris?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}
                ]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"location": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}}
                ]},
                // consecutive OpenAI tool messages merge into one user turn
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": [{"type": "text", "text": "18C"}]},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "10:00"}]}
                ]}
            ],
            "temperature": 1.0,
            "stop_sequences": ["END"],
            "tools": [{"name": "get_weather", "description": "w", "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true}
        }),
        "OpenAI-only fields (seed, response_format) and mlx:* never reach Anthropic"
    );
}

#[test]
fn anthropic_request_to_openai() {
    let body = json!({
        "model": "gpt-4o-mini",
        "max_tokens": 256,
        "system": [{"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}],
        "stream": true,
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                {"type": "text", "text": "Thanks"}
            ]}
        ],
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "metadata": {"user_id": "u-1"}
    });
    let req = decode_request(Surface::Anthropic, &serde_json::to_vec(&body).unwrap()).unwrap();
    let out = json_of(&encode_request(WireFormat::OpenAi, &req, "gpt-4o-mini").unwrap());
    assert_eq!(
        out,
        json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
                {"role": "user", "content": "Thanks"}
            ],
            "max_tokens": 256,
            "stream": true,
            "stream_options": {"include_usage": true},
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "user": "u-1"
        })
    );
}

#[test]
fn thinking_round_trips_only_with_a_signature_to_anthropic_targets() {
    let body = json!({"model": "m", "max_tokens": 10, "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "a", "signature": "s1"},
            {"type": "redacted_thinking", "data": "r"},
            {"type": "text", "text": "b"}]}, {"role": "user", "content": "y"}]});
    let req = decode_request(Surface::Anthropic, &serde_json::to_vec(&body).unwrap()).unwrap();
    let out = json_of(&encode_request(WireFormat::Anthropic, &req, "claude").unwrap());
    assert_eq!(out["thinking"], json!({"type": "enabled", "budget_tokens": 1024}));
    assert_eq!(
        out["messages"][1]["content"],
        json!([{"type": "thinking", "thinking": "a", "signature": "s1"}, {"type": "redacted_thinking", "data": "r"}, {"type": "text", "text": "b"}])
    );
}

#[test]
fn anthropic_response_to_openai() {
    let resp = decode_response(WireFormat::Anthropic, &fixture("anthropic/message_tool_use.json")).unwrap();
    let out = json_of(&encode_response(Surface::OpenAi, &resp));
    assert_eq!(out["object"], "chat.completion");
    assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
    let msg = &out["choices"][0]["message"];
    assert!(msg["content"].as_str().unwrap().len() > 3);
    let call = &msg["tool_calls"][0];
    assert!(call["id"].as_str().unwrap().starts_with("toolu_"));
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args.is_object());
    let src = json_of(&fixture("anthropic/message_tool_use.json"));
    let u = &src["usage"];
    let input = u["input_tokens"].as_u64().unwrap()
        + u["cache_read_input_tokens"].as_u64().unwrap_or(0)
        + u["cache_creation_input_tokens"].as_u64().unwrap_or(0);
    assert_eq!(out["usage"]["prompt_tokens"], input);
    assert_eq!(out["usage"]["completion_tokens"], u["output_tokens"]);
}

#[test]
fn openai_response_to_anthropic() {
    let resp = decode_response(WireFormat::OpenAi, &fixture("openai/chat_completion.json")).unwrap();
    let out = json_of(&encode_response(Surface::Anthropic, &resp));
    let src = json_of(&fixture("openai/chat_completion.json"));
    assert_eq!(out["type"], "message");
    assert_eq!(out["role"], "assistant");
    assert!(out["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(out["content"][0]["type"], "text");
    assert_eq!(out["content"][0]["text"], src["choices"][0]["message"]["content"]);
    assert_eq!(out["stop_reason"], "end_turn");
    let cached = src["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert_eq!(
        out["usage"]["input_tokens"].as_u64().unwrap() + cached,
        src["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(out["usage"]["output_tokens"], src["usage"]["completion_tokens"]);
}

#[test]
fn openai_tool_stream_to_anthropic_at_every_split() {
    let input = fixture("openai/chat_completion_tool_stream.txt");
    let reference = transcode(Surface::OpenAi, Surface::Anthropic, &input, 0, true);
    for split in 1..input.len() {
        let out = transcode(Surface::OpenAi, Surface::Anthropic, &input, split, true);
        assert!(out == reference, "split {split}: {}", String::from_utf8_lossy(&out));
    }
    let ev = events(&reference);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(ev[1].1["index"], 0);
    assert_eq!(ev[1].1["content_block"]["name"], "get_weather");
    let args: String =
        ev[2..4].iter().map(|(_, v)| v["delta"]["partial_json"].as_str().unwrap().to_string()).collect();
    assert_eq!(serde_json::from_str::<Value>(&args).unwrap(), json!({"location": "Paris"}));
    assert_eq!(ev[5].1["index"], 1);
    assert_eq!(ev[5].1["content_block"]["name"], "get_time");
    assert_eq!(ev[8].1["delta"]["stop_reason"], "tool_use");
    // input tokens reach the client in message_delta (usage arrives last from OpenAI)
    assert_eq!(ev[8].1["usage"]["input_tokens"], 85 - 64);
    assert_eq!(ev[8].1["usage"]["cache_read_input_tokens"], 64);
    assert_eq!(ev[8].1["usage"]["output_tokens"], 40);
}

#[test]
fn anthropic_streams_to_openai_at_every_split() {
    for (file, wants_usage) in [
        ("anthropic/message_stream.txt", false),
        ("anthropic/message_tool_use_stream.txt", true),
        ("anthropic/message_thinking_stream.txt", true),
    ] {
        let input = fixture(file);
        let reference = transcode(Surface::Anthropic, Surface::OpenAi, &input, 0, wants_usage);
        for split in 1..input.len() {
            let out = transcode(Surface::Anthropic, Surface::OpenAi, &input, split, wants_usage);
            assert!(out == reference, "{file} split {split}: {}", String::from_utf8_lossy(&out));
        }
        let ev = events(&reference);
        assert_eq!(ev.last().unwrap().1, Value::Null, "{file}: ends with [DONE]");
        let chunks: Vec<&Value> = ev.iter().map(|(_, v)| v).filter(|v| !v.is_null()).collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
        let usage_chunks = chunks.iter().filter(|c| c["usage"].is_object()).count();
        assert_eq!(usage_chunks, usize::from(wants_usage), "{file}: usage chunk only when asked");
        let text: String =
            chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        let src: String = events(&input)
            .iter()
            .filter_map(|(_, v)| v["delta"]["text"].as_str().map(str::to_string))
            .collect();
        assert_eq!(text, src, "{file}: text survives");
        let finish: Vec<&str> =
            chunks.iter().filter_map(|c| c["choices"][0]["finish_reason"].as_str()).collect();
        assert_eq!(finish.len(), 1, "{file}");
    }
}

#[test]
fn stream_without_final_event_is_an_error_then_an_error_event() {
    let input = fixture("anthropic/message_stream.txt");
    let cut = &input[..input.len() / 2];
    let mut t = Transcoder::new(
        Box::new(crate::sse::Parser::new()),
        WireFormat::Anthropic,
        Surface::OpenAi,
        "m",
        false,
    );
    let mut out = Vec::new();
    t.feed(cut, &mut out).unwrap();
    assert!(t.finish(&mut out).is_err());
    t.fail("upstream_error", "reset", &mut out);
    let last = events(&out).pop().unwrap().1;
    assert_eq!(last["error"]["type"], "upstream_error");

    let mut t = Transcoder::new(
        Box::new(crate::sse::Parser::new()),
        WireFormat::OpenAi,
        Surface::Anthropic,
        "m",
        false,
    );
    let mut out = Vec::new();
    t.feed(b"data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n", &mut out)
        .unwrap();
    t.fail("api_error", "reset", &mut out);
    let ev = events(&out);
    assert_eq!(ev.last().unwrap().0, "error");
    assert_eq!(ev.last().unwrap().1["error"]["type"], "api_error");
}

#[test]
fn usage_merge_keeps_earlier_fields() {
    let mut u = Usage { input: 10, ..Usage::default() };
    u.merge(Usage { output: 5, ..Usage::default() });
    assert_eq!((u.input, u.output), (10, 5));
}

#[test]
fn answer_text_reads_whole_answers_and_streams() {
    let openai = br#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;
    assert_eq!(answer_text(Surface::OpenAi, openai).as_deref(), Some("hi there"));
    let chunk = |content: &str| {
        format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":null}}]}}\n\n"
        )
    };
    let stream = format!("{}{}data: [DONE]\n\n", chunk("hi"), chunk(" there"));
    assert_eq!(answer_text(Surface::OpenAi, stream.as_bytes()).as_deref(), Some("hi there"));
    // A copy cut mid-stream gives what decoded before the cut.
    let cut = &stream.as_bytes()[..chunk("hi").len() + 20];
    assert_eq!(answer_text(Surface::OpenAi, cut).as_deref(), Some("hi"));
    let anthropic = br#"{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[{"type":"text","text":"hi there"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":2}}"#;
    assert_eq!(answer_text(Surface::Anthropic, anthropic).as_deref(), Some("hi there"));
    assert_eq!(answer_text(Surface::OpenAi, b"not an answer"), None);
    assert_eq!(answer_text(Surface::OpenAi, b"{\"error\": {}}"), None);
}
