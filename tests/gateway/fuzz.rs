//! The HTTP-level fuzz run (`modelux_loadtest::fuzz`), short and seeded.

use super::*;

/// The seeded fuzz run CI does (the long one is `loadtest/fuzz.sh`): every hostile request
/// answered in its surface's format or closed within the bound, every good one served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_http_fuzz_run_gets_answers_or_clean_closes() {
    let upstream = mock(MockConfig::default()).await;
    let gw = start(Cfg {
        server_extra: "  client_body_timeout_ms: 1000\n  client_header_timeout_ms: 2000",
        ..Cfg::new(&upstream.base_url())
    })
    .await;
    let target = modelux_loadtest::fuzz::Target {
        proxy: gw.proxy,
        manage: gw.manage,
        key: KEY.into(),
        admin_key: ADMIN_KEY.into(),
        model: "@fast".into(),
    };
    let run = modelux_loadtest::fuzz::Run {
        seed: 20,
        requests: 1_500,
        duration: Duration::from_secs(120),
        concurrency: 8,
        good_every: 9,
        bound: Duration::from_secs(5),
        pid: None,
    };
    let report = modelux_loadtest::fuzz::run(target, run).await;
    assert_eq!(report.failures, 0, "{:#?}", report.failure_samples);
    assert_eq!(report.requests, 1_500);
    assert!(report.good >= 140, "{report:?}");
    assert_eq!(report.outcomes.get("good_ok").copied().unwrap_or(0), report.good);
    // Every kind of case ran.
    assert!(report.cases.len() >= 15, "{:?}", report.cases);
    // And the gateway is still fine.
    assert_eq!(post(&gw, Some(KEY), &chat_body("@fast")).await.status, 200);
}
