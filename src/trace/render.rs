//! Text renderings of trace records for `modelux logs`: one line per request in lists, and
//! the whole decision (config, candidates, attempts, outcome, cost) for one request.

use std::fmt::Write;

use serde_json::Value;

use super::TraceRow;
use crate::spend::period::iso8601_ms;

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

fn usd(v: f64) -> String {
    // Enough digits for a single cheap request ($0.0000066).
    let mut s = format!("{v:.7}").trim_end_matches('0').to_string();
    let decimals = s.len() - s.find('.').map_or(s.len(), |i| i + 1);
    s.extend(std::iter::repeat_n('0', 2usize.saturating_sub(decimals)));
    format!("${s}")
}

fn served(r: &TraceRow) -> String {
    if r.provider.is_empty() {
        "-".into()
    } else {
        format!("{}/{}", r.provider, r.model)
    }
}

/// `2026-11-21T10:00:00.123Z  200   380.0 ms  openai/gpt-4o-mini  $0.0000066  <id>  tenant=acme`
pub fn line(r: &TraceRow) -> String {
    let tags: Vec<String> = r.tag_keys.iter().zip(&r.tag_values).map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "{}  {:>3}  {:>9.1} ms  {:<34}  {:<12}  {}  {}",
        iso8601_ms(r.ts_ms as i64),
        r.status,
        r.latency_ms,
        served(r),
        usd(r.cost_total),
        r.request_id,
        tags.join(",")
    )
}

/// The decision, the way the landing page shows it.
pub fn decision(r: &TraceRow) -> String {
    let mut o = String::new();
    let trace: Value = serde_json::from_str(&r.decision_trace).unwrap_or(Value::Null);
    let _ = writeln!(o, "request    {}  {}", r.request_id, iso8601_ms(r.ts_ms as i64));
    let _ = writeln!(
        o,
        "caller     project {}  key {}  {} {}",
        or_dash(&r.project),
        or_dash(&r.key_name),
        r.surface,
        r.endpoint
    );
    let _ = writeln!(
        o,
        "model      {} → {}  (resolved {})",
        or_dash(&r.model_requested),
        served(r),
        or_dash(&r.resolution)
    );
    if !r.routing_config.is_empty() {
        let _ = write!(o, "config     {} (v{})  strategy {}", r.routing_config, r.config_version, r.strategy);
        if let Some(agg) = trace["aggregation"].as_str() {
            let _ = write!(o, "  aggregation {agg}");
        }
        if !r.ab_variant.is_empty() {
            let _ = write!(o, "  variant {}", r.ab_variant);
        }
        o.push('\n');
    }
    for hop in trace["hops"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "  via      {} (v{}) {}: {}",
            hop["routing_config"].as_str().unwrap_or_default(),
            hop["config_version"],
            hop["strategy"].as_str().unwrap_or_default(),
            hop["choice"].as_str().unwrap_or_default()
        );
    }
    if let Some(candidates) = trace["candidates"].as_array().filter(|c| !c.is_empty()) {
        let _ = writeln!(o, "candidates");
        for c in candidates {
            let _ = writeln!(
                o,
                "  {:<40} {:<12} {}",
                format!(
                    "{}/{}",
                    c["provider"].as_str().unwrap_or_default(),
                    c["model"].as_str().unwrap_or_default()
                ),
                c["status"].as_str().unwrap_or_default(),
                c["reason"].as_str().unwrap_or_default()
            );
        }
    }
    if !r.attempt_statuses.is_empty() {
        let _ = writeln!(o, "attempts");
        for i in 0..r.attempt_statuses.len() {
            let http = r.attempt_http_statuses.get(i).copied().filter(|s| *s > 0);
            let ttfb = r.attempt_ttfb_ms.get(i).copied().filter(|t| *t >= 0.0);
            let _ = write!(
                o,
                "  {}  {:<40} {:<14} {:>3}  ttft {:>9}  {:>9.1} ms",
                i + 1,
                format!(
                    "{}/{}",
                    r.attempt_providers.get(i).map_or("", String::as_str),
                    r.attempt_models.get(i).map_or("", String::as_str)
                ),
                r.attempt_statuses[i],
                http.map_or("-".to_string(), |s| s.to_string()),
                ttfb.map_or("-".to_string(), |t| format!("{t:.1} ms")),
                r.attempt_duration_ms.get(i).copied().unwrap_or_default()
            );
            if let Some(e) = r.attempt_errors.get(i).filter(|e| !e.is_empty()) {
                let _ = write!(o, "  {e}");
            }
            o.push('\n');
        }
    }
    if let Some(reason) = trace["decision"]["reason"].as_str().filter(|s| !s.is_empty()) {
        let winner = trace["decision"]["winner_attempt"].as_u64();
        let _ = writeln!(
            o,
            "decision   {}{}",
            winner.map_or(String::new(), |w| format!("attempt {w}: ")),
            reason
        );
    }
    if !r.budget_name.is_empty() {
        let _ = write!(o, "budget     {}  {}", r.budget_name, r.budget_action);
        if let Some(left) = trace["budget"]["remaining_usd"].as_f64() {
            let _ = write!(o, "  {} left", usd(left));
        }
        if let Some(from) = trace["budget"]["downgraded_from"].as_str() {
            let _ = write!(o, "  downgraded from {from}");
        }
        o.push('\n');
    }
    let _ = writeln!(
        o,
        "tokens     {} in, {} out ({} cached, {} reasoning)",
        r.input_tokens, r.output_tokens, r.cached_tokens, r.reasoning_tokens
    );
    let _ = write!(
        o,
        "cost       {}  (input {}, output {})",
        usd(r.cost_total),
        usd(r.cost_input),
        usd(r.cost_output)
    );
    if trace["cost_usd"]["unpriced"].as_bool() == Some(true) {
        o.push_str("  unpriced model");
    }
    if trace["cost_usd"]["estimated"].as_bool() == Some(true) {
        o.push_str("  estimated");
    }
    o.push('\n');
    let _ = write!(o, "status     {}", r.status);
    if !r.error_code.is_empty() {
        let _ = write!(o, " {}", r.error_code);
    }
    let _ = write!(o, "  latency {:.1} ms", r.latency_ms);
    if let Some(t) = r.ttfb_ms {
        let _ = write!(o, "  ttft {t:.1} ms");
    }
    let _ = writeln!(
        o,
        "  {}  {} B in, {} B out",
        if r.streamed { "streamed" } else { "whole" },
        r.bytes_in,
        r.bytes_out
    );
    if !r.tag_keys.is_empty() {
        let tags: Vec<String> =
            r.tag_keys.iter().zip(&r.tag_values).map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(o, "tags       {}", tags.join(", "));
    }
    if !(r.trace_id.is_empty() && r.conversation_id.is_empty() && r.end_user.is_empty()) {
        let _ = writeln!(
            o,
            "session    trace {}  conversation {}  end user {}",
            or_dash(&r.trace_id),
            or_dash(&r.conversation_id),
            or_dash(&r.end_user)
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_keeps_small_amounts_readable() {
        assert_eq!(usd(0.0000066), "$0.0000066");
        assert_eq!(usd(1.5), "$1.50");
        assert_eq!(usd(0.0), "$0.00");
        assert_eq!(usd(42.15), "$42.15");
    }
}
