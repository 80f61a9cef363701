//! What every management resource endpoint shares: the call, the error envelope, JSON
//! bodies with the failing field's path, cursor pages, and the one way a change is applied
//! (stage, plan, validate the whole would-be snapshot, commit one transaction, swap).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::auth::Principal;
use crate::config::{ConfigError, Snapshot};
use crate::state::{Actor, Change, Idempotent, Kind, ListQuery, Op, Origin, StateError, StateStore, Stored};

/// Largest management request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// How long an idempotency key's answer is replayed.
const IDEMPOTENCY_WINDOW_MS: i64 = 24 * 3600 * 1000;
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// One management request, read.
pub struct Call<'a> {
    pub method: &'a str,
    pub query: &'a str,
    pub body: &'a [u8],
    pub principal: &'a Principal,
    pub idempotency_key: Option<&'a str>,
    pub if_match: Option<&'a str>,
    pub origin: Origin,
}

impl Call<'_> {
    pub fn actor(&self) -> Actor {
        Actor {
            kind: "management_key".into(),
            id: self.principal.key_name.to_string(),
            label: self.principal.key_name.to_string(),
        }
    }

    /// The value of query parameter `name` (percent-decoded).
    pub fn param(&self, name: &str) -> Option<String> {
        url::form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// `If-Match: 3` (or `"3"`, `W/"3"`): the version the change was computed from.
    pub fn expected_version(&self) -> Result<Option<i64>, ApiError> {
        let Some(raw) = self.if_match else { return Ok(None) };
        let v = raw.trim().trim_start_matches("W/").trim_matches('"');
        v.parse().map(Some).map_err(|_| {
            ApiError::bad_request(
                "invalid_if_match",
                format!("If-Match must be a version number, got {raw:?}"),
            )
        })
    }
}

/// An answer: status, JSON body, extra headers.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl Answer {
    pub fn json(status: u16, body: &Value) -> Answer {
        Answer { status, body: serde_json::to_vec(body).unwrap_or_default(), headers: Vec::new() }
    }

    /// `{"data": …}`.
    pub fn data(status: u16, data: Value) -> Answer {
        Answer::json(status, &json!({ "data": data }))
    }
}

/// A management error, answered in the nested envelope (boxed: errors travel by `Result`).
#[derive(Debug)]
pub struct ApiError(Box<ErrorBody>);

#[derive(Debug)]
struct ErrorBody {
    status: u16,
    kind: &'static str,
    code: String,
    message: String,
    resource: Option<&'static str>,
    id: Option<String>,
    /// `validation_failed`: every error with its path.
    errors: Vec<ConfigError>,
}

impl ApiError {
    pub fn new(
        status: u16,
        kind: &'static str,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError(Box::new(ErrorBody {
            status,
            kind,
            code: code.into(),
            message: message.into(),
            resource: None,
            id: None,
            errors: Vec::new(),
        }))
    }

    fn about(mut self, resource: &'static str, id: &str) -> ApiError {
        self.0.resource = Some(resource);
        self.0.id = Some(id.to_string());
        self
    }

    pub fn bad_request(code: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(400, "invalid_request", code, message)
    }

    pub fn not_found(resource: &'static str, id: &str) -> ApiError {
        let message = format!("{} {id} not found", resource.replace('_', " "));
        ApiError::new(404, "not_found", format!("{resource}_not_found"), message).about(resource, id)
    }

    pub fn conflict(code: &str, resource: &'static str, id: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(409, "conflict", code, message).about(resource, id)
    }

    pub fn managed_by_file(resource: &'static str, id: &str) -> ApiError {
        ApiError::conflict(
            "managed_by_file",
            resource,
            id,
            format!(
                "{} {id} is defined in the config file and is read-only through the API; change the file",
                resource.replace('_', " ")
            ),
        )
    }

    pub fn invalid(errors: Vec<ConfigError>) -> ApiError {
        let message = match errors.as_slice() {
            [one] => format!("validation failed: {one}"),
            many => format!("validation failed with {} errors", many.len()),
        };
        let mut e = ApiError::new(422, "validation_error", "validation_failed", message);
        e.0.errors = errors;
        e
    }

    /// A secret could not be sealed under the master key.
    pub fn sealing(e: String) -> ApiError {
        ApiError::new(500, "internal_error", "encryption_failed", e)
    }

    pub fn unavailable(e: &StateError) -> ApiError {
        ApiError::new(503, "service_unavailable", "state_store_unavailable", e.to_string())
    }

    pub fn method_not_allowed(method: &str, allowed: &str) -> ApiError {
        ApiError::new(
            405,
            "invalid_request",
            "method_not_allowed",
            format!("{method} is not allowed here; use {allowed}"),
        )
    }

    pub fn into_answer(self) -> Answer {
        let e = *self.0;
        let mut error = json!({ "type": e.kind, "code": e.code, "message": e.message });
        if let Some(r) = e.resource {
            error["resource"] = json!(r);
        }
        if let Some(id) = e.id {
            error["id"] = json!(id);
        }
        if !e.errors.is_empty() {
            error["errors"] =
                e.errors.iter().map(|e| json!({ "path": e.path, "message": e.message })).collect();
        }
        Answer::json(e.status, &json!({ "error": error }))
    }
}

/// Parses a JSON body into `T`; errors name the field's path.
pub fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("invalid_json", "the request body is empty; send a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.classify() == serde_json::error::Category::Data {
            ApiError::invalid(vec![ConfigError::new(
                if path == "." { String::new() } else { path },
                inner.to_string(),
            )])
        } else {
            ApiError::bad_request("invalid_json", format!("the request body is not valid JSON: {inner}"))
        }
    })
}

/// For PATCH fields that may be cleared: absent → `None`, `null` → `Some(None)`.
pub fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `limit` (default 50, at most 200) and the opaque `cursor` of a list.
pub struct Page {
    pub limit: usize,
    pub cursor: Option<String>,
}

pub fn page(call: &Call<'_>) -> Result<Page, ApiError> {
    let limit = match call.param("limit") {
        None => 50,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=200).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_limit",
                    "limit must be a whole number from 1 to 200",
                ))
            }
        },
    };
    Ok(Page { limit, cursor: call.param("cursor").filter(|c| !c.is_empty()) })
}

/// A list over the config file's entries (first, in file order) then the store's (by
/// `seq`). Cursor: `f<index>` or `s<seq>`, the position after the last item given.
pub enum Position {
    File(usize),
    Store(i64),
}

pub fn position(cursor: Option<&str>) -> Result<Position, ApiError> {
    let bad = || ApiError::bad_request("invalid_cursor", "cursor is not one this API gave out");
    match cursor {
        None => Ok(Position::File(0)),
        Some(c) => {
            let (tag, n) = c.split_at_checked(1).ok_or_else(bad)?;
            match tag {
                "f" => n.parse().map(Position::File).map_err(|_| bad()),
                "s" => n.parse().map(Position::Store).map_err(|_| bad()),
                _ => Err(bad()),
            }
        }
    }
}

/// `{data, next_cursor, has_more}`.
pub fn list_answer(items: Vec<Value>, next: Option<String>) -> Answer {
    let has_more = next.is_some();
    Answer::json(200, &json!({ "data": items, "next_cursor": next, "has_more": has_more }))
}

/// What a planned change gives back besides the store rows.
pub struct Plan {
    pub changes: Vec<Change>,
    pub status: u16,
    /// The answer's `data`.
    pub data: Value,
    /// Fields of `data` holding a secret shown once (a new key, a signing secret): the copy
    /// kept for `Idempotency-Key` replays has them replaced by `null`, so no secret is stored.
    pub secret_fields: &'static [&'static str],
}

/// Resources with a change in flight (by lock key): a second change of the same resource
/// while the first is applied is answered 409 instead of silently overwriting it.
#[derive(Default)]
pub struct InFlight(Mutex<HashSet<String>>);

struct Claim<'a> {
    set: &'a InFlight,
    key: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.set.0.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
    }
}

impl InFlight {
    fn claim(&self, key: &str) -> Option<Claim<'_>> {
        let mut set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        set.insert(key.to_string()).then(|| Claim { set: self, key: key.to_string() })
    }
}

pub fn now_ms() -> i64 {
    (crate::spend::unix_now_us() / 1000) as i64
}

fn fingerprint(call: &Call<'_>, path: &str) -> String {
    let mut h = Sha256::new();
    h.update(call.method.as_bytes());
    h.update([0]);
    h.update(path.as_bytes());
    h.update([0]);
    h.update(call.body);
    hex::encode(h.finalize())
}

/// The resources after `changes`.
fn apply(current: &[Stored], changes: &[Change]) -> Vec<Stored> {
    let mut out = current.to_vec();
    for c in changes {
        out.retain(|r| r.id != c.resource.id);
        if !matches!(c.op, Op::Delete) {
            out.push(c.resource.clone());
        }
    }
    out
}

/// Applies one management change. `lock` names the resource (one change of it at a time);
/// `plan` computes the change from the live resources and the current snapshot.
pub async fn mutate(
    config: &crate::config::store::ConfigStore,
    state: &Arc<dyn StateStore>,
    in_flight: &InFlight,
    call: &Call<'_>,
    path: &str,
    lock: &str,
    plan: impl FnOnce(&[Stored], &Snapshot) -> Result<Plan, ApiError>,
) -> Answer {
    match mutate_inner(config, state, in_flight, call, path, lock, plan).await {
        Ok(a) => a,
        Err(e) => e.into_answer(),
    }
}

async fn mutate_inner(
    config: &crate::config::store::ConfigStore,
    state: &Arc<dyn StateStore>,
    in_flight: &InFlight,
    call: &Call<'_>,
    path: &str,
    lock: &str,
    plan: impl FnOnce(&[Stored], &Snapshot) -> Result<Plan, ApiError>,
) -> Result<Answer, ApiError> {
    let idempotency = match call.idempotency_key {
        Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY => {
            return Err(ApiError::bad_request(
                "invalid_idempotency_key",
                format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters"),
            ))
        }
        Some(k) => Some((k, fingerprint(call, path))),
        None => None,
    };
    let Some(_claim) = in_flight.claim(lock) else {
        return Err(ApiError::new(
            409,
            "conflict",
            "concurrent_modification",
            "another change of this resource is being applied; read it again and retry",
        ));
    };
    let staged = config.stage().await;
    let scope = call.principal.key_name.to_string();
    let now = now_ms();
    if let Some((key, fp)) = &idempotency {
        let stored = state
            .idempotent(&scope, key, now - IDEMPOTENCY_WINDOW_MS)
            .await
            .map_err(|e| ApiError::unavailable(&e))?;
        if let Some(stored) = stored {
            if stored.fingerprint != *fp {
                return Err(ApiError::new(
                    409,
                    "conflict",
                    "idempotency_conflict",
                    "this Idempotency-Key was used with a different request in the last 24 hours",
                ));
            }
            let mut answer = Answer { status: stored.status, body: stored.body, headers: Vec::new() };
            answer.headers.push(("idempotent-replayed", "true".into()));
            return Ok(answer);
        }
    }
    // With a store shared by several nodes, another node may have committed since this
    // node's snapshot was built: plan on what the store holds now.
    let current = if state.backend() == "postgres" {
        Arc::new(state.load().await.map_err(|e| ApiError::unavailable(&e))?)
    } else {
        staged.resources()
    };
    let snapshot = config.load();
    let mut plan = plan(&current, &snapshot)?;
    let candidate = apply(&current, &plan.changes);
    let built = staged.build(&candidate).map_err(ApiError::invalid)?;
    // Written to the webhook outbox in the change's own transaction.
    for c in &mut plan.changes {
        c.events = super::webhooks::events_of(c, &snapshot.settings.webhooks.org_id);
    }
    let mut kept = plan.data.clone();
    for field in plan.secret_fields {
        if let Some(v) = kept.get_mut(*field) {
            *v = Value::Null;
        }
    }
    let answer = Answer::data(plan.status, plan.data);
    if let (Some((key, fp)), Some(first)) = (&idempotency, plan.changes.first_mut()) {
        first.idempotent = Some(Idempotent {
            scope,
            key: key.to_string(),
            fingerprint: fp.clone(),
            status: answer.status,
            body: Answer::data(answer.status, kept).body,
            created_ms: now,
        });
    }
    match state.commit(&plan.changes).await {
        Ok(_) => {}
        Err(StateError::Conflict(m)) => return Err(ApiError::new(409, "conflict", "conflict", m)),
        Err(e) => return Err(ApiError::unavailable(&e)),
    }
    staged.install(built, candidate);
    Ok(answer)
}

/// A change of `resource` (already at its new version) by `call`.
pub fn change(call: &Call<'_>, op: Op, resource: Stored, base: Option<i64>, action: String) -> Change {
    Change {
        op,
        resource,
        base_version: base,
        action,
        actor: call.actor(),
        origin: call.origin.clone(),
        before: None,
        after: None,
        now_ms: now_ms(),
        idempotent: None,
        events: Vec::new(),
    }
}

/// ISO-8601 of unix ms.
pub fn time(ms: i64) -> Value {
    json!(crate::spend::period::iso8601_ms(ms))
}

pub fn opt_time(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, time)
}

/// A new resource of `kind` (its id generated), at version 1.
pub fn new_resource(kind: Kind, project: String, slug: String, body: Value) -> Stored {
    let now = now_ms();
    Stored {
        kind,
        id: format!("{}{}", kind.id_prefix(), uuid::Uuid::now_v7().simple()),
        project,
        slug,
        body,
        version: 1,
        seq: 0,
        created_ms: now,
        updated_ms: now,
        deleted_ms: None,
    }
}

/// `old` at its next version with `body`.
pub fn next_version(old: &Stored, body: Value) -> Stored {
    let mut new = old.clone();
    new.body = body;
    new.version += 1;
    new.updated_ms = now_ms();
    new
}

/// Creating `r`: the change, audited as `action`, answered 201 with `view(r)`.
pub fn create_plan(call: &Call<'_>, r: Stored, action: &str, view: fn(&Stored) -> Value) -> Plan {
    let data = view(&r);
    let mut c = change(call, Op::Create, r, None, action.into());
    c.after = Some(data.clone());
    Plan { changes: vec![c], status: 201, data, secret_fields: &[] }
}

/// `old` becoming `new` (its next version), audited as `action`.
pub fn update_plan(
    call: &Call<'_>,
    old: &Stored,
    new: Stored,
    action: &str,
    view: fn(&Stored) -> Value,
) -> Plan {
    let data = view(&new);
    let mut c = change(call, Op::Update, new, Some(old.version), action.into());
    c.before = Some(view(old));
    c.after = Some(data.clone());
    Plan { changes: vec![c], status: 200, data, secret_fields: &[] }
}

/// The change that soft-deletes (or revokes) `old`, audited as `action`.
pub fn delete_change(call: &Call<'_>, old: &Stored, action: &str, view: fn(&Stored) -> Value) -> Change {
    let mut gone = next_version(old, old.body.clone());
    gone.deleted_ms = Some(gone.updated_ms);
    let after = view(&gone);
    let mut c = change(call, Op::Delete, gone, Some(old.version), action.into());
    c.before = Some(view(old));
    c.after = Some(after);
    c
}

/// Deleting `old`: answered 200 with the deleted resource.
pub fn delete_plan(call: &Call<'_>, old: &Stored, action: &str, view: fn(&Stored) -> Value) -> Plan {
    let c = delete_change(call, old, action, view);
    let data = c.after.clone().unwrap_or(Value::Null);
    Plan { changes: vec![c], status: 200, data, secret_fields: &[] }
}

/// The live stored resource `found` picked out of `current`, held to `If-Match`; without
/// one, 409 `managed_by_file` when the config file defines `key`, else 404.
pub fn editable<'a>(
    current: &'a [Stored],
    resource: &'static str,
    key: &str,
    in_file: bool,
    call: &Call<'_>,
    found: impl Fn(&Stored) -> bool,
) -> Result<&'a Stored, ApiError> {
    let Some(r) = current.iter().find(|r| found(r)) else {
        return Err(if in_file {
            ApiError::managed_by_file(resource, key)
        } else {
            ApiError::not_found(resource, key)
        });
    };
    if let Some(v) = call.expected_version()? {
        if v != r.version {
            return Err(ApiError::conflict(
                "version_conflict",
                resource,
                &r.id,
                format!("{} {} is at version {}, not {v}", resource.replace('_', " "), r.slug, r.version),
            ));
        }
    }
    Ok(r)
}

/// `editable` for a resource of `kind` named by its id or its slug.
pub fn editable_named<'a>(
    current: &'a [Stored],
    kind: Kind,
    key: &str,
    in_file: bool,
    call: &Call<'_>,
) -> Result<&'a Stored, ApiError> {
    editable(current, kind.as_str(), key, in_file, call, |r| r.kind == kind && (r.id == key || r.slug == key))
}

/// One page of a list: the config file's entries (`file`, already viewed) first, then the
/// store's resources of `kind` by `seq`.
pub async fn list_page(
    state: &dyn StateStore,
    call: &Call<'_>,
    kind: Kind,
    file: Vec<Value>,
    mut query: ListQuery,
    view: impl Fn(&Stored) -> Value,
) -> Result<Answer, ApiError> {
    let page = page(call)?;
    let mut items = Vec::new();
    let after_seq = match position(page.cursor.as_deref())? {
        Position::File(i) => {
            items.extend(file.iter().skip(i).take(page.limit).cloned());
            if i + page.limit < file.len() {
                return Ok(list_answer(items, Some(format!("f{}", i + page.limit))));
            }
            0
        }
        Position::Store(seq) => seq,
    };
    let want = page.limit - items.len();
    query.after_seq = Some(after_seq);
    query.limit = want + 1;
    let rows = state.list(kind, &query).await.map_err(|e| ApiError::unavailable(&e))?;
    let more = rows.len() > want;
    let rows = &rows[..rows.len().min(want)];
    items.extend(rows.iter().map(view));
    let next = if more { rows.last().map(|r| format!("s{}", r.seq)) } else { None };
    Ok(list_answer(items, next))
}

/// 409 `code` when routing configs of the snapshot use `old` (`uses` picks them), naming them.
pub fn refuse_if_used(
    snapshot: &Snapshot,
    resource: &'static str,
    old: &Stored,
    code: &str,
    uses: impl Fn(&crate::routing::RoutingConfig) -> bool,
) -> Result<(), ApiError> {
    let mut users: Vec<&str> =
        snapshot.routing_configs.values().filter(|rc| uses(rc)).map(|rc| rc.slug.as_str()).collect();
    if users.is_empty() {
        return Ok(());
    }
    users.sort_unstable();
    Err(ApiError::conflict(
        code,
        resource,
        &old.slug,
        format!(
            "{} {} is used by @{}; change those first",
            resource.replace('_', " "),
            old.slug,
            users.join(", @")
        ),
    ))
}

/// The live project `key` (id or slug) names, from the store or the file.
pub enum Found<'a> {
    Api(&'a Stored),
    File(String),
}

pub fn find_project<'a>(resources: &'a [Stored], snapshot: &Snapshot, key: &str) -> Option<Found<'a>> {
    if let Some(r) = resources.iter().find(|r| r.kind == Kind::Project && (r.id == key || r.slug == key)) {
        return Some(Found::Api(r));
    }
    snapshot.file_owned.projects.iter().find(|p| *p == key).map(|p| Found::File(p.clone()))
}
