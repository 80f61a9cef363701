//! Azure OpenAI for the mock upstream: `POST
//! /openai/deployments/{deployment}/chat/completions?api-version=...` and
//! `.../embeddings?api-version=...` answer exactly like the OpenAI routes,
//! with the deployment name as the model. Azure's own answers (a missing
//! `api-version`, an unknown path, scripted statuses) use its
//! `{"error":{"code":"<status>","message":...}}` envelope.

use std::io::Write;

use crate::answer::{self, compact, obj, Answer};

/// What was asked under `/openai/deployments/{deployment}/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Chat,
    Embeddings,
    /// Audio and images (`media`).
    Media(crate::media::Op),
    /// No `api-version`, or a path Azure does not serve: 404.
    NotFound,
}

impl Op {
    pub(crate) fn from_path(endpoint: &str, query: &str) -> Op {
        if answer::query_param(query, "api-version").is_none_or(str::is_empty) {
            return Op::NotFound;
        }
        match endpoint {
            "chat/completions" => Op::Chat,
            "embeddings" => Op::Embeddings,
            other => crate::media::Op::from_endpoint(other).map_or(Op::NotFound, Op::Media),
        }
    }
}

/// Response headers of every Azure answer.
pub(crate) fn push_headers(out: &mut Vec<u8>, seq: u64) {
    out.extend_from_slice(b"apim-request-id: ");
    answer::push_uuid(out, seq);
    out.extend_from_slice(b"\r\nx-request-id: ");
    answer::push_uuid(out, seq);
    let _ = write!(out, "\r\nx-ms-region: East US\r\n");
}

/// Azure's error envelope; an empty `message` gets its usual text.
pub(crate) fn error_body(status: u16, message: &str) -> Vec<u8> {
    let message = if message.is_empty() {
        match status {
            401 => "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.",
            404 => "Resource not found",
            408 => "The operation was timeout.",
            429 => "Requests to the ChatCompletions_Create Operation under Azure OpenAI API have exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after 1 second.",
            s if s >= 500 => "The server had an error while processing your request. Sorry about that!",
            _ => "The request is invalid.",
        }
    } else {
        message
    };
    compact(&obj! {"error": obj! {"code": status.to_string(), "message": message}})
}

/// The error answer for `status`; 429 says when to retry, as Azure does.
pub(crate) fn error(status: u16, message: &str) -> Answer {
    let mut a = Answer::json(status, error_body(status, message));
    if status == 429 {
        if let Answer::Body { headers, .. } = &mut a {
            *headers = "retry-after: 1\r\nretry-after-ms: 1000\r\n".into();
        }
    }
    a
}
