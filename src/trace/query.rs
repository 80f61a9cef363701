//! The reads both stores answer, and the exact semantics they share, so that the same
//! query gives the same answer from ClickHouse and from the embedded store:
//!
//! * **Filters** (`LogQuery`, `ReportQuery`): all given filters must hold. `start_ms` is
//!   inclusive, `end_ms` exclusive, both on `ts_ms`. `model` matches the served model or
//!   the requested one (`model = M OR model_requested = M`). `tags`: every pair must be
//!   present on the record (`tag_keys[i] = k AND tag_values[i] = v` for some `i`).
//!   `status`: `Class(4)` is 400..=499, `Exact(n)` is `status = n`.
//! * **Order and pages**: newest first, `(ts_ms, request_id)` descending. A cursor names
//!   the last row of the previous page; the next page holds rows strictly after it in
//!   that order.
//! * **Errors**: a request counts as an error when `status >= 400` or `status = 0` (the
//!   client went away before an answer).
//! * **Buckets**: `ts_ms - ts_ms % granularity_ms` (UTC; day buckets start at midnight UTC).
//! * **Percentiles**: `quantile_exact` below, ClickHouse's `quantileExact` rule (the
//!   element at index `floor(q * n)` of the sorted values). TTFB percentiles use only the
//!   records that have a TTFB; `None` when none has.
//! * **Sums**: `cost_usd` is rounded to 9 decimals (nano-USD) after summing, so summation
//!   order cannot change the answer.
//! * **Groups**: `group_by` gives every series row a `group` value; a record without the
//!   grouped tag (or end user) falls into the group `""`. Series are ordered by bucket,
//!   then group.

use serde::Serialize;

use super::TraceRow;

pub const DEFAULT_PAGE: usize = 50;
pub const MAX_PAGE: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    /// `2xx`, `4xx`, `5xx`: the hundreds digit.
    Class(u16),
    Exact(u16),
}

impl StatusFilter {
    pub fn matches(self, status: u16) -> bool {
        match self {
            StatusFilter::Class(c) => status / 100 == c,
            StatusFilter::Exact(s) => status == s,
        }
    }

    /// Inclusive bounds on `status`.
    pub fn range(self) -> (u16, u16) {
        match self {
            StatusFilter::Class(c) => (c * 100, c * 100 + 99),
            StatusFilter::Exact(s) => (s, s),
        }
    }
}

/// The last row of a page: `(ts_ms, request_id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub ts_ms: u64,
    pub request_id: String,
}

impl Cursor {
    pub fn after(row: &TraceRow) -> Cursor {
        Cursor { ts_ms: row.ts_ms, request_id: row.request_id.clone() }
    }

    /// Opaque to clients: `<ts_ms>.<request_id>`, base64url.
    pub fn encode(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}.{}", self.ts_ms, self.request_id))
    }

    pub fn decode(text: &str) -> Option<Cursor> {
        use base64::Engine;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (ts, id) = raw.split_once('.')?;
        Some(Cursor { ts_ms: ts.parse().ok()?, request_id: id.to_string() })
    }

    /// Whether `row` comes after this cursor in newest-first order.
    pub fn precedes(&self, row: &TraceRow) -> bool {
        row.ts_ms < self.ts_ms
            || (row.ts_ms == self.ts_ms && row.request_id.as_str() < self.request_id.as_str())
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogQuery {
    pub start_ms: Option<u64>,
    pub end_ms: Option<u64>,
    pub project: Option<String>,
    pub status: Option<StatusFilter>,
    pub model: Option<String>,
    /// Exactly what the client asked for (`@slug`, a model): replay's "traffic that named
    /// @slug", including requests refused before routing.
    pub model_requested: Option<String>,
    pub provider: Option<String>,
    pub routing_config: Option<String>,
    pub end_user: Option<String>,
    pub tags: Vec<(String, String)>,
    pub trace_id: Option<String>,
    pub conversation_id: Option<String>,
    pub min_latency_ms: Option<f64>,
    pub cursor: Option<Cursor>,
    /// 1..=MAX_PAGE.
    pub limit: usize,
}

impl LogQuery {
    /// Whether a row passes every filter (not the cursor): the reference the SQL of both
    /// stores must agree with.
    pub fn matches(&self, row: &TraceRow) -> bool {
        self.start_ms.is_none_or(|s| row.ts_ms >= s)
            && self.end_ms.is_none_or(|e| row.ts_ms < e)
            && self.project.as_ref().is_none_or(|p| *p == row.project)
            && self.status.is_none_or(|s| s.matches(row.status))
            && self.model.as_ref().is_none_or(|m| *m == row.model || *m == row.model_requested)
            && self.model_requested.as_ref().is_none_or(|m| *m == row.model_requested)
            && self.provider.as_ref().is_none_or(|p| *p == row.provider)
            && self.routing_config.as_ref().is_none_or(|c| *c == row.routing_config)
            && self.end_user.as_ref().is_none_or(|u| *u == row.end_user)
            && self.trace_id.as_ref().is_none_or(|t| *t == row.trace_id)
            && self.conversation_id.as_ref().is_none_or(|c| *c == row.conversation_id)
            && self.min_latency_ms.is_none_or(|l| row.latency_ms >= l)
            // Some position holds the pair (as documented), not just the key's first one:
            // the same answer as `arrayExists` in ClickHouse and the tag table in SQLite.
            && self.tags.iter().all(|(k, v)| row.tag_keys.iter().zip(&row.tag_values).any(|(rk, rv)| rk == k && rv == v))
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogPage {
    pub rows: Vec<TraceRow>,
    /// Set when more rows follow.
    pub next_cursor: Option<Cursor>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub fn millis(self) -> u64 {
        match self {
            Granularity::Minute => 60_000,
            Granularity::Hour => 3_600_000,
            Granularity::Day => 86_400_000,
        }
    }

    pub fn bucket(self, ts_ms: u64) -> u64 {
        ts_ms - ts_ms % self.millis()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    Model,
    Provider,
    Project,
    RoutingConfig,
    EndUser,
    Tag(String),
}

impl GroupBy {
    /// The group a row falls into.
    pub fn value(&self, row: &TraceRow) -> String {
        match self {
            GroupBy::Model => row.model.clone(),
            GroupBy::Provider => row.provider.clone(),
            GroupBy::Project => row.project.clone(),
            GroupBy::RoutingConfig => row.routing_config.clone(),
            GroupBy::EndUser => row.end_user.clone(),
            GroupBy::Tag(k) => row.tag(k).unwrap_or_default().to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReportQuery {
    pub start_ms: u64,
    pub end_ms: u64,
    pub granularity: Granularity,
    pub group_by: Option<GroupBy>,
    /// Filters, as in `LogQuery` (its cursor and limit are ignored).
    pub filter: LogQuery,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReportRow {
    /// Start of the bucket, unix ms.
    pub bucket_ms: u64,
    /// `None` without `group_by`.
    pub group: Option<String>,
    pub requests: u64,
    pub errors: u64,
    pub cost_usd: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub p50_latency_ms: f64,
    pub p95_latency_ms: f64,
    pub p99_latency_ms: f64,
    pub p50_ttfb_ms: Option<f64>,
    pub p95_ttfb_ms: Option<f64>,
    pub p99_ttfb_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    pub cost_usd: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// errors / requests; 0 without requests.
    pub error_rate: f64,
    pub p50_latency_ms: Option<f64>,
    pub p95_latency_ms: Option<f64>,
    pub p99_latency_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub series: Vec<ReportRow>,
    pub totals: Totals,
}

/// Whether a status counts as an error in reports.
pub fn is_error(status: u16) -> bool {
    status >= 400 || status == 0
}

/// ClickHouse's `quantileExact`: the element at index `floor(q * n)` (the last one for
/// `q >= 1`) of the sorted values. `sorted` must be sorted ascending.
pub fn quantile_exact(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let n = if q < 1.0 { (q * sorted.len() as f64) as usize } else { sorted.len() - 1 };
    sorted.get(n.min(sorted.len() - 1)).copied()
}

/// Rounds a summed cost to whole nano-USD.
pub fn round_cost(usd: f64) -> f64 {
    (usd * 1e9).round() / 1e9
}

/// The reference report: what both stores' SQL must produce, computed over rows in memory
/// (the embedded store uses it over the rows its SQL selects; tests compare against it).
pub fn report_from_rows<'a>(query: &ReportQuery, rows: impl IntoIterator<Item = &'a TraceRow>) -> Report {
    use std::collections::BTreeMap;
    let mut groups: BTreeMap<(u64, Option<String>), ReportAcc> = BTreeMap::new();
    let mut total = ReportAcc::default();
    for row in rows {
        if row.ts_ms < query.start_ms || row.ts_ms >= query.end_ms || !query.filter.matches(row) {
            continue;
        }
        let key = (query.granularity.bucket(row.ts_ms), query.group_by.as_ref().map(|g| g.value(row)));
        groups.entry(key).or_default().add_row(row);
        total.add_row(row);
    }
    let series = groups.into_iter().map(|((bucket_ms, group), a)| a.into_row(bucket_ms, group)).collect();
    let totals = total.into_totals();
    Report { series, totals }
}

/// One report cell (a bucket and group, or the totals) as both the reference and the
/// embedded store accumulate it.
#[derive(Default)]
pub(crate) struct ReportAcc {
    requests: u64,
    errors: u64,
    cost: f64,
    input: u64,
    output: u64,
    latency: Vec<f64>,
    ttfb: Vec<f64>,
}

impl ReportAcc {
    pub(crate) fn add(
        &mut self,
        status: u16,
        cost: f64,
        input: u64,
        output: u64,
        latency: f64,
        ttfb: Option<f64>,
    ) {
        self.requests += 1;
        self.errors += u64::from(is_error(status));
        self.cost += cost;
        // ClickHouse's sum wraps too.
        self.input = self.input.wrapping_add(input);
        self.output = self.output.wrapping_add(output);
        self.latency.push(latency);
        if let Some(t) = ttfb {
            self.ttfb.push(t);
        }
    }

    pub(crate) fn add_row(&mut self, row: &TraceRow) {
        self.add(
            row.status,
            row.cost_total,
            row.input_tokens,
            row.output_tokens,
            row.latency_ms,
            row.ttfb_ms,
        );
    }

    pub(crate) fn into_row(mut self, bucket_ms: u64, group: Option<String>) -> ReportRow {
        self.latency.sort_by(f64::total_cmp);
        self.ttfb.sort_by(f64::total_cmp);
        let q = |v: &[f64], q: f64| quantile_exact(v, q);
        ReportRow {
            bucket_ms,
            group,
            requests: self.requests,
            errors: self.errors,
            cost_usd: round_cost(self.cost),
            input_tokens: self.input,
            output_tokens: self.output,
            p50_latency_ms: q(&self.latency, 0.5).unwrap_or(0.0),
            p95_latency_ms: q(&self.latency, 0.95).unwrap_or(0.0),
            p99_latency_ms: q(&self.latency, 0.99).unwrap_or(0.0),
            p50_ttfb_ms: q(&self.ttfb, 0.5),
            p95_ttfb_ms: q(&self.ttfb, 0.95),
            p99_ttfb_ms: q(&self.ttfb, 0.99),
        }
    }

    pub(crate) fn into_totals(mut self) -> Totals {
        self.latency.sort_by(f64::total_cmp);
        let q = |q: f64| quantile_exact(&self.latency, q);
        Totals {
            requests: self.requests,
            errors: self.errors,
            cost_usd: round_cost(self.cost),
            input_tokens: self.input,
            output_tokens: self.output,
            error_rate: if self.requests == 0 { 0.0 } else { self.errors as f64 / self.requests as f64 },
            p50_latency_ms: q(0.5),
            p95_latency_ms: q(0.95),
            p99_latency_ms: q(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_exact_follows_clickhouse() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(quantile_exact(&v, 0.5), Some(6.0));
        assert_eq!(quantile_exact(&v, 0.95), Some(10.0));
        assert_eq!(quantile_exact(&v, 0.99), Some(10.0));
        assert_eq!(quantile_exact(&v[..1], 0.5), Some(1.0));
        assert_eq!(quantile_exact(&[], 0.5), None);
    }

    #[test]
    fn cursor_round_trips() {
        let c = Cursor { ts_ms: 1_763_700_000_123, request_id: "0193-abc".into() };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("!!"), None);
    }
}
