//! Prometheus metrics, one registry per gateway instance (tests run several in a process).
//! Labels are low-cardinality by construction: surfaces and provider ids come from a fixed
//! set or the config, status is an HTTP code, and model names are capped (see `model_label`).

use dashmap::DashMap;
use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::routing::health::{now_ms, HealthRegistry, HealthSettings};

/// Distinct model label values kept before new ones are folded into "other": clients can
/// put arbitrary names behind a recognised prefix, and each label value is a new series.
const MAX_MODEL_LABELS: usize = 200;

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub errors: IntCounterVec,
    pub duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub overhead: HistogramVec,
    pub ttfb: HistogramVec,
    pub in_flight: IntGauge,
    pub bytes_in: IntCounterVec,
    pub bytes_out: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    pub upstream_connections_reused: IntCounter,
    pub upstream_connections_new: IntCounter,
    pub routing_attempts: IntCounterVec,
    pub cost_usd: CounterVec,
    pub tokens: IntCounterVec,
    pub budget_outcomes: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub spend_flushes: IntCounterVec,
    /// The shared (Redis) counters' health and traffic.
    pub shared_counters: crate::spend::shared::SharedMetrics,
    /// Trace records by what became of them: `written`, `retried` (sent again after a
    /// failed insert), `spilled` (to the disk queue), `dropped` (queue full), `dead_letter`.
    pub trace_records: IntCounterVec,
    pub trace_queue_depth: IntGauge,
    pub trace_spill_depth: IntGauge,
    pub trace_flush: HistogramVec,
    /// Response cache lookups by result: `hit`, `miss`, `bypass`.
    pub cache_lookups: IntCounterVec,
    pub cache_bytes: IntGauge,
    pub cache_entries: IntGauge,
    /// Answers written to the cache.
    pub cache_stores: IntCounter,
    /// Entries pushed out for room (not expiries).
    pub cache_evictions: IntCounter,
    /// Webhook delivery attempts by outcome: `delivered`, `retry` (failed, tried again
    /// later), `failed` (given up).
    pub webhook_attempts: IntCounterVec,
    /// Webhook events this node observed (budget thresholds, provider health), by type.
    pub webhook_events: IntCounterVec,
    /// Store calls that failed (`get`, `put`, `embed`, `index`): the request was served
    /// uncached, or its answer not indexed.
    pub cache_errors: IntCounterVec,
    /// Semantic lookups after an exact miss, by result: `hit`, `miss`, `unindexable` (the
    /// last message is not the user's text), `error` (the embeddings call failed).
    pub cache_semantic: IntCounterVec,
    pub cache_vectors: IntGauge,
    pub cache_vector_bytes: IntGauge,
    /// Client connections open, by listener (`proxy`, `manage`).
    pub client_connections: IntGaugeVec,
    /// Client connections turned away at the listener's `max_connections`, by listener.
    pub client_connections_refused: IntCounterVec,
    /// Clients cut off for being too slow, by listener and phase: `header` (the request
    /// head did not arrive in time), `body` (nor did the body), `write` (the client stopped
    /// reading its answer).
    pub client_timeouts: IntCounterVec,
    target_healthy: GaugeVec,
    target_success_rate: GaugeVec,
    target_samples: GaugeVec,
    target_p50: GaugeVec,
    target_ewma: GaugeVec,
    target_last_sample_age: GaugeVec,
    models: DashMap<String, ()>,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("modelux_requests_total", "Proxy requests by surface, provider, model and status"),
            &["surface", "provider", "model", "status"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new("modelux_errors_total", "Requests answered with a gateway error, by error code"),
            &["surface", "code"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "modelux_request_duration_seconds",
                "Total request time as seen by the gateway",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["surface"],
        )?;
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "modelux_upstream_duration_seconds",
                "Time spent waiting on the upstream, connect to last byte",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["provider"],
        )?;
        let overhead = HistogramVec::new(
            HistogramOpts::new(
                "modelux_gateway_overhead_seconds",
                "Request time not spent waiting on the upstream",
            )
            .buckets(OVERHEAD_BUCKETS.to_vec()),
            &["surface"],
        )?;
        let ttfb = HistogramVec::new(
            HistogramOpts::new(
                "modelux_upstream_ttfb_seconds",
                "Upstream time to first byte (response headers)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["provider"],
        )?;
        let in_flight = IntGauge::new("modelux_requests_in_flight", "Proxy requests being processed")?;
        let bytes_in = IntCounterVec::new(
            Opts::new("modelux_request_bytes_total", "Request body bytes received from clients"),
            &["surface"],
        )?;
        let bytes_out = IntCounterVec::new(
            Opts::new("modelux_response_bytes_total", "Response body bytes sent to clients"),
            &["surface"],
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new("modelux_config_reloads_total", "Config reload attempts by result"),
            &["result"],
        )?;
        let config_generation =
            IntGauge::new("modelux_config_generation", "Generation of the active config snapshot")?;
        let upstream_connections_reused = IntCounter::new(
            "modelux_upstream_connections_reused_total",
            "Upstream requests sent on a pooled connection",
        )?;
        let upstream_connections_new = IntCounter::new(
            "modelux_upstream_connections_new_total",
            "Upstream requests that had to open a new connection",
        )?;
        let routing_attempts = IntCounterVec::new(
            Opts::new(
                "modelux_upstream_attempts_total",
                "Upstream attempts by provider and outcome (success, rate_limited, upstream_error, timeout, connect_error, rejected, client_error)",
            ),
            &["provider", "outcome"],
        )?;
        registry.register(Box::new(routing_attempts.clone()))?;
        let cost_usd = CounterVec::new(
            Opts::new(
                "modelux_cost_usd_total",
                "What served answers cost at the price table's rates, by provider and model",
            ),
            &["provider", "model"],
        )?;
        registry.register(Box::new(cost_usd.clone()))?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "modelux_tokens_total",
                "Tokens of served answers by provider, model and kind (input, output)",
            ),
            &["provider", "model", "kind"],
        )?;
        registry.register(Box::new(tokens.clone()))?;
        let budget_outcomes = IntCounterVec::new(
            Opts::new(
                "modelux_budget_outcomes_total",
                "Requests a budget acted on, by budget and action (warn_only, downgrade, block)",
            ),
            &["budget", "action"],
        )?;
        registry.register(Box::new(budget_outcomes.clone()))?;
        let rate_limited = IntCounterVec::new(
            Opts::new("modelux_rate_limited_total", "Requests refused by a per-key rate limit, by kind"),
            &["kind"],
        )?;
        registry.register(Box::new(rate_limited.clone()))?;
        let spend_flushes = IntCounterVec::new(
            Opts::new(
                "modelux_spend_flushes_total",
                "Writes of settled budget spend to the embedded store, by result (ok, error)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(spend_flushes.clone()))?;
        let shared_counters = crate::spend::shared::SharedMetrics {
            transitions: IntCounterVec::new(
                Opts::new(
                    "modelux_counters_transitions_total",
                    "Shared (Redis) counters becoming unreachable (to=down) or reachable again (to=up)",
                ),
                &["to"],
            )?,
            errors: IntCounterVec::new(
                Opts::new("modelux_counters_errors_total", "Shared counter calls that failed or timed out, by operation"),
                &["op"],
            )?,
            local: IntCounterVec::new(
                Opts::new(
                    "modelux_counters_local_total",
                    "Operations counted in process while Redis was out of reach (fail_open), and figures reconciled into it since",
                ),
                &["op"],
            )?,
            reachable: IntGauge::new("modelux_counters_reachable", "1 while the shared (Redis) counters answer")?,
            round_trips: IntCounterVec::new(
                Opts::new("modelux_counters_round_trips_total", "Round trips to the shared counters' Redis, by operation"),
                &["op"],
            )?,
            wait: prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "modelux_counters_wait_seconds",
                    "How long a request waited on the shared counters for a rate-limit take or a reservation (the latency Redis adds before its upstream call)",
                )
                .buckets(vec![
                    0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 0.25, 1.0,
                ]),
            )?,
        };
        registry.register(Box::new(shared_counters.transitions.clone()))?;
        registry.register(Box::new(shared_counters.errors.clone()))?;
        registry.register(Box::new(shared_counters.local.clone()))?;
        registry.register(Box::new(shared_counters.reachable.clone()))?;
        registry.register(Box::new(shared_counters.round_trips.clone()))?;
        registry.register(Box::new(shared_counters.wait.clone()))?;
        let trace_records = IntCounterVec::new(
            Opts::new(
                "modelux_trace_records_total",
                "Decision trace records by result: written, retried, spilled, dropped, dead_letter",
            ),
            &["result"],
        )?;
        registry.register(Box::new(trace_records.clone()))?;
        for result in ["written", "retried", "spilled", "dropped", "dead_letter"] {
            // Present from the start, so a scrape shows 0 rather than nothing.
            trace_records.with_label_values(&[result]);
        }
        let trace_queue_depth =
            IntGauge::new("modelux_trace_queue_depth", "Trace records waiting in memory for the writer")?;
        registry.register(Box::new(trace_queue_depth.clone()))?;
        let trace_spill_depth = IntGauge::new(
            "modelux_trace_spill_records",
            "Trace records in the disk queue, waiting for the store to come back",
        )?;
        registry.register(Box::new(trace_spill_depth.clone()))?;
        let trace_flush = HistogramVec::new(
            HistogramOpts::new(
                "modelux_trace_flush_duration_seconds",
                "Time to write one batch of trace records, by store and result",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["store", "result"],
        )?;
        registry.register(Box::new(trace_flush.clone()))?;
        // Provider health, per provider/model (model "*" = the provider as a whole). Refreshed
        // from the health registry at scrape time.
        let health_gauge = |name: &str, help: &str| -> Result<GaugeVec, prometheus::Error> {
            let g = GaugeVec::new(Opts::new(name, help), &["provider", "model"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let target_healthy = health_gauge(
            "modelux_target_healthy",
            "1 when the target's circuit is closed, 0 when open (skipped)",
        )?;
        let target_success_rate =
            health_gauge("modelux_target_success_rate", "Upstream success rate over the health window")?;
        let target_samples = health_gauge("modelux_target_samples", "Attempts counted in the health window")?;
        let target_p50 = health_gauge(
            "modelux_target_latency_p50_seconds",
            "Median time to the upstream's response header over the health window",
        )?;
        let target_ewma = health_gauge(
            "modelux_target_latency_ewma_seconds",
            "Exponentially weighted moving average of time to the response header",
        )?;
        let target_last_sample_age =
            health_gauge("modelux_target_last_sample_age_seconds", "Time since the target's last attempt")?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(overhead.clone()))?;
        registry.register(Box::new(ttfb.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(bytes_in.clone()))?;
        registry.register(Box::new(bytes_out.clone()))?;
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(config_generation.clone()))?;
        registry.register(Box::new(upstream_connections_reused.clone()))?;
        registry.register(Box::new(upstream_connections_new.clone()))?;
        let cache_lookups = IntCounterVec::new(
            Opts::new("modelux_cache_lookups_total", "Response cache lookups by result (hit, miss, bypass)"),
            &["result"],
        )?;
        let cache_bytes = IntGauge::new("modelux_cache_bytes", "Bytes held by the embedded response cache")?;
        let cache_entries = IntGauge::new("modelux_cache_entries", "Entries in the embedded response cache")?;
        let cache_stores =
            IntCounter::new("modelux_cache_stores_total", "Answers written to the response cache")?;
        let cache_evictions = IntCounter::new(
            "modelux_cache_evictions_total",
            "Cache entries evicted for room (not expiries)",
        )?;
        registry.register(Box::new(cache_lookups.clone()))?;
        registry.register(Box::new(cache_bytes.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        registry.register(Box::new(cache_stores.clone()))?;
        registry.register(Box::new(cache_evictions.clone()))?;
        let webhook_attempts = IntCounterVec::new(
            Opts::new(
                "modelux_webhook_attempts_total",
                "Webhook delivery attempts: delivered, retry (failed, tried again later) or failed (given up)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(webhook_attempts.clone()))?;
        let webhook_events = IntCounterVec::new(
            Opts::new(
                "modelux_webhook_events_total",
                "Webhook events this node observed and wrote to the outbox (budget thresholds, provider health)",
            ),
            &["type"],
        )?;
        registry.register(Box::new(webhook_events.clone()))?;
        let cache_errors = IntCounterVec::new(
            Opts::new(
                "modelux_cache_errors_total",
                "Response cache store calls that failed (served uncached)",
            ),
            &["op"],
        )?;
        registry.register(Box::new(cache_errors.clone()))?;
        let cache_semantic = IntCounterVec::new(
            Opts::new(
                "modelux_cache_semantic_lookups_total",
                "Semantic cache lookups after an exact miss, by result (hit, miss, unindexable, error)",
            ),
            &["result"],
        )?;
        let cache_vectors = IntGauge::new("modelux_cache_vectors", "Vectors in the semantic cache index")?;
        let cache_vector_bytes =
            IntGauge::new("modelux_cache_vector_bytes", "Memory held by the semantic cache index")?;
        registry.register(Box::new(cache_semantic.clone()))?;
        registry.register(Box::new(cache_vectors.clone()))?;
        registry.register(Box::new(cache_vector_bytes.clone()))?;
        let client_connections = IntGaugeVec::new(
            Opts::new("modelux_client_connections", "Client connections open, by listener"),
            &["listener"],
        )?;
        let client_connections_refused = IntCounterVec::new(
            Opts::new(
                "modelux_client_connections_refused_total",
                "Client connections answered 503 and closed because the listener was at max_connections",
            ),
            &["listener"],
        )?;
        let client_timeouts = IntCounterVec::new(
            Opts::new(
                "modelux_client_timeouts_total",
                "Clients cut off for being too slow: the request head (header) or body (body) did not arrive in time, or the answer could not be written (write)",
            ),
            &["listener", "phase"],
        )?;
        registry.register(Box::new(client_connections.clone()))?;
        registry.register(Box::new(client_connections_refused.clone()))?;
        registry.register(Box::new(client_timeouts.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            errors,
            duration,
            upstream_duration,
            overhead,
            ttfb,
            in_flight,
            bytes_in,
            bytes_out,
            config_reloads,
            config_generation,
            upstream_connections_reused,
            upstream_connections_new,
            routing_attempts,
            cost_usd,
            tokens,
            budget_outcomes,
            rate_limited,
            spend_flushes,
            shared_counters,
            trace_records,
            trace_queue_depth,
            trace_spill_depth,
            trace_flush,
            cache_lookups,
            cache_bytes,
            cache_entries,
            cache_stores,
            cache_evictions,
            webhook_attempts,
            webhook_events,
            cache_errors,
            cache_semantic,
            cache_vectors,
            cache_vector_bytes,
            client_connections,
            client_connections_refused,
            client_timeouts,
            target_healthy,
            target_success_rate,
            target_samples,
            target_p50,
            target_ewma,
            target_last_sample_age,
            models: DashMap::new(),
        })
    }

    /// The label value for a model name: itself while fewer than `MAX_MODEL_LABELS` distinct
    /// names were seen, "other" afterwards.
    pub fn model_label<'a>(&self, model: &'a str) -> &'a str {
        if model.is_empty() {
            return "none";
        }
        if self.models.contains_key(model) {
            return model;
        }
        if self.models.len() < MAX_MODEL_LABELS {
            self.models.insert(model.to_string(), ());
            return model;
        }
        "other"
    }

    /// Copies the live health of every target that saw traffic into the health gauges.
    pub fn refresh_health(&self, health: &HealthRegistry, settings: &HealthSettings) {
        let now = now_ms();
        for (key, cell) in health.snapshot() {
            let (provider, model) = key.split_once('/').unwrap_or((key.as_str(), "*"));
            let labels = [provider, model];
            let r = cell.report(now, settings);
            self.target_healthy.with_label_values(&labels).set(if r.healthy { 1.0 } else { 0.0 });
            self.target_samples.with_label_values(&labels).set(r.samples as f64);
            if let Some(rate) = r.success_rate {
                self.target_success_rate.with_label_values(&labels).set(rate);
            }
            if let Some(p50) = r.p50_ms {
                self.target_p50.with_label_values(&labels).set(p50 / 1000.0);
            }
            if let Some(ewma) = r.ewma_ms {
                self.target_ewma.with_label_values(&labels).set(ewma / 1000.0);
            }
            if let Some(age) = r.last_sample_age_ms {
                self.target_last_sample_age.with_label_values(&labels).set(age as f64 / 1000.0);
            }
        }
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}
