//! The live config: one `ArcSwap<Snapshot>`. A reload builds and validates a whole new
//! snapshot first and swaps only on success; a bad file is logged and the old snapshot
//! keeps serving. Reload triggers: SIGHUP and (optionally) a change of the file on disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use sha2::{Digest, Sha256};

use super::{build_snapshot_with, env_lookup, ConfigError, Snapshot};
use crate::metrics::Metrics;
use crate::state::secrets::MasterKey;
use crate::state::{FileVersion, Stored};

/// The config shipped in the binary; `modelux serve` without `--config` runs on it.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../conf/modelux.yaml");

/// How often the file is checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

pub struct ConfigStore {
    path: Option<PathBuf>,
    current: ArcSwap<Snapshot>,
    /// What the current snapshot was built from. Held by reloads and management changes so
    /// two cannot interleave (the swap itself is lock-free).
    sources: tokio::sync::Mutex<Sources>,
    metrics: Arc<Metrics>,
}

/// The inputs of the current snapshot.
struct Sources {
    /// Of the file text and the files it pulls in, as last read (valid or not).
    hash: [u8; 32],
    /// The last file text that built a snapshot.
    text: String,
    /// The state store's live resources.
    resources: Arc<Vec<Stored>>,
    /// Opens the provider keys among them.
    master: Option<Arc<MasterKey>>,
}

/// A management change in progress: holds the sources, so no reload or other change
/// interleaves between building the candidate snapshot and swapping it in.
pub struct StagedChange<'a> {
    store: &'a ConfigStore,
    sources: tokio::sync::MutexGuard<'a, Sources>,
}

impl StagedChange<'_> {
    /// The state store's resources the current snapshot holds.
    pub fn resources(&self) -> Arc<Vec<Stored>> {
        self.sources.resources.clone()
    }

    /// The snapshot the file plus `resources` would give (validated, not installed).
    pub fn build(&self, resources: &[Stored]) -> Result<Snapshot, Vec<ConfigError>> {
        let old = self.store.current.load_full();
        let master = self.sources.master.as_deref();
        build_snapshot_with(
            &self.sources.text,
            &env_lookup,
            Some(&old),
            &self.store.base_dir(),
            resources,
            master,
        )
    }

    /// Swaps in `snapshot`, built by `build` from `resources`.
    pub fn install(mut self, snapshot: Snapshot, resources: Vec<Stored>) {
        self.sources.resources = Arc::new(resources);
        self.store.swap(snapshot);
    }
}

/// Hash of the config text and of every file it pulls in (rule files), so editing a rule
/// file is a change like editing the config.
fn content_hash(text: &str, files: &[PathBuf]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(text.as_bytes());
    for f in files {
        h.update(f.as_os_str().as_encoded_bytes());
        h.update(std::fs::read(f).unwrap_or_default());
    }
    h.finalize().into()
}

/// Relative paths in the config (rule files) resolve against the config file's directory;
/// for the embedded default, against the working directory.
fn base_dir(path: Option<&PathBuf>) -> PathBuf {
    path.and_then(|p| p.parent())
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

impl ConfigStore {
    /// Loads the file at `path`, or the embedded default when `path` is `None`.
    pub fn open(path: Option<PathBuf>, metrics: Arc<Metrics>) -> Result<ConfigStore, Vec<ConfigError>> {
        let text = read_text(path.as_ref())?;
        let snapshot = build_snapshot_with(&text, &env_lookup, None, &base_dir(path.as_ref()), &[], None)?;
        metrics.config_generation.set(snapshot.generation as i64);
        let hash = content_hash(&text, &snapshot.watched_files);
        Ok(ConfigStore {
            path,
            current: ArcSwap::from_pointee(snapshot),
            sources: tokio::sync::Mutex::new(Sources { hash, text, resources: Arc::default(), master: None }),
            metrics,
        })
    }

    /// Lays the state store's resources over the file (at start, before serving); `master`
    /// opens their provider keys. `recorded`: the file's routing-config versions as last
    /// served; a config whose definition is unchanged keeps its version, a changed one takes
    /// the next.
    pub fn load_resources(
        &self,
        resources: Vec<Stored>,
        master: Arc<MasterKey>,
        recorded: &[FileVersion],
    ) -> Result<(), Vec<ConfigError>> {
        let Ok(mut sources) = self.sources.try_lock() else {
            return Err(vec![ConfigError::new("state", "the config is being changed; try again")]);
        };
        // Built as the first snapshot (generation 1): nothing has been served yet.
        let mut snapshot = build_snapshot_with(
            &sources.text,
            &env_lookup,
            None,
            &self.base_dir(),
            &resources,
            Some(&master),
        )?;
        for r in recorded {
            if !snapshot.file_owned.routing_configs.contains(&r.slug) {
                continue;
            }
            let Some(rc) = snapshot.routing_configs.get_mut(&r.slug) else { continue };
            let last = u32::try_from(r.version).unwrap_or(1);
            Arc::make_mut(rc).version =
                if rc.definition == r.definition { last } else { last.saturating_add(1) };
        }
        sources.resources = Arc::new(resources);
        sources.master = Some(master);
        self.swap(snapshot);
        Ok(())
    }

    /// The versions the config file's routing configs are served at now.
    pub fn file_versions(&self) -> Vec<FileVersion> {
        let snapshot = self.load();
        let file = &snapshot.file_owned.routing_configs;
        file.iter()
            .filter_map(|slug| snapshot.routing_configs.get(slug))
            .map(|rc| FileVersion {
                slug: rc.slug.clone(),
                definition: rc.definition.clone(),
                version: i64::from(rc.version),
            })
            .collect()
    }

    /// Starts a management change; see `StagedChange`.
    pub async fn stage(&self) -> StagedChange<'_> {
        StagedChange { store: self, sources: self.sources.lock().await }
    }

    fn base_dir(&self) -> PathBuf {
        base_dir(self.path.as_ref())
    }

    fn swap(&self, snapshot: Snapshot) {
        let generation = snapshot.generation;
        self.current.store(Arc::new(snapshot));
        self.metrics.config_generation.set(generation as i64);
    }

    /// The snapshot to use for one whole request.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The snapshot with routing config `slug` defined as `body` (a replay candidate);
    /// validated, never installed. The sources are copied under the lock and the build runs
    /// after it is released, so a slow (low-priority) caller never holds up a change.
    pub async fn build_replacing(
        &self,
        slug: &str,
        body: &serde_json::Value,
    ) -> Result<Snapshot, Vec<ConfigError>> {
        let (text, resources, master) = {
            let s = self.sources.lock().await;
            (s.text.clone(), s.resources.clone(), s.master.clone())
        };
        let old = self.current.load_full();
        crate::config::build_snapshot_replacing(
            &text,
            &env_lookup,
            Some(&old),
            &self.base_dir(),
            &resources,
            master.as_deref(),
            slug,
            body,
        )
    }

    pub fn path(&self) -> Option<&PathBuf> {
        self.path.as_ref()
    }

    /// Re-reads the file; swaps in the new snapshot if it is valid and different.
    /// Returns the active generation.
    pub async fn reload(&self, force: bool) -> Result<u64, Vec<ConfigError>> {
        let mut sources = self.sources.lock().await;
        let text = match read_text(self.path.as_ref()) {
            Ok(t) => t,
            Err(e) => {
                self.metrics.config_reloads.with_label_values(&["error"]).inc();
                return Err(e);
            }
        };
        let old = self.current.load_full();
        let hash = content_hash(&text, &old.watched_files);
        if !force && hash == sources.hash {
            return Ok(old.generation);
        }
        match build_snapshot_with(
            &text,
            &env_lookup,
            Some(&old),
            &self.base_dir(),
            &sources.resources,
            sources.master.as_deref(),
        ) {
            Ok(new) => {
                if new.settings.proxy_listen != old.settings.proxy_listen
                    || new.settings.manage_listen != old.settings.manage_listen
                    || new.settings.threads != old.settings.threads
                    || new.settings.work_stealing != old.settings.work_stealing
                {
                    tracing::warn!("listen addresses and thread settings take effect only after a restart");
                }
                let generation = new.generation;
                self.swap(new);
                sources.hash = hash;
                sources.text = text;
                self.metrics.config_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(generation, "config reloaded");
                Ok(generation)
            }
            Err(errors) => {
                // Remember the hash so a bad file is reported once, not on every poll.
                sources.hash = hash;
                self.metrics.config_reloads.with_label_values(&["error"]).inc();
                Err(errors)
            }
        }
    }
}

fn read_text(path: Option<&PathBuf>) -> Result<String, Vec<ConfigError>> {
    match path {
        None => Ok(EMBEDDED_DEFAULT.to_string()),
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| vec![ConfigError::new("", format!("cannot read {}: {e}", p.display()))]),
    }
}

/// Background service: reloads on SIGHUP and when the file's metadata changes.
pub struct ConfigWatcher {
    pub store: Arc<ConfigStore>,
    pub poll_file: bool,
    pub handle_sighup: bool,
    /// Where the file's routing-config versions are recorded after each reload.
    pub state: Option<Arc<dyn crate::state::StateStore>>,
}

/// What identifies one version of a file without reading it. The inode is part of it because
/// an atomic rename swaps the inode, and two writes inside one coarse mtime tick (a few ms on
/// Linux) with the same length would otherwise look identical.
fn file_stamp(path: &PathBuf) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

impl ConfigWatcher {
    async fn reload_and_log(&self, force: bool) {
        match self.store.reload(force).await {
            Ok(_) => {
                let (Some(state), versions) = (self.state.clone(), self.store.file_versions()) else {
                    return;
                };
                let saved =
                    tokio::task::spawn_blocking(move || state.save_file_versions_now(&versions)).await;
                if let Ok(Err(e)) = saved {
                    tracing::warn!(error = %e, "cannot record the routing-config versions; a restart may count again from the recorded ones");
                }
            }
            Err(errors) => {
                for e in &errors {
                    tracing::error!(error = %e, "config reload rejected; the previous config stays active");
                }
            }
        }
    }
}

#[async_trait]
impl BackgroundService for ConfigWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(path) = self.store.path().cloned() else {
            return;
        };
        let mut hup = if self.handle_sighup {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(error = %e, "cannot install SIGHUP handler");
                    None
                }
            }
        } else {
            None
        };
        let stamps = |store: &ConfigStore| {
            let mut v = vec![file_stamp(&path)];
            v.extend(store.load().watched_files.iter().map(file_stamp));
            v
        };
        let mut stamp = stamps(&self.store);
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!("SIGHUP: reloading config");
                    // Stamp before reading: a write landing during the reload then differs
                    // from the stamp and is picked up on the next tick instead of being lost.
                    stamp = stamps(&self.store);
                    self.reload_and_log(true).await;
                }
                _ = tick.tick(), if self.poll_file => {
                    let now = stamps(&self.store);
                    if now[0].is_some() && now != stamp {
                        // The new snapshot may watch other files; the next tick sees a changed
                        // stamp list and re-reads, which the content hash turns into a no-op.
                        stamp = now;
                        self.reload_and_log(false).await;
                    }
                }
            }
        }
    }
}

/// How often a node compares the state store's revision with its own, in case a change
/// notification was missed (a dropped connection, a failover).
const REVISION_CHECK: Duration = Duration::from_secs(2);
/// After the change feed fails, it is tried again this soon.
const FOLLOW_RETRY: Duration = Duration::from_millis(500);

/// Background service (`state.backend: postgres`): rebuilds this node's snapshot whenever
/// any node commits a management change. Changes arrive by LISTEN/NOTIFY within
/// milliseconds; a revision check every `REVISION_CHECK` is the safety net.
pub struct StateFollower {
    pub store: Arc<ConfigStore>,
    pub state: Arc<dyn crate::state::StateStore>,
    pub url: String,
    /// The revision this node's snapshot was last built from.
    pub seen: std::sync::atomic::AtomicI64,
}

impl StateFollower {
    /// Loads the live resources and swaps in the snapshot they give, when the revision
    /// moved past what was last built.
    async fn refresh(&self, force: bool) {
        use std::sync::atomic::Ordering;
        let revision = match self.state.revision().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "state follower: cannot read the revision; will retry");
                return;
            }
        };
        if !force && revision <= self.seen.load(Ordering::Acquire) {
            return;
        }
        // Under the change lock: a local management change and this rebuild never interleave.
        let staged = self.store.stage().await;
        let resources = match self.state.load().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "state follower: cannot load the state; will retry");
                return;
            }
        };
        // Nothing this node lacks (its own change, or a check that found none): no rebuild,
        // so the config generation moves only when the config does.
        if same_resources(&resources, &staged.resources()) {
            self.seen.fetch_max(revision, Ordering::AcqRel);
            return;
        }
        match staged.build(&resources) {
            Ok(snapshot) => {
                staged.install(snapshot, resources);
                self.seen.fetch_max(revision, Ordering::AcqRel);
                tracing::debug!(revision, "state follower: snapshot rebuilt from the shared state");
            }
            Err(errors) => {
                for e in &errors {
                    tracing::error!(error = %e, revision, "state follower: the shared state does not build on this node; the previous snapshot stays");
                }
                // Said once per revision: the next change is tried again.
                self.seen.fetch_max(revision, Ordering::AcqRel);
            }
        }
    }
}

/// Whether two loads of the state hold the same resources at the same versions.
fn same_resources(a: &[Stored], b: &[Stored]) -> bool {
    let key = |r: &Stored| (r.id.clone(), r.version, r.deleted_ms);
    let (mut x, mut y): (Vec<_>, Vec<_>) = (a.iter().map(key).collect(), b.iter().map(key).collect());
    x.sort();
    y.sort();
    x == y
}

#[async_trait]
impl BackgroundService for StateFollower {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if let Ok(r) = self.state.revision().await {
            self.seen.fetch_max(r, std::sync::atomic::Ordering::AcqRel);
        }
        let mut check = tokio::time::interval(REVISION_CHECK);
        loop {
            let (tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
            let (listening_tx, listening) = tokio::sync::oneshot::channel();
            let url = self.url.clone();
            let feed = crate::state::postgres::follow_changes(&url, tx, listening_tx);
            tokio::pin!(feed);
            let mut listening = Some(listening);
            let ended = loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    reason = &mut feed => break reason,
                    Ok(()) = async { match listening.as_mut() { Some(l) => l.await, None => std::future::pending().await } } => {
                        listening = None;
                        // Changes committed while nobody listened (or before this service
                        // started, after the snapshot was first built).
                        self.refresh(true).await;
                    }
                    Some(_) = changes.recv() => {
                        // A burst of commits is one rebuild.
                        while changes.try_recv().is_ok() {}
                        self.refresh(false).await;
                    }
                    _ = check.tick() => self.refresh(false).await,
                }
            };
            tracing::warn!(reason = %ended, "state follower: the change feed stopped; reconnecting (revision checks continue)");
            let pause = tokio::time::sleep(FOLLOW_RETRY);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = &mut pause => break,
                    _ = check.tick() => self.refresh(false).await,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::file_stamp;

    #[test]
    fn an_atomic_rename_changes_the_stamp_even_with_the_same_length_and_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("modelux.yaml");
        std::fs::write(&path, "models: a\n").unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let before = file_stamp(&path).unwrap();
        let tmp = dir.path().join("modelux.tmp");
        std::fs::write(&tmp, "models: b\n").unwrap();
        std::fs::File::options().write(true).open(&tmp).unwrap().set_modified(mtime).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let after = file_stamp(&path).unwrap();
        assert_eq!((before.0, before.1), (after.0, after.1), "same length and mtime by construction");
        assert_ne!(before, after);
    }
}
