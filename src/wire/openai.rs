//! OpenAI Chat Completions: the canonical codec, used when the other side of the hop
//! speaks another wire format (a same-format hop forwards the client's bytes; see
//! `wire::routed`).

pub mod codec {
    use serde_json::value::RawValue;
    use serde_json::{json, Map, Value};

    use crate::error::GatewayError;
    use crate::wire::canonical::*;

    /// Fields only OpenAI-family targets understand; passed through for them, dropped for others.
    const OPENAI_ONLY: &[&str] = &[
        "response_format",
        "seed",
        "logprobs",
        "top_logprobs",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "n",
        "service_tier",
        "store",
        "reasoning_effort",
        "prediction",
        "modalities",
        "audio",
        "web_search_options",
        "verbosity",
    ];

    fn bad(message: impl Into<String>) -> GatewayError {
        GatewayError::invalid("invalid_request", message)
    }

    fn text_of(content: &Value, path: &str) -> Result<String, GatewayError> {
        match content {
            Value::String(s) => Ok(s.clone()),
            Value::Null => Ok(String::new()),
            Value::Array(parts) => {
                let mut out = String::new();
                for p in parts {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        out.push_str(t);
                    }
                }
                Ok(out)
            }
            _ => Err(bad(format!("{path} must be a string or an array of parts"))),
        }
    }

    fn image_source(url: &str) -> ImageSource {
        // data:[<media type>];base64,<data>
        if let Some(rest) = url.strip_prefix("data:") {
            if let Some((meta, data)) = rest.split_once(',') {
                if let Some(media_type) = meta.strip_suffix(";base64") {
                    return ImageSource::Base64 {
                        media_type: media_type.to_string(),
                        data: data.to_string(),
                    };
                }
            }
        }
        ImageSource::Url(url.to_string())
    }

    fn user_parts(content: &Value, path: &str) -> Result<Vec<Part>, GatewayError> {
        match content {
            Value::String(s) => Ok(vec![Part::Text { text: s.clone(), cache_control: None }]),
            Value::Array(items) => {
                let mut parts = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item.get("type").and_then(Value::as_str) {
                        Some("text") => parts.push(Part::Text {
                            text: item.get("text").and_then(Value::as_str).unwrap_or("").to_string(),
                            cache_control: item.get("cache_control").cloned(),
                        }),
                        Some("image_url") => {
                            let url = item
                                .pointer("/image_url/url")
                                .and_then(Value::as_str)
                                .ok_or_else(|| bad(format!("{path}[{i}].image_url.url is required")))?;
                            parts.push(Part::Image { source: image_source(url), cache_control: None });
                        }
                        other => {
                            return Err(bad(format!(
                                "{path}[{i}]: unsupported content part type {}",
                                other.map_or("(none)".to_string(), |t| format!("\"{t}\""))
                            )))
                        }
                    }
                }
                Ok(parts)
            }
            Value::Null => Ok(Vec::new()),
            _ => Err(bad(format!("{path} must be a string or an array of parts"))),
        }
    }

    /// Client OpenAI body → canonical request.
    pub fn decode_request(body: &[u8]) -> Result<Request, GatewayError> {
        let v: Value = serde_json::from_slice(body).map_err(|e| {
            GatewayError::invalid("invalid_json", format!("request body is not valid JSON: {e}"))
        })?;
        let Value::Object(obj) = v else {
            return Err(GatewayError::invalid("invalid_json", "request body must be a JSON object"));
        };
        let model = obj.get("model").and_then(Value::as_str).unwrap_or_default().to_string();
        let messages = obj
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| GatewayError::invalid("missing_field", "Missing required field: messages"))?;
        let mut req = Request {
            model,
            system: Vec::new(),
            messages: Vec::new(),
            max_tokens: obj
                .get("max_completion_tokens")
                .or_else(|| obj.get("max_tokens"))
                .and_then(Value::as_u64),
            temperature: obj.get("temperature").and_then(Value::as_f64),
            top_p: obj.get("top_p").and_then(Value::as_f64),
            stop: match obj.get("stop") {
                Some(Value::String(s)) => vec![s.clone()],
                Some(Value::Array(a)) => a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect(),
                _ => Vec::new(),
            },
            stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
            stream_usage: obj
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            tools: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: obj.get("parallel_tool_calls").and_then(Value::as_bool),
            thinking_budget: None,
            user: obj.get("user").and_then(Value::as_str).map(str::to_string),
            openai_only: OPENAI_ONLY
                .iter()
                .filter_map(|k| obj.get(*k).map(|v| (k.to_string(), v.clone())))
                .collect(),
        };
        for (i, m) in messages.iter().enumerate() {
            let path = format!("messages[{i}]");
            let role = m.get("role").and_then(Value::as_str).unwrap_or("");
            let content = m.get("content").unwrap_or(&Value::Null);
            match role {
                "system" | "developer" => {
                    req.system.push(TextBlock { text: text_of(content, &path)?, cache_control: None })
                }
                "user" => req.messages.push(Message {
                    role: Role::User,
                    content: user_parts(content, &format!("{path}.content"))?,
                }),
                "assistant" => {
                    let mut parts = Vec::new();
                    let text = text_of(content, &path)?;
                    if !text.is_empty() {
                        parts.push(Part::Text { text, cache_control: None });
                    }
                    for (j, call) in
                        m.get("tool_calls").and_then(Value::as_array).into_iter().flatten().enumerate()
                    {
                        parts.push(Part::ToolCall {
                            id: call.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
                            name: call
                                .pointer("/function/name")
                                .and_then(Value::as_str)
                                .ok_or_else(|| {
                                    bad(format!("{path}.tool_calls[{j}].function.name is required"))
                                })?
                                .to_string(),
                            arguments: call
                                .pointer("/function/arguments")
                                .and_then(Value::as_str)
                                .unwrap_or("{}")
                                .to_string(),
                        });
                    }
                    req.messages.push(Message { role: Role::Assistant, content: parts });
                }
                "tool" => {
                    let call_id = m
                        .get("tool_call_id")
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad(format!("{path}.tool_call_id is required")))?
                        .to_string();
                    // Tool results keep only their text (PRODUCT.md): images inside are dropped.
                    let text = text_of(content, &path)?;
                    let part = Part::ToolResult {
                        call_id,
                        content: vec![Part::Text { text, cache_control: None }],
                        is_error: false,
                    };
                    req.messages.push(Message { role: Role::User, content: vec![part] });
                }
                other => return Err(bad(format!("{path}.role: unsupported role \"{other}\""))),
            }
        }
        for (i, t) in obj.get("tools").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let f = t.get("function").ok_or_else(|| bad(format!("tools[{i}].function is required")))?;
            req.tools.push(Tool {
                name: f
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("tools[{i}].function.name is required")))?
                    .to_string(),
                description: f.get("description").and_then(Value::as_str).map(str::to_string),
                parameters: f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"})),
                cache_control: None,
            });
        }
        req.tool_choice = match obj.get("tool_choice") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => match s.as_str() {
                "auto" => Some(ToolChoice::Auto),
                "none" => Some(ToolChoice::None),
                "required" => Some(ToolChoice::Required),
                other => return Err(bad(format!("tool_choice: unknown value \"{other}\""))),
            },
            Some(v) => Some(ToolChoice::Tool(
                v.pointer("/function/name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("tool_choice.function.name is required"))?
                    .to_string(),
            )),
        };
        Ok(req)
    }

    fn image_url(source: &ImageSource) -> String {
        match source {
            ImageSource::Url(u) => u.clone(),
            ImageSource::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
        }
    }

    fn text_only(parts: &[Part]) -> String {
        parts
            .iter()
            .filter_map(|p| match p {
                Part::Text { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("")
    }

    /// Canonical request → OpenAI-family upstream body.
    pub fn encode_request(req: &Request, model: &str) -> Vec<u8> {
        let mut messages = Vec::new();
        if !req.system.is_empty() {
            let text = req.system.iter().map(|b| b.text.as_str()).collect::<Vec<_>>().join("\n\n");
            messages.push(json!({"role": "system", "content": text}));
        }
        for m in &req.messages {
            match m.role {
                Role::User => {
                    let mut parts = Vec::new();
                    for p in &m.content {
                        match p {
                            Part::ToolResult { call_id, content, .. } => {
                                messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": text_only(content)}));
                            }
                            Part::Text { text, .. } => parts.push(json!({"type": "text", "text": text})),
                            Part::Image { source, .. } => parts
                                .push(json!({"type": "image_url", "image_url": {"url": image_url(source)}})),
                            _ => {}
                        }
                    }
                    if !parts.is_empty() {
                        let content = match parts.as_slice() {
                            [one] if one["type"] == "text" => one["text"].clone(),
                            _ => Value::Array(parts),
                        };
                        messages.push(json!({"role": "user", "content": content}));
                    }
                }
                Role::Assistant => {
                    let text = text_only(&m.content);
                    let calls: Vec<Value> = m
                        .content
                        .iter()
                        .filter_map(|p| match p {
                            Part::ToolCall { id, name, arguments } => Some(json!({
                                "id": id, "type": "function", "function": {"name": name, "arguments": arguments}
                            })),
                            _ => None,
                        })
                        .collect();
                    let mut msg = Map::new();
                    msg.insert("role".into(), "assistant".into());
                    msg.insert(
                        "content".into(),
                        if text.is_empty() && !calls.is_empty() { Value::Null } else { text.into() },
                    );
                    if !calls.is_empty() {
                        msg.insert("tool_calls".into(), Value::Array(calls));
                    }
                    messages.push(Value::Object(msg));
                }
            }
        }
        let mut body = Map::new();
        body.insert("model".into(), model.into());
        body.insert("messages".into(), Value::Array(messages));
        if let Some(n) = req.max_tokens {
            body.insert("max_tokens".into(), n.into());
        }
        if let Some(t) = req.temperature {
            body.insert("temperature".into(), t.into());
        }
        if let Some(p) = req.top_p {
            body.insert("top_p".into(), p.into());
        }
        if !req.stop.is_empty() {
            body.insert("stop".into(), req.stop.clone().into());
        }
        if req.stream {
            body.insert("stream".into(), true.into());
            // Always ask for usage: the gateway needs it; the encoder drops the extra
            // chunk when the client did not ask for it.
            body.insert("stream_options".into(), json!({"include_usage": true}));
        }
        if !req.tools.is_empty() {
            let tools: Vec<Value> = req
                .tools
                .iter()
                .map(|t| {
                    let mut f = json!({"name": t.name, "parameters": t.parameters});
                    if let Some(d) = &t.description {
                        f["description"] = d.clone().into();
                    }
                    json!({"type": "function", "function": f})
                })
                .collect();
            body.insert("tools".into(), Value::Array(tools));
        }
        if let Some(choice) = &req.tool_choice {
            let v = match choice {
                ToolChoice::Auto => json!("auto"),
                ToolChoice::None => json!("none"),
                ToolChoice::Required => json!("required"),
                ToolChoice::Tool(name) => json!({"type": "function", "function": {"name": name}}),
            };
            body.insert("tool_choice".into(), v);
        }
        if let Some(p) = req.parallel_tool_calls {
            if !req.tools.is_empty() {
                body.insert("parallel_tool_calls".into(), p.into());
            }
        }
        if let Some(u) = &req.user {
            body.insert("user".into(), u.clone().into());
        }
        for (k, v) in &req.openai_only {
            body.insert(k.clone(), v.clone());
        }
        serde_json::to_vec(&Value::Object(body)).unwrap_or_default()
    }

    fn stop_reason(s: &str) -> Option<StopReason> {
        Some(match s {
            "stop" => StopReason::EndTurn,
            "length" => StopReason::MaxTokens,
            "tool_calls" | "function_call" => StopReason::ToolUse,
            "content_filter" => StopReason::ContentFilter,
            _ => return None,
        })
    }

    pub fn finish_reason(s: StopReason) -> &'static str {
        match s {
            StopReason::EndTurn | StopReason::StopSequence => "stop",
            StopReason::MaxTokens => "length",
            StopReason::ToolUse => "tool_calls",
            StopReason::ContentFilter => "content_filter",
        }
    }

    /// An OpenAI usage object (chat completion, stream chunk, embeddings, and the Responses
    /// API's, whose names differ: `input_tokens`, `output_tokens`, `…_details`): the one
    /// reader of OpenAI usage, for the codec and the passthrough tap alike.
    pub fn usage(u: &Value) -> Usage {
        let n = |p: &str| u.pointer(p).and_then(Value::as_u64);
        let either = |chat: &str, responses: &str| n(chat).or_else(|| n(responses)).unwrap_or(0);
        Usage {
            input: either("/prompt_tokens", "/input_tokens"),
            output: either("/completion_tokens", "/output_tokens"),
            cache_read: either("/prompt_tokens_details/cached_tokens", "/input_tokens_details/cached_tokens"),
            cache_write: 0,
            reasoning: either(
                "/completion_tokens_details/reasoning_tokens",
                "/output_tokens_details/reasoning_tokens",
            ),
        }
    }

    pub fn usage_json(u: &Usage) -> Value {
        json!({
            "prompt_tokens": u.input,
            "completion_tokens": u.output,
            "total_tokens": u.input + u.output,
            "prompt_tokens_details": {"cached_tokens": u.cache_read},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning},
        })
    }

    /// OpenAI-family upstream response → canonical.
    pub fn decode_response(body: &[u8]) -> Result<Response, String> {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| format!("invalid JSON from upstream: {e}"))?;
        let choice = v.pointer("/choices/0").ok_or("upstream response has no choices")?;
        let msg = choice.get("message").ok_or("upstream choice has no message")?;
        let mut content = Vec::new();
        if let Some(r) = msg.get("reasoning_content").and_then(Value::as_str) {
            if !r.is_empty() {
                content.push(Part::Thinking { text: r.to_string(), signature: None });
            }
        }
        if let Some(t) = msg.get("content").and_then(Value::as_str) {
            if !t.is_empty() {
                content.push(Part::Text { text: t.to_string(), cache_control: None });
            }
        }
        for call in msg.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            content.push(Part::ToolCall {
                id: call.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
                name: call.pointer("/function/name").and_then(Value::as_str).unwrap_or_default().to_string(),
                arguments: call
                    .pointer("/function/arguments")
                    .and_then(Value::as_str)
                    .unwrap_or("{}")
                    .to_string(),
            });
        }
        Ok(Response {
            id: v.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
            model: v.get("model").and_then(Value::as_str).unwrap_or_default().to_string(),
            created: v.get("created").and_then(Value::as_u64).unwrap_or_else(now_secs),
            content,
            stop: choice.get("finish_reason").and_then(Value::as_str).and_then(stop_reason),
            usage: v.get("usage").map(usage).unwrap_or_default(),
        })
    }

    /// Canonical → OpenAI chat.completion (client surface).
    /// Canonical → OpenAI chat completion (client surface). Serialised from borrowed typed
    /// structs: building a `Value` tree cost more than the rest of the translation.
    pub fn encode_response(resp: &Response) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Function<'a> {
            name: &'a str,
            arguments: &'a str,
        }
        #[derive(serde::Serialize)]
        struct Call<'a> {
            id: &'a str,
            #[serde(rename = "type")]
            kind: &'static str,
            function: Function<'a>,
        }
        #[derive(serde::Serialize)]
        struct Message<'a> {
            role: &'static str,
            content: Option<&'a str>,
            refusal: Option<()>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            tool_calls: Vec<Call<'a>>,
        }
        #[derive(serde::Serialize)]
        struct Choice<'a> {
            index: u32,
            message: Message<'a>,
            logprobs: Option<()>,
            finish_reason: &'static str,
        }
        #[derive(serde::Serialize)]
        struct PromptDetails {
            cached_tokens: u64,
        }
        #[derive(serde::Serialize)]
        struct CompletionDetails {
            reasoning_tokens: u64,
        }
        #[derive(serde::Serialize)]
        struct UsageOut {
            prompt_tokens: u64,
            completion_tokens: u64,
            total_tokens: u64,
            prompt_tokens_details: PromptDetails,
            completion_tokens_details: CompletionDetails,
        }
        #[derive(serde::Serialize)]
        struct Completion<'a> {
            id: &'a str,
            object: &'static str,
            created: u64,
            model: &'a str,
            choices: [Choice<'a>; 1],
            usage: UsageOut,
        }

        let mut text = std::borrow::Cow::Borrowed("");
        let mut tool_calls = Vec::new();
        for p in &resp.content {
            match p {
                Part::Text { text: t, .. } if text.is_empty() => {
                    text = std::borrow::Cow::Borrowed(t.as_str())
                }
                Part::Text { text: t, .. } => text.to_mut().push_str(t),
                Part::ToolCall { id, name, arguments } => {
                    tool_calls.push(Call { id, kind: "function", function: Function { name, arguments } })
                }
                _ => {}
            }
        }
        let id = chat_id(&resp.id);
        let u = &resp.usage;
        let body = Completion {
            id: &id,
            object: "chat.completion",
            created: resp.created,
            model: &resp.model,
            choices: [Choice {
                index: 0,
                message: Message {
                    role: "assistant",
                    content: if text.is_empty() && !tool_calls.is_empty() { None } else { Some(&text) },
                    refusal: None,
                    tool_calls,
                },
                logprobs: None,
                finish_reason: resp.stop.map(finish_reason).unwrap_or("stop"),
            }],
            usage: UsageOut {
                prompt_tokens: u.input,
                completion_tokens: u.output,
                total_tokens: u.input + u.output,
                prompt_tokens_details: PromptDetails { cached_tokens: u.cache_read },
                completion_tokens_details: CompletionDetails { reasoning_tokens: u.reasoning },
            },
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }

    fn chat_id(id: &str) -> String {
        // Bedrock answers carry no id; clients expect a unique one.
        if id.is_empty() {
            format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())
        } else if id.starts_with("chatcmpl-") {
            id.to_string()
        } else {
            format!("chatcmpl-{id}")
        }
    }

    /// OpenAI-family SSE events → deltas (the SSE framing is parsed by the caller).
    #[derive(Default)]
    pub struct StreamDecoder {
        started: bool,
    }

    impl StreamDecoder {
        pub fn decode(
            &mut self,
            events: &mut Vec<crate::sse::Event>,
            out: &mut Vec<Delta>,
        ) -> Result<(), String> {
            for ev in events.drain(..) {
                let data = ev.data.trim();
                if data == "[DONE]" {
                    out.push(Delta::Done);
                    continue;
                }
                let v: Value =
                    serde_json::from_str(data).map_err(|e| format!("invalid stream chunk: {e}"))?;
                if let Some(err) = v.get("error") {
                    out.push(Delta::Error {
                        kind: err.get("type").and_then(Value::as_str).unwrap_or("api_error").to_string(),
                        message: err
                            .get("message")
                            .and_then(Value::as_str)
                            .unwrap_or("upstream error")
                            .to_string(),
                    });
                    continue;
                }
                if !self.started {
                    self.started = true;
                    out.push(Delta::Start {
                        id: v.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
                        model: v.get("model").and_then(Value::as_str).unwrap_or_default().to_string(),
                    });
                }
                if let Some(choice) = v.pointer("/choices/0") {
                    let delta = choice.get("delta").unwrap_or(&Value::Null);
                    if let Some(r) = delta.get("reasoning_content").and_then(Value::as_str) {
                        if !r.is_empty() {
                            out.push(Delta::Thinking(r.to_string()));
                        }
                    }
                    if let Some(t) = delta.get("content").and_then(Value::as_str) {
                        if !t.is_empty() {
                            out.push(Delta::Text(t.to_string()));
                        }
                    }
                    for call in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
                        let index = call.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                        if let Some(name) = call.pointer("/function/name").and_then(Value::as_str) {
                            out.push(Delta::ToolCallStart {
                                call: index,
                                id: call.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
                                name: name.to_string(),
                            });
                        }
                        if let Some(args) = call.pointer("/function/arguments").and_then(Value::as_str) {
                            if !args.is_empty() {
                                out.push(Delta::ToolArgs { call: index, json: args.to_string() });
                            }
                        }
                    }
                    if let Some(reason) =
                        choice.get("finish_reason").and_then(Value::as_str).and_then(stop_reason)
                    {
                        out.push(Delta::Stop(reason));
                    }
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    out.push(Delta::Usage(usage(u)));
                }
            }
            Ok(())
        }
    }

    /// Deltas → OpenAI chat.completion.chunk SSE (client surface).
    pub struct StreamEncoder {
        id: String,
        model: String,
        created: u64,
        /// Send the usage chunk (the client asked with `stream_options.include_usage`).
        send_usage: bool,
        usage: Usage,
        stop: Option<StopReason>,
        role_sent: bool,
        finished: bool,
    }

    impl StreamEncoder {
        pub fn new(model: &str, send_usage: bool) -> StreamEncoder {
            StreamEncoder {
                id: String::new(),
                model: model.to_string(),
                created: now_secs(),
                send_usage,
                usage: Usage::default(),
                stop: None,
                role_sent: false,
                finished: false,
            }
        }

        fn chunk(&self, delta: Value, finish: Option<&str>, out: &mut Vec<u8>) {
            let chunk = json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            });
            push_data(out, &chunk);
        }

        fn ensure_role(&mut self, out: &mut Vec<u8>) {
            if !self.role_sent {
                self.role_sent = true;
                if self.id.is_empty() {
                    self.id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
                }
                self.chunk(json!({"role": "assistant", "content": ""}), None, out);
            }
        }

        pub fn encode(&mut self, delta: &Delta, out: &mut Vec<u8>) {
            if self.finished {
                return;
            }
            match delta {
                Delta::Start { id, .. } => {
                    self.id = chat_id(id);
                    self.ensure_role(out);
                }
                Delta::Text(t) => {
                    self.ensure_role(out);
                    self.chunk(json!({"content": t}), None, out);
                }
                Delta::Thinking(_) | Delta::Signature(_) => {}
                Delta::ToolCallStart { call, id, name } => {
                    self.ensure_role(out);
                    self.chunk(
                        json!({"tool_calls": [{"index": call, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
                        None,
                        out,
                    );
                }
                Delta::ToolArgs { call, json: args } => {
                    self.ensure_role(out);
                    self.chunk(
                        json!({"tool_calls": [{"index": call, "function": {"arguments": args}}]}),
                        None,
                        out,
                    );
                }
                Delta::Stop(reason) => self.stop = Some(*reason),
                Delta::Usage(u) => self.usage.merge(*u),
                Delta::Error { kind, message } => {
                    push_data(
                        out,
                        &json!({"error": {"type": kind, "message": message, "code": null, "param": null}}),
                    );
                    self.finished = true;
                }
                Delta::Done => {
                    self.ensure_role(out);
                    self.chunk(json!({}), Some(finish_reason(self.stop.unwrap_or(StopReason::EndTurn))), out);
                    if self.send_usage {
                        let chunk = json!({
                            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.model, "choices": [], "usage": usage_json(&self.usage),
                        });
                        push_data(out, &chunk);
                    }
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    self.finished = true;
                }
            }
        }

        pub fn usage(&self) -> Usage {
            self.usage
        }

        /// A choice-less chunk carrying the decision trace (`"mlx:trace": true`), shaped
        /// like the usage chunk so SDKs parse it as an ordinary chunk.
        pub fn trace_chunk(&self, trace: &RawValue, out: &mut Vec<u8>) {
            // The trace goes in as serialized once; a derived struct writes it raw.
            #[derive(serde::Serialize)]
            struct TraceChunk<'a> {
                id: &'a str,
                object: &'static str,
                created: u64,
                model: &'a str,
                choices: [(); 0],
                #[serde(rename = "mlx:trace")]
                trace: &'a RawValue,
            }
            let chunk = TraceChunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
                choices: [],
                trace,
            };
            out.extend_from_slice(b"data: ");
            let _ = serde_json::to_writer(&mut *out, &chunk);
            out.extend_from_slice(b"\n\n");
        }
    }

    fn push_data(out: &mut Vec<u8>, v: &Value) {
        out.extend_from_slice(b"data: ");
        let _ = serde_json::to_writer(&mut *out, v);
        out.extend_from_slice(b"\n\n");
    }

    /// The OpenAI Chat Completions codec, both as a provider format and as a client surface.
    pub struct OpenAiCodec;

    use crate::wire::canonical::{EmbeddingsRequest, EmbeddingsResponse};
    use crate::wire::embeddings::{
        decode_response as decode_embeddings, encode_request as encode_embeddings,
    };

    crate::wire::codec::surface_format_codec!(OpenAiCodec, OpenAi, embeddings);

    impl crate::wire::codec::SurfaceCodec for OpenAiCodec {
        fn surface(&self) -> crate::error::Surface {
            crate::error::Surface::OpenAi
        }

        fn decode_request(&self, body: &[u8]) -> Result<Request, GatewayError> {
            decode_request(body)
        }

        fn encode_response(&self, resp: &Response) -> Vec<u8> {
            encode_response(resp)
        }

        fn stream_encoder(
            &self,
            model: &str,
            send_usage: bool,
        ) -> Box<dyn crate::wire::codec::StreamEncoder> {
            Box::new(StreamEncoder::new(model, send_usage))
        }
    }

    impl crate::wire::codec::StreamEncoder for StreamEncoder {
        fn encode(&mut self, delta: &Delta, out: &mut Vec<u8>) {
            StreamEncoder::encode(self, delta, out)
        }

        fn usage(&self) -> Usage {
            StreamEncoder::usage(self)
        }

        fn done_with_trace(&mut self, trace: &RawValue, out: &mut Vec<u8>) {
            let mut tail = Vec::new();
            StreamEncoder::encode(self, &Delta::Done, &mut tail);
            let cut = tail.len().saturating_sub(b"data: [DONE]\n\n".len());
            out.extend_from_slice(&tail[..cut]);
            self.trace_chunk(trace, out);
            out.extend_from_slice(&tail[cut..]);
        }
    }
}
