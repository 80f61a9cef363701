//! One error type for everything a request can fail with. It knows its HTTP status, its
//! OpenAI-shaped rendering and the short code used as a metric label, so an error is built
//! once where it happens and rendered once at the edge.

use std::fmt;

/// A wire format: what a client surface speaks, and what a provider speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Surface {
    OpenAi,
    Anthropic,
}

impl Surface {
    pub fn as_str(self) -> &'static str {
        match self {
            Surface::OpenAi => "openai",
            Surface::Anthropic => "anthropic",
        }
    }
}

#[derive(Debug, Clone)]
pub enum GatewayError {
    /// 400: the client sent something we cannot use. `code` is the machine-readable reason.
    InvalidRequest { code: &'static str, message: String },
    /// 401: missing or unknown key.
    Unauthorized { message: String },
    /// 404: path or routing config not found.
    NotFound { code: &'static str, message: String },
    /// 405: known path, wrong method.
    MethodNotAllowed { allowed: &'static str },
    /// 408: the client did not finish sending its body in time.
    RequestTimeout { message: String },
    /// 413: body larger than `server.max_body_bytes`.
    PayloadTooLarge { limit: u64 },
    /// 415: body declared as something other than JSON.
    UnsupportedMediaType { content_type: String },
    /// Upstream answered with an error status; 4xx are passed through by the caller, this
    /// variant carries 5xx and credential failures that map to 502.
    UpstreamStatus { provider: String, status: u16, message: String },
    /// Upstream could not be reached or broke the connection.
    UpstreamConnect { provider: String, message: String },
    /// Upstream did not answer within its timeout.
    UpstreamTimeout { provider: String, after_ms: u64 },
    /// Bug or resource failure inside the gateway.
    Internal { message: String },
    /// 503: a store the answer depends on could not be read in time; retrying may work.
    Unavailable { code: &'static str, message: String },
    /// 429: a blocking budget is fully held by reservations of requests in flight (its
    /// settled spend is under the cap): retry shortly.
    BudgetBusy { name: String, committed_usd: f64, in_flight_usd: f64, cap_usd: f64 },
    /// 402: a budget that blocks is at its cap (PRODUCT.md §5.4).
    BudgetExceeded(Box<crate::spend::budgets::Blocked>),
    /// 429: the key's requests or tokens per minute are used up. `retry_after`: whole
    /// seconds; `requested` is set when one request alone exceeds a per-minute limit.
    RateLimited {
        kind: crate::spend::counters::RateKind,
        limit: u64,
        retry_after: u64,
        requested: Option<u64>,
    },
}

impl GatewayError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        GatewayError::InvalidRequest { code, message: message.into() }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        GatewayError::Internal { message: message.into() }
    }

    pub fn status(&self) -> u16 {
        match self {
            GatewayError::InvalidRequest { .. } => 400,
            GatewayError::Unauthorized { .. } => 401,
            GatewayError::NotFound { .. } => 404,
            GatewayError::MethodNotAllowed { .. } => 405,
            GatewayError::RequestTimeout { .. } => 408,
            GatewayError::PayloadTooLarge { .. } => 413,
            GatewayError::UnsupportedMediaType { .. } => 415,
            GatewayError::UpstreamStatus { .. } | GatewayError::UpstreamConnect { .. } => 502,
            GatewayError::UpstreamTimeout { .. } => 504,
            GatewayError::Internal { .. } => 500,
            GatewayError::Unavailable { .. } => 503,
            GatewayError::BudgetExceeded(_) => 402,
            GatewayError::BudgetBusy { .. } => 429,
            GatewayError::RateLimited { .. } => 429,
        }
    }

    /// OpenAI-style `error.type`.
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::InvalidRequest { .. }
            | GatewayError::NotFound { .. }
            | GatewayError::MethodNotAllowed { .. }
            | GatewayError::RequestTimeout { .. }
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::UnsupportedMediaType { .. } => "invalid_request_error",
            GatewayError::Unauthorized { .. } => "authentication_error",
            GatewayError::UpstreamStatus { .. } | GatewayError::UpstreamConnect { .. } => "upstream_error",
            GatewayError::UpstreamTimeout { .. } => "upstream_timeout",
            GatewayError::Internal { .. } | GatewayError::Unavailable { .. } => "server_error",
            GatewayError::BudgetExceeded(_) => "budget_exceeded",
            GatewayError::RateLimited { .. } | GatewayError::BudgetBusy { .. } => "rate_limit_error",
        }
    }

    /// Machine-readable `error.code`; also the `code` label of the error metric.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::InvalidRequest { code, .. }
            | GatewayError::NotFound { code, .. }
            | GatewayError::Unavailable { code, .. } => code,
            GatewayError::Unauthorized { .. } => "invalid_api_key",
            GatewayError::MethodNotAllowed { .. } => "method_not_allowed",
            GatewayError::RequestTimeout { .. } => "request_timeout",
            GatewayError::PayloadTooLarge { .. } => "request_too_large",
            GatewayError::UnsupportedMediaType { .. } => "unsupported_media_type",
            GatewayError::UpstreamStatus { status, .. } if *status == 401 || *status == 403 => {
                "provider_auth_failed"
            }
            GatewayError::UpstreamStatus { .. } => "upstream_error",
            GatewayError::UpstreamConnect { .. } => "upstream_unavailable",
            GatewayError::UpstreamTimeout { .. } => "upstream_timeout",
            GatewayError::Internal { .. } => "internal_error",
            GatewayError::BudgetExceeded(_) => "budget_exceeded",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::BudgetBusy { .. } => "budget_reserved",
        }
    }

    pub fn message(&self) -> String {
        match self {
            GatewayError::InvalidRequest { message, .. }
            | GatewayError::Unauthorized { message }
            | GatewayError::NotFound { message, .. }
            | GatewayError::RequestTimeout { message }
            | GatewayError::Internal { message }
            | GatewayError::Unavailable { message, .. } => message.clone(),
            GatewayError::MethodNotAllowed { allowed } => {
                format!("method not allowed; use {allowed}")
            }
            GatewayError::PayloadTooLarge { limit } => {
                format!("request body exceeds the limit of {limit} bytes")
            }
            GatewayError::UnsupportedMediaType { content_type } => {
                format!("unsupported content-type '{content_type}'; send the body as application/json")
            }
            GatewayError::UpstreamStatus { provider, status, message } => {
                if *status == 401 || *status == 403 {
                    format!("provider '{provider}' rejected the configured credential ({status}): {message}")
                } else {
                    format!("provider '{provider}' returned {status}: {message}")
                }
            }
            GatewayError::UpstreamConnect { provider, message } => {
                format!("provider '{provider}' is unreachable: {message}")
            }
            GatewayError::UpstreamTimeout { provider, after_ms } => {
                format!("provider '{provider}' did not respond within {after_ms} ms")
            }
            GatewayError::BudgetExceeded(blocked) => blocked.message(),
            GatewayError::BudgetBusy { name, committed_usd, in_flight_usd, cap_usd } => format!(
                "budget \"{name}\" is held by requests in flight (${committed_usd:.2} spent + ${in_flight_usd:.2} reserved of ${cap_usd:.2}); retry shortly"
            ),
            GatewayError::RateLimited { kind, limit, requested: Some(n), .. } => {
                let unit = kind.unit();
                format!("this request needs about {n} {unit}, more than this API key's limit of {limit} {unit}/minute")
            }
            GatewayError::RateLimited { kind, limit, .. } => {
                format!("rate limit of {limit} {}/minute exceeded for this API key", kind.unit())
            }
        }
    }

    /// The error envelope of `surface`.
    pub fn render(&self, surface: Surface) -> Vec<u8> {
        if let GatewayError::BudgetExceeded(blocked) = self {
            // The one error whose `code` is an integer, with the budget alongside (the
            // modelux SDKs raise BudgetExceededError from `error.budget`).
            let body = match surface {
                Surface::OpenAi => serde_json::json!({"error": {
                    "type": "budget_exceeded",
                    "message": blocked.message(),
                    "code": 402,
                    "budget": blocked.json(),
                }}),
                Surface::Anthropic => serde_json::json!({"type": "error", "error": {
                    "type": "budget_exceeded",
                    "message": blocked.message(),
                    "budget": blocked.json(),
                }}),
            };
            return serde_json::to_vec(&body).unwrap_or_default();
        }
        match surface {
            Surface::OpenAi => self.to_openai_body(),
            Surface::Anthropic => anthropic_error_body(anthropic_error_type(self.status()), &self.message()),
        }
    }

    /// The OpenAI error envelope: `{"error":{"type","message","code"}}`.
    pub fn to_openai_body(&self) -> Vec<u8> {
        if let GatewayError::BudgetExceeded(_) = self {
            return self.render(Surface::OpenAi);
        }
        openai_error_body(self.kind(), &self.message(), self.code())
    }
}

/// An upstream's 4xx answer, re-rendered in the client's envelope (a translated route):
/// the same status and message, the type the client's SDK maps that status to.
pub fn upstream_client_error_body(client: Surface, status: u16, message: &str) -> Vec<u8> {
    match client {
        Surface::OpenAi => openai_error_body(openai_error_type(status), message, "upstream_client_error"),
        Surface::Anthropic => anthropic_error_body(anthropic_error_type(status), message),
    }
}

/// OpenAI-style `error.type` for a status passed from a translated upstream.
fn openai_error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        _ => "invalid_request_error",
    }
}

/// The Anthropic error envelope: `{"type":"error","error":{"type","message"}}`.
pub fn anthropic_error_body(kind: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"type": "error", "error": {"type": kind, "message": message}}))
        .unwrap_or_else(|_| br#"{"type":"error","error":{}}"#.to_vec())
}

/// Anthropic's `error.type` for a gateway error status.
pub fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        400 | 405 | 408 | 415 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

pub fn openai_error_body(kind: &str, message: &str, code: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "error": { "type": kind, "message": message, "code": code, "param": null }
    });
    serde_json::to_vec(&body).unwrap_or_else(|_| b"{\"error\":{}}".to_vec())
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.status(), self.code(), self.message())
    }
}

impl std::error::Error for GatewayError {}
