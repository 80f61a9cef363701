//! OpenAI audio and images (PRODUCT.md §1.3, §4.6): `/audio/transcriptions` and
//! `/audio/translations` (multipart, `model` a form field; an omitted one is
//! `openai/whisper-1`), `/audio/speech` (JSON in, binary audio streamed back) and
//! `/images/generations` (JSON; an omitted model is OpenAI's default, `openai/dall-e-2`).
//! Routed by `model` like chat (budgets, rate limits, `single`/`fallback` configs), to
//! OpenAI and Azure OpenAI providers only; the client's bytes go through with only `model`
//! rewritten, and the answer comes back unchanged, priced from its `usage` where the price
//! table knows the model.

use bytes::Bytes;

use super::execute::{self, Exec, Form, Media};
use super::request::{self, Incoming};
use super::{billing, dry_run, Req};
use crate::auth::Principal;
use crate::error::GatewayError;
use crate::wire::multipart;
use crate::wire::routed::{Payload, RoutedRequest};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Transcriptions,
    Translations,
    Speech,
    Images,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Transcriptions => "/audio/transcriptions",
            Kind::Translations => "/audio/translations",
            Kind::Speech => "/audio/speech",
            Kind::Images => "/images/generations",
        }
    }

    /// What the API falls back to when the body names no model.
    fn default_model(self) -> Option<&'static str> {
        match self {
            Kind::Transcriptions | Kind::Translations => Some("openai/whisper-1"),
            Kind::Images => Some("openai/dall-e-2"),
            Kind::Speech => None,
        }
    }
}

/// A multipart body's `model`, `stream` and the bytes a model reads (the fields that are
/// not files).
struct FormRead {
    form: Form,
    model: Option<String>,
    stream: bool,
    text_bytes: usize,
}

fn read_form(content_type: &str, body: &[u8]) -> Result<FormRead, GatewayError> {
    let bad = |m: String| GatewayError::invalid("invalid_multipart", m);
    let Some(boundary) = multipart::boundary(content_type) else {
        return Err(GatewayError::UnsupportedMediaType { content_type: content_type.to_string() });
    };
    let parsed = multipart::parse(boundary, body).map_err(bad)?;
    if !parsed.fields.iter().any(|f| f.filename.is_some()) {
        return Err(bad("the form has no file part; send the audio as `file`".into()));
    }
    let mut model = None;
    let mut stream = false;
    let mut text_bytes = 0;
    for f in &parsed.fields {
        if f.filename.is_some() {
            continue;
        }
        text_bytes += f.value.len();
        let value = || String::from_utf8_lossy(&body[f.value.clone()]).trim().to_string();
        match f.name.as_str() {
            // One model only: the provider must run the model the gateway routed and priced.
            "model" if model.is_some() => return Err(bad("the form has more than one model field".into())),
            "model" => model = Some((f.value.clone(), value())),
            "stream" => stream = value().eq_ignore_ascii_case("true"),
            _ => {}
        }
    }
    let (range, name) = match model {
        Some((range, name)) => (Some(range), Some(name)),
        None => (None, None),
    };
    Ok(FormRead {
        form: Form {
            content_type: content_type.to_string(),
            boundary: boundary.to_string(),
            model: range,
            closing: parsed.closing,
        },
        model: name,
        stream,
        text_bytes,
    })
}

pub async fn serve(req: &mut Req<'_>, principal: &Principal, kind: Kind) -> Result<(), GatewayError> {
    let snapshot = req.snapshot;
    let settings = &snapshot.settings;
    let multipart_body = matches!(kind, Kind::Transcriptions | Kind::Translations);
    let (body, form, text_bytes, routing_json) = if multipart_body {
        let content_type = req
            .session
            .req_header()
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        // Audio files are bigger than chat bodies: the upload limit, and a deadline that
        // grows with the declared size (64 KiB/s at the least).
        let declared = super::body::declared_length(req.session.req_header()).unwrap_or(0);
        let deadline = settings.client_body_timeout + std::time::Duration::from_secs(declared / (64 * 1024));
        let body = super::body::read_body(req.session, settings.max_upload_bytes, deadline).await?;
        req.ctx.bytes_in = body.len() as u64;
        let read = read_form(&content_type, &body)?;
        let model = match read.model {
            Some(m) if !m.is_empty() => m,
            _ => kind.default_model().unwrap_or_default().to_string(),
        };
        // Routing reads the model from a JSON body: the form's, as one.
        let json = serde_json::to_vec(&serde_json::json!({ "model": model, "stream": read.stream }))
            .unwrap_or_default();
        (body, Some(read.form), read.text_bytes, Bytes::from(json))
    } else {
        let body = request::read_json_body(req).await?;
        let no_model = matches!(RoutedRequest::parse_routed(&body, Payload::Free), Err(e) if e.code() == "missing_field");
        let body = match kind.default_model() {
            Some(default) if no_model => with_default_model(&body, default).unwrap_or(body),
            _ => body,
        };
        let len = body.len();
        (body.clone(), None, len, body)
    };
    let incoming: Incoming<'_> =
        request::incoming(req.session, req.ctx, RoutedRequest::parse_routed(&routing_json, Payload::Free)?);
    let asked = &incoming.request;
    let mut facts = crate::admission::facts(asked, &incoming.meta, text_bytes, &req.ctx.request_id);
    // Audio bytes are not tokens: only the text fields count towards the estimate.
    req.ctx.bill.est_input_tokens = crate::estimate::reserved_tokens(text_bytes);
    if !incoming.dry_run {
        billing::charge_tokens(req.state, req.ctx, principal, facts.est_input_tokens).await?;
    }
    let (eval, routed) = request::admit(req, principal, &incoming, &mut facts, !incoming.dry_run)?;
    if incoming.dry_run {
        return dry_run::answer(req, &routed, &facts, 0).await;
    }
    let health = &snapshot.health_settings;
    let what = kind.endpoint();
    let sequence = execute::passthrough_sequence(&routed, health, &asked.model, what)?;
    let attempts = execute::eligible_attempts(req.ctx, &routed, health, |m| {
        let provider = &m.target.provider;
        provider.openai_model_path(&m.target.model, what).is_none().then(|| {
            format!("provider {} (kind {}) does not serve {what}", provider.id, provider.adapter.kind())
        })
    });
    if attempts.is_empty() {
        return Err(execute::no_provider_serves(&routed.attempts(), &asked.model, what, "openai and azure"));
    }
    let usd = billing::max_cost(
        snapshot,
        &attempts,
        false,
        req.ctx.bill.est_input_tokens,
        asked.max_tokens,
        asked.choices,
    );
    billing::reserve(req.state, req.ctx, &eval, usd).await?;
    let info = routed.info();
    let media = Media { endpoint: what, form, raw_answer: kind == Kind::Speech };
    let mut exec = Exec::media(req, asked, &body, &info, &media);
    execute::sequential(&mut exec, &attempts, sequence).await
}

/// A JSON object body with `"model": default` added in front (the body named none).
fn with_default_model(body: &Bytes, default: &str) -> Option<Bytes> {
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[start] != b'{' {
        return None;
    }
    let rest = &body[start + 1..];
    let empty = rest.iter().all(|b| b.is_ascii_whitespace() || *b == b'}');
    let mut out = Vec::with_capacity(body.len() + default.len() + 16);
    out.extend_from_slice(b"{\"model\":");
    out.extend_from_slice(serde_json::to_string(default).ok()?.as_bytes());
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_default_model_goes_in_front() {
        let b =
            with_default_model(&Bytes::from_static(br#" {"prompt":"a cat"}"#), "openai/dall-e-2").unwrap();
        assert_eq!(&b[..], br#"{"model":"openai/dall-e-2","prompt":"a cat"}"#);
        let b = with_default_model(&Bytes::from_static(b"{}"), "m").unwrap();
        assert_eq!(&b[..], br#"{"model":"m"}"#);
        assert!(with_default_model(&Bytes::from_static(b"[1]"), "m").is_none());
    }

    #[test]
    fn forms_give_their_model_and_text_size() {
        let ct = "multipart/form-data; boundary=XX";
        let body = b"--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\n\r\nID3\x00\x01\r\n--XX\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n@voice\r\n--XX--\r\n";
        let read = read_form(ct, body).unwrap();
        assert_eq!(read.model.as_deref(), Some("@voice"));
        assert_eq!(read.text_bytes, 6);
        let twice = b"--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nx\r\n--XX\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XX\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n--XX--\r\n";
        assert_eq!(read_form(ct, twice).err().map(|e| e.code()), Some("invalid_multipart"));
        let no_file = b"--XX\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--XX--\r\n";
        assert_eq!(read_form(ct, no_file).err().map(|e| e.code()), Some("invalid_multipart"));
        assert!(matches!(
            read_form("application/json", body),
            Err(GatewayError::UnsupportedMediaType { .. })
        ));
        assert_eq!(read_form(ct, b"garbage").err().map(|e| e.code()), Some("invalid_multipart"));
    }
}
