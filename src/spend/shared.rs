//! Budget and rate counters shared by every gateway node through Redis
//! (`spend.counters: redis`), behind the same `Counters` trait as the in-process ones.
//!
//! Each operation is an atomic server-side script (`EVALSHA`, reloaded on `NOSCRIPT`): a
//! reservation checks every budget of the request and holds on all of them or none; a
//! settlement releases the hold and records the spend; the rate limiter is the same GCRA as
//! in process, on Redis's clock so nodes with skewed clocks agree. Operations queued on one
//! thread at the same moment go in one call (`BATCH`, `SETTLE`): under load a burst of
//! requests costs one round trip, not one each; alone, a request's operation goes at once.
//! Settlements wait a moment for the thread's next batch and go in front of it, pipelined
//! in the same round trip, so a request costs one round trip rather than two.
//!
//! A budget counter is a hash `mlx:spend:<period start>:<budget length>:<budget>:<instance>`
//! holding `t` (settled spend of all nodes), `r` (reservations in flight) and `n:<node>`
//! (each node's own settled spend, an absolute figure). Money is integer nano-USD, the unit
//! the in-process counters use: sums are `HINCRBY` on 64-bit integers, so nothing drifts.
//! Because every node writes only its own absolute figure, and raises it with "max", a
//! settlement can be retried, replayed after an outage or re-seeded from the durable store
//! by several nodes at once without counting anything twice.
//!
//! Each reservation is also a member `<hold id>:<amount>` of the sorted set `<counter>:h`,
//! scored by when its lease ends (`HOLD_LEASE_S`): a release removes its member and lowers
//! `r` only if the member was still there, so a release retried after a lost answer, or one
//! for a reservation Redis never saw, changes nothing; and the reservations of a node that
//! died with requests in flight are dropped when their lease ends.
//!
//! `mlx:spend:epoch` marks a seeded Redis. When Redis comes back empty (a restart without
//! persistence), scripts refuse until one node re-seeds it from the durable rows (every
//! node's last written figures) in one script that only the first caller applies; every
//! live node then pushes its own newer figures when it sees the new epoch.
//!
//! While Redis cannot be reached, `on_counter_error` decides: `fail_closed` refuses what a
//! budget or a limit polices (503 `counters_unavailable`), `fail_open` serves and counts in
//! this process (against the last shared level it saw), then pushes what it counted when
//! Redis answers again. Either way each transition is logged and counted.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::counters::{
    reserve_each, Counters, CountersDown, CountersStatus, Hold, LocalCounters, Nanos, Pending, RateKind,
    RateVerdict, ReserveItem, Reserved, SpendCounter, SpendKey, SpendLevel, Take, TakenAndReserved,
};
use super::unix_now_us;

/// What requests get while the shared counters cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Refuse what a budget or limit polices: 503 `counters_unavailable`.
    FailClosed,
    /// Serve, count in this process, reconcile into Redis when it is back.
    FailOpen,
}

impl OnError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::FailClosed => "fail_closed",
            OnError::FailOpen => "fail_open",
        }
    }
}

/// Metrics the shared counters report (made by the metrics registry, passed in).
#[derive(Clone)]
pub struct SharedMetrics {
    /// `modelux_counters_transitions_total{to="down"|"up"}`.
    pub transitions: prometheus::IntCounterVec,
    /// `modelux_counters_errors_total{op}`: failed or timed-out calls.
    pub errors: prometheus::IntCounterVec,
    /// `modelux_counters_local_total{op}`: operations counted in process during an outage.
    pub local: prometheus::IntCounterVec,
    /// `modelux_counters_reachable`: 1 while Redis answers.
    pub reachable: prometheus::IntGauge,
    /// `modelux_counters_round_trips_total{op}`: round trips to Redis (a settlement that
    /// rides in front of a batch is not one of its own).
    pub round_trips: prometheus::IntCounterVec,
    /// `modelux_counters_wait_seconds`: how long each take or reservation waited.
    pub wait: prometheus::Histogram,
}

/// One node's settled spend of one counter, as written to the durable store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpendRow {
    pub budget: String,
    pub instance: String,
    pub period_start: i64,
    /// End of the period: Redis expires the counter after it.
    pub period_end: i64,
    pub node: String,
    pub spend_nanos: Nanos,
}

/// Where nodes' settled figures are kept durably (the state store). Blocking calls: the
/// spend flusher's and the re-seed's blocking threads make them.
pub trait SpendRows: Send + Sync {
    /// Writes absolute figures (a row never lowers a newer figure of its node).
    fn save(&self, rows: &[NodeSpendRow]) -> Result<(), String>;
    /// Every node's figures of periods that started at or after `since` (Unix seconds).
    fn load(&self, since: i64) -> Result<Vec<NodeSpendRow>, String>;
}

/// Reads every node's durable rows of current periods (for a re-seed). Blocking.
pub type SeedSource = Arc<dyn Fn() -> Result<Vec<NodeSpendRow>, String> + Send + Sync>;

pub struct SharedSettings {
    pub url: String,
    pub timeout: Duration,
    pub on_error: OnError,
    /// This node's name in the counters (`n:<node>`): stable across restarts, unique.
    pub node: String,
}

const EPOCH_KEY: &str = "mlx:spend:epoch";
/// After a failed call, calls fail at once for this long; the reconciler probes meanwhile.
const BACKOFF: Duration = Duration::from_millis(500);
/// How often the reconciler looks for work (owed releases, unpushed spend, a probe).
const RECONCILE_EVERY: Duration = Duration::from_millis(200);
/// Counters outlive their period by this much (late settlements, reporting).
const EXPIRY_GRACE_S: i64 = 86_400;
/// Keys per reconciliation script call.
const CHUNK: usize = 200;
/// Holds per settle script call.
const SETTLE_BATCH: usize = 256;
/// How long settlements wait for a batch of takes and reservations on their thread to carry
/// them (one round trip for both) before they go on their own. A hold released this much
/// later only makes other nodes a moment more cautious; this node's view drops it at once.
const SETTLE_RIDE: Duration = Duration::from_millis(1);
/// Takes and reservations per batch script call (a longer script holds Redis up for
/// every node).
const OP_BATCH: usize = 128;
/// How long a node's claim on its name lasts unless renewed (the reconciler renews it every
/// `RECONCILE_EVERY`): a node that starts under the name of a running one is refused.
const NODE_LEASE_MS: u64 = 3_000;
/// A reservation is dropped this long after it was made if it was never settled (its
/// node died, or its release was lost): longer than any request runs.
const HOLD_LEASE_S: i64 = 3_600;

/// Settlements of several holds in one call: ARGV[1] is this node's field, ARGV[2] the
/// number of holds, then per hold its member, the amount it reserved on each of its keys,
/// how many keys and their KEYS indexes; then per key (KEYS[2..]) this node's figure and
/// when the counter expires. Each key's figure is pushed once however many holds it had.
const SETTLE: &str = r"
local epoch = redis.call('GET', KEYS[1])
if not epoch then return {-1} end
local at = 3
for h = 1, tonumber(ARGV[2]) do
  local member, reserved, n = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2])
  if member ~= '' then
    for j = 1, n do
      local k = KEYS[tonumber(ARGV[at + 2 + j])]
      if redis.call('ZREM', k .. ':h', member) == 1 then
        if redis.call('HINCRBY', k, 'r', string.format('%d', -tonumber(reserved))) < 0 then redis.call('HSET', k, 'r', '0') end
      end
    end
  end
  at = at + 3 + n
end
local out = {0, epoch}
for i = 2, #KEYS do
  local k = KEYS[i]
  local want = tonumber(ARGV[at])
  local have = tonumber(redis.call('HGET', k, ARGV[1])) or 0
  if want > have then
    redis.call('HSET', k, ARGV[1], ARGV[at])
    redis.call('HINCRBY', k, 't', string.format('%d', want - have))
  end
  redis.call('EXPIREAT', k, ARGV[at + 1])
  at = at + 2
  local v = redis.call('HMGET', k, 't', 'r', ARGV[1])
  out[#out + 1] = tonumber(v[1]) or 0
  out[#out + 1] = tonumber(v[2]) or 0
  out[#out + 1] = tonumber(v[3]) or 0
end
return out
";

const SEED: &str = r"
local current = redis.call('GET', KEYS[1])
if current then return current end
for i = 2, #KEYS do
  local at = 3 * i - 4
  local want = tonumber(ARGV[at + 1])
  local have = tonumber(redis.call('HGET', KEYS[i], ARGV[at])) or 0
  if want > have then
    redis.call('HSET', KEYS[i], ARGV[at], ARGV[at + 1])
    redis.call('HINCRBY', KEYS[i], 't', string.format('%d', want - have))
  end
  redis.call('EXPIREAT', KEYS[i], ARGV[at + 2])
end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
";

/// Takes or renews this node's name for `ARGV[2]` ms unless another process holds it.
const LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

const LEVELS: &str = r"
local out = {}
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 't', 'r')
  out[#out + 1] = tonumber(v[1]) or 0
  out[#out + 1] = tonumber(v[2]) or 0
end
return out
";

const ADJUST: &str = r"
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then return 0 end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local nxt = tat + tonumber(ARGV[1])
if nxt < 0 then nxt = 0 end
redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX', math.max(math.ceil((nxt - now) / 1000), 0) + 1000)
return 1
";

/// Limiter takes and reservations queued on one thread, in one call: ARGV[1] is this
/// node's field, ARGV[2] the number of operations, then per operation one of
/// - `t, <key index>, <per minute>, <cost>`: a take (GCRA as in `counters::gcra`, on
///   Redis's clock in µs);
/// - `r, <amount>, <member>, <lease s>, <key count>`, then per key `<index>, <cap>, <expiry>`:
///   a reservation;
/// - `g, <take count>`, that many takes' `<key index>, <per minute>, <cost>`, then a
///   reservation's fields: the takes in order up to the first refusal, and the reservation
///   only if every take allowed; its answer is the list of theirs (a request's whole
///   admission in one round trip).
///
/// One answer per operation, in order; each operation sees the ones before it.
const BATCH: &str = r"
local epoch = redis.call('GET', KEYS[1])
local clock = redis.call('TIME')
local now_s = tonumber(clock[1])
local now = now_s * 1000000 + tonumber(clock[2])
local minute = 60000000
local function take(at)
  local key = KEYS[tonumber(ARGV[at])]
  local per = tonumber(ARGV[at + 1])
  local inc = math.floor(tonumber(ARGV[at + 2]) * minute / per)
  local tat = tonumber(redis.call('GET', key)) or 0
  local base = math.max(tat, now)
  local nxt = base + inc
  local function remaining(x)
    local room = now + minute - x
    if room < 0 then room = 0 end
    return math.floor(room * per / minute)
  end
  if nxt > now + minute then
    local retry = -1
    if inc <= minute then retry = nxt - minute - now end
    return {0, remaining(base), base - now, retry}
  end
  redis.call('SET', key, string.format('%d', nxt), 'PX', string.format('%d', math.ceil((nxt - now) / 1000) + 1000))
  return {1, remaining(nxt), nxt - now, 0}
end
-- The reservation whose fields start at ARGV[at] (made only when `run`), and where the
-- next operation starts.
local function reserve(at, run)
  local amount, member, lease, n = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  local first = at + 4
  local nxt = first + 3 * n
  if not run then return nil, nxt end
  if not epoch then return {-1}, nxt end
  local answer = {0, epoch}
  for j = 0, n - 1 do
    local k = KEYS[tonumber(ARGV[first + 3 * j])]
    local expired = redis.call('ZRANGEBYSCORE', k .. ':h', '-inf', now_s)
    if #expired > 0 then
      local gone = 0
      for _, m in ipairs(expired) do gone = gone + (tonumber(string.match(m, ':(%d+)$')) or 0) end
      redis.call('ZREMRANGEBYSCORE', k .. ':h', '-inf', now_s)
      if redis.call('HINCRBY', k, 'r', string.format('%d', -gone)) < 0 then redis.call('HSET', k, 'r', '0') end
    end
    local v = redis.call('HMGET', k, 't', 'r', ARGV[1])
    local t = tonumber(v[1]) or 0
    local r = tonumber(v[2]) or 0
    local cap = tonumber(ARGV[first + 3 * j + 1])
    if cap >= 0 and t + r >= cap then
      return {1, j, t, r}, nxt
    end
    answer[#answer + 1] = t
    answer[#answer + 1] = r + tonumber(amount)
    answer[#answer + 1] = tonumber(v[3]) or 0
  end
  for j = 0, n - 1 do
    local k = KEYS[tonumber(ARGV[first + 3 * j])]
    local expiry = ARGV[first + 3 * j + 2]
    redis.call('HINCRBY', k, 'r', amount)
    redis.call('ZADD', k .. ':h', string.format('%d', now_s + lease), member)
    redis.call('EXPIREAT', k, expiry)
    redis.call('EXPIREAT', k .. ':h', expiry)
  end
  return answer, nxt
end
local out = {}
local at = 3
for o = 1, tonumber(ARGV[2]) do
  local kind = ARGV[at]
  if kind == 't' then
    out[o] = take(at + 1)
    at = at + 4
  elseif kind == 'r' then
    out[o], at = reserve(at + 1, true)
  else
    local answers = {}
    local allowed = true
    local n = tonumber(ARGV[at + 1])
    at = at + 2
    for _ = 1, n do
      if allowed then
        local a = take(at)
        answers[#answers + 1] = a
        allowed = a[1] == 1
      end
      at = at + 3
    end
    local r
    r, at = reserve(at, allowed)
    if r then answers[#answers + 1] = r end
    out[o] = answers
  end
end
return out
";

/// Answers a thread's queue if the task that was to send it is dropped before taking it
/// (its runtime shutting down): waiting operations get an error instead of waiting on.
struct QueueGuard {
    inner: Arc<Inner>,
    thread: std::thread::ThreadId,
    armed: bool,
}

impl Drop for QueueGuard {
    fn drop(&mut self) {
        if self.armed {
            // Dropping the queued operations drops their reply senders.
            drop(self.inner.ops.remove(&self.thread));
        }
    }
}

fn first_of(v: &redis::Value) -> Option<&redis::Value> {
    match v {
        redis::Value::Array(items) => items.first(),
        _ => None,
    }
}

/// One operation of a batch (see `BATCH`).
enum Op {
    Take {
        key: String,
        per_minute: u64,
        cost: u64,
    },
    Reserve(ReserveOp),
    /// Takes (key, per minute, cost), then the reservation if every take allowed.
    Gated {
        takes: Vec<(String, u64, u64)>,
        reserve: ReserveOp,
    },
}

/// A reservation as a batch sends it: per key its Redis key, cap (-1: none) and expiry.
struct ReserveOp {
    keys: Vec<(String, i64, i64)>,
    cells: Vec<Arc<Cell>>,
    amount: Nanos,
    member: String,
}

impl Op {
    /// The reservation's own answer within the operation's answer `v`, if it was made.
    fn reservation<'v>(&self, v: &'v redis::Value) -> Option<(&ReserveOp, &'v redis::Value)> {
        match (self, v) {
            (Op::Reserve(r), _) => Some((r, v)),
            (Op::Gated { takes, reserve }, redis::Value::Array(items)) if items.len() == takes.len() + 1 => {
                items.last().map(|a| (reserve, a))
            }
            _ => None,
        }
    }
}

/// An operation waiting for its thread's next batch, and where its answer goes.
struct QueuedOp {
    op: Op,
    reply: tokio::sync::oneshot::Sender<Result<redis::Value, CountersDown>>,
}

struct Scripts {
    batch: Script,
    lease: Script,
    settle: Script,
    seed: Script,
    levels: Script,
    adjust: Script,
}

/// A script call being built: sent as `EVALSHA` alone, or pipelined behind another so one
/// round trip carries both (what `redis::ScriptInvocation` cannot be).
struct Eval<'s> {
    script: &'s Script,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl<'s> Eval<'s> {
    fn new(script: &'s Script) -> Eval<'s> {
        Eval { script, keys: Vec::new(), args: Vec::new() }
    }

    fn key<T: redis::ToRedisArgs>(&mut self, key: T) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    fn arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    fn cmd(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(self.keys.len()).arg(&self.keys[..]).arg(&self.args[..]);
        cmd
    }

    /// `answer` to this call as sent; when Redis lacked the script (it restarted, or
    /// flushed its scripts) the script never ran: it is loaded and the call sent again.
    async fn unless_missing(
        &self,
        c: &mut ConnectionManager,
        answer: redis::RedisResult<redis::Value>,
    ) -> redis::RedisResult<redis::Value> {
        match answer {
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                self.script.prepare_invoke().load_async(c).await?;
                self.cmd().query_async(c).await
            }
            answer => answer,
        }
    }
}

/// This node's view of one shared budget counter.
#[derive(Default)]
struct Cell {
    /// This node's settled spend (absolute, the figure written to Redis and the store).
    own: AtomicI64,
    /// Settled spend of all nodes as Redis last said, plus this node's settlements since.
    total: AtomicI64,
    /// Reservations in flight on all nodes, as Redis last said.
    reserved: AtomicI64,
    /// Reservations this node holds in process (made while Redis was out of reach).
    local_pending: AtomicI64,
    /// `own` changed since the last durable write.
    dirty_store: AtomicBool,
    /// `own` may be ahead of Redis (a settlement that did not reach it).
    dirty_redis: AtomicBool,
    period_end: AtomicI64,
}

impl Cell {
    fn seen(&self, total: i64, reserved: i64) {
        self.total.store(total, Ordering::Release);
        self.reserved.store(reserved, Ordering::Release);
    }

    /// Redis knows more of this node's spend than the process (a restart that lost figures
    /// not yet written): take it, so later settlements add to it.
    fn hydrate(&self, mine: Nanos) {
        if self.own.fetch_max(mine, Ordering::AcqRel) < mine {
            self.dirty_store.store(true, Ordering::Release);
        }
    }

    /// Adds `actual` settled spend of this node; the new absolute figure.
    fn add_own(&self, actual: Nanos) -> Nanos {
        let own = self.own.fetch_add(actual, Ordering::AcqRel) + actual;
        self.total.fetch_add(actual, Ordering::AcqRel);
        if actual != 0 {
            self.dirty_store.store(true, Ordering::Release);
        }
        own
    }
}

impl SpendCounter for Cell {
    fn level(&self) -> SpendLevel {
        let committed = self.total.load(Ordering::Acquire);
        let used = committed
            .saturating_add(self.reserved.load(Ordering::Acquire).max(0))
            .saturating_add(self.local_pending.load(Ordering::Acquire));
        SpendLevel { committed, used }
    }

    /// A reservation in process (Redis out of reach, `fail_open`): against the last shared
    /// level plus what this node holds.
    fn reserve(&self, amount: Nanos, cap: Option<Nanos>) -> Result<SpendLevel, SpendLevel> {
        let mut pending = self.local_pending.load(Ordering::Acquire);
        loop {
            let level = SpendLevel {
                committed: self.total.load(Ordering::Acquire),
                used: self
                    .total
                    .load(Ordering::Acquire)
                    .saturating_add(self.reserved.load(Ordering::Acquire).max(0))
                    .saturating_add(pending),
            };
            if cap.is_some_and(|cap| level.used >= cap) {
                return Err(level);
            }
            match self.local_pending.compare_exchange_weak(
                pending,
                pending.saturating_add(amount),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(SpendLevel { used: level.used.saturating_add(amount), ..level }),
                Err(now) => pending = now,
            }
        }
    }

    /// Settles an in-process reservation (or a charge): counted here, pushed to Redis by
    /// the reconciler.
    fn settle(&self, reserved: Nanos, actual: Nanos) {
        self.local_pending.fetch_sub(reserved, Ordering::AcqRel);
        self.add_own(actual);
        self.dirty_redis.store(true, Ordering::Release);
    }
}

type FastMap<K, V> = DashMap<K, V, ahash::RandomState>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CellKey {
    budget: Box<str>,
    instance: Box<str>,
    period_start: i64,
}

fn redis_key(budget: &str, instance: &str, period_start: i64) -> String {
    // The budget's length makes the key unambiguous whatever the names contain.
    format!("mlx:spend:{period_start}:{}:{budget}:{instance}", budget.len())
}

fn rate_key(kind: RateKind, key: &str) -> String {
    format!("mlx:rate:{}:{key}", kind.unit())
}

/// A hold to release (a settlement waiting to be sent, or one owed after a failure and
/// retried by the reconciler: a release that did arrive finds no member the second time
/// and changes nothing).
struct SettleJob {
    keys: Vec<(String, Arc<Cell>)>,
    /// The hold's member in each counter's `:h` set.
    member: String,
    reserved: Nanos,
}

pub struct SharedCounters {
    inner: Arc<Inner>,
    /// Runs the connection, settlements and the reconciler (`None` only while dropping).
    runtime: Option<tokio::runtime::Runtime>,
}

struct Inner {
    client: redis::Client,
    conn: ArcSwapOption<ConnectionManager>,
    timeout: Duration,
    on_error: OnError,
    node: String,
    field: String,
    scripts: Scripts,
    cells: FastMap<CellKey, Arc<Cell>>,
    /// The counters' own runtime, for work queued outside any runtime.
    runtime_handle: std::sync::OnceLock<tokio::runtime::Handle>,
    /// A connection per thread that calls (`None` while it is being made).
    by_thread: Arc<FastMap<std::thread::ThreadId, Option<ConnectionManager>>>,
    /// The rate limiter while Redis is out of reach (`fail_open`).
    fallback: LocalCounters,
    reachable: AtomicBool,
    started: Instant,
    /// Milliseconds since `started` before which calls fail without trying.
    retry_at_ms: AtomicU64,
    /// Redis has no epoch: a re-seed is due.
    needs_seed: AtomicBool,
    /// This process's claim on `node` (`mlx:node:<node>`).
    token: String,
    /// Another running process holds this node's name.
    name_taken: AtomicBool,
    /// The epoch Redis last answered with: a new one means it was re-seeded, and this
    /// node's figures may be newer than the store's.
    epoch: Mutex<String>,
    owed: Mutex<Vec<SettleJob>>,
    /// Settlements waiting to be sent, per thread that made them: the thread's next batch
    /// of takes and reservations carries them, or after `SETTLE_RIDE` a task on that
    /// thread sends whatever queued, in one call on the thread's own connection (a
    /// separate worker thread cost a context switch per batch).
    settles: FastMap<std::thread::ThreadId, Vec<SettleJob>>,
    /// Takes and reservations waiting, per thread, batched the same way (a burst of
    /// requests on one thread makes one round trip, not one each).
    ops: FastMap<std::thread::ThreadId, Vec<QueuedOp>>,
    seed_source: SeedSource,
    metrics: SharedMetrics,
    wake: tokio::sync::Notify,
}

impl SharedCounters {
    /// Connects (waiting at most the timeout; an unreachable Redis is retried in the
    /// background) and loads this node's durable figures (`own`: rows of this node).
    pub fn open(
        settings: SharedSettings,
        own: Vec<NodeSpendRow>,
        seed_source: SeedSource,
        metrics: SharedMetrics,
    ) -> Result<SharedCounters, String> {
        let client = redis::Client::open(settings.url.as_str()).map_err(|e| format!("redis url: {e}"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("modelux-counters")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the counters runtime: {e}"))?;
        let inner = Arc::new(Inner {
            client,
            conn: ArcSwapOption::empty(),
            timeout: settings.timeout,
            on_error: settings.on_error,
            field: format!("n:{}", settings.node),
            node: settings.node,
            scripts: Scripts {
                batch: Script::new(BATCH),
                lease: Script::new(LEASE),
                settle: Script::new(SETTLE),
                seed: Script::new(SEED),
                levels: Script::new(LEVELS),
                adjust: Script::new(ADJUST),
            },
            cells: FastMap::default(),
            by_thread: Arc::new(FastMap::default()),
            runtime_handle: std::sync::OnceLock::new(),
            fallback: LocalCounters::new(),
            reachable: AtomicBool::new(false),
            started: Instant::now(),
            retry_at_ms: AtomicU64::new(0),
            needs_seed: AtomicBool::new(true),
            epoch: Mutex::new(String::new()),
            token: hex::encode(rand::random::<[u8; 8]>()),
            name_taken: AtomicBool::new(false),
            owed: Mutex::new(Vec::new()),
            settles: FastMap::default(),
            ops: FastMap::default(),
            seed_source,
            metrics,
            wake: tokio::sync::Notify::new(),
        });
        for row in own.into_iter().filter(|r| r.node == inner.node) {
            let cell = inner.cell_owned(CellKey {
                budget: row.budget.into(),
                instance: row.instance.into(),
                period_start: row.period_start,
            });
            cell.own.fetch_max(row.spend_nanos, Ordering::AcqRel);
            cell.total.fetch_max(row.spend_nanos, Ordering::AcqRel);
            cell.period_end.store(row.period_end, Ordering::Release);
            // Redis may have lost it: the reconciler pushes it (a no-op if Redis has it).
            cell.dirty_redis.store(true, Ordering::Release);
        }
        inner.metrics.reachable.set(0);
        let _ = inner.runtime_handle.set(runtime.handle().clone());
        // The first connection and seed, before traffic; then the reconciler keeps both.
        let (tx, rx) = std::sync::mpsc::channel();
        let first = inner.clone();
        runtime.spawn(async move {
            first.reconcile().await;
            let _ = tx.send(());
        });
        let _ = rx.recv_timeout(settings.timeout.max(Duration::from_millis(500)) * 4);
        // The name may still be held by this node's previous process (a crash or a quick
        // restart): its claim runs out within NODE_LEASE_MS.
        let deadline = Instant::now() + Duration::from_millis(NODE_LEASE_MS + 500);
        while inner.name_taken.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(RECONCILE_EVERY);
            let (tx, rx) = std::sync::mpsc::channel();
            let again = inner.clone();
            runtime.spawn(async move {
                again.claim_name().await;
                let _ = tx.send(());
            });
            let _ = rx.recv_timeout(settings.timeout.max(Duration::from_millis(500)) * 2);
        }
        if inner.name_taken.load(Ordering::Acquire) {
            runtime.shutdown_background();
            return Err(format!(
                "another running node uses the node name \"{}\" in these counters; give each node its own spend.node_id",
                inner.node
            ));
        }
        let looping = inner.clone();
        runtime.spawn(async move {
            loop {
                let _ = tokio::time::timeout(RECONCILE_EVERY, looping.wake.notified()).await;
                looping.reconcile().await;
            }
        });
        if !inner.reachable.load(Ordering::Acquire) {
            tracing::warn!(
                policy = inner.on_error.as_str(),
                "shared counters: Redis cannot be reached at start; retrying in the background"
            );
        }
        Ok(SharedCounters { inner, runtime: Some(runtime) })
    }

    /// This node's settled figures changed since the last call (for the durable store).
    pub fn dirty_rows(&self) -> Vec<NodeSpendRow> {
        let mut rows = Vec::new();
        for e in self.inner.cells.iter() {
            if e.value().dirty_store.swap(false, Ordering::AcqRel) {
                let k = e.key();
                rows.push(NodeSpendRow {
                    budget: k.budget.to_string(),
                    instance: k.instance.to_string(),
                    period_start: k.period_start,
                    period_end: e.value().period_end.load(Ordering::Acquire),
                    node: self.inner.node.clone(),
                    spend_nanos: e.value().own.load(Ordering::Acquire),
                });
            }
        }
        rows
    }

    /// Marks rows a failed durable write still owes.
    pub fn redirty(&self, rows: &[NodeSpendRow]) {
        for r in rows {
            let key = CellKey {
                budget: r.budget.as_str().into(),
                instance: r.instance.as_str().into(),
                period_start: r.period_start,
            };
            if let Some(c) = self.inner.cells.get(&key) {
                c.dirty_store.store(true, Ordering::Release);
            }
        }
    }

    /// Forgets counters of periods that started before `before` with nothing pending.
    pub fn forget_before(&self, before: i64) {
        self.inner.cells.retain(|k, c| {
            let busy = Arc::strong_count(c) > 1
                || c.dirty_store.load(Ordering::Acquire)
                || c.dirty_redis.load(Ordering::Acquire)
                || c.local_pending.load(Ordering::Acquire) != 0;
            busy || k.period_start >= before
        });
    }
}

impl Drop for SharedCounters {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is not allowed inside another runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A reservation's fields in a `BATCH` call (after its `r`), its keys indexed in `keys`.
fn reserve_args<'o>(
    inv: &mut Eval<'_>,
    r: &'o ReserveOp,
    index: &mut std::collections::HashMap<&'o str, usize>,
    keys: &mut Vec<&'o str>,
) {
    inv.arg(r.amount).arg(&r.member).arg(HOLD_LEASE_S).arg(r.keys.len());
    for (k, cap, expiry) in &r.keys {
        let i = *index.entry(k.as_str()).or_insert_with(|| {
            keys.push(k.as_str());
            keys.len() + 1
        });
        inv.arg(i).arg(*cap).arg(*expiry);
    }
}

impl ReserveOp {
    /// The settlement that gives the hold back (a no-op where Redis never made it).
    fn release(&self) -> SettleJob {
        let keys = self.keys.iter().map(|(k, _, _)| k.clone()).zip(self.cells.iter().cloned()).collect();
        SettleJob { keys, member: self.member.clone(), reserved: self.amount }
    }
}

/// A take's answer `{allowed, remaining, reset µs, retry µs (-1: never)}`.
fn verdict_of(v: &redis::Value, per_minute: u64) -> RateVerdict {
    let n = ints(v);
    let at = |i: usize| n.get(i).copied().unwrap_or(0);
    RateVerdict {
        allowed: at(0) == 1,
        limit: per_minute,
        remaining: at(1).max(0) as u64,
        reset_us: at(2).max(0) as u64,
        retry_after_us: if at(3) < 0 { u64::MAX } else { at(3) as u64 },
    }
}

/// A script's answer, as integers and (first) strings.
fn ints(v: &redis::Value) -> Vec<i64> {
    match v {
        redis::Value::Array(items) => items
            .iter()
            .map(|i| match i {
                redis::Value::Int(n) => *n,
                redis::Value::BulkString(b) => {
                    std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).unwrap_or(0)
                }
                _ => 0,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The epoch of a granted reservation's answer (`{0, epoch, …}`); takes and refusals
/// carry none.
fn granted_epoch(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::Array(items) if matches!(items.first(), Some(redis::Value::Int(0))) => text_at(v, 1),
        _ => None,
    }
}

fn text_at(v: &redis::Value, i: usize) -> Option<String> {
    match v {
        redis::Value::Array(items) => match items.get(i)? {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            redis::Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// A settle script's answer: the levels of `cells` (in the call's order) as Redis has them.
fn settled_levels(cells: &[Arc<Cell>], v: &redis::Value) {
    let n = ints(v);
    for (i, cell) in cells.iter().enumerate() {
        let at = 2 + 3 * i;
        if let (Some(&t), Some(&r), Some(&mine)) = (n.get(at), n.get(at + 1), n.get(at + 2)) {
            cell.seen(t, r);
            cell.hydrate(mine);
        }
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn cell_owned(&self, key: CellKey) -> Arc<Cell> {
        if let Some(c) = self.cells.get(&key) {
            return c.clone();
        }
        self.cells.entry(key).or_default().clone()
    }

    fn cell(&self, key: &SpendKey<'_>) -> Arc<Cell> {
        self.cell_owned(CellKey {
            budget: key.budget.into(),
            instance: key.instance.into(),
            period_start: key.period_start,
        })
    }

    fn mark_down(&self, op: &str, error: &str) {
        self.metrics.errors.with_label_values(&[op]).inc();
        self.retry_at_ms.store(self.now_ms() + BACKOFF.as_millis() as u64, Ordering::Release);
        if self.reachable.swap(false, Ordering::AcqRel) {
            self.metrics.transitions.with_label_values(&["down"]).inc();
            self.metrics.reachable.set(0);
            tracing::error!(
                error,
                policy = self.on_error.as_str(),
                "shared counters: Redis is out of reach; {}",
                match self.on_error {
                    OnError::FailClosed =>
                        "requests a budget or rate limit polices get 503 counters_unavailable",
                    OnError::FailOpen => "serving and counting in this process until it is back",
                }
            );
        }
    }

    /// Notes the epoch a script answered with; when it changed, this node's figures are
    /// pushed again (another node re-seeded Redis from the store, which may lag).
    fn observe_epoch(&self, epoch: &str) {
        let Ok(mut last) = self.epoch.lock() else { return };
        if *last == epoch {
            return;
        }
        let changed = !last.is_empty();
        *last = epoch.to_string();
        drop(last);
        if changed {
            self.mark_all_dirty();
            self.wake.notify_one();
        }
    }

    fn mark_all_dirty(&self) {
        for e in self.cells.iter() {
            if e.value().own.load(Ordering::Acquire) > 0 {
                e.value().dirty_redis.store(true, Ordering::Release);
            }
        }
    }

    fn mark_up(&self) {
        self.retry_at_ms.store(0, Ordering::Release);
        if !self.reachable.swap(true, Ordering::AcqRel) {
            self.metrics.transitions.with_label_values(&["up"]).inc();
            self.metrics.reachable.set(1);
            tracing::warn!("shared counters: Redis answers again; reconciling what was counted meanwhile");
        }
    }

    /// The connection for a call from this thread: its own once made (so a call never
    /// wakes another thread and back), the shared one until then or outside a runtime.
    fn connection(&self) -> Option<ConnectionManager> {
        let shared = || self.conn.load_full().map(|c| (*c).clone());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return shared() };
        let thread = std::thread::current().id();
        if let Some(c) = self.by_thread.get(&thread) {
            return c.clone().or_else(shared);
        }
        let base = shared()?;
        self.by_thread.insert(thread, None);
        let config = self.connection_config();
        let (client, slots) = (self.client.clone(), self.by_thread.clone());
        // Made on this thread's runtime, so its driver runs here too.
        runtime.spawn(async move {
            match ConnectionManager::new_with_config(client, config).await {
                Ok(c) => {
                    slots.insert(thread, Some(c));
                }
                Err(_) => {
                    // Tried again by a later call; the shared connection serves meanwhile.
                    slots.remove(&thread);
                }
            }
        });
        Some(base)
    }

    fn connection_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout.max(Duration::from_millis(200)))
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1)
            // Without it a write behind an unacknowledged one waits for its ACK (Nagle):
            // pipelined batches would stall.
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true))
    }

    /// One script call, bounded by the timeout. Fails at once while backing off.
    /// A connection to call on, unless Redis is known to be out of reach (the round trip
    /// about to be made is counted).
    fn ready(&self, op: &'static str) -> Result<ConnectionManager, CountersDown> {
        if !self.reachable.load(Ordering::Acquire) && self.now_ms() < self.retry_at_ms.load(Ordering::Acquire)
        {
            return Err(CountersDown("Redis is out of reach".into()));
        }
        let Some(c) = self.connection() else {
            return Err(CountersDown("no connection to Redis yet".into()));
        };
        self.metrics.round_trips.with_label_values(&[op]).inc();
        Ok(c)
    }

    async fn call(&self, op: &'static str, eval: Eval<'_>) -> Result<redis::Value, CountersDown> {
        let mut c = self.ready(op)?;
        let sent = async {
            let answer = eval.cmd().query_async::<redis::Value>(&mut c).await;
            eval.unless_missing(&mut c, answer).await
        };
        let answer = tokio::time::timeout(self.timeout, sent).await.ok();
        self.answered(op, answer)
    }

    /// Settlements riding in front of a batch: both scripts in one round trip, settling
    /// first (a released hold makes room for the batch's reservations). Answers the
    /// settlement's and the batch's results.
    async fn call_riding(
        &self,
        settle: Eval<'_>,
        batch: Eval<'_>,
    ) -> (Result<redis::Value, CountersDown>, Result<redis::Value, CountersDown>) {
        let mut c = match self.ready("batch") {
            Ok(c) => c,
            Err(e) => return (Err(e.clone()), Err(e)),
        };
        let mut pipe = redis::pipe();
        pipe.add_command(settle.cmd()).add_command(batch.cmd());
        let sent = async {
            let answers = c.req_packed_commands(&pipe, 0, 2).await?;
            let Ok([settled, batched]) = <[redis::Value; 2]>::try_from(answers) else {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::ResponseError,
                    "a pipelined answer was short",
                )));
            };
            // A script Redis lacked is sent again on its own. (Had only the settle script
            // gone missing, the batch ran first: right after, a reservation the release
            // would have made room for may be refused, as it would have been a moment
            // earlier.)
            let settled = settle.unless_missing(&mut c, settled.extract_error()).await;
            let batched = batch.unless_missing(&mut c, batched.extract_error()).await;
            Ok::<_, redis::RedisError>((settled, batched))
        };
        match tokio::time::timeout(self.timeout, sent).await {
            Ok(Ok((settled, batched))) => {
                (self.answered("settle", Some(settled)), self.answered("batch", Some(batched)))
            }
            Ok(Err(e)) => {
                let e = self.answered("batch", Some(Err(e)));
                (e.clone(), e)
            }
            Err(_) => {
                let e = self.answered("batch", None);
                (e.clone(), e)
            }
        }
    }

    /// A call's answer (`None`: none within the timeout), with what it says about Redis:
    /// reachable, unreachable, or without its counters.
    fn answered(
        &self,
        op: &'static str,
        answer: Option<redis::RedisResult<redis::Value>>,
    ) -> Result<redis::Value, CountersDown> {
        match answer {
            Some(Ok(v)) => {
                if matches!(&v, redis::Value::Array(a) if matches!(a.first(), Some(redis::Value::Int(-1)))) {
                    // Redis lost its counters: refuse until it is re-seeded.
                    if !self.needs_seed.swap(true, Ordering::AcqRel) {
                        tracing::error!("shared counters: Redis came back without its counters; re-seeding from the durable store");
                    }
                    self.wake.notify_one();
                    self.mark_down(op, "not seeded");
                    return Err(CountersDown("Redis is being re-seeded".into()));
                }
                // A script that does not check the epoch (the limiter) answers an empty Redis
                // too: it does not make the counters usable before the re-seed.
                if !self.needs_seed.load(Ordering::Acquire) {
                    self.mark_up();
                }
                if matches!(op, "settle" | "reconcile") {
                    if let Some(epoch) = granted_epoch(&v) {
                        self.observe_epoch(&epoch);
                    }
                }
                Ok(v)
            }
            Some(Err(e)) => {
                let e = e.to_string();
                self.mark_down(op, &e);
                Err(CountersDown(e))
            }
            None => {
                let e = format!("no answer within {} ms", self.timeout.as_millis());
                self.mark_down(op, &e);
                Err(CountersDown(e))
            }
        }
    }

    /// Connects when there is no connection, re-seeds when Redis lost its counters, then
    /// delivers owed releases and pushes this node's figures Redis may lack.
    async fn reconcile(&self) {
        if self.conn.load().is_none() {
            match ConnectionManager::new_with_config(self.client.clone(), self.connection_config()).await {
                Ok(c) => self.conn.store(Some(Arc::new(c))),
                Err(e) => {
                    self.mark_down("connect", &e.to_string());
                    return;
                }
            }
        }
        if !self.reachable.load(Ordering::Acquire) || self.needs_seed.load(Ordering::Acquire) {
            // A probe that also tells whether Redis still has its epoch (requests keep
            // failing fast meanwhile: the gate opens only when it answers).
            let Some(conn) = self.conn.load_full() else { return };
            let mut c = (*conn).clone();
            let mut exists = redis::cmd("EXISTS");
            exists.arg(EPOCH_KEY);
            match tokio::time::timeout(self.timeout, exists.query_async::<i64>(&mut c)).await {
                Ok(Ok(1)) => {
                    if self.needs_seed.swap(false, Ordering::AcqRel) {
                        // Told Redis lost its counters, found it seeded: another node did it.
                        self.mark_all_dirty();
                    }
                }
                Ok(Ok(_)) => {
                    if let Err(e) = self.seed().await {
                        self.mark_down("seed", &e);
                        return;
                    }
                }
                Ok(Err(e)) => return self.mark_down("probe", &e.to_string()),
                Err(_) => return self.mark_down("probe", "no answer"),
            }
            self.mark_up();
        }
        self.claim_name().await;
        self.deliver_owed().await;
        self.push_dirty().await;
    }

    /// Claims or renews this node's name; two processes under one name would each raise
    /// the same figure and count half the spend.
    async fn claim_name(&self) {
        let Some(conn) = self.conn.load_full() else { return };
        let mut c = (*conn).clone();
        let mut inv = self.scripts.lease.prepare_invoke();
        inv.key(format!("mlx:node:{}", self.node)).arg(&self.token).arg(NODE_LEASE_MS);
        match tokio::time::timeout(self.timeout, inv.invoke_async::<i64>(&mut c)).await {
            Ok(Ok(1)) if self.name_taken.swap(false, Ordering::AcqRel) => {
                tracing::warn!(node = %self.node, "shared counters: this node's name is its own again");
            }
            Ok(Ok(1)) => {}
            Ok(Ok(_)) if !self.name_taken.swap(true, Ordering::AcqRel) => {
                self.metrics.errors.with_label_values(&["node_name"]).inc();
                tracing::error!(node = %self.node, "shared counters: another running process uses this node's name; give each node its own spend.node_id (their spend would be counted once, not twice)");
            }
            // Already noted; or Redis unreachable, which the probe and the calls report.
            _ => {}
        }
    }

    /// Writes every node's durable figures into an empty Redis, once (the script does
    /// nothing if another node seeded first), then marks all of this node's figures for a
    /// push (they may be newer than what the store had).
    async fn seed(&self) -> Result<(), String> {
        let source = self.seed_source.clone();
        let rows =
            tokio::task::spawn_blocking(move || source()).await.map_err(|e| format!("seed task: {e}"))??;
        // Counters whose period (and grace) is over would expire as soon as written.
        let now = super::unix_now();
        let rows: Vec<_> = rows.into_iter().filter(|r| r.period_end + EXPIRY_GRACE_S > now).collect();
        let epoch = hex::encode(rand::random::<[u8; 8]>());
        let Some(conn) = self.conn.load_full() else { return Err("no connection".into()) };
        let mut c = (*conn).clone();
        // One script call (atomic): a seed split in parts could interleave with another node's.
        let mut inv = self.scripts.seed.prepare_invoke();
        inv.key(EPOCH_KEY).arg(&epoch);
        for r in &rows {
            inv.key(redis_key(&r.budget, &r.instance, r.period_start))
                .arg(format!("n:{}", r.node))
                .arg(r.spend_nanos)
                .arg(r.period_end + EXPIRY_GRACE_S);
        }
        self.metrics.round_trips.with_label_values(&["seed"]).inc();
        let applied: String =
            tokio::time::timeout(self.timeout.max(Duration::from_secs(5)), inv.invoke_async(&mut c))
                .await
                .map_err(|_| "no answer to the seed".to_string())?
                .map_err(|e| e.to_string())?;
        if applied == epoch {
            tracing::warn!(rows = rows.len(), "shared counters: seeded Redis from the durable store");
        }
        self.mark_all_dirty();
        self.needs_seed.store(false, Ordering::Release);
        Ok(())
    }

    async fn deliver_owed(&self) {
        let owed = match self.owed.lock() {
            Ok(mut o) => std::mem::take(&mut *o),
            Err(_) => return,
        };
        let mut failed = Vec::new();
        let mut jobs = owed.into_iter().peekable();
        while jobs.peek().is_some() {
            let batch: Vec<SettleJob> = jobs.by_ref().take(SETTLE_BATCH).collect();
            if self.send_settles(&batch, &[], "settle").await.is_err() {
                failed.extend(batch);
                failed.extend(jobs);
                break;
            }
        }
        if !failed.is_empty() {
            if let Ok(mut o) = self.owed.lock() {
                o.extend(failed);
            }
        }
    }

    /// Queues a take or a reservation for this thread's next batch and waits for its answer.
    async fn submit(self: &Arc<Self>, op: Op) -> Result<redis::Value, CountersDown> {
        let started = Instant::now();
        let answer = self.queue_and_wait(op).await;
        self.metrics.wait.observe(started.elapsed().as_secs_f64());
        answer
    }

    async fn queue_and_wait(self: &Arc<Self>, op: Op) -> Result<redis::Value, CountersDown> {
        let thread = std::thread::current().id();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let first = {
            let mut q = self.ops.entry(thread).or_default();
            q.push(QueuedOp { op, reply: tx });
            q.len() == 1
        };
        if first {
            let guard = QueueGuard { inner: self.clone(), thread, armed: true };
            let send = async move {
                let mut guard = guard;
                // The requests ready on this thread right now join the batch.
                tokio::task::yield_now().await;
                guard.armed = false;
                guard.inner.send_ops(thread).await;
            };
            match tokio::runtime::Handle::try_current() {
                Ok(h) => drop(h.spawn(send)),
                Err(_) => match self.runtime_handle.get() {
                    Some(rt) => drop(rt.spawn(send)),
                    // Dropping `send` drops its guard, which answers the queue.
                    None => drop(send),
                },
            }
        }
        // `call` bounds the round trip; this bounds the wait for a batch to go at all.
        match tokio::time::timeout(self.timeout * 2 + Duration::from_millis(100), rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(CountersDown("the counters call was dropped".into())),
            Err(_) => Err(CountersDown("no answer from the counters batch in time".into())),
        }
    }

    /// Sends `thread`'s queued operations, at most `OP_BATCH` per script call, and hands
    /// out the answers. Operations whose caller has gone are not sent.
    async fn send_ops(self: &Arc<Self>, thread: std::thread::ThreadId) {
        let mut queued: Vec<QueuedOp> = self
            .ops
            .get_mut(&thread)
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default()
            .into_iter()
            .filter(|q| !q.reply.is_closed())
            .collect();
        while !queued.is_empty() {
            let rest = queued.split_off(queued.len().min(OP_BATCH));
            self.send_op_batch(thread, queued).await;
            queued = rest;
        }
    }

    /// One batch script call, carrying the settlements queued on `thread` in front of it.
    async fn send_op_batch(self: &Arc<Self>, thread: std::thread::ThreadId, queued: Vec<QueuedOp>) {
        let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        let mut keys: Vec<&str> = Vec::new();
        let mut inv = Eval::new(&self.scripts.batch);
        inv.key(EPOCH_KEY).arg(&self.field).arg(queued.len());
        for q in &queued {
            match &q.op {
                Op::Take { key, per_minute, cost } => {
                    let i = *index.entry(key.as_str()).or_insert_with(|| {
                        keys.push(key.as_str());
                        keys.len() + 1
                    });
                    inv.arg("t").arg(i).arg((*per_minute).max(1)).arg(*cost);
                }
                Op::Reserve(r) => {
                    inv.arg("r");
                    reserve_args(&mut inv, r, &mut index, &mut keys);
                }
                Op::Gated { takes, reserve } => {
                    inv.arg("g").arg(takes.len());
                    for (key, per_minute, cost) in takes {
                        let i = *index.entry(key.as_str()).or_insert_with(|| {
                            keys.push(key.as_str());
                            keys.len() + 1
                        });
                        inv.arg(i).arg((*per_minute).max(1)).arg(*cost);
                    }
                    reserve_args(&mut inv, reserve, &mut index, &mut keys);
                }
            }
        }
        for k in &keys {
            inv.key(*k);
        }
        let riding: Vec<SettleJob> = self
            .settles
            .get_mut(&thread)
            .map(|mut q| {
                let n = q.len().min(SETTLE_BATCH);
                q.drain(..n).collect()
            })
            .unwrap_or_default();
        let answer = if riding.is_empty() {
            self.call("batch", inv).await
        } else {
            let (settle, cells) = self.settle_eval(&riding, &[]);
            let (settled, answer) = self.call_riding(settle, inv).await;
            match settled {
                Ok(v) => settled_levels(&cells, &v),
                Err(_) => self.owe(riding),
            }
            answer
        };
        let answers = match &answer {
            Ok(redis::Value::Array(items)) => Some(items.as_slice()),
            _ => None,
        };
        let mut unseeded = false;
        let mut epoch = None;
        for (i, q) in queued.into_iter().enumerate() {
            let reply = match (&answer, answers.and_then(|a| a.get(i))) {
                (Err(e), _) => Err(e.clone()),
                (Ok(_), Some(v)) => match q.op.reservation(v).map(|(_, r)| first_of(r)) {
                    Some(Some(redis::Value::Int(-1))) => {
                        unseeded = true;
                        match q.op {
                            // Its takes were judged: the caller keeps their verdicts and
                            // reserves in process.
                            Op::Gated { .. } => Ok(v.clone()),
                            _ => Err(CountersDown("Redis is being re-seeded".into())),
                        }
                    }
                    _ => Ok(v.clone()),
                },
                (Ok(_), None) => Err(CountersDown("a batch answer was short".into())),
            };
            if epoch.is_none() {
                if let Ok(v) = &reply {
                    epoch = q.op.reservation(v).and_then(|(_, r)| granted_epoch(r));
                }
            }
            if let Err(Ok(v)) = q.reply.send(reply) {
                // The caller went away after its reservation was granted: release it.
                if let Some((r, answer)) = q.op.reservation(&v) {
                    if matches!(first_of(answer), Some(redis::Value::Int(0))) {
                        self.queue_settle(r.release());
                    }
                }
            }
        }
        if unseeded {
            if !self.needs_seed.swap(true, Ordering::AcqRel) {
                tracing::error!("shared counters: Redis came back without its counters; re-seeding from the durable store");
            }
            self.wake.notify_one();
            self.mark_down("batch", "not seeded");
        } else if let Some(epoch) = epoch {
            self.observe_epoch(&epoch);
        }
    }

    /// Queues a settlement; the first of a batch starts the task that sends it.
    fn queue_settle(self: &Arc<Self>, job: SettleJob) {
        let thread = std::thread::current().id();
        let first = {
            let mut q = self.settles.entry(thread).or_default();
            q.push(job);
            q.len() == 1
        };
        if !first {
            return;
        }
        let guard = SettleGuard { inner: self.clone(), thread, armed: true };
        let send = async move {
            let mut guard = guard;
            // Meanwhile the thread's next batch of takes and reservations takes them along,
            // and the requests that end on this thread join them.
            tokio::time::sleep(SETTLE_RIDE).await;
            guard.armed = false;
            guard.inner.send_queued(thread).await;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn(send)),
            Err(_) => match self.runtime_handle.get() {
                Some(rt) => drop(rt.spawn(send)),
                // Dropping `send` drops its guard, which hands the queue to the reconciler.
                None => drop(send),
            },
        }
    }

    /// Sends what `thread` queued, in batches; what fails is owed and retried by the
    /// reconciler.
    async fn send_queued(&self, thread: std::thread::ThreadId) {
        let jobs = self.settles.get_mut(&thread).map(|mut q| std::mem::take(&mut *q)).unwrap_or_default();
        self.send_jobs(jobs).await;
    }

    /// Sends the settlements queued on every thread now, not when they would have ridden:
    /// a level read next includes every answer this node has given. (A reservation queued
    /// at that moment on another thread may then reach Redis before a release it would
    /// have ridden behind: it is judged as if it had come a moment earlier.)
    async fn send_all_queued(&self) {
        let jobs: Vec<SettleJob> =
            self.settles.iter_mut().flat_map(|mut q| std::mem::take(q.value_mut())).collect();
        self.send_jobs(jobs).await;
    }

    async fn send_jobs(&self, jobs: Vec<SettleJob>) {
        let mut jobs = jobs.into_iter().peekable();
        while jobs.peek().is_some() {
            let batch: Vec<SettleJob> = jobs.by_ref().take(SETTLE_BATCH).collect();
            if self.send_settles(&batch, &[], "settle").await.is_err() {
                self.owe(batch);
            }
        }
    }

    /// Settlements that did not reach Redis: released and pushed by the reconciler.
    fn owe(&self, jobs: Vec<SettleJob>) {
        for job in &jobs {
            for (_, c) in &job.keys {
                c.dirty_redis.store(true, Ordering::Release);
            }
        }
        if let Ok(mut o) = self.owed.lock() {
            o.extend(jobs);
        }
    }

    async fn push_dirty(&self) {
        let dirty: Vec<(String, Arc<Cell>)> = self
            .cells
            .iter()
            .filter(|e| e.value().dirty_redis.swap(false, Ordering::AcqRel))
            .map(|e| (redis_key(&e.key().budget, &e.key().instance, e.key().period_start), e.value().clone()))
            .collect();
        if dirty.is_empty() {
            return;
        }
        let mut pushed = 0usize;
        for chunk in dirty.chunks(CHUNK) {
            if self.send_settles(&[], chunk, "reconcile").await.is_err() {
                for (_, c) in &dirty[pushed..] {
                    c.dirty_redis.store(true, Ordering::Release);
                }
                return;
            }
            pushed += chunk.len();
        }
        self.metrics.local.with_label_values(&["reconciled"]).inc_by(pushed as u64);
    }

    /// One settle script: releases each job's hold (if Redis still has it) and raises this
    /// node's figure, once, on every key of the jobs and of `push`.
    async fn send_settles(
        &self,
        jobs: &[SettleJob],
        push: &[(String, Arc<Cell>)],
        op: &'static str,
    ) -> Result<(), CountersDown> {
        let (eval, cells) = self.settle_eval(jobs, push);
        let v = self.call(op, eval).await?;
        settled_levels(&cells, &v);
        Ok(())
    }

    /// The settle script's call for `jobs` and `push`, and the counters its answer gives
    /// the levels of, in order.
    fn settle_eval(&self, jobs: &[SettleJob], push: &[(String, Arc<Cell>)]) -> (Eval<'_>, Vec<Arc<Cell>>) {
        let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        let mut keys: Vec<&(String, Arc<Cell>)> = Vec::new();
        for k in jobs.iter().flat_map(|j| j.keys.iter()).chain(push) {
            index.entry(k.0.as_str()).or_insert_with(|| {
                keys.push(k);
                keys.len() + 1
            });
        }
        let mut inv = Eval::new(&self.scripts.settle);
        inv.key(EPOCH_KEY).arg(&self.field).arg(jobs.len());
        for job in jobs {
            inv.arg(&job.member).arg(job.reserved).arg(job.keys.len());
            for (k, _) in &job.keys {
                inv.arg(index.get(k.as_str()).copied().unwrap_or(0));
            }
        }
        for (k, cell) in &keys {
            inv.key(k)
                .arg(cell.own.load(Ordering::Acquire))
                .arg(cell.period_end.load(Ordering::Acquire) + EXPIRY_GRACE_S);
        }
        (inv, keys.into_iter().map(|(_, c)| c.clone()).collect())
    }

    fn locally(&self, op: &str) {
        self.metrics.local.with_label_values(&[op]).inc();
    }
}

/// Hands a thread's queued settlements to the reconciler if the task that was to send them
/// is dropped before taking them (its runtime shutting down).
struct SettleGuard {
    inner: Arc<Inner>,
    thread: std::thread::ThreadId,
    armed: bool,
}

impl Drop for SettleGuard {
    fn drop(&mut self) {
        if self.armed {
            if let Some((_, jobs)) = self.inner.settles.remove(&self.thread) {
                self.inner.owe(jobs);
            }
        }
    }
}

/// A hold on shared counters: settled in process at once, in Redis by a batch.
struct SharedHold {
    inner: Arc<Inner>,
    keys: Vec<(String, Arc<Cell>)>,
    member: String,
}

impl Hold for SharedHold {
    fn settle(&self, reserved: Nanos, actual: Nanos) {
        for (_, cell) in &self.keys {
            cell.add_own(actual);
            // Until Redis answers, this node's view drops its own reservation at once.
            cell.reserved.fetch_sub(reserved, Ordering::AcqRel);
        }
        self.inner.queue_settle(SettleJob { keys: self.keys.clone(), member: self.member.clone(), reserved });
    }
}

impl SharedCounters {
    /// The reservation of `amount` on `items`, as a batch sends it.
    fn reserve_op(&self, items: &[ReserveItem<'_>], amount: Nanos) -> ReserveOp {
        let mut keys = Vec::with_capacity(items.len());
        let mut cells = Vec::with_capacity(items.len());
        for i in items {
            let cell = self.inner.cell(&i.key);
            cell.period_end.store(i.period_end, Ordering::Release);
            let key = redis_key(i.key.budget, i.key.instance, i.key.period_start);
            keys.push((key, i.cap.unwrap_or(-1), i.period_end + EXPIRY_GRACE_S));
            cells.push(cell);
        }
        let member = format!("{:016x}:{amount}", rand::random::<u64>());
        ReserveOp { keys, cells, amount, member }
    }

    /// A reservation's answer `v`: granted (this node's view of each counter updated) or
    /// refused by the budget at the index it names.
    fn reserved(&self, v: &redis::Value, release: SettleJob) -> Reserved {
        let n = ints(v);
        let SettleJob { keys, member, .. } = release;
        if n.first() == Some(&1) {
            let i = n.get(1).copied().unwrap_or(0).max(0) as usize;
            let (t, r) = (n.get(2).copied().unwrap_or(0), n.get(3).copied().unwrap_or(0));
            if let Some((_, cell)) = keys.get(i) {
                cell.seen(t, r);
            }
            return Err((i, SpendLevel { committed: t, used: t.saturating_add(r) }));
        }
        for (i, (_, cell)) in keys.iter().enumerate() {
            let at = 2 + 3 * i;
            if let (Some(&t), Some(&r), Some(&mine)) = (n.get(at), n.get(at + 1), n.get(at + 2)) {
                cell.seen(t, r);
                cell.hydrate(mine);
            }
        }
        Ok(Box::new(SharedHold { inner: self.inner.clone(), keys, member }) as Box<dyn Hold>)
    }

    /// A reservation whose answer was lost may have been made: released when Redis answers
    /// again (a no-op if it never arrived).
    fn owe_release(&self, release: SettleJob) {
        if let Ok(mut o) = self.inner.owed.lock() {
            o.push(release);
        }
    }

    fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.runtime.as_ref().map(|r| r.handle().clone())
    }

    /// Sends what is still waiting (settlements about to ride, releases owed after a
    /// failure) before the process exits, waiting at most `limit`: a hold left in Redis
    /// would keep its budget's room for an hour. Tries Redis even within the pause after
    /// a failure, and again while anything is left (a send already under way elsewhere
    /// may fail and owe its releases after this one looked). Blocking; for after the
    /// server stopped. `false`: some of it did not reach Redis.
    pub fn settle_before_exit(&self, limit: Duration) -> bool {
        let Some(handle) = self.handle() else { return false };
        let inner = self.inner.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        handle.spawn(async move {
            let deadline = Instant::now() + limit;
            let waiting = |inner: &Inner| {
                inner.owed.lock().map_or(true, |o| !o.is_empty())
                    || inner.settles.iter().any(|q| !q.is_empty())
            };
            let mut quiet = 0;
            while quiet < 2 && Instant::now() < deadline {
                inner.retry_at_ms.store(0, Ordering::Release);
                inner.send_all_queued().await;
                inner.deliver_owed().await;
                quiet = if waiting(&inner) { 0 } else { quiet + 1 };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = tx.send(quiet >= 2);
        });
        rx.recv_timeout(limit + Duration::from_millis(100)).unwrap_or(false)
    }

    /// An outage's answer to a reservation: refused when a budget polices the request and
    /// the policy is `fail_closed`; else counted in process.
    fn reserve_locally(
        &self,
        items: &[ReserveItem<'_>],
        amount: Nanos,
        e: CountersDown,
    ) -> Result<Reserved, CountersDown> {
        if self.inner.on_error == OnError::FailClosed && items.iter().any(|i| i.enforced) {
            return Err(e);
        }
        self.inner.locally("reserve");
        Ok(reserve_each(self, items, amount))
    }
}

impl Counters for SharedCounters {
    fn spend_counter(&self, key: &SpendKey<'_>) -> Arc<dyn SpendCounter> {
        self.inner.cell(key)
    }

    fn spend_levels(&self) -> Vec<super::counters::CounterLevel> {
        self.inner
            .cells
            .iter()
            .map(|e| super::counters::CounterLevel {
                budget: e.key().budget.to_string(),
                instance: e.key().instance.to_string(),
                period_start: e.key().period_start,
                committed: e.value().level().committed,
            })
            .collect()
    }

    fn find_spend_counter(&self, key: &SpendKey<'_>) -> Option<Arc<dyn SpendCounter>> {
        let k = CellKey {
            budget: key.budget.into(),
            instance: key.instance.into(),
            period_start: key.period_start,
        };
        self.inner.cells.get(&k).map(|c| c.clone() as Arc<dyn SpendCounter>)
    }

    fn take(&self, kind: RateKind, key: &str, per_minute: u64, cost: u64, now_us: u64) -> RateVerdict {
        self.inner.fallback.take(kind, key, per_minute, cost, now_us)
    }

    fn adjust(&self, kind: RateKind, key: &str, per_minute: u64, delta: i64) {
        self.inner.fallback.adjust(kind, key, per_minute, delta);
        let Some(handle) = self.handle() else { return };
        let inc =
            i64::try_from(u128::from(delta.unsigned_abs()) * 60_000_000 / u128::from(per_minute.max(1)))
                .unwrap_or(i64::MAX);
        let delta_us = if delta >= 0 { inc } else { -inc };
        let (inner, key) = (self.inner.clone(), rate_key(kind, key));
        let handle = tokio::runtime::Handle::try_current().unwrap_or(handle);
        handle.spawn(async move {
            let mut inv = Eval::new(&inner.scripts.adjust);
            inv.key(key).arg(delta_us);
            // A correction that does not arrive only affects this minute's allowance.
            let _ = inner.call("adjust", inv).await;
        });
    }

    fn take_shared(
        &self,
        kind: RateKind,
        key: &str,
        per_minute: u64,
        cost: u64,
        now_us: u64,
    ) -> Pending<'_, Result<RateVerdict, CountersDown>> {
        let redis_key = rate_key(kind, key);
        let key = key.to_string();
        Pending::Remote(Box::pin(async move {
            let op = Op::Take { key: redis_key, per_minute, cost };
            match self.inner.submit(op).await {
                Ok(v) => Ok(verdict_of(&v, per_minute)),
                Err(e) if self.inner.on_error == OnError::FailClosed => Err(e),
                Err(_) => {
                    self.inner.locally("take");
                    Ok(self.inner.fallback.take(kind, &key, per_minute, cost, now_us))
                }
            }
        }))
    }

    fn reserve_all<'a>(
        &'a self,
        items: &'a [ReserveItem<'a>],
        amount: Nanos,
    ) -> Pending<'a, Result<Reserved, CountersDown>> {
        Pending::Remote(Box::pin(async move {
            let op = self.reserve_op(items, amount);
            let release = op.release();
            match self.inner.submit(Op::Reserve(op)).await {
                Ok(v) => Ok(self.reserved(&v, release)),
                Err(e) => {
                    // The script may have run with its answer lost: release the hold when
                    // Redis answers again (a no-op if it never arrived).
                    self.owe_release(release);
                    self.reserve_locally(items, amount, e)
                }
            }
        }))
    }

    fn combines_takes(&self) -> bool {
        true
    }

    fn take_and_reserve<'a>(
        &'a self,
        takes: &'a [Take],
        items: &'a [ReserveItem<'a>],
        amount: Nanos,
    ) -> Pending<'a, Result<TakenAndReserved, CountersDown>> {
        Pending::Remote(Box::pin(async move {
            let op = self.reserve_op(items, amount);
            let release = op.release();
            let gated = Op::Gated {
                takes: takes.iter().map(|t| (rate_key(t.kind, &t.key), t.per_minute, t.cost)).collect(),
                reserve: op,
            };
            let answer = self.inner.submit(gated).await.and_then(|v| match v {
                redis::Value::Array(answers) if !answers.is_empty() => Ok(answers),
                _ => Err(CountersDown("a take-and-reserve answer was not a list".into())),
            });
            let e = match answer {
                Ok(answers) => {
                    let verdicts: Vec<RateVerdict> =
                        takes.iter().zip(&answers).map(|(t, a)| verdict_of(a, t.per_minute)).collect();
                    if verdicts.last().is_some_and(|v| !v.allowed) {
                        return Ok((verdicts, None));
                    }
                    match answers.get(takes.len()) {
                        Some(r)
                            if verdicts.len() == takes.len()
                                && first_of(r) == Some(&redis::Value::Int(-1)) =>
                        {
                            // Redis lost its counters (nothing was reserved there): as a
                            // reservation alone would be while it is re-seeded.
                            let held = self.reserve_locally(
                                items,
                                amount,
                                CountersDown("Redis is being re-seeded".into()),
                            )?;
                            return Ok((verdicts, Some(held)));
                        }
                        Some(r) if verdicts.len() == takes.len() => {
                            return Ok((verdicts, Some(self.reserved(r, release))));
                        }
                        _ => CountersDown("a take-and-reserve answer was short".into()),
                    }
                }
                Err(e) => e,
            };
            self.owe_release(release);
            if self.inner.on_error == OnError::FailClosed {
                // A take is always policed.
                return Err(e);
            }
            let mut verdicts = Vec::with_capacity(takes.len());
            for t in takes {
                self.inner.locally("take");
                let verdict = self.inner.fallback.take(t.kind, &t.key, t.per_minute, t.cost, unix_now_us());
                verdicts.push(verdict);
                if !verdict.allowed {
                    return Ok((verdicts, None));
                }
            }
            let held = self.reserve_locally(items, amount, e)?;
            Ok((verdicts, Some(held)))
        }))
    }

    fn charge(&self, keys: &[ReserveItem<'_>], amount: Nanos) {
        // Counted here and pushed by the reconciler (an absolute figure: never twice).
        for item in keys {
            let cell = self.inner.cell(&item.key);
            cell.period_end.store(item.period_end, Ordering::Release);
            cell.settle(0, amount);
        }
        self.inner.wake.notify_one();
    }

    fn level_now<'a>(&'a self, key: SpendKey<'a>) -> Pending<'a, Result<SpendLevel, CountersDown>> {
        Pending::Remote(Box::pin(async move {
            self.inner.send_all_queued().await;
            let mut inv = Eval::new(&self.inner.scripts.levels);
            inv.key(redis_key(key.budget, key.instance, key.period_start));
            let v = self.inner.call("levels", inv).await?;
            let n = ints(&v);
            let (t, r) = (n.first().copied().unwrap_or(0), n.get(1).copied().unwrap_or(0));
            let cell = self.inner.cell(&key);
            cell.seen(t, r);
            Ok(cell.level())
        }))
    }

    fn status(&self) -> CountersStatus {
        CountersStatus {
            backend: "redis",
            reachable: self.inner.reachable.load(Ordering::Acquire),
            on_error: Some(self.inner.on_error.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unambiguous() {
        assert_ne!(redis_key("a:b", "", 1), redis_key("a", "b:", 1));
        assert_eq!(rate_key(RateKind::Tokens, "default/dev"), "mlx:rate:tokens:default/dev");
    }
}
