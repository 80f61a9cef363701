//! Spend and rate counters behind one small trait. `LocalCounters` keeps them in this
//! process (atomics in concurrent maps); a shared backend for several gateway nodes
//! implements the same trait, and the request path does not change.

use std::borrow::Borrow;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use dashmap::DashMap;

/// Money in nano-USD: integer, so reservations and settlements add up exactly and fit
/// one atomic. i64 holds over nine billion dollars.
pub type Nanos = i64;

pub fn to_nanos(usd: f64) -> Nanos {
    (usd * 1e9).round() as Nanos
}

pub fn to_usd(n: Nanos) -> f64 {
    n as f64 / 1e9
}

/// One counter of one budget: the budget, which instance of it (an end user, a tag value,
/// or "" for a budget with a fixed selector) and the start of the period (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpendKey<'a> {
    pub budget: &'a str,
    pub instance: &'a str,
    pub period_start: i64,
}

/// Spend of one counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpendLevel {
    /// Settled spend.
    pub committed: Nanos,
    /// Settled spend plus the reservations of requests still in flight.
    pub used: Nanos,
}

/// Which per-key rate a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKind {
    Requests,
    Tokens,
}

impl RateKind {
    pub fn unit(self) -> &'static str {
        match self {
            RateKind::Requests => "requests",
            RateKind::Tokens => "tokens",
        }
    }
}

/// The answer of a rate limiter for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateVerdict {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// Until the limiter is back to its full allowance.
    pub reset_us: u64,
    /// Until this request would be allowed (0 when allowed; `u64::MAX` when it never
    /// will be, because it alone exceeds the per-minute limit).
    pub retry_after_us: u64,
}

/// One spend counter, found once per request and then used without another lookup.
pub trait SpendCounter: Send + Sync {
    fn level(&self) -> SpendLevel;
    /// Adds `amount` to the in-flight spend, unless the counter is already at or above
    /// `cap` (then `Err` with the level that refused it). Check and add are one atomic step.
    fn reserve(&self, amount: Nanos, cap: Option<Nanos>) -> Result<SpendLevel, SpendLevel>;
    /// Replaces a reservation by the actual cost (`actual` 0: the request cost nothing).
    fn settle(&self, reserved: Nanos, actual: Nanos);
}

/// A shared counter backend could not be reached (or answered nonsense): what the request
/// gets then is `spend.on_counter_error`'s choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountersDown(pub String);

/// A counters call: ready at once for counters of this process, or a round trip to a
/// shared backend. No allocation on the ready path.
pub enum Pending<'a, T> {
    Ready(Option<T>),
    Remote(Pin<Box<dyn Future<Output = T> + Send + 'a>>),
}

impl<T> Pending<'_, T> {
    pub fn ready(value: T) -> Self {
        Pending::Ready(Some(value))
    }
}

impl<T: Unpin> Future for Pending<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.get_mut() {
            // Polled again after it answered: a caller bug, answered by never finishing
            // rather than a panic on the request path.
            Pending::Ready(v) => v.take().map_or(Poll::Pending, Poll::Ready),
            Pending::Remote(f) => f.as_mut().poll(cx),
        }
    }
}

/// One budget counter a reservation takes from, with the cap it must stay under.
pub struct ReserveItem<'k> {
    pub key: SpendKey<'k>,
    /// `Some`: refuse once settled spend plus reservations reach it.
    pub cap: Option<Nanos>,
    /// The budget decides something about the request (blocks or downgrades it), rather
    /// than only counting: shared counters out of reach under `fail_closed` refuse it.
    pub enforced: bool,
    /// The counter, when the caller already holds it (saves a lookup).
    pub counter: Option<Arc<dyn SpendCounter>>,
    /// End of the counter's period (Unix seconds): a shared backend expires it after.
    pub period_end: i64,
}

/// Amounts held on a request's budget counters until it settles.
pub trait Hold: Send + Sync {
    /// Replaces the `reserved` amount by `actual` on every counter of the hold.
    fn settle(&self, reserved: Nanos, actual: Nanos);
}

/// Holds on counters of this process.
struct LocalHold(Vec<Arc<dyn SpendCounter>>);

impl Hold for LocalHold {
    fn settle(&self, reserved: Nanos, actual: Nanos) {
        for c in &self.0 {
            c.settle(reserved, actual);
        }
    }
}

/// A reservation's answer: the hold, or the index of the item that refused and its level.
pub type Reserved = Result<Box<dyn Hold>, (usize, SpendLevel)>;

/// A rate-limit take held back to go with the request's reservation (`take_and_reserve`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Take {
    pub kind: RateKind,
    pub key: Arc<str>,
    pub per_minute: u64,
    pub cost: u64,
}

/// Each take's verdict, in order, up to the first refusal; then the reservation, made only
/// when every take was allowed.
pub type TakenAndReserved = (Vec<RateVerdict>, Option<Reserved>);

/// Reserves on each item in turn through its `SpendCounter`; on a refusal the holds already
/// taken are released. Atomic per counter, not across them: enough within one process.
pub fn reserve_each(counters: &dyn Counters, items: &[ReserveItem<'_>], amount: Nanos) -> Reserved {
    let mut holds: Vec<Arc<dyn SpendCounter>> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let counter = match &item.counter {
            Some(c) => c.clone(),
            None => counters.spend_counter(&item.key),
        };
        match counter.reserve(amount, item.cap) {
            Ok(_) => holds.push(counter),
            Err(level) => {
                for h in &holds {
                    h.settle(amount, 0);
                }
                return Err((i, level));
            }
        }
    }
    Ok(Box::new(LocalHold(holds)))
}

/// Where the counters live and whether they can be reached, for health and the README's
/// failure policy (`spend.on_counter_error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountersStatus {
    pub backend: &'static str,
    pub reachable: bool,
    pub on_error: Option<&'static str>,
}

/// Where counters live. The sync methods are non-blocking and cheap (a shared backend
/// answers them from this node's view of the shared counters); the `Pending` ones are where
/// a shared backend makes its one round trip.
pub trait Counters: Send + Sync {
    /// The counter of `key`, created at zero if it does not exist yet.
    fn spend_counter(&self, key: &SpendKey<'_>) -> Arc<dyn SpendCounter>;

    /// The counter of `key` if it exists (no counter: nothing was spent).
    fn find_spend_counter(&self, key: &SpendKey<'_>) -> Option<Arc<dyn SpendCounter>>;

    fn spend(&self, key: &SpendKey<'_>) -> SpendLevel {
        self.spend_counter(key).level()
    }

    fn reserve(
        &self,
        key: &SpendKey<'_>,
        amount: Nanos,
        cap: Option<Nanos>,
    ) -> Result<SpendLevel, SpendLevel> {
        self.spend_counter(key).reserve(amount, cap)
    }

    fn settle(&self, key: &SpendKey<'_>, reserved: Nanos, actual: Nanos) {
        self.spend_counter(key).settle(reserved, actual)
    }

    /// Takes `cost` units from a per-minute allowance of `per_minute` (GCRA: the allowance
    /// refills continuously, and a full minute's worth may be used in a burst).
    fn take(&self, kind: RateKind, key: &str, per_minute: u64, cost: u64, now_us: u64) -> RateVerdict;
    /// Corrects an earlier `take` once the real cost is known (`delta` may be negative).
    fn adjust(&self, kind: RateKind, key: &str, per_minute: u64, delta: i64);

    /// `take`, where the limiter is shared: `Err` when it cannot be reached and the
    /// failure policy is to refuse.
    fn take_shared(
        &self,
        kind: RateKind,
        key: &str,
        per_minute: u64,
        cost: u64,
        now_us: u64,
    ) -> Pending<'_, Result<RateVerdict, CountersDown>> {
        Pending::ready(Ok(self.take(kind, key, per_minute, cost, now_us)))
    }

    /// Reserves `amount` on every item, refusing (and holding nothing) if any item's cap is
    /// reached. `Err` when a shared backend cannot be reached and the policy is to refuse.
    fn reserve_all<'a>(
        &'a self,
        items: &'a [ReserveItem<'a>],
        amount: Nanos,
    ) -> Pending<'a, Result<Reserved, CountersDown>>;

    /// Whether rate-limit takes are worth holding back to go with the reservation: true
    /// where each call is a round trip (shared counters), so a request makes one, not two.
    fn combines_takes(&self) -> bool {
        false
    }

    /// `takes` in order, stopping at the first refusal; then, only if every one allowed,
    /// `reserve_all`. The same answers as those calls one after the other; shared counters
    /// make it one atomic round trip.
    fn take_and_reserve<'a>(
        &'a self,
        takes: &'a [Take],
        items: &'a [ReserveItem<'a>],
        amount: Nanos,
    ) -> Pending<'a, Result<TakenAndReserved, CountersDown>> {
        Pending::Remote(Box::pin(async move {
            let mut verdicts = Vec::with_capacity(takes.len());
            for t in takes {
                let now_us = crate::spend::unix_now_us();
                let verdict = self.take_shared(t.kind, &t.key, t.per_minute, t.cost, now_us).await?;
                verdicts.push(verdict);
                if !verdict.allowed {
                    return Ok((verdicts, None));
                }
            }
            let held = self.reserve_all(items, amount).await?;
            Ok((verdicts, Some(held)))
        }))
    }

    /// Adds spent `amount` to each key without a cap check (money already spent).
    fn charge(&self, keys: &[ReserveItem<'_>], amount: Nanos) {
        for item in keys {
            match &item.counter {
                Some(c) => c.settle(0, amount),
                None => self.spend_counter(&item.key).settle(0, amount),
            }
        }
    }

    /// The current level of `key` as every node sees it (the management API's figure): a
    /// shared backend reads it fresh.
    fn level_now<'a>(&'a self, key: SpendKey<'a>) -> Pending<'a, Result<SpendLevel, CountersDown>> {
        Pending::ready(Ok(self.spend(&key)))
    }

    /// Every budget counter this process holds, with its settled spend (for shared
    /// counters: the last shared figure it saw), so alerts can be raised off the request path.
    fn spend_levels(&self) -> Vec<CounterLevel> {
        Vec::new()
    }

    fn status(&self) -> CountersStatus {
        CountersStatus { backend: "local", reachable: true, on_error: None }
    }
}

/// A spend counter whose settled value should be persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendRow {
    pub budget: String,
    pub instance: String,
    pub period_start: i64,
    pub committed: Nanos,
}

#[derive(Debug, PartialEq, Eq)]
struct OwnedKey {
    budget: Box<str>,
    instance: Box<str>,
    period_start: i64,
}

/// Lets the map be probed with a borrowed `SpendKey` (no allocation per lookup).
trait KeyView {
    fn view(&self) -> SpendKey<'_>;
}

impl KeyView for OwnedKey {
    fn view(&self) -> SpendKey<'_> {
        SpendKey { budget: &self.budget, instance: &self.instance, period_start: self.period_start }
    }
}

impl KeyView for SpendKey<'_> {
    fn view(&self) -> SpendKey<'_> {
        *self
    }
}

impl<'a> Borrow<dyn KeyView + 'a> for OwnedKey {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

impl Hash for OwnedKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.view().hash(state)
    }
}

impl Hash for dyn KeyView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.view().hash(state)
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.view() == other.view()
    }
}

impl Eq for dyn KeyView + '_ {}

#[derive(Default)]
struct SpendCell {
    used: AtomicI64,
    committed: AtomicI64,
    dirty: AtomicBool,
}

impl SpendCounter for SpendCell {
    fn level(&self) -> SpendLevel {
        SpendLevel {
            committed: self.committed.load(Ordering::Acquire),
            used: self.used.load(Ordering::Acquire),
        }
    }

    fn reserve(&self, amount: Nanos, cap: Option<Nanos>) -> Result<SpendLevel, SpendLevel> {
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            if cap.is_some_and(|cap| used >= cap) {
                return Err(SpendLevel { committed: self.committed.load(Ordering::Acquire), used });
            }
            match self.used.compare_exchange_weak(
                used,
                used.saturating_add(amount),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(SpendLevel {
                        committed: self.committed.load(Ordering::Acquire),
                        used: used.saturating_add(amount),
                    })
                }
                Err(now) => used = now,
            }
        }
    }

    fn settle(&self, reserved: Nanos, actual: Nanos) {
        self.used.fetch_add(actual - reserved, Ordering::AcqRel);
        if actual != 0 {
            self.committed.fetch_add(actual, Ordering::AcqRel);
            self.dirty.store(true, Ordering::Release);
        }
    }
}

/// One budget counter's settled spend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterLevel {
    pub budget: String,
    pub instance: String,
    pub period_start: i64,
    pub committed: Nanos,
}

/// Maps of the request path hash with aHash: several times faster than SipHash on short
/// keys, and still keyed per process.
type FastMap<K, V> = DashMap<K, V, ahash::RandomState>;

/// Length of a GCRA window.
const MINUTE_US: u64 = 60_000_000;

/// Counters of one process. Spend survives restarts through `dirty_rows`/`restore` (see
/// `store`); rate state is per minute and is not persisted.
#[derive(Default)]
pub struct LocalCounters {
    spend: FastMap<OwnedKey, Arc<SpendCell>>,
    requests: FastMap<Box<str>, AtomicU64>,
    tokens: FastMap<Box<str>, AtomicU64>,
}

impl LocalCounters {
    pub fn new() -> LocalCounters {
        LocalCounters::default()
    }

    fn cell(&self, key: &SpendKey<'_>) -> Arc<SpendCell> {
        if let Some(cell) = self.spend.get(key as &dyn KeyView) {
            return cell.clone();
        }
        let owned = OwnedKey {
            budget: key.budget.into(),
            instance: key.instance.into(),
            period_start: key.period_start,
        };
        self.spend.entry(owned).or_default().clone()
    }

    /// Loads persisted spend (at start, before traffic).
    pub fn restore(&self, rows: impl IntoIterator<Item = SpendRow>) {
        for row in rows {
            let key = OwnedKey {
                budget: row.budget.into(),
                instance: row.instance.into(),
                period_start: row.period_start,
            };
            let cell = self.spend.entry(key).or_default();
            cell.committed.fetch_add(row.committed, Ordering::AcqRel);
            cell.used.fetch_add(row.committed, Ordering::AcqRel);
        }
    }

    /// Counters settled since the last call, with their whole settled value.
    pub fn dirty_rows(&self) -> Vec<SpendRow> {
        let mut rows = Vec::new();
        for entry in self.spend.iter() {
            if entry.value().dirty.swap(false, Ordering::AcqRel) {
                let k = entry.key();
                rows.push(SpendRow {
                    budget: k.budget.to_string(),
                    instance: k.instance.to_string(),
                    period_start: k.period_start,
                    committed: entry.value().committed.load(Ordering::Acquire),
                });
            }
        }
        rows
    }

    /// Drops counters of periods that started before `before` (no period is longer than a
    /// month), and counters that hold nothing (released reservations of client-chosen
    /// instances), unless something is in flight, unsaved or still referenced.
    pub fn forget_before(&self, before: i64) {
        self.spend.retain(|k, cell| {
            let idle = Arc::strong_count(cell) == 1
                && !cell.dirty.load(Ordering::Acquire)
                && cell.used.load(Ordering::Acquire) == cell.committed.load(Ordering::Acquire);
            let empty = cell.committed.load(Ordering::Acquire) == 0;
            !(idle && (k.period_start < before || empty))
        });
    }

    pub fn spend_counters(&self) -> usize {
        self.spend.len()
    }

    fn rate_map(&self, kind: RateKind) -> &FastMap<Box<str>, AtomicU64> {
        match kind {
            RateKind::Requests => &self.requests,
            RateKind::Tokens => &self.tokens,
        }
    }
}

/// Time one unit of allowance takes to refill, in µs (scaled by `cost`).
fn increment(per_minute: u64, cost: u64) -> u64 {
    let inc = u128::from(cost) * u128::from(MINUTE_US) / u128::from(per_minute.max(1));
    u64::try_from(inc).unwrap_or(u64::MAX)
}

fn gcra(tat: &AtomicU64, per_minute: u64, cost: u64, now: u64) -> RateVerdict {
    let inc = increment(per_minute, cost);
    let remaining_at = |t: u64| {
        let room = (now + MINUTE_US).saturating_sub(t);
        (u128::from(room) * u128::from(per_minute) / u128::from(MINUTE_US)) as u64
    };
    let mut current = tat.load(Ordering::Acquire);
    loop {
        let base = current.max(now);
        let next = base.saturating_add(inc);
        if next > now + MINUTE_US {
            let retry_after_us = if inc > MINUTE_US { u64::MAX } else { next - MINUTE_US - now };
            return RateVerdict {
                allowed: false,
                limit: per_minute,
                remaining: remaining_at(base),
                reset_us: base - now,
                retry_after_us,
            };
        }
        match tat.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                return RateVerdict {
                    allowed: true,
                    limit: per_minute,
                    remaining: remaining_at(next),
                    reset_us: next - now,
                    retry_after_us: 0,
                }
            }
            Err(actual) => current = actual,
        }
    }
}

impl Counters for LocalCounters {
    fn spend_counter(&self, key: &SpendKey<'_>) -> Arc<dyn SpendCounter> {
        self.cell(key)
    }

    fn find_spend_counter(&self, key: &SpendKey<'_>) -> Option<Arc<dyn SpendCounter>> {
        self.spend.get(key as &dyn KeyView).map(|c| c.clone() as Arc<dyn SpendCounter>)
    }

    fn spend_levels(&self) -> Vec<CounterLevel> {
        self.spend
            .iter()
            .map(|e| CounterLevel {
                budget: e.key().budget.to_string(),
                instance: e.key().instance.to_string(),
                period_start: e.key().period_start,
                committed: e.value().committed.load(Ordering::Acquire),
            })
            .collect()
    }

    fn take(&self, kind: RateKind, key: &str, per_minute: u64, cost: u64, now_us: u64) -> RateVerdict {
        let map = self.rate_map(kind);
        if let Some(tat) = map.get(key) {
            return gcra(&tat, per_minute, cost, now_us);
        }
        let tat = map.entry(key.into()).or_insert_with(|| AtomicU64::new(0));
        gcra(&tat, per_minute, cost, now_us)
    }

    fn reserve_all<'a>(
        &'a self,
        items: &'a [ReserveItem<'a>],
        amount: Nanos,
    ) -> Pending<'a, Result<Reserved, CountersDown>> {
        Pending::ready(Ok(reserve_each(self, items, amount)))
    }

    fn adjust(&self, kind: RateKind, key: &str, per_minute: u64, delta: i64) {
        let Some(tat) = self.rate_map(kind).get(key) else { return };
        let inc = increment(per_minute, delta.unsigned_abs());
        if delta >= 0 {
            let _ = tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| Some(t.saturating_add(inc)));
        } else {
            let _ = tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| Some(t.saturating_sub(inc)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: SpendKey<'static> = SpendKey { budget: "b", instance: "", period_start: 100 };

    #[test]
    fn reserve_refuses_at_the_cap_and_settle_replaces_the_reservation() {
        let c = LocalCounters::new();
        assert_eq!(c.reserve(&K, 60, Some(100)), Ok(SpendLevel { committed: 0, used: 60 }));
        assert_eq!(c.reserve(&K, 60, Some(100)), Ok(SpendLevel { committed: 0, used: 120 }));
        assert_eq!(c.reserve(&K, 1, Some(100)), Err(SpendLevel { committed: 0, used: 120 }));
        c.settle(&K, 60, 10);
        c.settle(&K, 60, 0);
        assert_eq!(c.spend(&K), SpendLevel { committed: 10, used: 10 });
        // Uncapped reservations (accounting only) always pass.
        assert!(c.reserve(&K, 1_000, None).is_ok());
        // Another instance or period is another counter.
        let other = SpendKey { instance: "alice", ..K };
        assert_eq!(c.spend(&other), SpendLevel::default());
        let next = SpendKey { period_start: 200, ..K };
        assert_eq!(c.spend(&next), SpendLevel::default());
    }

    #[test]
    fn concurrent_reservations_overshoot_by_at_most_one() {
        let c = Arc::new(LocalCounters::new());
        let admitted = Arc::new(AtomicI64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (c, admitted) = (c.clone(), admitted.clone());
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if c.reserve(&K, 7, Some(1_000)).is_ok() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            c.settle(&K, 7, 7);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let spent = c.spend(&K).committed;
        assert_eq!(spent, admitted.load(Ordering::Relaxed) * 7);
        assert!((1_000..1_007).contains(&spent), "{spent}");
    }

    #[test]
    fn dirty_rows_persist_and_restore() {
        let c = LocalCounters::new();
        c.reserve(&K, 5, None).unwrap();
        c.settle(&K, 5, 4);
        let rows = c.dirty_rows();
        assert_eq!(
            rows,
            vec![SpendRow { budget: "b".into(), instance: "".into(), period_start: 100, committed: 4 }]
        );
        assert!(c.dirty_rows().is_empty());
        let d = LocalCounters::new();
        d.restore(rows);
        assert_eq!(d.spend(&K), SpendLevel { committed: 4, used: 4 });
        d.forget_before(101);
        assert_eq!(d.spend_counters(), 0);
    }

    #[test]
    fn gcra_allows_a_minute_in_a_burst_then_refills_steadily() {
        let c = LocalCounters::new();
        let t0 = 1_000_000_000;
        for i in 0..600 {
            let v = c.take(RateKind::Requests, "k", 600, 1, t0);
            assert!(v.allowed, "request {i}");
            assert_eq!(v.remaining, 599 - i);
        }
        let refused = c.take(RateKind::Requests, "k", 600, 1, t0);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_us, 100_000);
        assert_eq!(refused.reset_us, MINUTE_US);
        // 100 ms later one request's worth has come back.
        assert!(c.take(RateKind::Requests, "k", 600, 1, t0 + 100_000).allowed);
        assert!(!c.take(RateKind::Requests, "k", 600, 1, t0 + 100_000).allowed);
        // Other keys and kinds are independent.
        assert!(c.take(RateKind::Requests, "other", 600, 1, t0).allowed);
        assert!(c.take(RateKind::Tokens, "k", 600, 1, t0).allowed);
    }

    #[test]
    fn gcra_costs_and_adjustments() {
        let c = LocalCounters::new();
        let t0 = 5_000_000_000;
        let v = c.take(RateKind::Tokens, "k", 1_000, 400, t0);
        assert!(v.allowed && v.remaining == 600);
        c.adjust(RateKind::Tokens, "k", 1_000, -300);
        assert_eq!(c.take(RateKind::Tokens, "k", 1_000, 0, t0).remaining, 900);
        c.adjust(RateKind::Tokens, "k", 1_000, 850);
        assert!(!c.take(RateKind::Tokens, "k", 1_000, 100, t0).allowed);
        let too_big = c.take(RateKind::Tokens, "fresh", 1_000, 1_001, t0);
        assert!(!too_big.allowed);
        assert_eq!(too_big.retry_after_us, u64::MAX);
    }
}
