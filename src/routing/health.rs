//! Live health per provider and per provider/model: a rolling success rate and latency
//! (p50 from a log-bucketed histogram, plus an EWMA) over a time window, and a circuit
//! breaker: closed (healthy) → open (skipped by health-aware strategies) → half-open (one
//! real request every `probe_after` is let through as a probe; success closes it).
//!
//! Recording takes a per-target mutex (once per upstream attempt, off the decision path);
//! decisions only read atomics the recorder publishes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Thresholds and window (config `health:`; defaults from PRODUCT.md §9.3).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSettings {
    pub window: Duration,
    /// Below this success rate (0–1), with at least `min_requests` samples, a target opens.
    pub min_success_rate: f64,
    pub min_requests: u32,
    /// This many failures in a row open a target regardless of the rate.
    pub consecutive_failures: u32,
    /// How long an open target is skipped before a probe request is let through.
    pub probe_after: Duration,
    /// Weight of the newest sample in the latency EWMA.
    pub ewma_alpha: f64,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            window: Duration::from_secs(300),
            min_success_rate: 0.9,
            min_requests: 20,
            consecutive_failures: 5,
            probe_after: Duration::from_secs(30),
            ewma_alpha: 0.2,
        }
    }
}

/// What one upstream attempt did, as far as the provider's health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    Success,
    /// 429, 5xx, timeouts, connection failures.
    Failure,
}

/// Milliseconds since the first call in this process: a monotonic clock atomics can hold.
pub fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    // +1 so that 0 can mean "never".
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

const SLOTS: usize = 12;
/// Quarter-octave latency buckets over microseconds: bucket b holds [2^(b/4), 2^((b+1)/4)) µs,
/// 108 buckets reach 2^27 µs ≈ 134 s; p50 is accurate to about ±9%.
const LAT_BUCKETS: usize = 108;

#[derive(Clone, Debug)]
struct Slot {
    /// Which slot-length interval this slot holds; stale slots are ignored and reused.
    epoch: u64,
    ok: u32,
    fail: u32,
    latency: [u32; LAT_BUCKETS],
}

impl Slot {
    fn empty() -> Slot {
        Slot { epoch: u64::MAX, ok: 0, fail: 0, latency: [0; LAT_BUCKETS] }
    }
}

#[derive(Debug)]
struct Window {
    slots: Vec<Slot>,
    /// Sum of the live slots, kept up to date as slots are filled and retired, so a
    /// record costs one histogram scan instead of re-adding every slot.
    ok: u64,
    fail: u64,
    latency: Vec<u64>,
    consecutive_failures: u32,
    ewma_us: f64,
}

impl Window {
    /// Takes slots older than `oldest` out of the running sums.
    fn retire(&mut self, oldest: u64) {
        for slot in self.slots.iter_mut() {
            if slot.epoch != u64::MAX && slot.epoch < oldest {
                self.ok -= slot.ok as u64;
                self.fail -= slot.fail as u64;
                for (sum, c) in self.latency.iter_mut().zip(slot.latency.iter()) {
                    *sum -= *c as u64;
                }
                *slot = Slot::empty();
            }
        }
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const UNKNOWN: u64 = 0;

/// Health of one target (a provider/model pair) or of a whole provider.
#[derive(Debug)]
pub struct Health {
    pub key: String,
    window: Mutex<Window>,
    state: AtomicU8,
    opened_at_ms: AtomicU64,
    last_probe_ms: AtomicU64,
    /// Published by the recorder; 0 = unknown.
    p50_us: AtomicU64,
    ewma_us: AtomicU64,
    /// Success rate in parts per million over the window; u32::MAX = no samples.
    success_ppm: AtomicU32,
    samples: AtomicU32,
    last_sample_ms: AtomicU64,
    total_samples: AtomicU64,
    total_failures: AtomicU64,
    /// Opens plus closes so far: a reader polling now and then sees a flap it missed.
    transitions: AtomicU64,
}

/// What a decision sees of a target right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// Open and not due for a probe: skip it.
    Unhealthy,
    /// Open, due for a probe, and this request holds the probe lease.
    Probe,
}

/// A point-in-time copy of a target's health, for traces, metrics and the management API.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthReport {
    pub healthy: bool,
    pub success_rate: Option<f64>,
    pub samples: u32,
    pub p50_ms: Option<f64>,
    pub ewma_ms: Option<f64>,
    /// Milliseconds since the last sample.
    pub last_sample_age_ms: Option<u64>,
}

fn bucket_of(us: u64) -> usize {
    if us <= 1 {
        return 0;
    }
    let b = ((us as f64).log2() * 4.0) as usize;
    b.min(LAT_BUCKETS - 1)
}

/// Geometric middle of a bucket, in microseconds.
fn bucket_mid_us(b: usize) -> f64 {
    2f64.powf((b as f64 + 0.5) / 4.0)
}

impl Health {
    pub fn new(key: impl Into<String>) -> Health {
        Health {
            key: key.into(),
            window: Mutex::new(Window {
                slots: vec![Slot::empty(); SLOTS],
                ok: 0,
                fail: 0,
                latency: vec![0; LAT_BUCKETS],
                consecutive_failures: 0,
                ewma_us: 0.0,
            }),
            state: AtomicU8::new(CLOSED),
            opened_at_ms: AtomicU64::new(0),
            last_probe_ms: AtomicU64::new(0),
            p50_us: AtomicU64::new(UNKNOWN),
            ewma_us: AtomicU64::new(UNKNOWN),
            success_ppm: AtomicU32::new(u32::MAX),
            samples: AtomicU32::new(0),
            last_sample_ms: AtomicU64::new(0),
            total_samples: AtomicU64::new(0),
            total_failures: AtomicU64::new(0),
            transitions: AtomicU64::new(0),
        }
    }

    /// Records one attempt. `latency` is the time to the upstream's response header (or to
    /// the failure); failures add no latency sample (a fast error is not a fast provider).
    pub fn record(&self, sample: Sample, latency: Duration, now: u64, s: &HealthSettings) {
        let slot_ms = (s.window.as_millis() as u64 / SLOTS as u64).max(1);
        let epoch = now / slot_ms;
        let Ok(mut w) = self.window.lock() else { return };
        let idx = (epoch % SLOTS as u64) as usize;
        w.retire(epoch.saturating_sub(SLOTS as u64 - 1));
        if w.slots[idx].epoch != epoch {
            w.slots[idx] = Slot::empty();
            w.slots[idx].epoch = epoch;
        }
        self.total_samples.fetch_add(1, Ordering::Relaxed);
        match sample {
            Sample::Success => {
                let us = latency.as_micros() as u64;
                let b = bucket_of(us);
                w.slots[idx].ok += 1;
                w.slots[idx].latency[b] += 1;
                w.ok += 1;
                w.latency[b] += 1;
                w.consecutive_failures = 0;
                w.ewma_us = if w.ewma_us == 0.0 {
                    us as f64
                } else {
                    w.ewma_us + s.ewma_alpha * (us as f64 - w.ewma_us)
                };
                let half_open = now.saturating_sub(self.opened_at_ms.load(Ordering::Relaxed))
                    >= s.probe_after.as_millis() as u64;
                if self.state.load(Ordering::Acquire) == OPEN && half_open {
                    // Recovered (the probe answered; a success from a request that started
                    // before the target opened does not count): start the rate over so old
                    // failures cannot reopen it at once.
                    for slot in w.slots.iter_mut() {
                        slot.ok = 0;
                        slot.fail = 0;
                    }
                    w.slots[idx].ok = 1;
                    w.ok = 1;
                    w.fail = 0;
                    self.state.store(CLOSED, Ordering::Release);
                    self.transitions.fetch_add(1, Ordering::Relaxed);
                }
            }
            Sample::Failure => {
                self.total_failures.fetch_add(1, Ordering::Relaxed);
                w.slots[idx].fail += 1;
                w.fail += 1;
                w.consecutive_failures += 1;
            }
        }
        let (ok, fail) = (w.ok, w.fail);
        let hist = &w.latency;
        let total = ok + fail;
        let rate = if total == 0 { None } else { Some(ok as f64 / total as f64) };
        let lat_total: u64 = hist.iter().sum();
        if lat_total > 0 {
            let half = lat_total.div_ceil(2);
            let mut seen = 0;
            for (b, c) in hist.iter().enumerate() {
                seen += c;
                if seen >= half {
                    self.p50_us.store(bucket_mid_us(b).round().max(1.0) as u64, Ordering::Relaxed);
                    break;
                }
            }
        }
        self.ewma_us.store(w.ewma_us.round() as u64, Ordering::Relaxed);
        self.success_ppm.store(rate.map_or(u32::MAX, |r| (r * 1e6) as u32), Ordering::Relaxed);
        self.samples.store(total.min(u32::MAX as u64) as u32, Ordering::Relaxed);
        self.last_sample_ms.store(now, Ordering::Relaxed);
        if sample == Sample::Failure {
            let rate_low = total >= s.min_requests as u64 && rate.is_some_and(|r| r < s.min_success_rate);
            let streak = w.consecutive_failures >= s.consecutive_failures;
            match self.state.load(Ordering::Acquire) {
                CLOSED if rate_low || streak => {
                    self.opened_at_ms.store(now, Ordering::Relaxed);
                    self.state.store(OPEN, Ordering::Release);
                    self.transitions.fetch_add(1, Ordering::Relaxed);
                }
                // A failed probe: stay open for another full interval.
                OPEN => self.opened_at_ms.store(now, Ordering::Relaxed),
                _ => {}
            }
        }
    }

    /// Whether a decision may use this target now. With `lease`, takes the probe lease when
    /// the target is open and due: only one request per `probe_after` interval gets it.
    /// Without (dry runs), reports `Probe` without taking it.
    pub fn verdict(&self, now: u64, s: &HealthSettings, lease: bool) -> Verdict {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Verdict::Healthy;
        }
        let probe_ms = s.probe_after.as_millis() as u64;
        if now.saturating_sub(self.opened_at_ms.load(Ordering::Relaxed)) < probe_ms {
            return Verdict::Unhealthy;
        }
        let last = self.last_probe_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= probe_ms && !lease {
            return Verdict::Probe;
        }
        if now.saturating_sub(last) >= probe_ms
            && self.last_probe_ms.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            return Verdict::Probe;
        }
        Verdict::Unhealthy
    }

    /// Gives back a probe lease this target's verdict handed out, for a request that was
    /// answered without calling it (a cache hit): the next request may probe at once.
    pub fn return_probe(&self, now: u64, s: &HealthSettings) {
        if self.state.load(Ordering::Acquire) != CLOSED {
            let probe_ms = s.probe_after.as_millis() as u64;
            self.last_probe_ms.store(now.saturating_sub(probe_ms), Ordering::Relaxed);
        }
    }

    /// Healthy right now, without taking a probe lease.
    pub fn is_healthy(&self) -> bool {
        self.state.load(Ordering::Acquire) == CLOSED
    }

    /// Live median latency in milliseconds; `None` without a success in the window.
    pub fn p50_ms(&self, now: u64, s: &HealthSettings) -> Option<f64> {
        let last = self.last_sample_ms.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) > s.window.as_millis() as u64 {
            return None;
        }
        match self.p50_us.load(Ordering::Relaxed) {
            UNKNOWN => None,
            us => Some(us as f64 / 1000.0),
        }
    }

    pub fn success_rate(&self, now: u64, s: &HealthSettings) -> Option<f64> {
        let last = self.last_sample_ms.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) > s.window.as_millis() as u64 {
            return None;
        }
        match self.success_ppm.load(Ordering::Relaxed) {
            u32::MAX => None,
            ppm => Some(ppm as f64 / 1e6),
        }
    }

    pub fn report(&self, now: u64, s: &HealthSettings) -> HealthReport {
        let last = self.last_sample_ms.load(Ordering::Relaxed);
        let fresh = last != 0 && now.saturating_sub(last) <= s.window.as_millis() as u64;
        HealthReport {
            healthy: self.is_healthy(),
            success_rate: self.success_rate(now, s),
            samples: if fresh { self.samples.load(Ordering::Relaxed) } else { 0 },
            p50_ms: self.p50_ms(now, s),
            ewma_ms: match self.ewma_us.load(Ordering::Relaxed) {
                UNKNOWN => None,
                us => Some(us as f64 / 1000.0),
            },
            last_sample_age_ms: (last != 0).then(|| now.saturating_sub(last)),
        }
    }

    /// How many times the target opened or closed so far.
    pub fn transitions(&self) -> u64 {
        self.transitions.load(Ordering::Relaxed)
    }

    pub fn totals(&self) -> (u64, u64) {
        (self.total_samples.load(Ordering::Relaxed), self.total_failures.load(Ordering::Relaxed))
    }
}

/// Most direct-traffic targets tracked; config targets are always tracked. Bounds memory
/// when clients send many distinct model names.
const MAX_CELLS: usize = 4096;

/// All health cells, kept across config reloads so a reload does not forget that a
/// provider is down. Keys: `provider` for a provider, `provider/model` for a target.
#[derive(Default, Debug)]
pub struct HealthRegistry {
    cells: DashMap<String, Arc<Health>>,
}

impl HealthRegistry {
    /// The cell for `key`, created if needed (config load time: always created).
    pub fn cell(&self, key: &str) -> Arc<Health> {
        if let Some(c) = self.cells.get(key) {
            return c.clone();
        }
        self.cells.entry(key.to_string()).or_insert_with(|| Arc::new(Health::new(key))).clone()
    }

    /// The cell for direct traffic: `None` once the registry is full.
    pub fn cell_for_traffic(&self, provider: &str, model: &str) -> Option<Arc<Health>> {
        let key = format!("{provider}/{model}");
        if let Some(c) = self.cells.get(&key) {
            return Some(c.clone());
        }
        if self.cells.len() >= MAX_CELLS {
            return None;
        }
        Some(self.cells.entry(key.clone()).or_insert_with(|| Arc::new(Health::new(key))).clone())
    }

    pub fn get(&self, key: &str) -> Option<Arc<Health>> {
        self.cells.get(key).map(|c| c.clone())
    }

    /// Every cell that has seen traffic, sorted by key.
    pub fn snapshot(&self) -> BTreeMap<String, Arc<Health>> {
        self.cells
            .iter()
            .filter(|e| e.value().totals().0 > 0)
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> HealthSettings {
        HealthSettings {
            window: Duration::from_secs(60),
            min_success_rate: 0.9,
            min_requests: 20,
            consecutive_failures: 5,
            probe_after: Duration::from_millis(1000),
            ewma_alpha: 0.5,
        }
    }

    #[test]
    fn five_failures_in_a_row_open_then_a_probe_closes() {
        let s = settings();
        let h = Health::new("p/m");
        let t = 10_000;
        for i in 0..4 {
            h.record(Sample::Failure, Duration::ZERO, t + i, &s);
            assert_eq!(h.verdict(t + i, &s, true), Verdict::Healthy);
        }
        h.record(Sample::Failure, Duration::ZERO, t + 4, &s);
        assert_eq!(h.verdict(t + 5, &s, true), Verdict::Unhealthy);
        assert_eq!(h.verdict(t + 900, &s, true), Verdict::Unhealthy);
        // Due: exactly one request gets the probe lease.
        assert_eq!(h.verdict(t + 1004, &s, true), Verdict::Probe);
        assert_eq!(h.verdict(t + 1005, &s, true), Verdict::Unhealthy);
        // A lease given back (its request was a cache hit): the next request probes.
        h.return_probe(t + 1005, &s);
        assert_eq!(h.verdict(t + 1006, &s, true), Verdict::Probe);
        assert_eq!(h.verdict(t + 1007, &s, true), Verdict::Unhealthy);
        // The probe fails: another full interval.
        h.record(Sample::Failure, Duration::ZERO, t + 1010, &s);
        assert_eq!(h.verdict(t + 1500, &s, true), Verdict::Unhealthy);
        assert_eq!(h.verdict(t + 2010, &s, true), Verdict::Probe);
        h.record(Sample::Success, Duration::from_millis(5), t + 2020, &s);
        assert_eq!(h.verdict(t + 2021, &s, true), Verdict::Healthy);
        // Old failures were forgotten on recovery: one more failure does not reopen.
        h.record(Sample::Failure, Duration::ZERO, t + 2030, &s);
        assert_eq!(h.verdict(t + 2031, &s, true), Verdict::Healthy);
    }

    #[test]
    fn low_success_rate_opens_only_with_enough_samples() {
        let s = settings();
        let h = Health::new("p/m");
        let t = 5_000;
        // 8 ok, 2 failed (80%) but only 10 samples: still healthy.
        for i in 0..8 {
            h.record(Sample::Success, Duration::from_millis(10), t + i, &s);
        }
        for i in 0..2 {
            h.record(Sample::Failure, Duration::ZERO, t + 10 + i, &s);
        }
        assert!(h.is_healthy());
        for i in 0..8 {
            h.record(Sample::Success, Duration::from_millis(10), t + 20 + i, &s);
            h.record(Sample::Failure, Duration::ZERO, t + 30 + i, &s);
        }
        assert!(!h.is_healthy(), "{:?}", h.report(t + 40, &s));
    }

    #[test]
    fn p50_and_ewma_follow_latency_and_expire_with_the_window() {
        let s = settings();
        let h = Health::new("p/m");
        let t = 1_000;
        for i in 0..9 {
            h.record(Sample::Success, Duration::from_millis(100), t + i, &s);
        }
        h.record(Sample::Success, Duration::from_millis(5000), t + 10, &s);
        let p50 = h.p50_ms(t + 11, &s).unwrap_or_default();
        assert!((91.0..=110.0).contains(&p50), "p50 {p50}");
        let r = h.report(t + 11, &s);
        assert_eq!(r.samples, 10);
        assert_eq!(r.success_rate, Some(1.0));
        assert!(r.ewma_ms.unwrap_or_default() > 100.0);
        // A minute later without samples the numbers are unknown again.
        assert_eq!(h.p50_ms(t + 61_000, &s), None);
        assert_eq!(h.success_rate(t + 61_000, &s), None);
    }

    #[test]
    fn old_slots_leave_the_window() {
        let s = settings();
        let h = Health::new("p/m");
        for i in 0..10 {
            h.record(Sample::Success, Duration::from_millis(1), 100 + i, &s);
        }
        // Two windows later, one failure: the old successes no longer count.
        h.record(Sample::Failure, Duration::ZERO, 130_000, &s);
        assert_eq!(h.report(130_000, &s).samples, 1);
        assert_eq!(h.success_rate(130_000, &s), Some(0.0));
    }
}
