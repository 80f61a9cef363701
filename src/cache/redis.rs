//! The response cache on Redis (`cache.redis.url`), shared by every gateway node pointed at
//! it. Entries are `mlx:cache:v1:<key hex>` → a JSON envelope (`Stored`), written with
//! `SET … PX <ttl>` so Redis expires them. Calls run on a small runtime of their own that
//! drives the one multiplexed, reconnecting connection (pingora's per-thread runtimes come
//! and go with their threads); each call is bounded by `timeout`. Any failure makes the
//! store sit out for a second (`BACKOFF`): requests are then served uncached, never failed
//! and never held up by a Redis that is down.
//!
//! Semantic vectors are shared through the stream `mlx:cache:v1:vectors` (`XADD … MAXLEN ~`
//! the index's cap): each node appends the vectors it indexes and follows the stream on a
//! connection of its own (`XREAD BLOCK`, from the start when it boots, so a restarted node
//! finds what the others indexed), adding the other nodes' vectors to its own index.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use super::semantic::{Indexed, Vectors};
use super::Answer;
use super::Entry;
use crate::wire::canonical::{EmbeddingsResponse, Response};

/// After a failure, Redis is not tried again for this long.
const BACKOFF: Duration = Duration::from_secs(1);

/// What is stored in Redis for one entry (the scheme is in the key's prefix).
#[derive(Serialize, Deserialize)]
struct Stored {
    /// A chat answer (entries of earlier builds have only this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response: Option<Response>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    embeddings: Option<EmbeddingsResponse>,
    provider: String,
    model: String,
    cost_usd: f64,
}

pub struct RedisCache {
    client: redis::Client,
    runtime: Option<tokio::runtime::Runtime>,
    conn: Arc<tokio::sync::Mutex<Option<ConnectionManager>>>,
    timeout: Duration,
    started: Instant,
    /// Milliseconds since `started` before which Redis is not tried.
    down_until_ms: AtomicU64,
    /// Tells this node's vectors from the other nodes' in the stream.
    node: String,
}

/// The stream every node's semantic vectors go through.
const VECTORS: &str = "mlx:cache:v1:vectors";
/// Entries read per `XREAD`.
const READ_BATCH: usize = 256;
/// How long an `XREAD` blocks waiting for new entries.
const BLOCK_MS: usize = 1000;
/// Any stream call answers within this, or the connection is made again.
const READ_LIMIT: Duration = Duration::from_secs(5);

/// The shared connection, made on first use.
async fn manager(
    slot: &tokio::sync::Mutex<Option<ConnectionManager>>,
    client: redis::Client,
) -> redis::RedisResult<ConnectionManager> {
    let mut slot = slot.lock().await;
    if let Some(m) = slot.as_ref() {
        return Ok(m.clone());
    }
    let m = ConnectionManager::new(client).await?;
    *slot = Some(m.clone());
    Ok(m)
}

fn redis_key(key: &[u8; 32]) -> String {
    format!("mlx:cache:v{}:{}", super::KEY_SCHEME, hex::encode(key))
}

impl RedisCache {
    /// `url`: `redis://[:password@]host:port[/db]`. Connects on first use.
    pub fn new(url: &str, timeout: Duration) -> Result<RedisCache, String> {
        let client = redis::Client::open(url).map_err(|e| format!("cache.redis.url: {e}"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("modelux-cache-redis")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the Redis cache runtime: {e}"))?;
        Ok(RedisCache {
            client,
            runtime: Some(runtime),
            conn: Arc::new(tokio::sync::Mutex::new(None)),
            timeout,
            started: Instant::now(),
            down_until_ms: AtomicU64::new(0),
            node: hex::encode(rand::random::<[u8; 8]>()),
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Runs one command on the cache's runtime, bounded by the timeout; a failure backs off.
    async fn call<T: Send + 'static>(
        &self,
        op: impl FnOnce(
                ConnectionManager,
            )
                -> std::pin::Pin<Box<dyn std::future::Future<Output = redis::RedisResult<T>> + Send>>
            + Send
            + 'static,
    ) -> Result<T, String> {
        if self.now_ms() < self.down_until_ms.load(Ordering::Relaxed) {
            return Err("redis is backing off after a failure".into());
        }
        let Some(runtime) = &self.runtime else { return Err("the Redis cache is shut down".into()) };
        let (conn, client, timeout) = (self.conn.clone(), self.client.clone(), self.timeout);
        let task = runtime.spawn(async move {
            let work = async { op(manager(&conn, client).await?).await };
            match tokio::time::timeout(timeout, work).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
            }
        });
        let result = task.await.map_err(|e| format!("redis task: {e}")).and_then(|r| r);
        if result.is_err() {
            self.down_until_ms.store(self.now_ms() + BACKOFF.as_millis() as u64, Ordering::Relaxed);
        }
        result
    }

    pub async fn get(&self, key: &[u8; 32], ttl_hint: Duration) -> Result<Option<Entry>, String> {
        let k = redis_key(key);
        let raw: Option<Vec<u8>> = self
            .call(move |mut c| {
                Box::pin(
                    async move { redis::cmd("GET").arg(&k).query_async::<Option<Vec<u8>>>(&mut c).await },
                )
            })
            .await?;
        let Some(raw) = raw else { return Ok(None) };
        // An entry this build cannot read is a miss (and is overwritten by the next store).
        let Ok(s) = serde_json::from_slice::<Stored>(&raw) else { return Ok(None) };
        let answer = match (s.response, s.embeddings) {
            (Some(r), None) => Answer::Chat(r),
            (None, Some(e)) => Answer::Embeddings(e),
            _ => return Ok(None),
        };
        Ok(Some(Entry::new(answer, s.provider, s.model, s.cost_usd, ttl_hint)))
    }

    pub async fn put(&self, key: &[u8; 32], entry: &Entry) -> Result<(), String> {
        let stored = Stored {
            response: match &entry.answer {
                Answer::Chat(r) => Some(r.clone()),
                Answer::Embeddings(_) => None,
            },
            embeddings: match &entry.answer {
                Answer::Embeddings(e) => Some(e.clone()),
                Answer::Chat(_) => None,
            },
            provider: entry.provider.clone(),
            model: entry.model.clone(),
            cost_usd: entry.cost_usd,
        };
        let body = serde_json::to_vec(&stored).map_err(|e| e.to_string())?;
        let (k, px) = (redis_key(key), entry.ttl.as_millis().max(1) as u64);
        self.call(move |mut c| {
            Box::pin(async move {
                redis::cmd("SET").arg(&k).arg(body).arg("PX").arg(px).query_async::<()>(&mut c).await
            })
        })
        .await
    }
}

impl RedisCache {
    /// Appends a vector this node indexed to the shared stream, which keeps about
    /// `max_len` of them. Sent in the background (the answer never waits for it) and
    /// bounded by the timeout; a failure is counted but does not pause the store.
    pub fn publish(&self, item: &Indexed, max_len: usize, failed: prometheus::IntCounter) {
        let Some(runtime) = &self.runtime else { return };
        let vector: Vec<u8> = item.vector.iter().flat_map(|f| f.to_le_bytes()).collect();
        let fields: [(&str, Vec<u8>); 5] = [
            ("n", self.node.clone().into_bytes()),
            ("p", item.partition.to_vec()),
            ("k", item.answer.to_vec()),
            ("e", item.expires_ms.to_string().into_bytes()),
            ("v", vector),
        ];
        let (conn, client, timeout) = (self.conn.clone(), self.client.clone(), self.timeout);
        runtime.spawn(async move {
            let work = async {
                let mut c = manager(&conn, client).await?;
                let mut cmd = redis::cmd("XADD");
                cmd.arg(VECTORS).arg("MAXLEN").arg("~").arg(max_len).arg("*");
                for (k, v) in &fields {
                    cmd.arg(*k).arg(v.as_slice());
                }
                cmd.query_async::<String>(&mut c).await.map(|_| ())
            };
            if !matches!(tokio::time::timeout(timeout, work).await, Ok(Ok(()))) {
                failed.inc();
            }
        });
    }

    /// Follows the shared stream for as long as this store lives, adding the other nodes'
    /// unexpired vectors to `vectors`. Reconnects a second after any failure, where it left.
    pub fn follow(&self, vectors: Arc<Vectors>) {
        let Some(runtime) = &self.runtime else { return };
        let (client, node) = (self.client.clone(), self.node.clone());
        runtime.spawn(async move {
            let mut last = "0-0".to_string();
            loop {
                if let Err(e) = tail(&client, &node, &vectors, &mut last).await {
                    tracing::debug!(error = %e, "semantic cache: following the shared vectors failed; retrying");
                }
                tokio::time::sleep(BACKOFF).await;
            }
        });
    }
}

/// Reads the stream from `last` until a call fails.
async fn tail(
    client: &redis::Client,
    node: &str,
    vectors: &Arc<Vectors>,
    last: &mut String,
) -> Result<(), String> {
    use redis::streams::{StreamReadOptions, StreamReadReply};
    // A blocked read holds its connection: this one is the stream's alone. Every call is
    // bounded, so a connection that went silent (a half-open socket, a failover) is dropped
    // and made again rather than waited on forever.
    let mut conn = tokio::time::timeout(READ_LIMIT, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| "no connection within the limit".to_string())?
        .map_err(|e| e.to_string())?;
    let options = StreamReadOptions::default().count(READ_BATCH).block(BLOCK_MS);
    loop {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg(&options).arg("STREAMS").arg(VECTORS).arg(last.as_str());
        let read = cmd.query_async::<StreamReadReply>(&mut conn);
        let reply = tokio::time::timeout(READ_LIMIT, read)
            .await
            .map_err(|_| "no answer to XREAD within the limit".to_string())?
            .map_err(|e| e.to_string())?;
        let mut batch = Vec::new();
        for key in reply.keys {
            for entry in key.ids {
                *last = entry.id.clone();
                let bytes = |name: &str| -> Option<Vec<u8>> {
                    match entry.map.get(name)? {
                        redis::Value::BulkString(b) => Some(b.clone()),
                        _ => None,
                    }
                };
                if bytes("n").as_deref() == Some(node.as_bytes()) {
                    continue;
                }
                let (Some(p), Some(k), Some(e), Some(v)) = (bytes("p"), bytes("k"), bytes("e"), bytes("v"))
                else {
                    continue;
                };
                let (Ok(partition), Ok(answer)) = (<[u8; 32]>::try_from(p), <[u8; 32]>::try_from(k)) else {
                    continue;
                };
                let Some(expires_ms) = std::str::from_utf8(&e).ok().and_then(|e| e.parse::<u64>().ok())
                else {
                    continue;
                };
                if v.len() % 4 != 0 || expires_ms <= super::semantic::now_ms() {
                    continue;
                }
                let vector =
                    v.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                batch.push(Indexed { partition, answer, vector, expires_ms });
            }
        }
        if !batch.is_empty() {
            // The indexer may be behind (a node starting on a long stream): wait for room on
            // a blocking thread rather than drop vectors or hold up this runtime.
            let vectors = vectors.clone();
            let queued = tokio::task::spawn_blocking(move || {
                for item in batch {
                    vectors.insert_waiting(item);
                }
            });
            queued.await.map_err(|e| e.to_string())?;
        }
    }
}

impl Drop for RedisCache {
    /// Dropping a runtime blocks, which is not allowed inside another runtime: let it wind
    /// down in the background.
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
