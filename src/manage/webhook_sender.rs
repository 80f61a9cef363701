//! Sends webhook deliveries, and raises the events this node observes off the request path.
//!
//! Every round (each `webhooks.poll_interval_ms`, or at once when woken): the budget levels
//! and provider health the node holds are compared with what it saw last, and the events
//! they cause are written to the outbox (budget events with a dedup key, so each threshold
//! is sent once per counter and period whichever node sees it first); undispatched events
//! become deliveries; due deliveries are leased to this node and sent. A delivery is sent
//! by one node at a time (the lease); a node that dies mid-send leaves a lease that runs
//! out, and the delivery is sent again with the same id (at least once: receivers
//! deduplicate on `X-Modelux-Delivery-Id`).

use std::collections::{HashMap, HashSet};
use std::io::Read as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hmac::{Hmac, Mac as _};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{json, Value};
use sha2::Sha256;

use super::webhooks::{is_own_listener, url_problem};
use crate::config::store::ConfigStore;
use crate::config::{Snapshot, WebhookSettings};
use crate::metrics::Metrics;
use crate::spend::counters::{to_usd, Counters};
use crate::spend::period::iso8601;
use crate::state::secrets::MasterKey;
use crate::state::webhooks::{Attempt, AttemptResult, Delivery, Event};
use crate::state::{Kind, StateStore};

/// Deliveries sent at once by one node. Few: each send holds a blocking thread, and
/// every new thread costs its own allocator heap.
const BATCH: usize = 4;
/// Batches sent back to back in one round while more are due.
const BATCHES_PER_ROUND: usize = 25;
/// Events dispatched per store call.
const DISPATCH_BATCH: usize = 100;
/// A lease outlives the attempt's timeout by up to this much (a clock step, a slow store
/// write); a node that died mid-send holds its deliveries no longer than that.
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// Bytes of a receiver's answer kept with the attempt.
const EXCERPT: usize = 1024;

pub struct WebhookSender {
    pub store: Arc<ConfigStore>,
    pub state: Arc<dyn StateStore>,
    pub counters: Arc<dyn Counters>,
    pub master: Arc<MasterKey>,
    pub metrics: Arc<Metrics>,
    pub node: Arc<str>,
    pub wake: Arc<tokio::sync::Notify>,
    observed: Mutex<Observed>,
    /// One client for every attempt (its connections and buffers reused).
    agent: ureq::Agent,
}

/// What this node saw last, so only changes raise events.
#[derive(Default)]
struct Observed {
    /// Health cell → (healthy, transitions).
    health: HashMap<String, (bool, u64)>,
    /// Dedup keys of budget events written (or found written) this process, by period start.
    budget: HashSet<(i64, String)>,
    /// Events the store could not take yet: written next round, never dropped.
    unsaved: Vec<Event>,
}

impl WebhookSender {
    pub fn new(
        store: Arc<ConfigStore>,
        state: Arc<dyn StateStore>,
        counters: Arc<dyn Counters>,
        master: Arc<MasterKey>,
        metrics: Arc<Metrics>,
        node: Arc<str>,
        wake: Arc<tokio::sync::Notify>,
    ) -> WebhookSender {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .max_redirects(0)
            .user_agent(concat!("modelux-webhooks/", env!("CARGO_PKG_VERSION")))
            .build();
        let agent = ureq::Agent::with_parts(
            config,
            ureq::unversioned::transport::DefaultConnector::new(),
            Guarded { store: store.clone(), inner: ureq::unversioned::resolver::DefaultResolver::default() },
        );
        WebhookSender {
            store,
            state,
            counters,
            master,
            metrics,
            node,
            wake,
            observed: Mutex::default(),
            agent,
        }
    }

    /// One round: observe, write, dispatch, send what is due.
    pub async fn round(&self) {
        let snapshot = self.store.load();
        let settings = &snapshot.settings.webhooks;
        let now = crate::manage::api::now_ms();
        let events = {
            let mut seen = self.observed.lock().unwrap_or_else(PoisonError::into_inner);
            let mut events = std::mem::take(&mut seen.unsaved);
            events.extend(self.health_events(&snapshot, &mut seen, now));
            events.extend(self.budget_events(&snapshot, &mut seen, now));
            events
        };
        if !events.is_empty() {
            if let Err(e) = self.state.enqueue_events(&events).await {
                tracing::warn!(error = %e, events = events.len(), "webhook events not written yet; retrying");
                self.observed.lock().unwrap_or_else(PoisonError::into_inner).unsaved = events;
            }
        }
        let window = settings.retry_window.as_millis() as i64;
        loop {
            match self.state.dispatch_events(now, window, DISPATCH_BATCH).await {
                Ok(n) if n == DISPATCH_BATCH => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot dispatch webhook events");
                    return;
                }
            }
        }
        for _ in 0..BATCHES_PER_ROUND {
            // The lease is taken now (not when the round began): an attempt starts only
            // while at least its whole timeout is left on it (`deliver`).
            let now = crate::manage::api::now_ms();
            let lease_until =
                now + (settings.timeout + settings.timeout.min(LEASE_MARGIN)).as_millis() as i64;
            let due = match self.state.claim_deliveries(&self.node, now, lease_until, BATCH).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read due webhook deliveries");
                    return;
                }
            };
            let claimed = due.len();
            let sends = due.into_iter().map(|d| self.deliver(d, &snapshot, lease_until));
            futures::future::join_all(sends).await;
            if claimed < BATCH {
                break;
            }
        }
    }

    /// `provider.health_changed` for each cell whose state changed since the last round (a
    /// flap in between is two events).
    fn health_events(&self, snapshot: &Snapshot, seen: &mut Observed, now: i64) -> Vec<Event> {
        let org = &snapshot.settings.webhooks.org_id;
        let health_now = crate::routing::health::now_ms();
        let mut events = Vec::new();
        for (key, cell) in snapshot.health.snapshot() {
            // States alternate from healthy, so the count alone says where the cell stands
            // (reading the state separately could pair a new state with an old count).
            let transitions = cell.transitions();
            let healthy = transitions.is_multiple_of(2);
            // A cell starts healthy with no transitions (and is listed once it has traffic).
            let (was, before) = seen.health.insert(key.clone(), (healthy, transitions)).unwrap_or((true, 0));
            if transitions == before {
                continue;
            }
            let mut states = Vec::new();
            if was == healthy {
                // Turned and back between two rounds.
                states.push(!healthy);
            }
            states.push(healthy);
            for state in states {
                events.push(self.health_event(&key, &cell, snapshot, state, health_now, now, org));
            }
        }
        events
    }

    #[allow(clippy::too_many_arguments)]
    fn health_event(
        &self,
        key: &str,
        cell: &crate::routing::health::Health,
        snapshot: &Snapshot,
        healthy: bool,
        health_now: u64,
        now: i64,
        org: &str,
    ) -> Event {
        let (provider, model) = match key.split_once('/') {
            Some((p, m)) => (p, Some(m)),
            None => (key, None),
        };
        let report = cell.report(health_now, &snapshot.health_settings);
        self.metrics.webhook_events.with_label_values(&["provider.health_changed"]).inc();
        let data = json!({
            "provider": provider,
            "model": model,
            "healthy": healthy,
            "previous_healthy": !healthy,
            "status": if healthy { "healthy" } else { "unhealthy" },
            "success_rate": report.success_rate,
            "samples": report.samples,
            "p50_ms": report.p50_ms,
            "node": &*self.node,
        });
        Event::new("provider.health_changed", org, data, now)
    }

    /// `budget.threshold_reached` and `budget.exceeded` for each counter of a current period
    /// past a threshold, once per counter, threshold and period (the dedup key holds across
    /// restarts and nodes).
    fn budget_events(&self, snapshot: &Snapshot, seen: &mut Observed, now: i64) -> Vec<Event> {
        if snapshot.budgets.is_empty() {
            return Vec::new();
        }
        let org = &snapshot.settings.webhooks.org_id;
        let by_name: HashMap<&str, &crate::spend::budgets::Budget> =
            snapshot.budgets.iter().map(|b| (&*b.name, b)).collect();
        let unix_now = now / 1000;
        let mut events = Vec::new();
        for level in self.counters.spend_levels() {
            let Some(budget) = by_name.get(level.budget.as_str()) else { continue };
            let (start, end) = budget.period.window(unix_now);
            if level.period_start != start || budget.cap == 0 {
                continue;
            }
            let used_pct = level.committed as f64 / budget.cap as f64 * 100.0;
            let mut crossed: Vec<(&str, Option<f64>)> = budget
                .alert_pcts
                .iter()
                .filter(|p| used_pct >= **p)
                .map(|p| ("budget.threshold_reached", Some(*p)))
                .collect();
            if level.committed >= budget.cap {
                crossed.push(("budget.exceeded", None));
            }
            for (event_type, pct) in crossed {
                let dedup = match pct {
                    Some(p) => format!("{event_type}:{}:{}:{start}:{p}", level.budget, level.instance),
                    None => format!("{event_type}:{}:{}:{start}", level.budget, level.instance),
                };
                if !seen.budget.insert((start, dedup.clone())) {
                    continue;
                }
                self.metrics.webhook_events.with_label_values(&[event_type]).inc();
                let data = json!({
                    "budget": {
                        "name": &*budget.name,
                        "period": budget.period.as_str(),
                        "cap_usd": budget.cap_usd,
                        "action": budget.action.as_str(),
                    },
                    "instance": if level.instance.is_empty() { Value::Null } else { json!(level.instance) },
                    "threshold_pct": pct,
                    "spend_usd": to_usd(level.committed),
                    "cap_usd": budget.cap_usd,
                    "percent_used": (used_pct * 100.0).round() / 100.0,
                    "period_starts_at": iso8601(start),
                    "period_resets_at": iso8601(end),
                });
                let mut event = Event::new(event_type, org, data, now);
                event.dedup = Some(dedup);
                events.push(event);
            }
        }
        // Keys of periods over are never needed again (no period is longer than a month).
        let cut = unix_now - 32 * 86_400;
        seen.budget.retain(|(start, _)| *start >= cut);
        events
    }

    /// One attempt of `d`, recorded with its outcome.
    async fn deliver(&self, d: Delivery, snapshot: &Snapshot, lease_until: i64) {
        let settings = snapshot.settings.webhooks.clone();
        let endpoint = self.state.get(Kind::WebhookEndpoint, &d.endpoint_id, "").await;
        let started_ms = crate::manage::api::now_ms();
        if started_ms + settings.timeout.as_millis() as i64 > lease_until {
            // Too little lease left for a whole attempt: another node may take the delivery
            // once the lease runs out; sending now could overlap with it.
            tracing::debug!(delivery = %d.id, "webhook lease too short to send; left to run out");
            return;
        }
        let prepared = match endpoint {
            Ok(Some(e)) => self.prepare(&d, &e.body, snapshot, started_ms),
            Ok(None) => Err(Refusal::Final(format!("endpoint {} no longer exists", d.endpoint_id))),
            Err(e) => Err(Refusal::Retry(format!("cannot read the endpoint: {e}"))),
        };
        let started = Instant::now();
        let (status_code, error, excerpt, final_refusal) = match prepared {
            Ok(request) => {
                let timeout = settings.timeout;
                let agent = self.agent.clone();
                match tokio::task::spawn_blocking(move || send(&agent, request, timeout)).await {
                    Ok(Ok((status, excerpt))) => (Some(i64::from(status)), None, excerpt, false),
                    Ok(Err(e)) => (None, Some(e), String::new(), false),
                    Err(e) => (None, Some(format!("send task failed: {e}")), String::new(), false),
                }
            }
            Err(Refusal::Retry(e)) => (None, Some(e), String::new(), false),
            Err(Refusal::Final(e)) => (None, Some(e), String::new(), true),
        };
        let duration_ms = started.elapsed().as_millis() as i64;
        let ok = status_code.is_some_and(|s| (200..300).contains(&s));
        let error = match (error, status_code) {
            (Some(e), _) => Some(e),
            (None, Some(s)) if !ok => Some(format!("the receiver answered {s}")),
            _ => None,
        };
        let finished = started_ms + duration_ms;
        let (status, next) = if ok {
            ("delivered", finished)
        } else {
            let since_replay = d.attempts + 1 - d.backoff_from;
            let next = finished.saturating_add(backoff(since_replay, &settings).as_millis() as i64);
            if final_refusal || next > d.deadline_ms {
                ("failed", finished)
            } else {
                ("pending", next)
            }
        };
        let outcome = match status {
            "pending" => "retry",
            s => s,
        };
        self.metrics.webhook_attempts.with_label_values(&[outcome]).inc();
        if !ok {
            tracing::info!(
                delivery = %d.id, endpoint = %d.endpoint_id, attempt = d.attempts + 1, status,
                error = error.as_deref().unwrap_or(""), "webhook delivery attempt failed"
            );
        }
        let result = AttemptResult {
            attempt: Attempt {
                n: d.attempts + 1,
                started_ms,
                duration_ms,
                status_code,
                error,
                response_excerpt: excerpt,
                node: self.node.to_string(),
            },
            status,
            next_attempt_ms: next,
        };
        match self.state.record_attempt(&d.id, &self.node, &result).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(delivery = %d.id, "webhook lease lost before the attempt was recorded")
            }
            Err(e) => tracing::warn!(delivery = %d.id, error = %e, "cannot record the webhook attempt"),
        }
    }

    /// The request for one attempt: target, body and signatures.
    fn prepare(
        &self,
        d: &Delivery,
        endpoint: &Value,
        snapshot: &Snapshot,
        now: i64,
    ) -> Result<Request, Refusal> {
        let url = endpoint["url"].as_str().unwrap_or_default().to_string();
        if let Some(problem) = url_problem(&url, snapshot) {
            return Err(Refusal::Final(format!("the endpoint URL {problem}")));
        }
        let unseal = |field: &str| -> Result<String, Refusal> {
            let sealed = endpoint[field].as_str().unwrap_or_default();
            self.master
                .decrypt(sealed)
                .map_err(|e| Refusal::Final(format!("cannot unseal the signing secret: {e}")))
        };
        let secret = unseal("secret_enc")?;
        let previous = match endpoint["previous_secret_expires_ms"].as_i64() {
            Some(until) if until > now => Some(unseal("previous_secret_enc")?),
            _ => None,
        };
        let body = if is_slack(&url) { slack_body(&d.body) } else { d.body.clone().into_bytes() };
        let signature = sign(&secret, &body);
        let previous_signature = previous.map(|p| sign(&p, &body));
        Ok(Request {
            url,
            body,
            signature,
            previous_signature,
            event_type: d.event_type.clone(),
            delivery_id: d.id.clone(),
            attempt: d.attempts + 1,
        })
    }
}

enum Refusal {
    /// Tried again later (the store was out of reach).
    Retry(String),
    /// Retrying cannot help: the delivery fails now.
    Final(String),
}

struct Request {
    url: String,
    body: Vec<u8>,
    signature: String,
    previous_signature: Option<String>,
    event_type: String,
    delivery_id: String,
    attempt: i64,
}

/// Lowercase hex HMAC-SHA256 of `body` keyed by the secret as given to the user.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return String::new() };
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The delay before attempt `n + 1` after attempt `n` failed: base × 2ⁿ⁻¹, capped.
pub fn backoff(n: i64, s: &WebhookSettings) -> Duration {
    let doublings = u32::try_from(n.saturating_sub(1)).unwrap_or(u32::MAX).min(30);
    s.backoff_base.saturating_mul(1u32 << doublings).min(s.backoff_cap)
}

/// A Slack incoming-webhook URL (they take `{"text": …}`, not our envelope).
fn is_slack(url: &str) -> bool {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(|h| h == "hooks.slack.com" || h.ends_with(".hooks.slack.com")))
        .unwrap_or(false)
}

/// The event as a Slack message: a one-line summary and the event's fields.
fn slack_body(envelope: &str) -> Vec<u8> {
    let e: Value = serde_json::from_str(envelope).unwrap_or(Value::Null);
    let data = &e["data"];
    let kind = e["type"].as_str().unwrap_or("event");
    let summary = match kind {
        "budget.threshold_reached" => format!(
            "Budget *{}* reached {}% of its ${} cap (${:.2} spent)",
            data["budget"]["name"].as_str().unwrap_or("?"),
            data["threshold_pct"],
            data["cap_usd"],
            data["spend_usd"].as_f64().unwrap_or(0.0)
        ),
        "budget.exceeded" => format!(
            "Budget *{}* is exceeded: ${:.2} of ${}",
            data["budget"]["name"].as_str().unwrap_or("?"),
            data["spend_usd"].as_f64().unwrap_or(0.0),
            data["cap_usd"]
        ),
        "provider.health_changed" => format!(
            "Provider *{}*{} is now {}",
            data["provider"].as_str().unwrap_or("?"),
            data["model"].as_str().map(|m| format!(" ({m})")).unwrap_or_default(),
            data["status"].as_str().unwrap_or("?")
        ),
        _ => format!("modelux event *{kind}*"),
    };
    let text = format!("{summary}\n```{}```", serde_json::to_string_pretty(data).unwrap_or_default());
    json!({
        "text": text,
        "blocks": [{ "type": "section", "text": { "type": "mrkdwn", "text": text } }],
    })
    .to_string()
    .into_bytes()
}

/// POSTs one attempt: never through an environment proxy, never following a redirect,
/// never to this gateway's own listeners. The receiver's status and the first bytes of
/// its answer, or why there was none.
fn send(agent: &ureq::Agent, r: Request, timeout: Duration) -> Result<(u16, String), String> {
    let timestamp = crate::spend::unix_now().to_string();
    let mut req = agent
        .post(&r.url)
        .config()
        .timeout_global(Some(timeout))
        .build()
        .header("content-type", "application/json")
        .header("x-modelux-signature", &r.signature)
        .header("x-modelux-event", &r.event_type)
        .header("x-modelux-delivery-id", &r.delivery_id)
        .header("x-modelux-timestamp", &timestamp)
        .header("x-modelux-attempt", r.attempt.to_string());
    if let Some(previous) = &r.previous_signature {
        req = req.header("x-modelux-signature-previous", previous);
    }
    let mut resp = req.send(&r.body[..]).map_err(|e| match e {
        ureq::Error::Other(inner) => inner.to_string(),
        e => e.to_string(),
    })?;
    let status = resp.status().as_u16();
    let mut excerpt = Vec::with_capacity(EXCERPT);
    // A receiver that answers and then stalls its body does not hold the attempt: the
    // status is what counts, the excerpt is best effort within the same timeout.
    let _ = resp.body_mut().as_reader().take(EXCERPT as u64).read_to_end(&mut excerpt);
    Ok((status, String::from_utf8_lossy(&excerpt).into_owned()))
}

const OWN_LISTENER: &str = "refused: the URL resolves to this gateway's own listener";

/// Resolves once, within the attempt's timeout, and refuses addresses of this gateway's own
/// listeners: the addresses checked are the ones connected to (no second lookup a
/// rebinding name could answer differently).
struct Guarded {
    store: Arc<ConfigStore>,
    inner: ureq::unversioned::resolver::DefaultResolver,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Guarded")
    }
}

impl ureq::unversioned::resolver::Resolver for Guarded {
    fn resolve(
        &self,
        uri: &http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let addrs = self.inner.resolve(uri, config, timeout)?;
        let snapshot = self.store.load();
        if addrs.iter().any(|a| is_own_listener(*a, &snapshot)) {
            return Err(ureq::Error::Other(OWN_LISTENER.into()));
        }
        Ok(addrs)
    }
}

/// How often finished deliveries past their retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Lowers the calling thread to nice 10; threads it starts later (the blocking pool's, where
/// sends and store calls run) inherit it. Deliveries then take a small share of a core the
/// proxy is busy on instead of an equal one, yet still go out under sustained load (an idle
/// scheduling class would hold budget alerts back exactly when traffic peaks). Best effort.
fn lower_priority() {
    // SAFETY: acts on the calling thread (its own tid) only.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
    }
}

#[async_trait]
impl BackgroundService for WebhookSender {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        lower_priority();
        let mut pruned: Option<Instant> = None;
        loop {
            if pruned.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                pruned = Some(Instant::now());
                let retention = self.store.load().settings.webhooks.retention.as_millis() as i64;
                match self.state.prune_webhooks(crate::manage::api::now_ms() - retention).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deliveries = n, "old webhook deliveries deleted"),
                    Err(e) => tracing::warn!(error = %e, "cannot prune webhook deliveries"),
                }
            }
            let interval = self.store.load().settings.webhooks.poll_interval;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => break,
            }
            self.round().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap() {
        let s = WebhookSettings::default();
        let secs: Vec<u64> = (1..=9).map(|n| backoff(n, &s).as_secs()).collect();
        assert_eq!(secs, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(backoff(1_000, &s).as_secs(), 3600);
    }

    #[test]
    fn signature_is_lowercase_hex_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn slack_urls_get_a_text_message() {
        assert!(is_slack("https://hooks.slack.com/services/T0/B0/x"));
        assert!(!is_slack("https://hooks.example/slack"));
        let e = Event::new(
            "budget.exceeded",
            "o",
            json!({"budget": {"name": "b"}, "spend_usd": 2.5, "cap_usd": 2}),
            0,
        );
        let v: Value = serde_json::from_slice(&slack_body(&e.body)).unwrap();
        assert!(v["text"].as_str().unwrap().starts_with("Budget *b* is exceeded: $2.50 of $2"));
    }
}
