//! Off the request path: the bounded queue the `logging` phase pushes to, and the writer
//! that drains it into the store in batches.
//!
//! * The queue is a fixed-size lock-free array (`crossbeam` `ArrayQueue`): a push is one
//!   compare-and-swap, never waits and never wakes a thread; when full, the record is
//!   dropped and counted (`modelux_trace_records_total{result="dropped"}`). The writer
//!   polls it every few milliseconds instead of being woken per record.
//! * A batch is written when it reaches `batch_size` records or its oldest record has
//!   waited `flush_interval`.
//! * A failed insert that may succeed later (`StoreError::Transient`) sends the batch to
//!   the disk queue (`spill`). Until the backoff after a failure has passed (100 ms,
//!   doubling to 5 s), new batches go straight to the disk queue too, behind the old ones.
//!   The disk queue is replayed front first, one batch per round, and fresh batches are
//!   written between those rounds rather than queued behind a long replay. Rows the store
//!   refuses (`StoreError::Data`) are bisected down to the offending records, which go to
//!   the dead-letter file; the rest are written.
//! * While an insert is in flight the queue keeps being drained, so a slow store does not
//!   make the request path drop records; what piles up beyond the queue's capacity is
//!   spilled, a batch at a time.
//! * Shutdown: `finish` drains the queue and writes (or spills) everything; what is spilled
//!   is replayed by the next start.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::spill::{self, Spill};
use super::{StoreError, TraceEvent, TraceRow, TraceStore};
use crate::metrics::Metrics;

/// How often the writer looks at the queue.
const TICK: Duration = Duration::from_millis(10);
/// Backoff between replay attempts while the store is down.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// An insert that takes longer is abandoned (and its batch spilled): the store may have
/// written it, which the store's idempotent inserts make harmless.
const INSERT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often old records are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// The request path's end of the trace pipeline.
pub struct TraceQueue {
    queue: ArrayQueue<Box<TraceEvent>>,
    metrics: Arc<Metrics>,
}

impl TraceQueue {
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> TraceQueue {
        TraceQueue { queue: ArrayQueue::new(capacity.max(1)), metrics }
    }

    /// Hands a record to the writer; never blocks. A full queue drops it (counted).
    pub fn submit(&self, event: Box<TraceEvent>) {
        if self.queue.push(event).is_err() {
            self.metrics.trace_records.with_label_values(&["dropped"]).inc();
        }
    }

    pub fn depth(&self) -> usize {
        self.queue.len()
    }

    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }

    /// The writer's end.
    pub fn pop(&self) -> Option<Box<TraceEvent>> {
        self.queue.pop()
    }
}

#[derive(Debug, Clone)]
pub struct WriterSettings {
    pub batch_size: usize,
    pub flush_interval: Duration,
    /// Records older than this are pruned from the store.
    pub retention: Duration,
    /// Replay bodies older than this are emptied (`traces.replay_hours` at start).
    pub replay_retention: Duration,
    pub spill_dir: PathBuf,
    /// Spilled batches may take this many bytes on disk; later ones are dropped (counted).
    pub max_spill_bytes: u64,
    pub dead_letter: PathBuf,
}

pub struct TraceWriter {
    queue: Arc<TraceQueue>,
    store: Arc<dyn TraceStore>,
    metrics: Arc<Metrics>,
    settings: WriterSettings,
    state: tokio::sync::Mutex<State>,
}

struct State {
    pending: Vec<TraceRow>,
    /// The batch being inserted (shared with the store): the server's runtime may cancel
    /// the writer at any await when it shuts down, and `finish` then writes it again.
    inflight: Option<Arc<[TraceRow]>>,
    /// When the oldest pending record arrived.
    pending_since: Option<Instant>,
    /// Sequence number of the last batch formed.
    seq: u64,
    spill: Spill,
    prepared: bool,
    backoff: Duration,
    retry_at: Instant,
    last_prune: Option<Instant>,
}

/// The store is unavailable: why, and the rows it did not take (in order, in parts; copied
/// out only where they are spilled).
struct Unavailable(String, Vec<Arc<[TraceRow]>>);

impl TraceWriter {
    pub fn new(
        queue: Arc<TraceQueue>,
        store: Arc<dyn TraceStore>,
        metrics: Arc<Metrics>,
        settings: WriterSettings,
    ) -> std::io::Result<TraceWriter> {
        let spill = Spill::open(&settings.spill_dir)?;
        metrics.trace_spill_depth.set(spill.rows() as i64);
        let state = State {
            pending: Vec::new(),
            inflight: None,
            pending_since: None,
            seq: spill.last_seq(),
            spill,
            prepared: false,
            backoff: MIN_BACKOFF,
            retry_at: Instant::now(),
            last_prune: None,
        };
        Ok(TraceWriter { queue, store, metrics, settings, state: tokio::sync::Mutex::new(state) })
    }

    pub fn store(&self) -> &Arc<dyn TraceStore> {
        &self.store
    }

    /// One round: drain the queue, write due batches, replay the disk queue when its
    /// backoff has passed, prune now and then.
    async fn step(&self, st: &mut State) {
        self.take_queue(st);
        while st.pending.len() >= self.settings.batch_size {
            let batch: Vec<TraceRow> = st.pending.drain(..self.settings.batch_size).collect();
            self.write(st, batch).await;
        }
        if st.pending_since.is_some_and(|t| t.elapsed() >= self.settings.flush_interval) {
            let batch = std::mem::take(&mut st.pending);
            st.pending_since = None;
            self.write(st, batch).await;
        }
        if !st.spill.is_empty() && Instant::now() >= st.retry_at {
            self.replay(st).await;
        }
        if st.spill.is_empty() && st.last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            st.last_prune = Some(Instant::now());
            if !st.prepared {
                st.prepared = self.store.prepare().await.is_ok();
            }
            if st.prepared {
                self.prune().await;
            }
        }
        self.metrics.trace_queue_depth.set(self.queue.depth() as i64);
    }

    fn take_queue(&self, st: &mut State) {
        take_into(&self.queue, &mut st.pending, &mut st.pending_since);
    }

    /// Writes one batch, or queues it on disk behind earlier spilled batches.
    async fn write(&self, st: &mut State, batch: Vec<TraceRow>) {
        if batch.is_empty() {
            return;
        }
        st.seq += 1;
        let seq = st.seq;
        if !st.spill.is_empty() && Instant::now() < st.retry_at {
            // The store failed moments ago: do not wait on it again before the backoff.
            self.spill(st, seq, &batch);
            return;
        }
        let batch: Arc<[TraceRow]> = batch.into();
        st.inflight = Some(batch.clone());
        match self.insert(st, batch).await {
            Ok(()) => st.backoff = MIN_BACKOFF,
            Err(Unavailable(e, parts)) => {
                let rows: Vec<TraceRow> = parts.iter().flat_map(|p| p.iter().cloned()).collect();
                tracing::warn!(error = %e, records = rows.len(), "trace store unavailable; spilling to disk");
                self.spill(st, seq, &rows);
                self.back_off(st);
            }
        }
        st.inflight = None;
    }

    fn spill(&self, st: &mut State, seq: u64, batch: &[TraceRow]) {
        if st.spill.bytes() >= self.settings.max_spill_bytes {
            // The disk queue is full: the earliest records of the outage are kept, and
            // what does not fit is counted.
            tracing::error!(
                records = batch.len(),
                spilled_bytes = st.spill.bytes(),
                "trace spill directory is at traces.max_spill_bytes; dropping records"
            );
            self.metrics.trace_records.with_label_values(&["dropped"]).inc_by(batch.len() as u64);
            return;
        }
        match st.spill.push(seq, batch) {
            Ok(()) => {
                self.metrics.trace_records.with_label_values(&["spilled"]).inc_by(batch.len() as u64);
                self.metrics.trace_spill_depth.set(st.spill.rows() as i64);
            }
            Err(e) => {
                // The disk is full or gone too: nothing left to keep the records in.
                tracing::error!(error = %e, records = batch.len(), "cannot spill trace records; dropping them");
                self.metrics.trace_records.with_label_values(&["dropped"]).inc_by(batch.len() as u64);
            }
        }
    }

    fn back_off(&self, st: &mut State) {
        st.retry_at = Instant::now() + st.backoff;
        st.backoff = (st.backoff * 2).min(MAX_BACKOFF);
    }

    /// Inserts `rows`, bisecting around records the store refuses. Keeps draining the
    /// queue while waiting on the store.
    async fn insert(&self, st: &mut State, rows: Arc<[TraceRow]>) -> Result<(), Unavailable> {
        if !st.prepared {
            let prepared = {
                let fut = self.store.prepare();
                self.while_draining(st, fut).await
            };
            match prepared {
                Ok(()) => st.prepared = true,
                Err(e) => return Err(Unavailable(e.to_string(), vec![rows])),
            }
        }
        let mut stack = vec![rows];
        while let Some(rows) = stack.pop() {
            let started = Instant::now();
            let result = {
                let fut = self.store.insert_shared(rows.clone());
                self.while_draining(st, fut).await
            };
            let outcome = match &result {
                Ok(()) => "ok",
                Err(StoreError::Transient(_)) => "unavailable",
                Err(StoreError::Data(_)) => "refused",
            };
            self.metrics
                .trace_flush
                .with_label_values(&[self.store.kind(), outcome])
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => {
                    self.metrics.trace_records.with_label_values(&["written"]).inc_by(rows.len() as u64);
                }
                Err(StoreError::Transient(e)) => {
                    // Hand back what is left, in order (the stack's top is the front).
                    stack.push(rows);
                    stack.reverse();
                    return Err(Unavailable(e, stack));
                }
                Err(StoreError::Data(e)) if rows.len() == 1 => {
                    tracing::error!(error = %e, request_id = %rows[0].request_id, "trace record refused by the store; written to the dead-letter file");
                    self.dead_letter(&e, &rows, &[]);
                }
                Err(StoreError::Data(_)) => {
                    let (first, second) = rows.split_at(rows.len() / 2);
                    stack.push(second.into());
                    stack.push(first.into());
                }
            }
        }
        Ok(())
    }

    fn dead_letter(&self, reason: &str, rows: &[TraceRow], bad_lines: &[String]) {
        let n = (rows.len() + bad_lines.len()) as u64;
        match spill::dead_letter(&self.settings.dead_letter, reason, rows, bad_lines) {
            Ok(()) => self.metrics.trace_records.with_label_values(&["dead_letter"]).inc_by(n),
            Err(e) => {
                tracing::error!(error = %e, "cannot write the trace dead-letter file; dropping records");
                self.metrics.trace_records.with_label_values(&["dropped"]).inc_by(n);
            }
        }
    }

    /// Awaits a store call while still draining the queue (a full queue would drop records
    /// on the request path). Records piling up behind a slow store stay in memory up to
    /// `overflow_limit`; only beyond it do they go to the disk queue, numbered after the
    /// in-flight batch. Spilling while the store still answers would cost more than the
    /// insert it avoids (encode, fsync, decode) and route every later batch through disk
    /// until the queue there is empty.
    async fn while_draining<T>(
        &self,
        st: &mut State,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let fut = tokio::time::timeout(INSERT_TIMEOUT, fut);
        tokio::pin!(fut);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = &mut fut => {
                    return r.unwrap_or_else(|_| Err(StoreError::Transient(format!("no answer within {}s", INSERT_TIMEOUT.as_secs()))));
                }
                _ = tick.tick() => {
                    self.take_queue(st);
                    // Only the excess, a batch per file, oldest first.
                    while st.pending.len() >= self.overflow_limit() {
                        let n = self.settings.batch_size.min(st.pending.len());
                        let batch: Vec<TraceRow> = st.pending.drain(..n).collect();
                        if st.pending.is_empty() {
                            st.pending_since = None;
                        }
                        st.seq += 1;
                        let seq = st.seq;
                        self.spill(st, seq, &batch);
                    }
                }
            }
        }
    }

    /// Records held in memory behind an insert in flight: as many as the queue holds (the
    /// request path is allowed that much already), and at least a few batches.
    fn overflow_limit(&self) -> usize {
        self.queue.capacity().max(self.settings.batch_size.saturating_mul(4))
    }

    /// Replays the front of the disk queue (about one batch, in the order it was spilled).
    /// One chunk per call, so that fresh batches are not held behind a long replay: they
    /// go straight to the store in between. Returns false when the store failed again.
    async fn replay(&self, st: &mut State) -> bool {
        let front = match st.spill.front(self.settings.batch_size) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the trace disk queue");
                self.back_off(st);
                return false;
            }
        };
        if front.seqs.is_empty() {
            return true;
        }
        if !front.bad_lines.is_empty() {
            self.dead_letter("unreadable line in the disk queue", &[], &front.bad_lines);
        }
        let n = front.rows.len() as u64;
        match self.insert(st, front.rows.into()).await {
            Ok(()) => {
                self.metrics.trace_records.with_label_values(&["retried"]).inc_by(n);
                if let Err(e) = st.spill.remove(&front.seqs) {
                    tracing::error!(error = %e, "cannot remove replayed trace files; they will be replayed again");
                }
                self.metrics.trace_spill_depth.set(st.spill.rows() as i64);
                st.backoff = MIN_BACKOFF;
                if st.spill.is_empty() {
                    tracing::info!("disk queue of trace records replayed");
                }
                true
            }
            Err(Unavailable(e, _)) => {
                tracing::debug!(error = %e, "trace store still unavailable");
                self.back_off(st);
                false
            }
        }
    }

    async fn prune(&self) {
        let now = u64::try_from(crate::spend::unix_now()).unwrap_or(0);
        let before = now.saturating_sub(self.settings.retention.as_secs()) * 1000;
        if let Err(e) = self.store.prune(before).await {
            tracing::warn!(error = %e, "pruning old trace records failed");
        }
        let bodies_before = now.saturating_sub(self.settings.replay_retention.as_secs()) * 1000;
        if let Err(e) = self.store.expire_replay_bodies(bodies_before).await {
            tracing::warn!(error = %e, "emptying expired replay bodies failed");
        }
    }

    /// Drains the queue and writes everything; what the store does not take is spilled.
    /// Used at shutdown (the queue may still receive records of requests cancelled by it).
    pub async fn finish(&self) {
        let mut st = self.state.lock().await;
        if let Some(inflight) = st.inflight.take() {
            // Interrupted mid-insert: write it again (inserts are idempotent).
            let mut batch = inflight.to_vec();
            batch.append(&mut st.pending);
            st.pending = batch;
        }
        self.take_queue(&mut st);
        while !st.pending.is_empty() {
            let n = st.pending.len().min(self.settings.batch_size);
            let batch: Vec<TraceRow> = st.pending.drain(..n).collect();
            self.write(&mut st, batch).await;
            self.take_queue(&mut st);
        }
        st.pending_since = None;
        if Instant::now() >= st.retry_at {
            while !st.spill.is_empty() && self.replay(&mut st).await {
                // Records of requests cancelled by the shutdown may still be arriving.
                self.take_queue(&mut st);
                while !st.pending.is_empty() {
                    let n = st.pending.len().min(self.settings.batch_size);
                    let batch: Vec<TraceRow> = st.pending.drain(..n).collect();
                    self.write(&mut st, batch).await;
                }
            }
        }
        self.metrics.trace_queue_depth.set(self.queue.depth() as i64);
    }

    /// Runs `finish` on its own runtime (the server's runtimes are gone at that point).
    pub fn finish_blocking(&self) {
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(self.finish()),
            Err(e) => tracing::error!(error = %e, "cannot start a runtime to write the last trace records"),
        }
    }

    /// Records on disk waiting for the store.
    pub async fn spilled(&self) -> u64 {
        self.state.lock().await.spill.rows()
    }
}

fn take_into(queue: &TraceQueue, pending: &mut Vec<TraceRow>, since: &mut Option<Instant>) {
    while let Some(event) = queue.pop() {
        if since.is_none() {
            *since = Some(Instant::now());
        }
        pending.push(event.into_row());
    }
}

#[async_trait::async_trait]
impl BackgroundService for TraceWriter {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut st = self.state.lock().await;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            self.step(&mut st).await;
        }
        drop(st);
        self.finish().await;
    }
}

#[cfg(test)]
mod tests {
    //! The writer against the real embedded store, with faults injected in front of it:
    //! an outage, a hanging insert, and rows the store refuses.
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::routing::trace::CostRecord;
    use crate::trace::embedded::EmbeddedStore;
    use crate::trace::{LogPage, LogQuery, Report, ReportQuery};

    /// The embedded store behind a switchboard of faults. `accepted` lists, in order, the
    /// ids of every row the real store took.
    struct Faulty {
        store: EmbeddedStore,
        down: AtomicBool,
        hang: AtomicBool,
        hanging: tokio::sync::Notify,
        release: tokio::sync::Notify,
        refuse: HashSet<String>,
        accepted: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl TraceStore for Faulty {
        fn kind(&self) -> &'static str {
            "embedded"
        }
        async fn prepare(&self) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Transient("down".into()));
            }
            self.store.prepare().await
        }
        async fn insert(&self, rows: &[TraceRow]) -> Result<(), StoreError> {
            if self.hang.load(Ordering::SeqCst) {
                self.hanging.notify_one();
                self.release.notified().await;
            }
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Transient("connection refused".into()));
            }
            if let Some(bad) = rows.iter().find(|r| self.refuse.contains(&r.request_id)) {
                return Err(StoreError::Data(format!("cannot parse {}", bad.request_id)));
            }
            self.store.insert(rows).await?;
            self.accepted.lock().unwrap().extend(rows.iter().map(|r| r.request_id.clone()));
            Ok(())
        }
        async fn list(&self, query: &LogQuery) -> Result<LogPage, StoreError> {
            self.store.list(query).await
        }
        async fn get(&self, request_id: &str) -> Result<Option<TraceRow>, StoreError> {
            self.store.get(request_id).await
        }
        async fn report(&self, query: &ReportQuery) -> Result<Report, StoreError> {
            self.store.report(query).await
        }
        async fn replay(
            &self,
            query: &crate::trace::replay::ReplayQuery,
        ) -> Result<Vec<crate::trace::replay::ReplayRow>, StoreError> {
            self.store.replay(query).await
        }
        async fn expire_replay_bodies(&self, before_ms: u64) -> Result<u64, StoreError> {
            self.store.expire_replay_bodies(before_ms).await
        }
        async fn prune(&self, before_ms: u64) -> Result<u64, StoreError> {
            self.store.prune(before_ms).await
        }
        async fn owner(&self, project: &str, id: &str) -> Result<Option<String>, StoreError> {
            self.store.owner(project, id).await
        }
    }

    struct Rig {
        dir: tempfile::TempDir,
        queue: Arc<TraceQueue>,
        store: Arc<Faulty>,
        metrics: Arc<Metrics>,
    }

    fn rig(refuse: &[&str]) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let store = Arc::new(Faulty {
            store: EmbeddedStore::open(&dir.path().join("traces.db"), Default::default()).unwrap(),
            down: AtomicBool::new(false),
            hang: AtomicBool::new(false),
            hanging: tokio::sync::Notify::new(),
            release: tokio::sync::Notify::new(),
            refuse: refuse.iter().map(|s| s.to_string()).collect(),
            accepted: Mutex::new(Vec::new()),
        });
        Rig { queue: Arc::new(TraceQueue::new(1024, metrics.clone())), store, metrics, dir }
    }

    impl Rig {
        fn writer(&self, batch_size: usize) -> TraceWriter {
            self.writer_spilling(batch_size, u64::MAX)
        }

        fn writer_spilling(&self, batch_size: usize, max_spill_bytes: u64) -> TraceWriter {
            let settings = WriterSettings {
                batch_size,
                flush_interval: Duration::from_secs(3600),
                retention: Duration::from_secs(30 * 86_400),
                replay_retention: Duration::from_secs(86_400),
                spill_dir: self.dir.path().join("trace-spill"),
                max_spill_bytes,
                dead_letter: self.dir.path().join("trace-dead-letter.jsonl"),
            };
            TraceWriter::new(self.queue.clone(), self.store.clone(), self.metrics.clone(), settings).unwrap()
        }

        fn submit(&self, ids: impl IntoIterator<Item = usize>) {
            let now = crate::spend::unix_now() as u64 * 1000;
            for i in ids {
                self.queue.submit(Box::new(event(&format!("r{i:03}"), now + i as u64)));
            }
        }

        fn count(&self, result: &str) -> u64 {
            self.metrics.trace_records.with_label_values(&[result]).get()
        }

        fn accepted(&self) -> Vec<String> {
            self.store.accepted.lock().unwrap().clone()
        }

        fn dead_letters(&self) -> Vec<serde_json::Value> {
            let text =
                std::fs::read_to_string(self.dir.path().join("trace-dead-letter.jsonl")).unwrap_or_default();
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
        }
    }

    fn event(id: &str, ts_ms: u64) -> TraceEvent {
        TraceEvent {
            request_id: id.to_string(),
            ts_ms,
            latency: Duration::from_millis(12),
            ttfb: Some(Duration::from_millis(5)),
            principal: None,
            surface: "openai",
            endpoint: "/v1/chat/completions".into(),
            model_requested: Some("gpt-4o-mini".into()),
            resolution: Some("direct"),
            provider: Some("openai".into()),
            model: Some("gpt-4o-mini".into()),
            status: 200,
            error_code: None,
            trace: None,
            usage: None,
            cost: CostRecord::default(),
            tags: vec![("team".into(), "search".into())],
            end_user: None,
            trace_id: None,
            conversation_id: None,
            streamed: false,
            bytes_in: 100,
            bytes_out: 200,
            request_body: None,
            max_tokens: None,
            replay_body: None,
            replay_answer: Vec::new(),
            cache_hit: false,
            cache_saved_usd: 0.0,
            cache_embedding_usd: 0.0,
            provider_key: String::new(),
            owned_ids: Vec::new(),
            response_body: None,
        }
    }

    fn ids(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("r{i:03}")).collect()
    }

    #[tokio::test]
    async fn refused_rows_are_bisected_out_to_the_dead_letter_file_and_the_rest_written() {
        let rig = rig(&["r007", "r040", "r041"]);
        let writer = rig.writer(64);
        rig.submit(0..64);
        writer.finish().await;

        let refused: HashSet<String> = ["r007", "r040", "r041"].iter().map(|s| s.to_string()).collect();
        let expected: Vec<String> = ids(0..64).into_iter().filter(|id| !refused.contains(id)).collect();
        // Bisection keeps the order of the good rows.
        assert_eq!(rig.accepted(), expected);
        for id in &expected {
            assert!(rig.store.get(id).await.unwrap().is_some(), "{id} missing");
        }
        for id in &refused {
            assert!(rig.store.get(id).await.unwrap().is_none(), "{id} was stored");
        }
        let letters = rig.dead_letters();
        let dead: HashSet<String> =
            letters.iter().map(|l| l["row"]["request_id"].as_str().unwrap().to_string()).collect();
        assert_eq!(dead, refused);
        assert!(letters.iter().all(|l| l["error"].as_str().unwrap().starts_with("cannot parse r0")));
        assert_eq!((rig.count("written"), rig.count("dead_letter"), rig.count("dropped")), (61, 3, 0));
        assert_eq!(writer.spilled().await, 0);
    }

    #[tokio::test]
    async fn an_outage_spills_batches_to_disk_and_they_are_replayed_in_order_across_a_restart() {
        let rig = rig(&[]);
        rig.store.down.store(true, Ordering::SeqCst);
        let writer = rig.writer(10);
        rig.submit(0..25);
        writer.finish().await;
        assert_eq!(writer.spilled().await, 25);
        assert_eq!((rig.count("spilled"), rig.count("written"), rig.count("dropped")), (25, 0, 0));
        let files = std::fs::read_dir(rig.dir.path().join("trace-spill")).unwrap().count();
        assert_eq!(files, 3, "one file per batch of 10");

        // Newer records queue behind the spilled ones while the store is still down.
        rig.submit(25..30);
        writer.finish().await;
        assert_eq!(writer.spilled().await, 30);
        drop(writer);

        // The next start finds the disk queue and replays it once the store is back; fresh
        // records are written first rather than held behind the replay.
        rig.store.down.store(false, Ordering::SeqCst);
        let writer = rig.writer(10);
        assert_eq!(writer.spilled().await, 30);
        rig.submit(30..35);
        writer.finish().await;
        assert_eq!(writer.spilled().await, 0);
        let expected: Vec<String> = ids(30..35).into_iter().chain(ids(0..30)).collect();
        assert_eq!(rig.accepted(), expected, "the disk queue replays in the order it was spilled");
        assert_eq!(rig.count("retried"), 30);
        assert_eq!(rig.count("dropped"), 0);
        assert_eq!(std::fs::read_dir(rig.dir.path().join("trace-spill")).unwrap().count(), 0);
    }

    /// A long outage fills the spill directory to its cap and no further: the first
    /// batches wait on disk, later ones are dropped and counted, and what was kept is
    /// replayed when the store returns.
    #[tokio::test]
    async fn the_spill_directory_stops_at_its_cap() {
        let rig = rig(&[]);
        rig.store.down.store(true, Ordering::SeqCst);
        // One batch of 10 is about 7 KiB of JSON: a 12 KiB cap takes two.
        let writer = rig.writer_spilling(10, 12 * 1024);
        rig.submit(0..100);
        writer.finish().await;
        let kept = writer.spilled().await;
        assert!((10..=40).contains(&kept), "{kept} records spilled");
        assert_eq!(rig.count("spilled"), kept);
        assert_eq!(rig.count("dropped"), 100 - kept);
        let bytes: u64 = std::fs::read_dir(rig.dir.path().join("trace-spill"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        // Over the cap by less than the batch that crossed it.
        let per_batch = bytes / (kept / 10);
        assert!(bytes < 12 * 1024 + per_batch, "{bytes} bytes on disk");
        drop(writer);
        rig.store.down.store(false, Ordering::SeqCst);
        let writer = rig.writer(10);
        writer.finish().await;
        assert_eq!(writer.spilled().await, 0);
        assert_eq!(rig.accepted(), ids(0..kept as usize), "the outage's first records are kept, in order");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_piling_up_behind_a_stuck_insert_spill_a_batch_at_a_time_and_all_arrive() {
        let rig = rig(&[]);
        let writer = Arc::new(rig.writer(100));
        let (stop, rx) = tokio::sync::watch::channel(false);
        let running = tokio::spawn({
            let writer = writer.clone();
            async move { writer.start(rx).await }
        });
        rig.store.hang.store(true, Ordering::SeqCst);
        rig.submit(0..100);
        tokio::time::timeout(Duration::from_secs(10), rig.store.hanging.notified()).await.unwrap();
        // Three queues' worth behind the stuck insert, offered no faster than it drains.
        for chunk in 0..30 {
            rig.submit(100 + chunk * 100..100 + (chunk + 1) * 100);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let spilled = rig.count("spilled");
        assert!(
            spilled >= 1_800,
            "only {spilled} of 3000 spilled with at most a queue's worth (1024) held in memory"
        );
        assert_eq!(spilled % 100, 0, "spilled a batch (100) at a time");
        assert_eq!(rig.count("dropped"), 0);
        for file in std::fs::read_dir(rig.dir.path().join("trace-spill")).unwrap() {
            let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
            assert_eq!(text.lines().count(), 100);
        }

        rig.store.hang.store(false, Ordering::SeqCst);
        rig.store.release.notify_one();
        stop.send(true).unwrap();
        running.await.unwrap();
        let accepted = rig.accepted();
        let unique: HashSet<&String> = accepted.iter().collect();
        assert_eq!((accepted.len(), unique.len()), (3100, 3100));
        assert_eq!(writer.spilled().await, 0);
        assert_eq!(rig.count("retried"), spilled);
    }

    #[tokio::test]
    async fn a_batch_cut_off_mid_insert_by_cancellation_is_written_by_finish() {
        let rig = rig(&[]);
        rig.store.hang.store(true, Ordering::SeqCst);
        let writer = Arc::new(rig.writer(8));
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let running = tokio::spawn({
            let writer = writer.clone();
            async move { writer.start(rx).await }
        });
        rig.submit(0..8);
        tokio::time::timeout(Duration::from_secs(10), rig.store.hanging.notified()).await.unwrap();
        // What the server's runtime does to background tasks when it goes away.
        running.abort();
        assert!(running.await.unwrap_err().is_cancelled());
        assert!(rig.accepted().is_empty());

        rig.store.hang.store(false, Ordering::SeqCst);
        writer.finish().await;
        assert_eq!(rig.accepted(), ids(0..8));
        assert_eq!(rig.count("dropped"), 0);
    }
}
