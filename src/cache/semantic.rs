//! The semantic index of `mode: semantic` (PRODUCT.md §7): the embedding of each stored
//! answer's last user message, found by cosine similarity.
//!
//! * **Partitions.** Vectors are kept per partition: the SHA-256 of everything in the exact
//!   key except the last user message (`super::partition`), so a hit always shares project,
//!   config, route, model, system prompt, sampling fields and every earlier turn with the
//!   request, and only the last question may be a paraphrase.
//! * **Search.** A partition of up to `FLAT_MAX` vectors is scanned exactly (f32, unit
//!   length); a larger one is an HNSW graph (usearch) of 8-bit vectors, each scaled so its
//!   largest component is ±127 before quantizing (usearch's own cast scales by the norm,
//!   which leaves 1,536-dimension embeddings a handful of levels). Similarity from a graph
//!   is the quantized cosine: within about 0.005 of the exact one.
//! * **Writes** go through one indexer thread (inserts, the flat → graph switch, the TTL
//!   sweep, the cap), so a request only ever searches; the graph allows searches while the
//!   indexer adds. The cap (`cache.max_vectors`) drops the oldest vectors first.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dashmap::DashMap;

/// A partition switches from an exact scan to a graph at this many vectors.
pub const FLAT_MAX: usize = 1024;
/// Vectors the index holds unless `cache.max_vectors` says otherwise.
pub const DEFAULT_MAX_VECTORS: usize = 100_000;
/// Writes waiting for the indexer beyond this are dropped (and counted).
const QUEUE: usize = 8192;
/// How often expired vectors are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Candidates a graph search returns.
const GRAPH_CANDIDATES: usize = 8;
/// Matches a search hands back, best first (the caller tries them in order: the best one's
/// answer may have left the store).
const MATCHES: usize = 3;
/// Text embedded per prompt or answer: the start of it, within every embeddings model's
/// input limit.
pub const MAX_EMBED_CHARS: usize = 8_000;
/// Threads that may search one graph at once (usearch keeps a context per thread).
const GRAPH_THREADS: usize = 64;

/// One vector to index: the answer stored under `answer`, reachable from `partition`.
#[derive(Debug, Clone)]
pub struct Indexed {
    pub partition: [u8; 32],
    pub answer: [u8; 32],
    pub vector: Vec<f32>,
    /// Unix milliseconds (meaningful across nodes).
    pub expires_ms: u64,
}

/// The closest stored question above nothing: the caller compares with its threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Match {
    pub answer: [u8; 32],
    pub similarity: f32,
}

/// Unit length, or `None` for a vector without direction (or with non-finite values).
pub fn normalized(v: &[f32]) -> Option<Vec<f32>> {
    let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    if !(norm.is_finite() && norm > 0.0) {
        return None;
    }
    Some(v.iter().map(|x| (f64::from(*x) / norm) as f32).collect())
}

fn quantized(v: &[f32]) -> Vec<i8> {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    if max == 0.0 {
        return vec![0; v.len()];
    }
    v.iter().map(|x| (x / max * 127.0).round().clamp(-127.0, 127.0) as i8).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// usearch's key for an answer: the answer key's first 8 bytes.
fn graph_key(answer: &[u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&answer[..8]);
    u64::from_le_bytes(b)
}

struct FlatEntry {
    answer: [u8; 32],
    expires_ms: u64,
    vector: Box<[f32]>,
}

struct Graph {
    index: usearch::Index,
    /// usearch key → the answer and its expiry.
    slots: DashMap<u64, ([u8; 32], u64)>,
}

enum Body {
    Flat(Vec<FlatEntry>),
    Graph(Graph),
}

struct Partition {
    dims: usize,
    body: RwLock<Body>,
}

impl Partition {
    fn len(&self) -> usize {
        match &*self.body.read().unwrap_or_else(|e| e.into_inner()) {
            Body::Flat(v) => v.len(),
            Body::Graph(g) => g.slots.len(),
        }
    }

    fn bytes(&self) -> u64 {
        match &*self.body.read().unwrap_or_else(|e| e.into_inner()) {
            Body::Flat(v) => (v.len() * (self.dims * 4 + 64)) as u64,
            Body::Graph(g) => (g.index.memory_usage() + g.slots.len() * 64) as u64,
        }
    }

    /// Unexpired matches at least `min` similar, best first.
    fn search(&self, query: &[f32], min: f32, now_ms: u64) -> Vec<Match> {
        let mut out: Vec<Match> = match &*self.body.read().unwrap_or_else(|e| e.into_inner()) {
            Body::Flat(entries) => entries
                .iter()
                .filter(|e| e.expires_ms > now_ms)
                .map(|e| Match { answer: e.answer, similarity: dot(&e.vector, query) })
                .filter(|m| m.similarity >= min)
                .collect(),
            Body::Graph(g) => {
                let Ok(found) = g.index.search(&quantized(query), GRAPH_CANDIDATES) else {
                    return Vec::new();
                };
                found
                    .keys
                    .iter()
                    .zip(&found.distances)
                    .filter_map(|(k, d)| {
                        let slot = g.slots.get(k)?;
                        (slot.1 > now_ms).then(|| Match { answer: slot.0, similarity: 1.0 - d })
                    })
                    .filter(|m| m.similarity >= min)
                    .collect()
            }
        };
        out.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
        out.truncate(MATCHES);
        out
    }
}

fn new_graph(dims: usize, capacity: usize) -> Result<Graph, String> {
    let options = usearch::IndexOptions {
        dimensions: dims,
        metric: usearch::MetricKind::Cos,
        quantization: usearch::ScalarKind::I8,
        ..Default::default()
    };
    let index = usearch::Index::new(&options).map_err(|e| e.to_string())?;
    index.reserve_capacity_and_threads(capacity, GRAPH_THREADS).map_err(|e| e.to_string())?;
    Ok(Graph { index, slots: DashMap::new() })
}

enum Job {
    Insert(Indexed),
    /// A vector whose answer left the store.
    Remove {
        partition: [u8; 32],
        answer: [u8; 32],
    },
    /// Answers once every job sent before it is done (tests, benchmarks).
    Flush(mpsc::Sender<()>),
}

/// Figures for the metrics.
#[derive(Default)]
pub struct Stats {
    pub vectors: AtomicU64,
    pub bytes: AtomicU64,
    /// Writes dropped because the indexer was behind.
    pub dropped: AtomicU64,
}

/// The semantic index of this process.
pub struct Vectors {
    partitions: Arc<DashMap<[u8; 32], Arc<Partition>>>,
    jobs: SyncSender<Job>,
    pub stats: Arc<Stats>,
}

/// Unix milliseconds: expiries are compared across nodes.
pub fn now_ms() -> u64 {
    crate::spend::unix_now_us() / 1000
}

impl Vectors {
    /// Starts the indexer thread; it ends when the index is dropped. A thread that cannot
    /// start is reported, and every write is then dropped (and counted).
    pub fn new(max_vectors: usize) -> Vectors {
        let partitions = Arc::new(DashMap::new());
        let stats = Arc::new(Stats::default());
        let (jobs, rx) = mpsc::sync_channel(QUEUE);
        let indexer = Indexer {
            partitions: partitions.clone(),
            stats: stats.clone(),
            order: VecDeque::new(),
            live: HashMap::new(),
            seq: 0,
            max_vectors: max_vectors.max(1),
        };
        if let Err(e) =
            std::thread::Builder::new().name("modelux-cache-index".into()).spawn(move || indexer.run(rx))
        {
            tracing::error!(error = %e, "cannot start the semantic cache index thread");
        }
        Vectors { partitions, jobs, stats }
    }

    /// The unexpired vectors of `partition` at least `min` similar to `query` (any length;
    /// normalized here), best first, at most three.
    pub fn search(&self, partition: &[u8; 32], query: &[f32], min: f32) -> Vec<Match> {
        let Some(p) = self.partitions.get(partition).map(|p| p.clone()) else { return Vec::new() };
        if p.dims != query.len() {
            return Vec::new();
        }
        let Some(query) = normalized(query) else { return Vec::new() };
        p.search(&query, min, now_ms())
    }

    /// Forgets a vector whose answer is no longer stored.
    pub fn remove(&self, partition: [u8; 32], answer: [u8; 32]) {
        let _ = self.jobs.try_send(Job::Remove { partition, answer });
    }

    /// Queues a vector, waiting for room (vectors read from the shared stream: none is
    /// dropped, the reader slows down instead). Blocks: not for a request's thread.
    pub fn insert_waiting(&self, item: Indexed) {
        let _ = self.jobs.send(Job::Insert(item));
    }

    /// Queues a vector for the indexer; `false` if it was dropped (the indexer is behind).
    pub fn insert(&self, item: Indexed) -> bool {
        match self.jobs.try_send(Job::Insert(item)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Waits until every write queued before it is in the index.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.jobs.send(Job::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

/// The indexer thread's state: every write goes through it.
struct Indexer {
    partitions: Arc<DashMap<[u8; 32], Arc<Partition>>>,
    stats: Arc<Stats>,
    /// Partition, answer and insert number of every vector, oldest first (what the cap
    /// drops first); entries whose vector was replaced or removed since are skipped.
    order: VecDeque<([u8; 32], [u8; 32], u64)>,
    /// Each indexed answer's partition and insert number.
    live: HashMap<[u8; 32], ([u8; 32], u64)>,
    seq: u64,
    max_vectors: usize,
}

impl Indexer {
    fn run(mut self, rx: Receiver<Job>) {
        let mut last_sweep = std::time::Instant::now();
        let mut last_stats = std::time::Instant::now();
        loop {
            match rx.recv_timeout(SWEEP_EVERY) {
                Ok(Job::Insert(item)) => {
                    self.insert(item);
                    // The figures walk every partition: at most once a second.
                    if last_stats.elapsed() >= Duration::from_secs(1) {
                        self.publish_stats();
                        last_stats = std::time::Instant::now();
                    }
                }
                Ok(Job::Remove { partition, answer }) => {
                    if let Some(p) = self.partitions.get(&partition).map(|p| p.clone()) {
                        self.remove(&p, &answer);
                    }
                    self.live.remove(&answer);
                }
                Ok(Job::Flush(done)) => {
                    self.publish_stats();
                    let _ = done.send(());
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if last_sweep.elapsed() >= SWEEP_EVERY {
                self.sweep();
                last_sweep = std::time::Instant::now();
                self.publish_stats();
            }
        }
    }

    fn publish_stats(&self) {
        let (mut vectors, mut bytes) = (0u64, 0u64);
        for p in self.partitions.iter() {
            vectors += p.len() as u64;
            bytes += p.bytes();
        }
        self.stats.vectors.store(vectors, Ordering::Relaxed);
        self.stats.bytes.store(bytes, Ordering::Relaxed);
    }

    fn insert(&mut self, item: Indexed) {
        let Some(vector) = normalized(&item.vector) else { return };
        if item.expires_ms <= now_ms() {
            return;
        }
        let partition = self
            .partitions
            .entry(item.partition)
            .or_insert_with(|| {
                Arc::new(Partition { dims: vector.len(), body: RwLock::new(Body::Flat(Vec::new())) })
            })
            .clone();
        if partition.dims != vector.len() {
            return;
        }
        self.remove(&partition, &item.answer);
        self.live.remove(&item.answer);
        let is_graph = matches!(&*partition.body.read().unwrap_or_else(|e| e.into_inner()), Body::Graph(_));
        let full_flat = if is_graph {
            if !Self::graph_add(&partition, item.answer, item.expires_ms, &vector) {
                return;
            }
            false
        } else {
            let mut body = partition.body.write().unwrap_or_else(|e| e.into_inner());
            match &mut *body {
                Body::Flat(entries) => {
                    entries.push(FlatEntry {
                        answer: item.answer,
                        expires_ms: item.expires_ms,
                        vector: vector.into_boxed_slice(),
                    });
                    entries.len() > FLAT_MAX
                }
                // Only this thread switches a partition to a graph.
                Body::Graph(_) => false,
            }
        };
        if full_flat {
            self.to_graph(&partition);
        }
        self.seq += 1;
        self.live.insert(item.answer, (item.partition, self.seq));
        self.order.push_back((item.partition, item.answer, self.seq));
        while self.live.len() > self.max_vectors {
            let Some((p, answer, seq)) = self.order.pop_front() else { break };
            if self.live.get(&answer) != Some(&(p, seq)) {
                continue;
            }
            self.live.remove(&answer);
            if let Some(part) = self.partitions.get(&p).map(|p| p.clone()) {
                self.remove(&part, &answer);
            }
        }
    }

    /// Adds to a graph partition, growing it first when full (the only step that makes
    /// searches wait).
    /// Whether it was added.
    fn graph_add(partition: &Partition, answer: [u8; 32], expires_ms: u64, vector: &[f32]) -> bool {
        {
            let body = partition.body.read().unwrap_or_else(|e| e.into_inner());
            let Body::Graph(g) = &*body else { return false };
            if g.index.size() < g.index.capacity() {
                let key = graph_key(&answer);
                g.slots.insert(key, (answer, expires_ms));
                if g.index.add(key, &quantized(vector)).is_err() {
                    g.slots.remove(&key);
                    return false;
                }
                return true;
            }
        }
        {
            let body = partition.body.write().unwrap_or_else(|e| e.into_inner());
            if let Body::Graph(g) = &*body {
                let capacity = g.index.capacity().max(FLAT_MAX) * 2;
                if g.index.reserve_capacity_and_threads(capacity, GRAPH_THREADS).is_err() {
                    return false;
                }
            }
        }
        Self::graph_add(partition, answer, expires_ms, vector)
    }

    /// A flat partition grown past `FLAT_MAX` becomes a graph (built before it is swapped
    /// in, so searches go on meanwhile).
    fn to_graph(&self, partition: &Partition) {
        let entries: Vec<([u8; 32], u64, Vec<i8>)> = {
            let body = partition.body.read().unwrap_or_else(|e| e.into_inner());
            let Body::Flat(entries) = &*body else { return };
            entries.iter().map(|e| (e.answer, e.expires_ms, quantized(&e.vector))).collect()
        };
        let Ok(graph) = new_graph(partition.dims, entries.len() * 2) else { return };
        for (answer, expires_ms, v) in &entries {
            let key = graph_key(answer);
            if graph.index.add(key, v).is_ok() {
                graph.slots.insert(key, (*answer, *expires_ms));
            }
        }
        let mut body = partition.body.write().unwrap_or_else(|e| e.into_inner());
        // Vectors added while the graph was built were added to the flat list.
        if let Body::Flat(now) = &*body {
            for e in now.iter().skip(entries.len()) {
                let key = graph_key(&e.answer);
                if graph.index.size() < graph.index.capacity()
                    && graph.index.add(key, &quantized(&e.vector)).is_ok()
                {
                    graph.slots.insert(key, (e.answer, e.expires_ms));
                }
            }
        }
        *body = Body::Graph(graph);
    }

    fn remove(&self, partition: &Partition, answer: &[u8; 32]) {
        let flat = {
            let body = partition.body.read().unwrap_or_else(|e| e.into_inner());
            match &*body {
                Body::Flat(entries) => entries.iter().any(|e| &e.answer == answer),
                Body::Graph(g) => {
                    let key = graph_key(answer);
                    if g.slots.remove(&key).is_some() {
                        let _ = g.index.remove(key);
                    }
                    false
                }
            }
        };
        if flat {
            let mut body = partition.body.write().unwrap_or_else(|e| e.into_inner());
            if let Body::Flat(entries) = &mut *body {
                entries.retain(|e| &e.answer != answer);
            }
        }
    }

    /// Drops expired vectors, and partitions left empty.
    fn sweep(&mut self) {
        let now = now_ms();
        let mut empty = Vec::new();
        let mut gone = Vec::new();
        for p in self.partitions.iter() {
            {
                let mut body = p.body.write().unwrap_or_else(|e| e.into_inner());
                match &mut *body {
                    Body::Flat(entries) => {
                        gone.extend(entries.iter().filter(|e| e.expires_ms <= now).map(|e| e.answer));
                        entries.retain(|e| e.expires_ms > now);
                    }
                    Body::Graph(g) => {
                        let expired: Vec<(u64, [u8; 32])> = g
                            .slots
                            .iter()
                            .filter(|s| s.value().1 <= now)
                            .map(|s| (*s.key(), s.value().0))
                            .collect();
                        for (key, answer) in expired {
                            g.slots.remove(&key);
                            let _ = g.index.remove(key);
                            gone.push(answer);
                        }
                    }
                }
            }
            if p.len() == 0 {
                empty.push(*p.key());
            }
        }
        for key in &empty {
            self.partitions.remove_if(key, |_, p| p.len() == 0);
        }
        for answer in &gone {
            self.live.remove(answer);
        }
        let live = &self.live;
        self.order.retain(|(p, answer, seq)| live.get(answer) == Some(&(*p, *seq)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(partition: u8, answer: u8, vector: Vec<f32>) -> Indexed {
        Indexed { partition: [partition; 32], answer: [answer; 32], vector, expires_ms: now_ms() + 60_000 }
    }

    #[test]
    fn finds_the_closest_vector_of_its_own_partition_only() {
        let v = Vectors::new(100);
        v.insert(item(1, 10, vec![1.0, 0.0, 0.0]));
        v.insert(item(1, 11, vec![0.0, 1.0, 0.0]));
        v.insert(item(2, 20, vec![0.96, 0.28, 0.0]));
        v.flush();
        let m = v.search(&[1; 32], &[0.96, 0.28, 0.0], 0.0)[0];
        assert_eq!(m.answer, [10; 32]);
        assert!((m.similarity - 0.96).abs() < 1e-5, "{}", m.similarity);
        assert_eq!(v.search(&[2; 32], &[2.0, 0.0, 0.0], 0.0)[0].answer, [20; 32]);
        assert!(v.search(&[3; 32], &[1.0, 0.0, 0.0], 0.0).is_empty(), "another partition");
        assert!(v.search(&[1; 32], &[1.0, 0.0], 0.0).is_empty(), "another length");
        assert_eq!(v.search(&[1; 32], &[0.96, 0.28, 0.0], 0.5).len(), 1, "one above 0.5");
        v.remove([1; 32], [10; 32]);
        v.flush();
        assert_eq!(v.search(&[1; 32], &[0.96, 0.28, 0.0], 0.0)[0].answer, [11; 32]);
        assert_eq!(v.stats.vectors.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn expired_vectors_are_not_found_and_the_cap_drops_the_oldest() {
        let v = Vectors::new(2);
        let mut old = item(1, 10, vec![1.0, 0.0]);
        old.expires_ms = now_ms() - 1;
        v.insert(old);
        v.insert(item(1, 11, vec![1.0, 0.1]));
        v.insert(item(1, 12, vec![0.0, 1.0]));
        v.insert(item(1, 13, vec![0.1, 1.0]));
        v.flush();
        // 11 was the oldest of three: dropped for the cap of 2.
        assert_eq!(v.search(&[1; 32], &[1.0, 0.0], 0.0)[0].answer, [13; 32]);
        // Re-indexing 13 makes 12 the oldest: the next one in drops 12, not 13.
        v.insert(item(1, 13, vec![0.1, 1.0]));
        v.insert(item(1, 14, vec![-1.0, 0.0]));
        v.flush();
        let left: Vec<[u8; 32]> = v.search(&[1; 32], &[1.0, 0.0], -1.0).iter().map(|m| m.answer).collect();
        assert_eq!(left, vec![[13; 32], [14; 32]]);
    }

    #[test]
    fn a_large_partition_becomes_a_graph_and_still_finds_its_vectors() {
        let dims = 64;
        let v = Vectors::new(10_000);
        let mut x: u64 = 7;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 2000) as f32 / 1000.0 - 1.0
        };
        let vectors: Vec<Vec<f32>> =
            (0..FLAT_MAX + 200).map(|_| (0..dims).map(|_| rnd()).collect()).collect();
        for (i, vec) in vectors.iter().enumerate() {
            let mut answer = [0u8; 32];
            answer[..8].copy_from_slice(&(i as u64).to_le_bytes());
            v.insert(Indexed {
                partition: [1; 32],
                answer,
                vector: vec.clone(),
                expires_ms: now_ms() + 60_000,
            });
        }
        v.flush();
        assert!(matches!(&*v.partitions.get(&[1; 32]).unwrap().body.read().unwrap(), Body::Graph(_)));
        for i in [0usize, 500, FLAT_MAX + 150] {
            let m = v.search(&[1; 32], &vectors[i], 0.9)[0];
            assert_eq!(u64::from_le_bytes(m.answer[..8].try_into().unwrap()), i as u64);
            assert!(m.similarity > 0.99, "{}", m.similarity);
        }
    }
}
