//! Bring your own key (`X-Modelux-Provider-Key`, PRODUCT.md §2.3): the caller's key goes to
//! the provider for that call only, where its format fits the provider's kind; the trace
//! keeps its fingerprint and nothing on disk holds the key.

use super::*;

const CALLER_KEY: &str = "sk-proj-CallerOwnedSecret0123456789abcdefTA0A";

async fn post(gw: &Gateway, path: &str, body: &str, provider_key: Option<&str>) -> Response {
    let auth = format!("Bearer {KEY}");
    let mut h = vec![("authorization", auth.as_str()), ("content-type", "application/json")];
    if let Some(k) = provider_key {
        h.push(("x-modelux-provider-key", k));
    }
    httpc::request(gw.proxy, "POST", path, &h, body.as_bytes()).await.unwrap()
}

fn all_files_under(dir: &std::path::Path, out: &mut Vec<u8>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            all_files_under(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.extend_from_slice(&bytes);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_key_reaches_the_provider_for_that_call_and_only_its_fingerprint_is_kept() {
    let upstream = mock(MockConfig::default()).await;
    let mut cfg = Cfg::new(upstream.base_url().leak());
    cfg.top_extra = "traces: { flush_interval_ms: 50, bodies: true }\n".into();
    let gw = start(cfg).await;
    let chat = r#"{"model":"openai/gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
    let last_auth = || upstream.requests().last().unwrap().header("authorization").unwrap().to_string();

    // 1. With the header: the caller's key, on chat and on embeddings.
    let r = post(&gw, CHAT, chat, Some(CALLER_KEY)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(last_auth(), format!("Bearer {CALLER_KEY}"));
    let byok_id = r.header("x-modelux-request-id").unwrap().to_string();
    let e = post(
        &gw,
        "/openai/v1/embeddings",
        r#"{"model":"openai/text-embedding-3-small","input":"x"}"#,
        Some(CALLER_KEY),
    )
    .await;
    assert_eq!(e.status, 200, "{}", e.text());
    assert_eq!(last_auth(), format!("Bearer {CALLER_KEY}"));

    // 2. Without it: the stored credential again (the key was for that call only).
    assert_eq!(post(&gw, CHAT, chat, None).await.status, 200);
    assert_eq!(last_auth(), "Bearer sk-test-upstream");

    // 3. A key of another provider's format is not sent to this one.
    let r = post(&gw, CHAT, chat, Some("sk-ant-api03-SomeoneElsesKey0123456789-xyzw")).await;
    assert_eq!(r.status, 200);
    assert_eq!(last_auth(), "Bearer sk-test-upstream");

    // 4. A value no header line can carry: 400 in the caller's format, nothing sent.
    let before = upstream.request_count();
    let bad = post(&gw, CHAT, chat, Some("sk-proj-has space")).await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert_eq!(bad.json().unwrap()["error"]["code"], "invalid_provider_key");
    assert_eq!(upstream.request_count(), before);

    // 5. The trace keeps the fingerprint; the key is nowhere in the logs API or on disk.
    let log = wait_for_log(&gw, &byok_id).await;
    assert_eq!(log["provider_key"], "sk-proj-...TA0A");
    assert!(!log.to_string().contains("CallerOwnedSecret"));
    let mut disk = Vec::new();
    all_files_under(gw.config_path.parent().unwrap(), &mut disk);
    assert!(!disk.is_empty());
    assert!(!disk.windows(17).any(|w| w == b"CallerOwnedSecret"), "the key was written to disk");
}
