//! The canonical request, response and stream-delta types every wire format converts to
//! and from. N formats cost N codecs: a client surface decodes into these, a provider
//! adapter encodes from them, and the reverse on the way back.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub model: String,
    pub system: Vec<TextBlock>,
    pub messages: Vec<Message>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub stop: Vec<String>,
    pub stream: bool,
    /// The client asked for token usage at the end of a stream (OpenAI `include_usage`).
    pub stream_usage: bool,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    /// Extended thinking budget (Anthropic-family targets only).
    pub thinking_budget: Option<u64>,
    /// End-user id (OpenAI `user`, Anthropic `metadata.user_id`).
    pub user: Option<String>,
    /// OpenAI-only fields (`response_format`, `seed`, `logprobs`, …), forwarded unchanged to
    /// OpenAI-family targets and dropped for others.
    pub openai_only: Vec<(String, Value)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextBlock {
    pub text: String,
    pub cache_control: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ImageSource {
    Url(String),
    Base64 { media_type: String, data: String },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Part {
    Text {
        text: String,
        cache_control: Option<Value>,
    },
    Image {
        source: ImageSource,
        cache_control: Option<Value>,
    },
    /// A tool call made by the assistant; `arguments` is JSON text.
    ToolCall {
        id: String,
        name: String,
        arguments: String,
    },
    /// The result of a call, sent back by the user side. Only text and images survive.
    ToolResult {
        call_id: String,
        content: Vec<Part>,
        is_error: bool,
    },
    Thinking {
        text: String,
        signature: Option<String>,
    },
    RedactedThinking {
        data: String,
    },
}

/// Gemini thought signatures travel tagged with this prefix, so they only ever go back to
/// Gemini and never to Claude (Anthropic, Bedrock), which would reject them. `:` is outside
/// the base64 alphabet, so no raw signature starts with it.
pub const GEMINI_SIGNATURE_TAG: &str = "gemini:";

impl Part {
    /// Thinking that carries a signature Claude issued (untagged and non-empty): the only
    /// thinking an Anthropic-family target accepts back.
    pub fn claude_signature(&self) -> Option<(&str, &str)> {
        match self {
            Part::Thinking { text, signature: Some(sig) }
                if !sig.is_empty() && !sig.starts_with(GEMINI_SIGNATURE_TAG) =>
            {
                Some((text, sig))
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON schema of the arguments.
    pub parameters: Value,
    pub cache_control: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    None,
    /// Some tool must be called.
    Required,
    /// This tool must be called.
    Tool(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StopReason {
    EndTurn,
    MaxTokens,
    ToolUse,
    StopSequence,
    ContentFilter,
}

/// Token counts. `input` counts every prompt token, cached ones included; `cache_read`
/// and `cache_write` are the parts of it served from or written to a prompt cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub reasoning: u64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Response {
    pub id: String,
    pub model: String,
    pub created: u64,
    pub content: Vec<Part>,
    pub stop: Option<StopReason>,
    pub usage: Usage,
}

/// One step of a streamed response, in upstream order.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Start {
        id: String,
        model: String,
    },
    Text(String),
    Thinking(String),
    Signature(String),
    /// A tool call begins; `call` numbers calls 0, 1, 2… within the response.
    ToolCallStart {
        call: usize,
        id: String,
        name: String,
    },
    ToolArgs {
        call: usize,
        json: String,
    },
    Stop(StopReason),
    /// Usage known so far; later values replace earlier non-zero ones field by field.
    Usage(Usage),
    /// The upstream reported an error inside the stream.
    Error {
        kind: String,
        message: String,
    },
    Done,
}

impl Usage {
    /// Merges a later report: fields it carries (non-zero) win.
    pub fn merge(&mut self, later: Usage) {
        for (mine, theirs) in [
            (&mut self.input, later.input),
            (&mut self.output, later.output),
            (&mut self.cache_read, later.cache_read),
            (&mut self.cache_write, later.cache_write),
            (&mut self.reasoning, later.reasoning),
        ] {
            if theirs != 0 {
                *mine = theirs;
            }
        }
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// An embeddings request. Only text inputs translate across providers; token-array inputs
/// are accepted for OpenAI-family targets only (forwarded as they are).
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub inputs: Vec<String>,
    /// Requested vector length (OpenAI `dimensions`, Gemini `outputDimensionality`,
    /// Cohere `output_dimension`).
    pub dimensions: Option<u64>,
    pub user: Option<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EmbeddingsResponse {
    pub model: String,
    /// One vector per input, in input order.
    pub vectors: Vec<Vec<f32>>,
    /// Prompt tokens billed, when the provider reports them (0 otherwise).
    pub input_tokens: u64,
}
