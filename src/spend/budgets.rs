//! Budgets (PRODUCT.md §5): each caps the spend of one scope (org, project, routing config,
//! end user, tag) over a calendar period. The config is compiled into an index so a request
//! finds its budgets with a few hash lookups however many budgets exist; spend itself lives
//! in the `Counters`.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwapOption;

use super::counters::{
    to_usd, Counters, CountersDown, Hold, Nanos, RateVerdict, ReserveItem, SpendCounter, SpendKey,
    SpendLevel, Take,
};
use super::period::{iso8601, Period};

/// What happens once a budget's cap is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Refuse with 402.
    Block,
    /// Serve with this model or `@config` instead of the requested one.
    Downgrade(Arc<str>),
    /// Keep serving; say so in the headers.
    WarnOnly,
}

impl Action {
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Downgrade(_) => "downgrade",
            Action::WarnOnly => "warn_only",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// All traffic of the gateway.
    Org,
    Project(String),
    /// A routing config by slug (without `@`).
    RoutingConfig(String),
    /// One end user, or (`None`) each end user separately.
    EndUser(Option<String>),
    /// Requests carrying tag `key` with `value`, or (`None`) each value of `key` separately.
    Tag {
        key: String,
        value: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct Budget {
    pub name: Arc<str>,
    pub scope: Scope,
    pub period: Period,
    pub cap: Nanos,
    pub cap_usd: f64,
    /// Spend at which the soft limit warns (`soft_limit_pct` of the cap).
    pub soft: Nanos,
    pub soft_limit_pct: f64,
    pub action: Action,
    /// Percentages of the cap that send `budget.threshold_reached`, ascending.
    pub alert_pcts: Vec<f64>,
}

/// Instance names longer than this are cut: they come from clients (end-user ids, tag
/// values) and each distinct one is a counter.
const MAX_INSTANCE_LEN: usize = 128;

/// aHash: the index is probed several times per request with short keys.
type Index<V> = HashMap<String, V, ahash::RandomState>;

#[derive(Debug, Default)]
struct TagIndex {
    each_value: Vec<u32>,
    by_value: Index<Vec<u32>>,
}

/// The counter a fixed-selector budget used last, so the next request of the same period
/// skips the counter lookup. `owner` identifies the `Counters` it came from.
struct CachedCounter {
    owner: usize,
    period_start: i64,
    counter: Arc<dyn SpendCounter>,
}

/// Every configured budget, indexed by what selects it.
#[derive(Default)]
pub struct Budgets {
    list: Vec<Budget>,
    /// Per budget (same index as `list`): its fixed-selector counter of the current period.
    cached: Vec<ArcSwapOption<CachedCounter>>,
    org: Vec<u32>,
    project: Index<Vec<u32>>,
    config: Index<Vec<u32>>,
    each_end_user: Vec<u32>,
    end_user: Index<Vec<u32>>,
    tags: Index<TagIndex>,
}

/// What a request is, as far as budgets care.
#[derive(Debug, Clone, Copy)]
pub struct BudgetRequest<'r> {
    pub project: &'r str,
    /// The routing config named by `@slug`, if any.
    pub config: Option<&'r str>,
    pub end_user: Option<&'r str>,
    pub tags: &'r [(String, String)],
}

/// Where a matched budget stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Under,
    /// At or past the soft limit, under the cap.
    Soft,
    /// At or past the cap (in-flight reservations included).
    Hard,
}

/// One budget that applies to a request.
#[derive(Debug, Clone)]
pub struct Hit<'b, 'r> {
    pub budget: &'b Budget,
    /// The end user or tag value for per-instance budgets, else "".
    pub instance: &'r str,
    pub period_start: i64,
    pub period_end: i64,
    pub level: SpendLevel,
    pub state: State,
    /// `None`: a per-instance counter that does not exist yet (nothing spent). It is made
    /// by the first reservation, so requests that are refused, dry runs and evaluations
    /// alone never add counters for client-chosen names.
    pub counter: Option<Arc<dyn SpendCounter>>,
}

impl std::fmt::Debug for dyn SpendCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.level())
    }
}

impl Hit<'_, '_> {
    pub fn key(&self) -> SpendKey<'_> {
        SpendKey { budget: &self.budget.name, instance: self.instance, period_start: self.period_start }
    }

    /// What the budget has left: the cap minus settled spend.
    pub fn remaining(&self) -> Nanos {
        (self.budget.cap - self.level.committed).max(0)
    }
}

/// The budgets of one request and the one whose outcome applies.
#[derive(Debug)]
pub struct Evaluation<'b, 'r> {
    pub hits: Vec<Hit<'b, 'r>>,
    /// Index into `hits` of the budget the headers describe: the most severe outcome, ties
    /// to the least remaining.
    pub applied: Option<usize>,
    /// Whether enforcement applies (only `@config` traffic is policed, PRODUCT.md §2.2).
    pub policed: bool,
}

/// The outcome the request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No budget, or all under their soft limit.
    None,
    /// A soft limit was crossed, or a hard one with `warn_only` (or on unpoliced traffic).
    Warn,
    Downgrade(Arc<str>),
    Block,
}

impl Outcome {
    pub fn header(&self) -> Option<&'static str> {
        match self {
            Outcome::None => None,
            Outcome::Warn => Some("warn_only"),
            Outcome::Downgrade(_) => Some("downgrade"),
            Outcome::Block => Some("block"),
        }
    }
}

fn severity(hit: &Hit<'_, '_>, policed: bool) -> u8 {
    match (hit.state, &hit.budget.action, policed) {
        (State::Hard, Action::Block, true) => 3,
        (State::Hard, Action::Downgrade(_), true) => 2,
        (State::Hard, _, _) | (State::Soft, _, _) => 1,
        (State::Under, _, _) => 0,
    }
}

fn cut(s: &str) -> &str {
    if s.len() <= MAX_INSTANCE_LEN {
        return s;
    }
    let mut end = MAX_INSTANCE_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl std::fmt::Debug for Budgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budgets").field("list", &self.list).finish()
    }
}

impl Budgets {
    pub fn new(list: Vec<Budget>) -> Budgets {
        let mut b = Budgets::default();
        for (i, budget) in list.iter().enumerate() {
            let i = i as u32;
            match &budget.scope {
                Scope::Org => b.org.push(i),
                Scope::Project(p) => b.project.entry(p.clone()).or_default().push(i),
                Scope::RoutingConfig(c) => b.config.entry(c.clone()).or_default().push(i),
                Scope::EndUser(None) => b.each_end_user.push(i),
                Scope::EndUser(Some(u)) => b.end_user.entry(u.clone()).or_default().push(i),
                Scope::Tag { key, value: None } => b.tags.entry(key.clone()).or_default().each_value.push(i),
                Scope::Tag { key, value: Some(v) } => {
                    b.tags.entry(key.clone()).or_default().by_value.entry(v.clone()).or_default().push(i)
                }
            }
        }
        b.cached = list.iter().map(|_| ArcSwapOption::empty()).collect();
        b.list = list;
        b
    }

    /// The counter of budget `i` for `key`: from the cache for fixed-selector budgets;
    /// per-instance counters only when they exist.
    fn counter(
        &self,
        counters: &dyn Counters,
        i: usize,
        key: &SpendKey<'_>,
    ) -> Option<Arc<dyn SpendCounter>> {
        if !key.instance.is_empty() {
            return counters.find_spend_counter(key);
        }
        let owner = counters as *const dyn Counters as *const () as usize;
        if let Some(c) = &*self.cached[i].load() {
            if c.owner == owner && c.period_start == key.period_start {
                return Some(c.counter.clone());
            }
        }
        let counter = counters.spend_counter(key);
        self.cached[i].store(Some(Arc::new(CachedCounter {
            owner,
            period_start: key.period_start,
            counter: counter.clone(),
        })));
        Some(counter)
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Budget> {
        self.list.iter()
    }

    /// The budgets that apply to `req`, with their current spend. `now`: Unix seconds.
    pub fn evaluate<'b, 'r>(
        &'b self,
        counters: &dyn Counters,
        req: &BudgetRequest<'r>,
        policed: bool,
        now: i64,
    ) -> Evaluation<'b, 'r> {
        let mut eval = Evaluation { hits: Vec::new(), applied: None, policed };
        if self.list.is_empty() {
            return eval;
        }
        let mut windows: [Option<(i64, i64)>; 3] = [None; 3];
        let mut add = |ids: &[u32], instance: &'r str, hits: &mut Vec<Hit<'b, 'r>>| {
            for &i in ids {
                let budget = &self.list[i as usize];
                let slot = budget.period as usize;
                let (start, end) = *windows[slot].get_or_insert_with(|| budget.period.window(now));
                let key = SpendKey { budget: &budget.name, instance, period_start: start };
                let counter = self.counter(counters, i as usize, &key);
                let level = counter.as_ref().map(|c| c.level()).unwrap_or_default();
                // Outcomes follow settled spend (PRODUCT.md §5.6); reservations in flight
                // are held back by `reserve` instead.
                let state = if level.committed >= budget.cap {
                    State::Hard
                } else if level.committed >= budget.soft {
                    State::Soft
                } else {
                    State::Under
                };
                hits.push(Hit {
                    budget,
                    instance,
                    period_start: start,
                    period_end: end,
                    level,
                    state,
                    counter,
                });
            }
        };
        add(&self.org, "", &mut eval.hits);
        if let Some(ids) = self.project.get(req.project) {
            add(ids, "", &mut eval.hits);
        }
        if let Some(ids) = req.config.and_then(|c| self.config.get(c)) {
            add(ids, "", &mut eval.hits);
        }
        if let Some(user) = req.end_user {
            add(&self.each_end_user, cut(user), &mut eval.hits);
            if let Some(ids) = self.end_user.get(user) {
                add(ids, "", &mut eval.hits);
            }
        }
        if !self.tags.is_empty() {
            for (key, value) in req.tags {
                if let Some(index) = self.tags.get(key.as_str()) {
                    add(&index.each_value, cut(value), &mut eval.hits);
                    if let Some(ids) = index.by_value.get(value.as_str()) {
                        add(ids, "", &mut eval.hits);
                    }
                }
            }
        }
        eval.applied = eval
            .hits
            .iter()
            .enumerate()
            .max_by(|(_, a), (_, b)| {
                severity(a, policed).cmp(&severity(b, policed)).then(b.remaining().cmp(&a.remaining()))
            })
            .map(|(i, _)| i);
        eval
    }
}

impl<'b, 'r> Evaluation<'b, 'r> {
    pub fn applied(&self) -> Option<&Hit<'b, 'r>> {
        self.applied.map(|i| &self.hits[i])
    }

    pub fn outcome(&self) -> Outcome {
        let Some(hit) = self.applied() else { return Outcome::None };
        match (severity(hit, self.policed), &hit.budget.action) {
            (3, _) => Outcome::Block,
            (2, Action::Downgrade(to)) => Outcome::Downgrade(to.clone()),
            (0, _) => Outcome::None,
            _ => Outcome::Warn,
        }
    }

    /// The counters a reservation or a charge takes from, with the caps enforced
    /// (`block` budgets on policed traffic).
    fn items(&self) -> Vec<ReserveItem<'_>> {
        self.hits
            .iter()
            .map(|hit| ReserveItem {
                key: hit.key(),
                cap: (self.policed && hit.budget.action == Action::Block).then_some(hit.budget.cap),
                enforced: self.policed && !matches!(hit.budget.action, Action::WarnOnly),
                counter: hit.counter.clone(),
                period_end: hit.period_end,
            })
            .collect()
    }

    /// Adds spent `amount` to every matched budget without a cap check: money already spent
    /// (a semantic cache hit's embeddings call) is counted, never refused.
    pub fn charge(&self, counters: &dyn Counters, amount: Nanos) {
        if !self.hits.is_empty() {
            counters.charge(&self.items(), amount);
        }
    }

    /// Reserves `amount` on every matched budget; enforced (`block`, policed) budgets refuse
    /// once settled spend plus reservations reach their cap. On refusal nothing stays
    /// reserved and the refusing hit is returned. `Err`: shared counters could not be
    /// reached and their policy is to refuse.
    pub async fn reserve(
        &self,
        counters: &dyn Counters,
        amount: Nanos,
    ) -> Result<Result<Reservation, (usize, SpendLevel)>, CountersDown> {
        let items = self.items();
        let held = counters.reserve_all(&items, amount).await?;
        Ok(held.map(|hold| Reservation { hold, amount, settled: false }))
    }

    /// `reserve`, after the request's rate-limit `takes` (in order, up to the first
    /// refusal; the reservation only if every take allowed): one round trip on shared
    /// counters.
    pub async fn take_and_reserve(
        &self,
        counters: &dyn Counters,
        takes: &[Take],
        amount: Nanos,
    ) -> Result<(Vec<RateVerdict>, Option<Result<Reservation, (usize, SpendLevel)>>), CountersDown> {
        let items = self.items();
        let (verdicts, held) = counters.take_and_reserve(takes, &items, amount).await?;
        Ok((verdicts, held.map(|h| h.map(|hold| Reservation { hold, amount, settled: false }))))
    }
}

/// The 402 a blocked request gets (PRODUCT.md §5.4).
#[derive(Debug, Clone, PartialEq)]
pub struct Blocked {
    pub name: Arc<str>,
    pub spend_usd: f64,
    pub cap_usd: f64,
    pub period: Period,
    pub resets_at: i64,
    /// Whole seconds until the reset, at least 1.
    pub retry_after: u64,
}

impl Blocked {
    pub fn new(hit: &Hit<'_, '_>, level: SpendLevel, now: i64) -> Blocked {
        Blocked {
            name: hit.budget.name.clone(),
            spend_usd: (to_usd(level.committed) * 1e6).round() / 1e6,
            cap_usd: hit.budget.cap_usd,
            period: hit.budget.period,
            resets_at: hit.period_end,
            retry_after: (hit.period_end - now).max(1) as u64,
        }
    }

    pub fn message(&self) -> String {
        format!("budget \"{}\" exceeded (${:.2} / ${:.2})", self.name, self.spend_usd, self.cap_usd)
    }

    pub fn resets_at_iso(&self) -> String {
        iso8601(self.resets_at)
    }

    /// The `error.budget` object.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": &*self.name,
            "spend_usd": self.spend_usd,
            "cap_usd": self.cap_usd,
            "period": self.period.as_str(),
            "period_resets_at": self.resets_at_iso(),
        })
    }
}

/// A request's reserved estimate on each of its budgets. `settle` replaces it by the
/// actual cost; dropped unsettled (the request failed or was abandoned), it is released.
pub struct Reservation {
    hold: Box<dyn Hold>,
    amount: Nanos,
    settled: bool,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation").field("amount", &self.amount).field("settled", &self.settled).finish()
    }
}

impl Reservation {
    pub fn amount(&self) -> Nanos {
        self.amount
    }

    pub fn settle(&mut self, actual: Nanos) {
        if self.settled {
            return;
        }
        self.settled = true;
        self.hold.settle(self.amount, actual);
    }
}

impl Drop for Reservation {
    /// Dropped unsettled: the request was cancelled (e.g. at shutdown) after its upstream
    /// call may have been billed. Charging the reservation overcounts; it never undercounts.
    fn drop(&mut self) {
        self.settle(self.amount);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spend::counters::{to_nanos, LocalCounters};
    use futures::FutureExt;

    /// Reserves `usd` on in-process counters (which answer at once).
    fn reserve_now(
        eval: &Evaluation<'_, '_>,
        c: &dyn Counters,
        usd: f64,
    ) -> Result<Reservation, (usize, SpendLevel)> {
        eval.reserve(c, to_nanos(usd)).now_or_never().expect("local counters answer at once").unwrap()
    }

    fn budget(name: &str, scope: Scope, cap: f64, action: Action) -> Budget {
        Budget {
            name: name.into(),
            scope,
            period: Period::Daily,
            cap: to_nanos(cap),
            cap_usd: cap,
            soft: to_nanos(cap * 0.8),
            soft_limit_pct: 80.0,
            alert_pcts: vec![80.0],
            action,
        }
    }

    fn tags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const NOW: i64 = 1_790_000_000;

    #[test]
    fn matches_by_scope_and_instance() {
        let b = Budgets::new(vec![
            budget("org", Scope::Org, 100.0, Action::WarnOnly),
            budget("proj", Scope::Project("default".into()), 10.0, Action::Block),
            budget("cfg", Scope::RoutingConfig("prod".into()), 10.0, Action::Block),
            budget("each-user", Scope::EndUser(None), 1.0, Action::WarnOnly),
            budget("alice", Scope::EndUser(Some("alice".into())), 1.0, Action::Block),
            budget(
                "acme",
                Scope::Tag { key: "tenant".into(), value: Some("acme".into()) },
                5.0,
                Action::Block,
            ),
            budget("each-tenant", Scope::Tag { key: "tenant".into(), value: None }, 5.0, Action::WarnOnly),
        ]);
        let c = LocalCounters::new();
        let t = tags(&[("tenant", "acme"), ("feature", "x")]);
        let req =
            BudgetRequest { project: "default", config: Some("prod"), end_user: Some("alice"), tags: &t };
        let eval = b.evaluate(&c, &req, true, NOW);
        let mut names: Vec<_> = eval.hits.iter().map(|h| (&*h.budget.name, h.instance)).collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                ("acme", ""),
                ("alice", ""),
                ("cfg", ""),
                ("each-tenant", "acme"),
                ("each-user", "alice"),
                ("org", ""),
                ("proj", "")
            ]
        );
        let other = BudgetRequest { project: "other", config: None, end_user: None, tags: &[] };
        let eval = b.evaluate(&c, &other, true, NOW);
        assert_eq!(eval.hits.len(), 1);
        assert_eq!(eval.outcome(), Outcome::None);
    }

    #[test]
    fn most_severe_outcome_wins_then_least_remaining() {
        let b = Budgets::new(vec![
            budget("warn", Scope::Org, 1.0, Action::WarnOnly),
            budget("down", Scope::Project("p".into()), 2.0, Action::Downgrade("gpt-4o-mini".into())),
            budget("block", Scope::Tag { key: "t".into(), value: Some("v".into()) }, 3.0, Action::Block),
        ]);
        let c = LocalCounters::new();
        let t = tags(&[("t", "v")]);
        let req = BudgetRequest { project: "p", config: None, end_user: None, tags: &t };
        let spend = |name: &str, usd: f64| {
            let start = Period::Daily.window(NOW).0;
            let key = SpendKey { budget: name, instance: "", period_start: start };
            c.reserve(&key, to_nanos(usd), None).unwrap();
            c.settle(&key, to_nanos(usd), to_nanos(usd));
        };
        let eval = b.evaluate(&c, &req, true, NOW);
        assert_eq!(eval.outcome(), Outcome::None);
        assert_eq!(&*eval.applied().unwrap().budget.name, "warn", "least remaining");
        spend("warn", 1.0);
        assert_eq!(b.evaluate(&c, &req, true, NOW).outcome(), Outcome::Warn);
        spend("down", 1.7);
        let eval = b.evaluate(&c, &req, true, NOW);
        assert_eq!(eval.outcome(), Outcome::Warn, "soft limit of down crossed, cap not");
        spend("down", 0.3);
        assert_eq!(b.evaluate(&c, &req, true, NOW).outcome(), Outcome::Downgrade("gpt-4o-mini".into()));
        // Unpoliced traffic is only warned.
        assert_eq!(b.evaluate(&c, &req, false, NOW).outcome(), Outcome::Warn);
        spend("block", 3.0);
        let eval = b.evaluate(&c, &req, true, NOW);
        assert_eq!(eval.outcome(), Outcome::Block);
        assert_eq!(&*eval.applied().unwrap().budget.name, "block");
    }

    #[test]
    fn reservations_refuse_at_an_enforced_cap_and_release_on_drop() {
        let b = Budgets::new(vec![
            budget("acct", Scope::Org, 0.001, Action::WarnOnly),
            budget("cap", Scope::Project("p".into()), 1.0, Action::Block),
        ]);
        let c: Arc<dyn Counters> = Arc::new(LocalCounters::new());
        let req = BudgetRequest { project: "p", config: None, end_user: None, tags: &[] };
        let eval = b.evaluate(&*c, &req, true, NOW);
        let r1 = reserve_now(&eval, &*c, 0.6).unwrap();
        let mut r2 = reserve_now(&eval, &*c, 0.6).unwrap();
        let (i, level) = reserve_now(&eval, &*c, 0.6).unwrap_err();
        assert_eq!(&*eval.hits[i].budget.name, "cap");
        assert_eq!(level.used, to_nanos(1.2));
        // The refused request left nothing reserved on the accounting-only budget.
        let acct = eval.hits.iter().find(|h| &*h.budget.name == "acct").unwrap();
        assert_eq!(c.spend(&acct.key()).used, to_nanos(1.2));
        let mut r1 = r1;
        r1.settle(0);
        r2.settle(to_nanos(0.25));
        assert_eq!(
            c.spend(&eval.hits[i].key()),
            SpendLevel { committed: to_nanos(0.25), used: to_nanos(0.25) }
        );
        // Unpoliced: never refused.
        let eval = b.evaluate(&*c, &req, false, NOW);
        assert!(reserve_now(&eval, &*c, 5.0).is_ok());
    }

    #[test]
    fn per_instance_counters_exist_only_once_something_was_reserved() {
        let b = Budgets::new(vec![budget("each", Scope::EndUser(None), 1.0, Action::Block)]);
        let local = Arc::new(LocalCounters::new());
        let c: Arc<dyn Counters> = local.clone();
        for i in 0..100 {
            let user = format!("user-{i}");
            let req = BudgetRequest { project: "p", config: None, end_user: Some(&user), tags: &[] };
            assert_eq!(b.evaluate(&*c, &req, true, NOW).hits.len(), 1);
        }
        assert_eq!(local.spend_counters(), 0, "evaluations alone add no counters");
        let req = BudgetRequest { project: "p", config: None, end_user: Some("bob"), tags: &[] };
        let mut r = reserve_now(&b.evaluate(&*c, &req, true, NOW), &*c, 0.5).unwrap();
        assert_eq!(local.spend_counters(), 1);
        r.settle(0);
        drop(r);
        local.forget_before(0);
        assert_eq!(local.spend_counters(), 0, "a released, empty counter is forgotten");
    }

    #[test]
    fn a_reservation_dropped_unsettled_is_charged_in_full() {
        let b = Budgets::new(vec![budget("org", Scope::Org, 1.0, Action::Block)]);
        let c: Arc<dyn Counters> = Arc::new(LocalCounters::new());
        let req = BudgetRequest { project: "p", config: None, end_user: None, tags: &[] };
        let eval = b.evaluate(&*c, &req, true, NOW);
        drop(reserve_now(&eval, &*c, 0.3).unwrap());
        let level = c.spend(&eval.hits[0].key());
        assert_eq!(level, SpendLevel { committed: to_nanos(0.3), used: to_nanos(0.3) });
    }

    #[test]
    fn blocked_body_matches_the_contract() {
        let b = Budgets::new(vec![Budget {
            period: Period::Monthly,
            ..budget("team-ml", Scope::Org, 100.0, Action::Block)
        }]);
        let c = LocalCounters::new();
        let req = BudgetRequest { project: "p", config: None, end_user: None, tags: &[] };
        let eval = b.evaluate(&c, &req, true, NOW);
        let hit = eval.applied().unwrap();
        let blocked =
            Blocked::new(hit, SpendLevel { committed: to_nanos(105.0), used: to_nanos(105.0) }, NOW);
        assert_eq!(blocked.message(), "budget \"team-ml\" exceeded ($105.00 / $100.00)");
        let (_, end) = Period::Monthly.window(NOW);
        assert_eq!(blocked.retry_after, (end - NOW) as u64);
        assert_eq!(
            blocked.json(),
            serde_json::json!({"name": "team-ml", "spend_usd": 105.0, "cap_usd": 100.0, "period": "monthly", "period_resets_at": iso8601(end)})
        );
    }
}
