//! Runs experiments off the request path: one worker thread in `SCHED_IDLE` (it gets a
//! CPU only when no proxy thread wants it) that reads the trace store and decides, at most
//! half of a core, paced page by page; its state-store calls (short, holding the
//! connection management changes share) run on a small runtime of normal priority. Every write of a running
//! experiment is conditional on its status, so a cancel or a delete always wins. An experiment is a row in the state store whose body is
//! the document the API shows plus its `job`; the worker moves it `queued → running →
//! completed | failed | cancelled`, saving progress as it reads. Rows left `queued` or
//! `running` by a stopped gateway are queued again at the next start.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::live::{self, Grant, Grants, Plan};
use super::simulate::{Report, Similarity, Simulation};
use super::MAX_SAMPLE;
use crate::admission::Now;
use crate::config::store::ConfigStore;
use crate::spend::counters::Counters;
use crate::spend::period::iso8601_ms;
use crate::state::{ExperimentQuery, ExperimentRow, StateStore};
use crate::trace::replay::{Bodies, ReplayQuery, ReplayRow};
use crate::trace::{LogQuery, TraceStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Records read per page of the trace store.
const PAGE: usize = 2_000;
/// `with_responses`: sampled requests whose bodies are read and sent at a time.
const SEND_CHUNK: usize = 200;

/// One sampled request of a `with_responses` run, after it was sent: its record without
/// body or answer, what came back (answer dropped), and both answers' text.
struct Item {
    row: ReplayRow,
    sent: Option<live::Sent>,
    production: Option<String>,
    candidate: Option<String>,
}
/// Decisions written per state-store transaction.
const DECISION_CHUNK: usize = 1_000;
/// Progress is saved at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// What the worker needs to run an experiment, resolved when it was created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub project: String,
    /// The config the candidate stands in for (replayed requests name `@slug`).
    pub slug: String,
    /// The config `promote` writes when the call names none.
    pub promote_to: Option<String>,
    /// The candidate's routing-config body.
    pub candidate_config: Value,
    pub mode: String,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub sample_size: Option<usize>,
    pub filter_routing_config: Option<String>,
    pub filter_model: Option<String>,
    pub filter_end_user: Option<String>,
    pub filter_tags: Vec<(String, String)>,
    /// A scheduled run's success criteria (`criteria::Criteria`).
    #[serde(default)]
    pub success_criteria: Option<Value>,
    /// `with_responses`: requests in flight at once.
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// `with_responses`: the similarity that counts as alike.
    #[serde(default)]
    pub similarity_threshold: Option<f64>,
}

impl Job {
    /// The trace-store filters of the window.
    pub fn query(&self) -> LogQuery {
        LogQuery {
            start_ms: Some(self.window_start_ms),
            end_ms: Some(self.window_end_ms),
            project: Some(self.project.clone()),
            model: self.filter_model.clone(),
            // Traffic that named the config, budget refusals included (they have no route).
            model_requested: self.filter_routing_config.as_ref().map(|s| format!("@{s}")),
            end_user: self.filter_end_user.clone(),
            tags: self.filter_tags.clone(),
            ..LogQuery::default()
        }
    }
}

/// The document the API shows: the stored body without its `job`.
pub fn view(row: &ExperimentRow) -> Value {
    let mut body = row.body.clone();
    if let Value::Object(m) = &mut body {
        m.remove("job");
        m.insert("status".into(), json!(row.status));
    }
    body
}

pub fn job_of(row: &ExperimentRow) -> Result<Job, String> {
    serde_json::from_value(row.body.get("job").cloned().unwrap_or(Value::Null))
        .map_err(|e| format!("experiment {} has no readable job: {e}", row.id))
}

fn now_ms() -> i64 {
    (crate::spend::unix_now_us() / 1000) as i64
}

/// Puts the calling thread in `SCHED_IDLE`: it runs only on a CPU no other thread wants, so
/// a replay never delays a proxied request (a nice value still takes a share of a busy
/// core, and CFS slices of milliseconds show up in the proxy's p99). Best effort: if the
/// kernel refuses, nice 19.
fn background_priority() {
    // SAFETY: both calls act on the calling thread (pid 0 / its own tid) and read only the
    // parameter struct passed by reference.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
        }
    }
}

/// The experiments of one gateway: a queue and the worker that drains it.
pub struct Experiments {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<String>,
}

struct Shared {
    state: Arc<dyn StateStore>,
    /// A runtime of normal priority for the state-store calls: they hold the store's
    /// connection, which management changes share, and must not wait on an idle-class
    /// thread.
    store_rt: Option<tokio::runtime::Handle>,
    traces: Arc<dyn TraceStore>,
    config: Arc<ConfigStore>,
    counters: Arc<dyn Counters>,
    /// Cancel flags of experiments queued or running here.
    cancels: DashMap<String, Arc<AtomicBool>>,
    /// Where `with_responses` sends (`None`: the mode fails).
    live: Option<LiveTarget>,
}

/// This gateway's proxy listener and the grants its requests present.
pub struct LiveTarget {
    pub proxy: std::net::SocketAddr,
    pub grants: Arc<Grants>,
}

impl Experiments {
    /// Starts the worker thread; it ends when this value is dropped. It first runs the
    /// experiments a stopped gateway left unfinished.
    pub fn start(
        state: Arc<dyn StateStore>,
        traces: Arc<dyn TraceStore>,
        config: Arc<ConfigStore>,
        counters: Arc<dyn Counters>,
        live: Option<LiveTarget>,
    ) -> Arc<Experiments> {
        // Built here, on a thread of normal priority (its threads keep that); without it the
        // store calls run on the worker's own runtime.
        let store_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("modelux-replay-store")
            .enable_all()
            .build()
            .map_err(|e| tracing::warn!(error = %e, "no separate runtime for experiment store calls"))
            .ok();
        let shared = Arc::new(Shared {
            state,
            store_rt: store_rt.as_ref().map(|rt| rt.handle().clone()),
            traces,
            config,
            counters,
            cancels: DashMap::new(),
            live,
        });
        let (jobs, rx) = mpsc::channel::<String>();
        let worker = shared.clone();
        let spawned = std::thread::Builder::new().name("modelux-replay".into()).spawn(move || {
            let _store_rt = store_rt;
            background_priority();
            // Its blocking pool (the trace reads) inherits the idle class; state-store calls
            // go to `store_rt` instead.
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name("modelux-replay-io")
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "experiment worker could not start its runtime");
                    return;
                }
            };
            for id in runtime.block_on(worker.unfinished()) {
                runtime.block_on(worker.run(&id));
            }
            while let Ok(id) = rx.recv() {
                runtime.block_on(worker.run(&id));
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the experiment worker; experiments stay queued");
        }
        Arc::new(Experiments { shared, jobs })
    }

    pub fn submit(&self, id: &str) {
        self.shared.cancels.insert(id.to_string(), Arc::new(AtomicBool::new(false)));
        if self.jobs.send(id.to_string()).is_err() {
            tracing::error!(experiment = %id, "experiment worker is gone");
        }
    }

    /// Stops the experiment if it runs here (the stored status is the caller's to set).
    pub fn cancel(&self, id: &str) {
        if let Some(flag) = self.shared.cancels.get(id) {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// How a run ended early.
enum Stop {
    Cancelled,
    Failed(String),
}

impl Shared {
    /// Runs a state-store call on the normal-priority runtime.
    async fn store<T: Send + 'static>(
        &self,
        call: impl std::future::Future<Output = Result<T, crate::state::StateError>> + Send + 'static,
    ) -> Result<T, crate::state::StateError> {
        match &self.store_rt {
            Some(rt) => rt
                .spawn(call)
                .await
                .map_err(|e| crate::state::StateError::Unavailable(format!("store task failed: {e}")))?,
            None => call.await,
        }
    }

    /// Experiments left `queued` or `running` by a stopped gateway, queued again, oldest
    /// first.
    async fn unfinished(&self) -> Vec<String> {
        let mut ids = Vec::new();
        for status in ["running", "queued"] {
            let q = ExperimentQuery { status: Some(status.into()), limit: 10_000, ..Default::default() };
            let state = self.state.clone();
            match self.store(async move { state.experiments(&q).await }).await {
                Ok(rows) => {
                    for mut row in rows.into_iter().rev() {
                        // A `with_responses` run stopped mid-way has spent on part of its
                        // sample: running it again would pay for those requests twice.
                        if row.status == "running" && row.body["mode"] == "with_responses" {
                            self.fail(
                                row,
                                "the gateway stopped while this with_responses experiment was sending; \
                                 not sent again (its requests so far were paid for): create it anew",
                            )
                            .await;
                            continue;
                        }
                        tracing::info!(experiment = %row.id, "running an experiment left unfinished");
                        if row.status == "running" {
                            row.status = "queued".into();
                            let (state, r) = (self.state.clone(), row.clone());
                            let moved =
                                self.store(async move { state.update_experiment(&r, &["running"]).await });
                            if !matches!(moved.await, Ok(true)) {
                                continue;
                            }
                        }
                        self.cancels.insert(row.id.clone(), Arc::new(AtomicBool::new(false)));
                        ids.push(row.id);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list unfinished experiments"),
            }
        }
        ids
    }

    fn cancelled(&self, id: &str) -> bool {
        self.cancels.get(id).is_some_and(|f| f.load(Ordering::SeqCst))
    }

    async fn run(&self, id: &str) {
        let (state, key) = (self.state.clone(), id.to_string());
        let row = match self.store(async move { state.experiment(&key).await }).await {
            Ok(Some(row)) if row.status == "queued" => row,
            Ok(_) => {
                self.cancels.remove(id);
                return;
            }
            Err(e) => {
                tracing::warn!(experiment = %id, error = %e, "cannot read the experiment");
                self.cancels.remove(id);
                return;
            }
        };
        let started = Instant::now();
        let mut row = row;
        let outcome = self.execute(&mut row).await;
        if let Value::Object(m) = &mut row.body {
            m.insert("completed_at".into(), json!(iso8601_ms(now_ms())));
        }
        row.updated_ms = now_ms();
        // Every write below is conditional on the run still being ours (`running`): a
        // cancel or a delete that came in meanwhile is never overwritten or undone.
        match outcome {
            Ok(report) => {
                if let Err(e) = self.save_decisions(id, &report).await {
                    self.fail(row, &format!("cannot save the decisions: {e}")).await;
                } else {
                    apply_report(&mut row.body, &report);
                    self.judge(&mut row, report.similarity.as_ref()).await;
                    row.status = "completed".into();
                    let events = self.events_of(&row);
                    let (state, r) = (self.state.clone(), row.clone());
                    match self
                        .store(async move { state.update_experiment_with(&r, &["running"], &events).await })
                        .await
                    {
                        Ok(true) => tracing::info!(
                            experiment = %id,
                            requests = report.outcomes.len(),
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "experiment completed"
                        ),
                        Ok(false) => {
                            // Cancelled or deleted while its decisions were written: a
                            // deleted one must not leave them behind.
                            let (state, key) = (self.state.clone(), id.to_string());
                            let _ = self
                                .store(async move {
                                    if state.experiment(&key).await?.is_none() {
                                        state.delete_experiment(&key).await?;
                                    }
                                    Ok(())
                                })
                                .await;
                        }
                        Err(e) => {
                            tracing::warn!(experiment = %id, error = %e, "cannot save the experiment's result")
                        }
                    }
                }
            }
            Err(Stop::Cancelled) => {
                row.status = "cancelled".into();
                let (state, r) = (self.state.clone(), row.clone());
                let _ = self.store(async move { state.update_experiment(&r, &["running"]).await }).await;
            }
            Err(Stop::Failed(message)) => self.fail(row, &message).await,
        }
        self.cancels.remove(id);
    }

    /// The webhook events a finished experiment sends: `experiment.completed`, and
    /// `experiment.regression_detected` on a scheduled run's transition into breach.
    fn events_of(&self, row: &ExperimentRow) -> Vec<crate::state::webhooks::Event> {
        let snapshot = self.config.load();
        let org = &snapshot.settings.webhooks.org_id;
        let b = &row.body;
        let data = json!({
            "experiment": {
                "id": row.id,
                "project": row.project,
                "schedule_id": if row.schedule_id.is_empty() { Value::Null } else { json!(row.schedule_id) },
                "name": b["name"],
                "status": row.status,
                "verdict": b["verdict"],
                "regression_detected": b["regression_detected"],
                "requests": b["requests"],
                "matched_requests": b["matched_requests"],
                "baseline_summary": b["baseline_summary"],
                "candidate_summary": b["candidate_summary"],
                "deltas": b["deltas"],
                "completed_at": b["completed_at"],
            }
        });
        let now = now_ms();
        let mut events =
            vec![crate::state::webhooks::Event::new("experiment.completed", org, data.clone(), now)];
        if b["regression_detected"] == json!(true) {
            let mut regression = data;
            regression["criteria_results"] = b["criteria_results"].clone();
            regression["signal_key"] = b["signal_key"].clone();
            events.push(crate::state::webhooks::Event::new(
                "experiment.regression_detected",
                org,
                regression,
                now,
            ));
        }
        events
    }

    /// A scheduled run's verdict by its schedule's success criteria, and whether it is the
    /// transition into breach (`fail` after a run that was not).
    async fn judge(&self, row: &mut ExperimentRow, similarity: Option<&Similarity>) {
        let criteria = row.body["job"]["success_criteria"].clone();
        if !criteria.is_object() {
            return;
        }
        let Ok(criteria) = super::criteria::Criteria::parse(&criteria, "success_criteria") else { return };
        let (verdict, details) = criteria.evaluate(&row.body, similarity);
        let q = ExperimentQuery {
            schedule_id: Some(row.schedule_id.clone()),
            status: Some("completed".into()),
            limit: 1,
            ..Default::default()
        };
        let state = self.state.clone();
        // The previous run's verdict; unknown when it cannot be read (then no transition is
        // claimed: a false regression would page someone).
        let previous = match self.store(async move { state.experiments(&q).await }).await {
            Ok(rows) => Some(rows.first().and_then(|r| r.body["verdict"].as_str().map(str::to_string))),
            Err(_) => None,
        };
        let regression = verdict == "fail" && previous.is_some_and(|p| p.as_deref() != Some("fail"));
        if let Value::Object(m) = &mut row.body {
            m.insert("verdict".into(), json!(verdict));
            m.insert("criteria_results".into(), details);
            m.insert("regression_detected".into(), json!(regression));
            if regression {
                m.insert("signal_key".into(), json!(format!("{}:regression", row.schedule_id)));
            }
        }
    }

    async fn fail(&self, mut row: ExperimentRow, message: &str) {
        tracing::warn!(experiment = %row.id, error = %message, "experiment failed");
        row.status = "failed".into();
        row.updated_ms = now_ms();
        if let Value::Object(m) = &mut row.body {
            m.insert("error".into(), json!({ "code": "experiment_failed", "message": message }));
        }
        let (state, r) = (self.state.clone(), row.clone());
        if let Err(e) =
            self.store(async move { state.update_experiment(&r, &["running", "queued"]).await }).await
        {
            tracing::warn!(experiment = %row.id, error = %e, "cannot record the failure");
        }
    }

    async fn execute(&self, row: &mut ExperimentRow) -> Result<Report, Stop> {
        let id = row.id.clone();
        let job = job_of(row).map_err(Stop::Failed)?;
        row.status = "running".into();
        row.updated_ms = now_ms();
        if let Value::Object(m) = &mut row.body {
            m.insert("started_at".into(), json!(iso8601_ms(row.updated_ms)));
        }
        // queued → running, unless it was cancelled or deleted since it was queued.
        let (state, r) = (self.state.clone(), row.clone());
        let moved = self.store(async move { state.update_experiment(&r, &["queued"]).await }).await;
        if !moved.map_err(|e| Stop::Failed(e.to_string()))? {
            return Err(Stop::Cancelled);
        }
        let snapshot =
            self.config.build_replacing(&job.slug, &job.candidate_config).await.map_err(|errors| {
                let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
                Stop::Failed(format!("the candidate no longer builds: {}", text.join("; ")))
            })?;
        match job.mode.as_str() {
            "routing_only" => {}
            "with_responses" => return self.send_for_real(row, &job, snapshot).await,
            other => return Err(Stop::Failed(format!("mode {other} is not run by this gateway"))),
        }
        let mut sim = Simulation::new(
            &snapshot,
            self.counters.as_ref(),
            &job.slug,
            Now::current(),
            job.sample_size.unwrap_or(MAX_SAMPLE),
            crate::routing::seed_of(&id),
        );
        let query = ReplayQuery { filters: job.query(), limit: PAGE, ..Default::default() };
        self.read_window(row, &job, query, 1.0, |page| {
            for r in &page {
                sim.push(r);
            }
            sim.matched()
        })
        .await?;
        if self.cancelled(&id) {
            return Err(Stop::Cancelled);
        }
        Ok(sim.finish())
    }

    /// Reads the window's replay set page by page, oldest first, handing each page to
    /// `each` (which returns the requests seen so far), saving progress (the share of the
    /// window read, times `scale`) and stopping on a cancel.
    async fn read_window(
        &self,
        row: &mut ExperimentRow,
        job: &Job,
        mut query: ReplayQuery,
        scale: f64,
        mut each: impl FnMut(Vec<ReplayRow>) -> u64,
    ) -> Result<(), Stop> {
        let id = row.id.clone();
        let span = job.window_end_ms.saturating_sub(job.window_start_ms).max(1);
        let mut last_progress = Instant::now();
        loop {
            if self.cancelled(&id) {
                return Err(Stop::Cancelled);
            }
            let started = Instant::now();
            let page = self.traces.replay(&query).await.map_err(|e| Stop::Failed(e.to_string()))?;
            let full = page.len() >= query.limit;
            let last_ts = page.last().map(|r| r.ts_ms);
            query.after = page.last().map(ReplayRow::cursor);
            let seen = each(page);
            // At most half of one core: a core kept busy by a replay, even at idle
            // priority, showed up in the proxy's tail on a VM (the hypervisor schedules
            // the whole vCPU).
            tokio::time::sleep(started.elapsed()).await;
            let Some(last_ts) = last_ts else { return Ok(()) };
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                let read = last_ts.saturating_sub(job.window_start_ms) as f64 / span as f64;
                self.progress(row, seen, (read * 100.0).min(99.0) * scale).await?;
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// `with_responses`: a uniform sample of the window's requests whose bodies are kept,
    /// sent through the candidate for real (`live`), their answers compared. The sample is
    /// drawn without reading bodies; bodies are read a chunk at a time, just before that
    /// chunk is sent, and only the answers' text is kept after it.
    async fn send_for_real(
        &self,
        row: &mut ExperimentRow,
        job: &Job,
        snapshot: crate::config::Snapshot,
    ) -> Result<Report, Stop> {
        let id = row.id.clone();
        let Some(target) = &self.live else {
            return Err(Stop::Failed(
                "this gateway has no proxy listener to send experiment traffic through".into(),
            ));
        };
        let sample_size = job.sample_size.unwrap_or(live::DEFAULT_SAMPLE).max(1);
        let mut rng = StdRng::seed_from_u64(crate::routing::seed_of(&id));
        let mut sample: Vec<ReplayRow> = Vec::new();
        let (mut matched, mut replayable, mut not_replayable) = (0u64, 0u64, 0u64);
        let query =
            ReplayQuery { filters: job.query(), limit: PAGE, bodies: Bodies::Presence, ..Default::default() };
        // Reading is the first tenth of the run's progress; sending the rest.
        self.read_window(row, job, query, 0.1, |page| {
            for r in page {
                matched += 1;
                // Only requests whose answer is kept too: every pair sent can be compared.
                if !r.has_body() || r.replay_body_truncated || !r.has_answer() {
                    not_replayable += 1;
                    continue;
                }
                replayable += 1;
                // Algorithm R, as `simulate` samples.
                if sample.len() < sample_size {
                    sample.push(r);
                } else {
                    let j = rng.random_range(0..replayable) as usize;
                    if let Some(slot) = sample.get_mut(j) {
                        *slot = r;
                    }
                }
            }
            matched
        })
        .await?;
        sample.sort_by(|a, b| (a.ts_ms, &a.request_id).cmp(&(b.ts_ms, &b.request_id)));
        let embedding_model = snapshot.settings.experiment_embedding_model.clone();
        let issued = target.grants.issue(Grant {
            experiment: id.clone(),
            project: job.project.clone(),
            snapshot: Arc::new(snapshot),
        });
        let plan = Arc::new(Plan {
            experiment: id.clone(),
            model: format!("@{}", job.slug),
            token: issued.token.clone(),
            proxy: target.proxy,
            concurrency: job.concurrency.unwrap_or(live::DEFAULT_CONCURRENCY),
        });
        let cancel = self.cancels.get(&id).map(|f| f.clone()).unwrap_or_default();
        let done = Arc::new(AtomicUsize::new(0));
        let total = sample.len().max(1);
        let sending_started_ms = crate::spend::unix_now_us() / 1000;
        // Per sampled request: what was sent back, and both answers' text.
        let mut items: Vec<Item> = Vec::with_capacity(sample.len());
        for chunk in sample.chunks(SEND_CHUNK) {
            if self.cancelled(&id) {
                return Err(Stop::Cancelled);
            }
            let ids: Vec<String> = chunk.iter().map(|r| r.request_id.clone()).collect();
            let q = ReplayQuery {
                filters: job.query(),
                limit: ids.len(),
                bodies: Bodies::Full,
                request_ids: ids,
                ..Default::default()
            };
            let fetched = self.traces.replay(&q).await.map_err(|e| Stop::Failed(e.to_string()))?;
            let mut by_id: HashMap<String, ReplayRow> =
                fetched.into_iter().map(|r| (r.request_id.clone(), r)).collect();
            // A body expired since the sample was drawn: not sent, counted as such.
            let rows: Vec<ReplayRow> = chunk
                .iter()
                .filter_map(|r| by_id.remove(&r.request_id))
                .filter(|r| r.has_body() && !r.replay_body_truncated)
                .collect();
            not_replayable += (chunk.len() - rows.len()) as u64;
            let rows = Arc::new(rows);
            let sent = {
                let (plan, rows, stop, sent_so_far) =
                    (plan.clone(), rows.clone(), cancel.clone(), done.clone());
                let percent = || 10.0 + done.load(Ordering::SeqCst) as f64 / total as f64 * 80.0;
                self.watched(row, matched, &cancel, percent, move || {
                    live::send_all(&plan, &rows, &stop, &sent_so_far)
                })
                .await?
            };
            for (r, s) in rows.iter().zip(sent) {
                let production = live::production_text(r);
                let candidate = s.as_ref().and_then(|s| live::answer_text(r, &s.answer));
                let mut r = r.clone();
                r.replay_body = Vec::new();
                r.replay_answer = Vec::new();
                let sent = s.map(|s| live::Sent { answer: Vec::new(), ..s });
                items.push(Item { row: r, sent, production, candidate });
            }
        }
        if self.cancelled(&id) {
            return Err(Stop::Cancelled);
        }
        let records = self.candidate_records(row, matched, job, &id, sending_started_ms, &items).await?;
        let mut outcomes = Vec::with_capacity(items.len());
        let mut pairs = Vec::with_capacity(items.len());
        for item in &items {
            let record =
                item.sent.as_ref().and_then(|s| s.request_id.as_ref()).and_then(|rid| records.get(rid));
            let o = live::outcome(&item.row, item.sent.as_ref(), record);
            // Only two complete answers compare: no error on either side, not even one
            // that ended a stream after its status went out.
            let clean = o.baseline.error.is_none()
                && item.row.error_code.is_empty()
                && o.candidate.error.is_none()
                && record.is_some_and(|r| r.error_code.is_empty());
            pairs.push(match (&item.production, &item.candidate) {
                (Some(a), Some(b)) if clean => Some((a.clone(), b.clone())),
                _ => None,
            });
            outcomes.push(o);
        }
        drop(items);
        let mut similarity = Similarity {
            model: embedding_model.clone(),
            threshold: job.similarity_threshold.unwrap_or(live::DEFAULT_THRESHOLD),
            ..Similarity::default()
        };
        match embedding_model {
            None => similarity.unavailable = Some("experiments.embedding_model is not set".into()),
            Some(model) if pairs.iter().any(Option::is_some) => {
                let (plan, c) = (plan.clone(), cancel.clone());
                let compared = self
                    .watched(
                        row,
                        matched,
                        &cancel,
                        || 95.0,
                        move || live::similarities(&plan, &model, &pairs, &c),
                    )
                    .await?;
                similarity.embedding_cost_usd = compared.cost_usd;
                for (o, v) in outcomes.iter_mut().zip(compared.values) {
                    o.similarity = v;
                }
                similarity.unavailable = compared.error;
            }
            Some(_) => {}
        }
        drop(issued);
        if self.cancelled(&id) {
            return Err(Stop::Cancelled);
        }
        similarity.values = outcomes.iter().filter_map(|o| o.similarity).collect();
        similarity.values.sort_by(f64::total_cmp);
        similarity.not_compared = (outcomes.len() - similarity.values.len()) as u64;
        let mut report = Report::of(matched, outcomes);
        report.similarity = Some(similarity);
        report.not_replayable = not_replayable;
        Ok(report)
    }

    /// Runs blocking work (the loopback calls) on a thread of normal priority, saving
    /// progress while it runs; a cancel (here or through the state store) sets `cancel`
    /// for the work to stop at its next request.
    async fn watched<T: Send + 'static>(
        &self,
        row: &mut ExperimentRow,
        matched: u64,
        cancel: &Arc<AtomicBool>,
        percent: impl Fn() -> f64,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Stop> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = move || {
            let _ = tx.send(work());
        };
        // A thread started from a task of the normal-priority runtime is of that class;
        // one started from this idle-class worker would be idle too.
        match &self.store_rt {
            Some(rt) => drop(rt.spawn(async move {
                let _ = tokio::task::spawn_blocking(job).await;
            })),
            None => drop(tokio::task::spawn_blocking(job)),
        }
        tokio::pin!(rx);
        loop {
            tokio::select! {
                out = &mut rx => return out.map_err(|_| Stop::Failed("the experiment's sender stopped".into())),
                _ = tokio::time::sleep(PROGRESS_EVERY) => {
                    if let Err(stop) = self.progress(row, matched, percent()).await {
                        cancel.store(true, Ordering::SeqCst);
                        let _ = rx.await;
                        return Err(stop);
                    }
                }
            }
        }
    }

    /// The trace records of the candidate's requests (read as replay reads, on the replay
    /// connection), waiting a bounded time for the writer to store them all.
    async fn candidate_records(
        &self,
        row: &mut ExperimentRow,
        matched: u64,
        job: &Job,
        id: &str,
        since_ms: u64,
        items: &[Item],
    ) -> Result<HashMap<String, ReplayRow>, Stop> {
        let wanted: std::collections::HashSet<&str> =
            items.iter().filter_map(|i| i.sent.as_ref()?.request_id.as_deref()).collect();
        let mut found: HashMap<String, ReplayRow> = HashMap::new();
        let deadline = Instant::now() + live::TRACE_WAIT;
        let filters = LogQuery {
            start_ms: Some(since_ms.saturating_sub(1_000)),
            project: Some(job.project.clone()),
            tags: vec![("experiment".into(), id.to_string())],
            ..LogQuery::default()
        };
        loop {
            let mut q = ReplayQuery {
                filters: filters.clone(),
                limit: PAGE,
                experiment_traffic: true,
                ..Default::default()
            };
            loop {
                let page = self.traces.replay(&q).await.map_err(|e| Stop::Failed(e.to_string()))?;
                let full = page.len() >= PAGE;
                q.after = page.last().map(ReplayRow::cursor);
                for r in page {
                    if wanted.contains(r.request_id.as_str()) {
                        found.insert(r.request_id.clone(), r);
                    }
                }
                if !full || Instant::now() >= deadline {
                    break;
                }
            }
            if found.len() >= wanted.len() || Instant::now() >= deadline {
                if found.len() < wanted.len() {
                    tracing::warn!(
                        experiment = %id,
                        missing = wanted.len() - found.len(),
                        "experiment requests whose trace records were not written in time"
                    );
                }
                return Ok(found);
            }
            self.progress(row, matched, 92.0).await?;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Saves how far the run got; a row cancelled or deleted meanwhile stops the run.
    async fn progress(&self, row: &mut ExperimentRow, read: u64, percent: f64) -> Result<(), Stop> {
        if let Value::Object(m) = &mut row.body {
            m.insert(
                "progress".into(),
                json!({ "requests_read": read, "percent": (percent * 10.0).round() / 10.0 }),
            );
        }
        row.updated_ms = now_ms();
        let (state, r) = (self.state.clone(), row.clone());
        match self.store(async move { state.update_experiment(&r, &["running"]).await }).await {
            Ok(true) => Ok(()),
            // Cancelled or deleted meanwhile.
            Ok(false) => Err(Stop::Cancelled),
            Err(e) => Err(Stop::Failed(e.to_string())),
        }
    }

    async fn save_decisions(&self, id: &str, report: &Report) -> Result<(), crate::state::StateError> {
        for (n, chunk) in report.outcomes.chunks(DECISION_CHUNK).enumerate() {
            let rows: Vec<Value> = chunk.iter().map(|o| o.view()).collect();
            let (state, key) = (self.state.clone(), id.to_string());
            let first = (n * DECISION_CHUNK) as i64 + 1;
            self.store(async move { state.save_decisions(&key, first, rows).await }).await?;
        }
        Ok(())
    }
}

fn routes(m: &std::collections::BTreeMap<String, f64>) -> Value {
    Value::Object(m.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Map<String, Value>>())
}

/// Writes a finished run's numbers into the experiment's document.
pub fn apply_report(body: &mut Value, report: &Report) {
    let Value::Object(m) = body else { return };
    let deltas = report.deltas();
    let baseline = report.baseline.view();
    let candidate = report.candidate.view();
    m.insert("requests".into(), json!(report.outcomes.len()));
    m.insert("matched_requests".into(), json!(report.matched));
    m.insert("progress".into(), json!({ "requests_read": report.matched, "percent": 100.0 }));
    m.insert("baseline_summary".into(), baseline.clone());
    m.insert("candidate_summary".into(), candidate.clone());
    // PRODUCT.md §8.6's result shape names the summaries `baseline` and `candidate`.
    m.insert("baseline".into(), baseline);
    m.insert("candidate".into(), candidate);
    m.insert("route_distribution".into(), routes(&report.candidate_routes));
    m.insert("baseline_route_distribution".into(), routes(&report.baseline_routes));
    if let Value::Object(d) = &deltas {
        for (k, v) in d {
            m.insert(k.clone(), v.clone());
        }
    }
    m.insert("deltas".into(), deltas);
    if let Some(sim) = &report.similarity {
        m.insert("similarity".into(), sim.view());
        m.insert("similarity_pct_above_threshold".into(), json!(sim.pct_above(sim.threshold)));
        m.insert("not_replayable".into(), json!(report.not_replayable));
    }
}
