//! The management API over durable state: projects, project and management keys, the
//! audit log, idempotency and races, each change served by the proxy on the next request
//! and still there after a restart.

use super::pg::PgServer;
use super::*;

pub(super) async fn call(
    gw: &Gateway,
    method: &str,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> Response {
    let auth = format!("Bearer {ADMIN_KEY}");
    let mut h = vec![("authorization", auth.as_str()), ("content-type", "application/json")];
    h.extend_from_slice(headers);
    let bytes = body.map(|b| serde_json::to_vec(&b).unwrap()).unwrap_or_default();
    httpc::request(gw.manage, method, path, &h, &bytes).await.unwrap()
}

async fn chat_with(gw: &Gateway, key: &str) -> Response {
    let auth = format!("Bearer {key}");
    httpc::request(gw.proxy, "POST", CHAT, &[("authorization", &auth)], &chat_body("@fast")).await.unwrap()
}

pub(super) fn data(resp: &Response) -> Value {
    resp.json().unwrap()["data"].clone()
}

/// Where the gateway under test keeps its management state: the embedded SQLite file, or a
/// database on a PostgreSQL server of the test's own. Every scenario runs on both.
pub(super) struct Backend {
    yaml: String,
    pg: Option<PgServer>,
}

impl Backend {
    pub(super) fn sqlite() -> Backend {
        Backend { yaml: String::new(), pg: None }
    }

    pub(super) async fn postgres() -> Backend {
        let pg = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
        let url = pg.database("modelux_test").await;
        Backend { yaml: format!("state: {{ backend: postgres, url: \"{url}\" }}\n"), pg: Some(pg) }
    }

    pub(super) fn cfg(&self, upstream: &MockServer) -> Cfg<'static> {
        let mut cfg = Cfg::new(upstream.base_url().leak());
        cfg.top_extra = self.yaml.clone();
        cfg
    }

    /// Files that hold the stored state (searched for plaintext secrets).
    pub(super) fn files(&self, data_dir: &std::path::Path) -> Vec<PathBuf> {
        match &self.pg {
            None => vec![data_dir.join("modelux.db"), data_dir.join("modelux.db-wal")],
            Some(pg) => pg.files(),
        }
    }
}

pub(super) fn with_data_dir(
    upstream: &MockServer,
    data: &tempfile::TempDir,
    backend: &Backend,
) -> Cfg<'static> {
    let mut cfg = backend.cfg(upstream);
    cfg.server_extra = format!("  data_dir: \"{}\"", data.path().display()).leak();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_and_keys_are_served_at_once_audited_and_survive_a_restart() {
    projects_and_keys_are_served_at_once_audited_and_survive_a_restart_on(Backend::sqlite()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_and_keys_are_served_at_once_audited_and_survive_a_restart_on_postgres() {
    projects_and_keys_are_served_at_once_audited_and_survive_a_restart_on(Backend::postgres().await).await
}

async fn projects_and_keys_are_served_at_once_audited_and_survive_a_restart_on(backend: Backend) {
    let upstream = mock(MockConfig::default()).await;
    let data_dir = tempfile::tempdir().unwrap();
    let gw = start(with_data_dir(&upstream, &data_dir, &backend)).await;

    // The file's projects are listed, read-only.
    let list = call(&gw, "GET", "/manage/v1/projects", None, &[]).await;
    assert_eq!(list.status, 200, "{}", list.text());
    let listed = list.json().unwrap();
    assert_eq!(listed["data"][0]["slug"], "default");
    assert_eq!(listed["data"][0]["managed_by"], "file");
    assert_eq!(listed["has_more"], false);
    let locked = call(&gw, "PATCH", "/manage/v1/projects/default", Some(json!({"name": "x"})), &[]).await;
    assert_eq!(locked.status, 409);
    assert_eq!(locked.json().unwrap()["error"]["code"], "managed_by_file");

    // Create a project, then a key for it: the key works on the very next request.
    let created = call(&gw, "POST", "/manage/v1/projects", Some(json!({"name": "Staging EU"})), &[]).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let project = data(&created);
    assert_eq!(project["slug"], "staging-eu");
    assert_eq!(project["managed_by"], "api");
    assert!(project["id"].as_str().unwrap().starts_with("proj_"));
    let dup = call(&gw, "POST", "/api/manage/v1/projects", Some(json!({"name": "staging eu"})), &[]).await;
    assert_eq!(dup.status, 409);
    assert_eq!(dup.json().unwrap()["error"]["code"], "project_exists");
    let file_dup = call(&gw, "POST", "/manage/v1/projects", Some(json!({"name": "default"})), &[]).await;
    assert_eq!(file_dup.status, 409);

    let key_resp = call(
        &gw,
        "POST",
        "/manage/v1/api-keys",
        Some(json!({"project": project["id"], "name": "ci", "requests_per_minute": 0})),
        &[],
    )
    .await;
    assert_eq!(key_resp.status, 201, "{}", key_resp.text());
    let key = data(&key_resp);
    let secret = key["key"].as_str().unwrap().to_string();
    assert!(secret.starts_with("mlx_sk_") && secret.len() > 40);
    assert_eq!(key["key_last4"], &secret[secret.len() - 4..]);
    assert_eq!(key["project"], "staging-eu");
    // The new project has no `@fast` (that belongs to `default`): routing refuses it as another
    // project's config, which proves the key authenticated as staging-eu.
    let resp = chat_with(&gw, &secret).await;
    assert_eq!(resp.status, 404, "{}", resp.text());
    // A key on a file project serves that project's configs.
    let dev2 =
        call(&gw, "POST", "/manage/v1/api-keys", Some(json!({"project": "default", "name": "dev2"})), &[])
            .await;
    assert_eq!(dev2.status, 201, "{}", dev2.text());
    let dev2_secret = data(&dev2)["key"].as_str().unwrap().to_string();
    assert_eq!(chat_with(&gw, &dev2_secret).await.status, 200);

    // Reads never show the key again.
    let got =
        call(&gw, "GET", &format!("/manage/v1/api-keys/{}", key["id"].as_str().unwrap()), None, &[]).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(data(&got).get("key").is_none());
    assert!(!got.text().contains(&secret));
    let keys = call(&gw, "GET", "/manage/v1/api-keys?project=default", None, &[]).await.json().unwrap();
    let names: Vec<&str> =
        keys["data"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["dev", "dev2"]);

    // Bad input: the nested envelope with the field's path; nothing is written.
    let bad = call(&gw, "POST", "/manage/v1/projects", Some(json!({"name": 7})), &[]).await;
    assert_eq!(bad.status, 422, "{}", bad.text());
    assert_eq!(bad.json().unwrap()["error"]["errors"][0]["path"], "name");
    let unknown =
        call(&gw, "POST", "/manage/v1/projects", Some(json!({"name": "a", "colour": "red"})), &[]).await;
    assert_eq!(unknown.status, 422);
    assert!(unknown.text().contains("colour"));
    let garbage = httpc::request(
        gw.manage,
        "POST",
        "/manage/v1/projects",
        &[("authorization", &format!("Bearer {ADMIN_KEY}"))],
        b"{not json",
    )
    .await
    .unwrap();
    assert_eq!(garbage.status, 400);
    assert_eq!(garbage.json().unwrap()["error"]["code"], "invalid_json");
    let huge = vec![b' '; 1024 * 1024 + 10];
    let too_big = httpc::request(
        gw.manage,
        "POST",
        "/manage/v1/projects",
        &[("authorization", &format!("Bearer {ADMIN_KEY}"))],
        &huge,
    )
    .await
    .unwrap();
    assert_eq!(too_big.status, 413);
    let missing = call(&gw, "GET", "/manage/v1/projects/nope", None, &[]).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json().unwrap()["error"]["code"], "project_not_found");
    assert_eq!(missing.json().unwrap()["error"]["resource"], "project");
    let anonymous = httpc::request(gw.manage, "GET", "/manage/v1/projects", &[], b"").await.unwrap();
    assert_eq!(anonymous.status, 401);

    // Revoke: the next request with the key is a 401.
    let revoked = call(
        &gw,
        "DELETE",
        &format!("/manage/v1/api-keys/{}", data(&dev2)["id"].as_str().unwrap()),
        None,
        &[],
    )
    .await;
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    assert_eq!(data(&revoked)["revoked"], true);
    assert_eq!(chat_with(&gw, &dev2_secret).await.status, 401);

    // A management key made through the API manages.
    let mk = call(&gw, "POST", "/manage/v1/management-keys", Some(json!({"name": "ops"})), &[]).await;
    assert_eq!(mk.status, 201, "{}", mk.text());
    let mk_secret = data(&mk)["key"].as_str().unwrap().to_string();
    assert!(mk_secret.starts_with("mlx_mk_"));
    let auth = format!("Bearer {mk_secret}");
    let as_ops = httpc::request(gw.manage, "GET", "/manage/v1/projects", &[("authorization", &auth)], b"")
        .await
        .unwrap();
    assert_eq!(as_ops.status, 200);

    // The audit log has every change, newest first, without a secret in it.
    let audit = call(&gw, "GET", "/manage/v1/audit-logs", None, &[]).await;
    assert_eq!(audit.status, 200, "{}", audit.text());
    let entries = audit.json().unwrap()["data"].as_array().unwrap().clone();
    let actions: Vec<&str> = entries.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "management_key.created",
            "api_key.revoked",
            "api_key.created",
            "api_key.created",
            "project.created"
        ]
    );
    assert_eq!(entries[4]["actor"]["type"], "management_key");
    assert_eq!(entries[4]["actor"]["id"], "admin");
    assert_eq!(entries[4]["ip"], "127.0.0.1");
    let only_keys = call(&gw, "GET", "/manage/v1/audit-logs?resource_type=api_key&limit=1", None, &[]).await;
    let page = only_keys.json().unwrap();
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["has_more"], true);
    let next = call(
        &gw,
        "GET",
        &format!(
            "/manage/v1/audit-logs?resource_type=api_key&limit=5&cursor={}",
            page["next_cursor"].as_str().unwrap()
        ),
        None,
        &[],
    )
    .await;
    assert_eq!(next.json().unwrap()["data"].as_array().unwrap().len(), 2);
    for secret in [&secret, &dev2_secret, &mk_secret] {
        let db = std::fs::read(data_dir.path().join("modelux.db")).unwrap();
        let wal = std::fs::read(data_dir.path().join("modelux.db-wal")).unwrap_or_default();
        for bytes in [db, wal] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "plaintext key in the database"
            );
        }
        assert!(!audit.text().contains(secret.as_str()));
    }

    // Restart: projects, keys and revocations are all still there.
    let project_id = project["id"].as_str().unwrap().to_string();
    drop(gw);
    let gw = start(with_data_dir(&upstream, &data_dir, &backend)).await;
    assert_eq!(chat_with(&gw, &secret).await.status, 404, "staging-eu's key still authenticates");
    assert_eq!(chat_with(&gw, &dev2_secret).await.status, 401);
    let again = call(&gw, "GET", &format!("/manage/v1/projects/{project_id}"), None, &[]).await;
    assert_eq!(data(&again)["slug"], "staging-eu");

    // Deleting the project revokes its keys at once; the project stays readable as deleted.
    let deleted = call(&gw, "DELETE", "/manage/v1/projects/staging-eu", None, &[]).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    assert_eq!(chat_with(&gw, &secret).await.status, 401);
    let gone = call(&gw, "GET", &format!("/manage/v1/projects/{project_id}"), None, &[]).await;
    assert!(data(&gone)["deleted_at"].is_string());
    let live = call(&gw, "GET", "/manage/v1/projects", None, &[]).await.json().unwrap();
    assert!(live["data"].as_array().unwrap().iter().all(|p| p["id"] != project_id.as_str()));
    let with_deleted =
        call(&gw, "GET", "/manage/v1/projects?include_deleted=true", None, &[]).await.json().unwrap();
    assert!(with_deleted["data"].as_array().unwrap().iter().any(|p| p["id"] == project_id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_replay_and_conflict() {
    idempotency_keys_replay_and_conflict_on(Backend::sqlite()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_replay_and_conflict_on_postgres() {
    idempotency_keys_replay_and_conflict_on(Backend::postgres().await).await
}

async fn idempotency_keys_replay_and_conflict_on(backend: Backend) {
    let upstream = mock(MockConfig::default()).await;
    let gw = start(backend.cfg(&upstream)).await;
    let body = json!({"name": "once"});
    let first =
        call(&gw, "POST", "/manage/v1/projects", Some(body.clone()), &[("idempotency-key", "k-1")]).await;
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(first.header("idempotent-replayed"), None);
    let second = call(&gw, "POST", "/manage/v1/projects", Some(body), &[("idempotency-key", "k-1")]).await;
    assert_eq!(second.status, 201, "{}", second.text());
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(second.text(), first.text());
    let other = call(
        &gw,
        "POST",
        "/manage/v1/projects",
        Some(json!({"name": "twice"})),
        &[("idempotency-key", "k-1")],
    )
    .await;
    assert_eq!(other.status, 409);
    assert_eq!(other.json().unwrap()["error"]["code"], "idempotency_conflict");
    let projects = call(&gw, "GET", "/manage/v1/projects", None, &[]).await.json().unwrap();
    let api: Vec<&Value> =
        projects["data"].as_array().unwrap().iter().filter(|p| p["managed_by"] == "api").collect();
    assert_eq!(api.len(), 1, "one project, however often the request was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_twenty_racing_patches_from_one_version_exactly_one_wins() {
    of_twenty_racing_patches_from_one_version_exactly_one_wins_on(Backend::sqlite()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_twenty_racing_patches_from_one_version_exactly_one_wins_on_postgres() {
    of_twenty_racing_patches_from_one_version_exactly_one_wins_on(Backend::postgres().await).await
}

async fn of_twenty_racing_patches_from_one_version_exactly_one_wins_on(backend: Backend) {
    let upstream = mock(MockConfig::default()).await;
    let gw = Arc::new(start(backend.cfg(&upstream)).await);
    let created = call(&gw, "POST", "/manage/v1/projects", Some(json!({"name": "race"})), &[]).await;
    assert_eq!(data(&created)["version"], 1);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let gw = gw.clone();
            tokio::spawn(async move {
                call(
                    &gw,
                    "PATCH",
                    "/manage/v1/projects/race",
                    Some(json!({"description": format!("writer {i}")})),
                    &[("if-match", "1")],
                )
                .await
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let resp = t.await.unwrap();
        if resp.status == 409 {
            let code = resp.json().unwrap()["error"]["code"].as_str().unwrap().to_string();
            assert!(code == "version_conflict" || code == "concurrent_modification", "{code}");
        }
        statuses.push(resp.status);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 409).count(), 19, "{statuses:?}");
    let now = call(&gw, "GET", "/manage/v1/projects/race", None, &[]).await;
    assert_eq!(data(&now)["version"], 2);
    let audit =
        call(&gw, "GET", "/manage/v1/audit-logs?action=project.updated", None, &[]).await.json().unwrap();
    assert_eq!(audit["data"].as_array().unwrap().len(), 1, "losers leave no audit entry");
}

/// The model the mock saw last.
fn last_model(upstream: &MockServer) -> String {
    upstream.requests().last().unwrap().json().unwrap()["model"].as_str().unwrap().to_string()
}

async fn ask_production(gw: &Gateway) -> Response {
    let auth = format!("Bearer {KEY}");
    httpc::request(gw.proxy, "POST", CHAT, &[("authorization", &auth)], &chat_body("@production"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_configs_are_versioned_diffed_rolled_back_and_served_at_once() {
    routing_configs_are_versioned_diffed_rolled_back_and_served_at_once_on(Backend::sqlite()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_configs_are_versioned_diffed_rolled_back_and_served_at_once_on_postgres() {
    routing_configs_are_versioned_diffed_rolled_back_and_served_at_once_on(Backend::postgres().await).await
}

async fn routing_configs_are_versioned_diffed_rolled_back_and_served_at_once_on(backend: Backend) {
    let upstream = mock(MockConfig::default()).await;
    let data_dir = tempfile::tempdir().unwrap();
    let gw = start(with_data_dir(&upstream, &data_dir, &backend)).await;
    let rc = "/manage/v1/routing-configs";

    // A draft is checked without saving; errors name the field in the body.
    let draft = json!({"project": "default", "strategy": "single", "model": "antropic/claude"});
    let checked = call(&gw, "POST", &format!("{rc}/validate"), Some(draft), &[]).await;
    assert_eq!(checked.status, 422, "{}", checked.text());
    let errors = checked.json().unwrap()["error"]["errors"].clone();
    assert_eq!(errors[0]["path"], "model", "{errors}");
    let fine = json!({"project": "default", "strategy": "single", "model": "openai/gpt-4o-mini"});
    let checked = call(&gw, "POST", &format!("{rc}/validate"), Some(fine), &[]).await;
    assert_eq!(checked.status, 200, "{}", checked.text());
    assert_eq!(
        call(&gw, "GET", &format!("{rc}/draft"), None, &[]).await.status,
        404,
        "validate saves nothing"
    );

    // v1, served on the next request.
    let v1 = json!({"slug": "production", "project": "default", "strategy": "single", "model": "openai/gpt-4o-mini"});
    let created = call(&gw, "POST", rc, Some(v1), &[]).await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(data(&created)["version"], 1);
    assert_eq!(data(&created)["managed_by"], "api");
    let resp = ask_production(&gw).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-modelux-config-version"), Some("v1"));
    assert_eq!(last_model(&upstream), "gpt-4o-mini");
    let taken = call(
        &gw,
        "POST",
        rc,
        Some(json!({"slug": "fast", "project": "default", "strategy": "single", "model": "openai/x"})),
        &[],
    )
    .await;
    assert_eq!(taken.status, 409, "a slug of the file's");

    // v2: a change that does not validate is refused and changes nothing.
    let broken =
        call(&gw, "PATCH", &format!("{rc}/production"), Some(json!({"model": "nope/none"})), &[]).await;
    assert_eq!(broken.status, 422, "{}", broken.text());
    assert_eq!(broken.json().unwrap()["error"]["errors"][0]["path"], "model");
    let v2 =
        call(&gw, "PATCH", &format!("{rc}/@production"), Some(json!({"model": "openai/gpt-4o"})), &[]).await;
    assert_eq!(v2.status, 200, "{}", v2.text());
    assert_eq!(data(&v2)["version"], 2);
    let resp = ask_production(&gw).await;
    assert_eq!(resp.header("x-modelux-config-version"), Some("v2"));
    assert_eq!(last_model(&upstream), "gpt-4o");

    // The diff between them, as JSON-pointer operations.
    let diff = call(&gw, "GET", &format!("{rc}/production/versions/diff?from=1&to=2"), None, &[]).await;
    assert_eq!(diff.status, 200, "{}", diff.text());
    assert_eq!(
        data(&diff),
        json!([{"path": "/model", "op": "replace", "from": "openai/gpt-4o-mini", "to": "openai/gpt-4o"}])
    );

    // Roll back: v3 equals v1, and is what the proxy serves.
    let back =
        call(&gw, "POST", &format!("{rc}/production/rollback"), Some(json!({"version": 1})), &[]).await;
    assert_eq!(back.status, 200, "{}", back.text());
    assert_eq!(data(&back)["version"], 3);
    let resp = ask_production(&gw).await;
    assert_eq!(resp.header("x-modelux-config-version"), Some("v3"));
    assert_eq!(last_model(&upstream), "gpt-4o-mini");
    let same = call(&gw, "GET", &format!("{rc}/production/versions/diff?from=1&to=3"), None, &[]).await;
    assert_eq!(data(&same), json!([]));
    assert_eq!(
        (same.json().unwrap()["from"].as_i64(), same.json().unwrap()["to"].as_i64()),
        (Some(1), Some(3))
    );
    let versions = call(&gw, "GET", &format!("{rc}/production/versions"), None, &[]).await.json().unwrap();
    let numbers: Vec<i64> =
        versions["data"].as_array().unwrap().iter().map(|v| v["version"].as_i64().unwrap()).collect();
    assert_eq!(numbers, [3, 2, 1]);
    assert_eq!(versions["data"][0]["active"], true);
    let v2_body = call(&gw, "GET", &format!("{rc}/production/versions/2"), None, &[]).await;
    assert_eq!(data(&v2_body)["config"]["model"], "openai/gpt-4o");
    let no_such =
        call(&gw, "POST", &format!("{rc}/production/rollback"), Some(json!({"version": 9})), &[]).await;
    assert_eq!(no_such.status, 422);

    // In use by another config: 409; file configs are read-only.
    let ab = json!({"slug": "split", "project": "default", "strategy": "ab_test",
        "variants": [{"name": "a", "weight": 50, "config": "@production"}, {"name": "b", "weight": 50, "config": "@fast"}]});
    assert_eq!(call(&gw, "POST", rc, Some(ab), &[]).await.status, 201);
    let in_use = call(&gw, "DELETE", &format!("{rc}/production"), None, &[]).await;
    assert_eq!(in_use.status, 409);
    assert_eq!(in_use.json().unwrap()["error"]["code"], "routing_config_in_use");
    let file = call(&gw, "PATCH", &format!("{rc}/fast"), Some(json!({"model": "openai/gpt-4o"})), &[]).await;
    assert_eq!(file.json().unwrap()["error"]["code"], "managed_by_file");
    let listed = call(&gw, "GET", &format!("{rc}?project=default"), None, &[]).await.json().unwrap();
    let slugs: Vec<&str> =
        listed["data"].as_array().unwrap().iter().map(|c| c["slug"].as_str().unwrap()).collect();
    assert_eq!(slugs, ["fast", "production", "split"]);

    // The active version survives a restart.
    drop(gw);
    let gw = start(with_data_dir(&upstream, &data_dir, &backend)).await;
    let resp = ask_production(&gw).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-modelux-config-version"), Some("v3"));
    let audit = call(&gw, "GET", "/manage/v1/audit-logs?resource_type=routing_config", None, &[])
        .await
        .json()
        .unwrap();
    let actions: Vec<&str> =
        audit["data"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "routing_config.created",
            "routing_config.rolled_back",
            "routing_config.updated",
            "routing_config.created"
        ]
    );
    assert_eq!(call(&gw, "DELETE", &format!("{rc}/split"), None, &[]).await.status, 200);
    assert_eq!(call(&gw, "DELETE", &format!("{rc}/production"), None, &[]).await.status, 200);
    assert_eq!(ask_production(&gw).await.status, 404);
}

/// The `authorization` header of each chat request the mock saw, in arrival order.
fn chat_keys(upstream: &MockServer) -> Vec<String> {
    upstream
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .map(|r| r.header("authorization").unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_are_verified_sealed_rotated_under_load_and_survive_a_restart() {
    providers_are_verified_sealed_rotated_under_load_and_survive_a_restart_on(Backend::sqlite()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_are_verified_sealed_rotated_under_load_and_survive_a_restart_on_postgres() {
    providers_are_verified_sealed_rotated_under_load_and_survive_a_restart_on(Backend::postgres().await).await
}

async fn providers_are_verified_sealed_rotated_under_load_and_survive_a_restart_on(backend: Backend) {
    let upstream = mock(MockConfig::default()).await;
    let data_dir = tempfile::tempdir().unwrap();
    let gw = Arc::new(start(with_data_dir(&upstream, &data_dir, &backend)).await);
    let old_key = "sk-old-0123456789abcdef";
    let new_key = "sk-new-fedcba9876543210";
    let base = upstream.base_url();

    // A key the provider refuses is not stored.
    upstream.push_script([Behavior::Status(401)]);
    let refused = call(
        &gw,
        "POST",
        "/manage/v1/providers",
        Some(json!({"id": "mockai", "vendor": "openai", "base_url": base, "api_key": "sk-bad-0000000000"})),
        &[],
    )
    .await;
    assert_eq!(refused.status, 422, "{}", refused.text());
    assert_eq!(refused.json().unwrap()["error"]["code"], "credential_verification_failed");
    assert_eq!(call(&gw, "GET", "/manage/v1/providers/mockai", None, &[]).await.status, 404);
    let bad_kind = call(
        &gw,
        "POST",
        "/manage/v1/providers",
        Some(json!({"id": "x", "kind": "openia", "api_key": "k"})),
        &[],
    )
    .await;
    assert_eq!(bad_kind.status, 422);
    assert_eq!(bad_kind.json().unwrap()["error"]["errors"][0]["path"], "kind");

    // Created: checked with a models read carrying the key, then stored sealed.
    let created = call(&gw, "POST", "/manage/v1/providers",
        Some(json!({"id": "mockai", "kind": "openai", "name": "Mock AI", "base_url": base, "api_key": old_key})), &[]).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let p = data(&created);
    assert_eq!(
        (p["id"].as_str(), p["key_last4"].as_str(), p["managed_by"].as_str()),
        (Some("mockai"), Some("cdef"), Some("api"))
    );
    assert!(p["verified_at"].is_string());
    assert!(!created.text().contains(old_key));
    let check = upstream.requests().into_iter().rev().find(|r| r.path == "/v1/models").unwrap();
    assert_eq!(
        (check.method.as_str(), check.header("authorization")),
        ("GET", Some(format!("Bearer {old_key}").as_str()))
    );
    let listed = call(&gw, "GET", "/manage/v1/providers", None, &[]).await;
    let ids: Vec<&str> = listed.json().unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string().leak() as &str)
        .collect();
    assert_eq!(ids, ["openai", "local", "mockai"]);
    assert!(!listed.text().contains(old_key));

    // Served by a routing config made through the API.
    let rc =
        json!({"slug": "viaapi", "project": "default", "strategy": "single", "model": "mockai/gpt-4o-mini"});
    assert_eq!(call(&gw, "POST", "/manage/v1/routing-configs", Some(rc), &[]).await.status, 201);
    let ask = |gw: Arc<Gateway>| async move {
        let auth = format!("Bearer {KEY}");
        httpc::request(gw.proxy, "POST", CHAT, &[("authorization", &auth)], &chat_body("@viaapi"))
            .await
            .unwrap()
    };
    assert_eq!(ask(gw.clone()).await.status, 200);
    assert_eq!(chat_keys(&upstream).last().map(String::as_str), Some(format!("Bearer {old_key}").as_str()));

    // Rotation under load: 2,000 requests, the key swapped in the middle, none fails.
    let sent = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (gw, sent) = (gw.clone(), sent.clone());
            tokio::spawn(async move {
                let mut failed = Vec::new();
                let auth = format!("Bearer {KEY}");
                let mut conn = httpc::Conn::connect(gw.proxy).await.unwrap();
                while sent.fetch_add(1, Ordering::SeqCst) < 2_000 {
                    let resp = conn
                        .request("POST", CHAT, &[("authorization", &auth)], &chat_body("@viaapi"))
                        .await
                        .unwrap();
                    if resp.status != 200 {
                        failed.push((resp.status, resp.text()));
                    }
                }
                failed
            })
        })
        .collect();
    while sent.load(Ordering::SeqCst) < 600 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rotated =
        call(&gw, "PATCH", "/manage/v1/providers/mockai", Some(json!({"api_key": new_key})), &[]).await;
    assert_eq!(rotated.status, 200, "{}", rotated.text());
    assert_eq!(data(&rotated)["key_last4"], "3210");
    let after_rotation = sent.load(Ordering::SeqCst);
    assert!(after_rotation < 2_000, "the rotation landed while traffic was running ({after_rotation})");
    for w in workers {
        assert_eq!(w.await.unwrap(), Vec::<(u16, String)>::new());
    }
    let keys = chat_keys(&upstream);
    let (old_h, new_h) = (format!("Bearer {old_key}"), format!("Bearer {new_key}"));
    assert!(keys.iter().all(|k| *k == old_h || *k == new_h));
    let first_new = keys.iter().position(|k| *k == new_h).unwrap();
    assert!(keys[..first_new].len() > 500, "the old key served until the swap");
    // Once the new key is in, only requests already in flight may still carry the old one.
    assert!(keys[first_new..].iter().filter(|k| **k == old_h).count() <= 8);
    assert_eq!(ask(gw.clone()).await.status, 200);
    assert_eq!(chat_keys(&upstream).last(), Some(&new_h));

    // In use: 409; health reads what was served.
    let in_use = call(&gw, "DELETE", "/manage/v1/providers/mockai", None, &[]).await;
    assert_eq!(in_use.json().unwrap()["error"]["code"], "provider_in_use");
    let health = call(&gw, "GET", "/manage/v1/providers/mockai/health", None, &[]).await;
    assert_eq!(health.status, 200, "{}", health.text());
    let h = data(&health);
    assert_eq!(h["state"], "healthy", "{h}");
    assert!(h["per_model"]["gpt-4o-mini"]["samples_window"].as_u64().unwrap() > 0, "{h}");
    let file = call(&gw, "PATCH", "/manage/v1/providers/openai", Some(json!({"api_key": "sk-x"})), &[]).await;
    assert_eq!(file.json().unwrap()["error"]["code"], "managed_by_file");

    // No plaintext key in the database, the audit log or the master key's absence.
    let audit = call(&gw, "GET", "/manage/v1/audit-logs?resource_type=provider", None, &[]).await;
    let actions: Vec<&str> = audit.json().unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string().leak() as &str)
        .collect();
    assert_eq!(actions, ["provider.key_rotated", "provider.created"]);
    for key in [old_key, new_key] {
        assert!(!audit.text().contains(key));
        for file in backend.files(data_dir.path()) {
            let bytes = std::fs::read(&file).unwrap_or_default();
            assert!(!bytes.windows(key.len()).any(|w| w == key.as_bytes()), "{key} in {file:?}");
        }
    }
    let master = std::fs::metadata(data_dir.path().join("master.key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(master.permissions().mode() & 0o777, 0o600);

    // After a restart the sealed key opens again and serves.
    drop(Arc::try_unwrap(gw).ok().unwrap());
    let gw = Arc::new(start(with_data_dir(&upstream, &data_dir, &backend)).await);
    assert_eq!(ask(gw.clone()).await.status, 200);
    assert_eq!(chat_keys(&upstream).last(), Some(&new_h));
    assert_eq!(call(&gw, "DELETE", "/manage/v1/routing-configs/viaapi", None, &[]).await.status, 200);
    assert_eq!(call(&gw, "DELETE", "/manage/v1/providers/mockai", None, &[]).await.status, 200);
    assert_eq!(
        call(&gw, "GET", "/manage/v1/providers/mockai", None, &[]).await.json().unwrap()["data"]["status"],
        "disabled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_through_the_api_police_at_once_and_report_spend_and_forecast() {
    budgets_through_the_api_police_at_once_and_report_spend_and_forecast_on(Backend::sqlite()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_through_the_api_police_at_once_and_report_spend_and_forecast_on_postgres() {
    budgets_through_the_api_police_at_once_and_report_spend_and_forecast_on(Backend::postgres().await).await
}

async fn budgets_through_the_api_police_at_once_and_report_spend_and_forecast_on(backend: Backend) {
    let upstream = mock(MockConfig::default()).await;
    let mut cfg = backend.cfg(&upstream);
    cfg.top_extra += "prices:\n  m1: { input_per_mtok: 10000, output_per_mtok: 10000 }\n";
    cfg.more_configs = "  cheap: { project: default, strategy: single, model: \"local/m1\" }\n".into();
    let gw = start(cfg).await;
    let ask = || async {
        let auth = format!("Bearer {KEY}");
        httpc::request(gw.proxy, "POST", CHAT, &[("authorization", &auth)], &chat_body("@cheap"))
            .await
            .unwrap()
    };

    let bad = call(&gw, "POST", "/manage/v1/budgets",
        Some(json!({"name": "team", "scope": "org", "period": "monthly", "cap_usd": "lots", "action": "block"})), &[]).await;
    assert_eq!(bad.status, 422, "{}", bad.text());
    assert_eq!(bad.json().unwrap()["error"]["errors"][0]["path"], "cap_usd");
    let orphan = call(&gw, "POST", "/manage/v1/budgets",
        Some(json!({"name": "x", "scope": "project", "project": "nope", "period": "daily", "cap_usd": 1, "action": "block"})), &[]).await;
    assert_eq!(orphan.status, 422, "{}", orphan.text());
    assert_eq!(orphan.json().unwrap()["error"]["errors"][0]["path"], "project", "{}", orphan.text());

    let created = call(&gw, "POST", "/manage/v1/budgets",
        Some(json!({"name": "team", "scope": "project", "project": "default", "period": "monthly", "cap_usd": 0.5, "action": "block"})), &[]).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let b = data(&created);
    assert_eq!((b["spend_usd"].as_f64(), b["remaining_usd"].as_f64()), (Some(0.0), Some(0.5)));
    assert!(b["period_starts_at"].as_str().unwrap().ends_with("-01T00:00:00Z"));
    assert!(b["period_resets_at"].is_string());

    // Spend until the cap, read back with a forecast; the next request is refused.
    let mut served = 0;
    loop {
        let resp = ask().await;
        if resp.status == 402 {
            break;
        }
        assert_eq!(resp.status, 200, "{}", resp.text());
        served += 1;
        assert!(served < 50, "the budget never blocked");
    }
    let read =
        call(&gw, "GET", &format!("/manage/v1/budgets/{}", b["id"].as_str().unwrap()), None, &[]).await;
    let r = data(&read);
    let spend = r["spend_usd"].as_f64().unwrap();
    assert!((0.5..1.0).contains(&spend), "{r}");
    assert_eq!(r["remaining_usd"].as_f64(), Some(0.0));
    assert!(r["forecast_usd"].as_f64().unwrap() >= spend, "{r}");

    // Raising the cap lets traffic through on the next request; deleting removes the cap.
    let raised = call(&gw, "PATCH", "/manage/v1/budgets/team", Some(json!({"cap_usd": 100})), &[]).await;
    assert_eq!(raised.status, 200, "{}", raised.text());
    assert_eq!(data(&raised)["version"], 2);
    assert!(data(&raised)["remaining_usd"].as_f64().unwrap() > 99.0);
    assert_eq!(ask().await.status, 200);
    let lowered = call(&gw, "PATCH", "/manage/v1/budgets/team", Some(json!({"cap_usd": 0.01})), &[]).await;
    assert_eq!(lowered.status, 200);
    assert_eq!(ask().await.status, 402);
    let listed = call(&gw, "GET", "/manage/v1/budgets", None, &[]).await.json().unwrap();
    assert_eq!(listed["data"][0]["name"], "team");
    assert!(listed["data"][0]["spend_usd"].as_f64().unwrap() > 0.5);
    assert_eq!(call(&gw, "DELETE", "/manage/v1/budgets/team", None, &[]).await.status, 200);
    assert_eq!(ask().await.status, 200);
}

/// Runs the `modelux` binary against `gw`'s management listener.
pub(super) async fn cli(gw: &Gateway, args: &[&str]) -> (bool, String, String) {
    let url = format!("http://{}", gw.manage);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelux"))
            .args(&args)
            .arg("--manage-url")
            .arg(url)
            .env("MODELUX_ADMIN_KEY", ADMIN_KEY)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_the_management_api() {
    the_cli_drives_the_management_api_on(Backend::sqlite()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_the_management_api_on_postgres() {
    the_cli_drives_the_management_api_on(Backend::postgres().await).await
}

async fn the_cli_drives_the_management_api_on(backend: Backend) {
    let upstream = mock(MockConfig::default()).await;
    let gw = start(backend.cfg(&upstream)).await;
    let (ok, out, err) = cli(&gw, &["projects", "create", "CLI Team", "--json"]).await;
    assert!(ok, "{err}");
    let made: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(made["slug"], "cli-team");
    let (ok, out, _) = cli(&gw, &["projects", "list"]).await;
    assert!(ok);
    assert!(out.lines().next().unwrap().starts_with("SLUG"), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("cli-team") && l.contains("CLI Team") && l.contains("api")),
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("default") && l.contains("file")), "{out}");

    let (ok, out, err) = cli(&gw, &["keys", "create", "--project", "default", "--name", "from-cli"]).await;
    assert!(ok, "{err}");
    let secret = out.lines().find(|l| l.starts_with("mlx_sk_")).unwrap().to_string();
    let auth = format!("Bearer {secret}");
    let resp = httpc::request(gw.proxy, "POST", CHAT, &[("authorization", &auth)], &chat_body("@fast"))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    let id = out.lines().next().unwrap().split(['(', ')']).nth(1).unwrap().to_string();
    let (ok, _, err) = cli(&gw, &["keys", "revoke", &id]).await;
    assert!(ok, "{err}");
    let resp = httpc::request(gw.proxy, "POST", CHAT, &[("authorization", &auth)], &chat_body("@fast"))
        .await
        .unwrap();
    assert_eq!(resp.status, 401);

    let rc =
        json!({"slug": "prod", "project": "default", "strategy": "single", "model": "openai/gpt-4o-mini"});
    assert_eq!(call(&gw, "POST", "/manage/v1/routing-configs", Some(rc), &[]).await.status, 201);
    assert_eq!(
        call(&gw, "PATCH", "/manage/v1/routing-configs/prod", Some(json!({"model": "openai/gpt-4o"})), &[])
            .await
            .status,
        200
    );
    let (ok, out, _) = cli(&gw, &["configs", "diff", "prod", "--from", "1", "--to", "2"]).await;
    assert!(ok);
    assert_eq!(out.trim(), "replace /model: \"openai/gpt-4o-mini\" -> \"openai/gpt-4o\"");
    let (ok, out, err) = cli(&gw, &["configs", "rollback", "prod", "--to", "1"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "@prod is now v3 (the body of v1)");
    let (ok, out, _) = cli(&gw, &["configs", "history", "prod"]).await;
    assert!(ok);
    let versions: Vec<&str> = out.lines().skip(1).map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(versions, ["3", "2", "1"]);
    let (ok, out, _) = cli(&gw, &["configs", "list", "--json"]).await;
    assert!(ok);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 3, "fast, theirs and prod");
    let (ok, out, _) = cli(&gw, &["budgets", "list"]).await;
    assert!(ok);
    assert!(out.starts_with("NAME"), "{out}");

    // Errors are the API's, on stderr, with a failing exit status.
    let (ok, _, err) = cli(&gw, &["configs", "rollback", "prod", "--to", "9"]).await;
    assert!(!ok);
    assert!(err.contains("422 validation_failed") && err.contains("version"), "{err}");
    let (ok, _, err) = cli(&gw, &["projects", "list", "--admin-key", "mlx_mk_wrong_0000000000000000"]).await;
    assert!(!ok);
    assert!(err.contains("401"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_routing_config_versions_count_on_across_restarts() {
    file_routing_config_versions_count_on_across_restarts_on(Backend::sqlite()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_routing_config_versions_count_on_across_restarts_on_postgres() {
    file_routing_config_versions_count_on_across_restarts_on(Backend::postgres().await).await
}

async fn file_routing_config_versions_count_on_across_restarts_on(backend: Backend) {
    let upstream = mock(MockConfig::default()).await;
    let data_dir = tempfile::tempdir().unwrap();
    let version = |gw: &Gateway| {
        let auth = format!("Bearer {KEY}");
        let proxy = gw.proxy;
        async move {
            let resp = httpc::request(proxy, "POST", CHAT, &[("authorization", &auth)], &chat_body("@fast"))
                .await
                .unwrap();
            assert_eq!(resp.status, 200, "{}", resp.text());
            resp.header("x-modelux-config-version").unwrap().to_string()
        }
    };
    let gw = start(with_data_dir(&upstream, &data_dir, &backend)).await;
    assert_eq!(version(&gw).await, "v1");
    // A reload that changes @fast makes v2, and the version is recorded.
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    write_config_atomically(&gw.config_path, &text.replace("model: \"gpt-4o-mini\"", "model: \"gpt-4o\""));
    wait_for_generation(&gw.handles, 2).await;
    assert_eq!(version(&gw).await, "v2");
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.handles.state.file_versions_now().unwrap().iter().all(|v| v.version != 2) {
        assert!(Instant::now() < deadline, "the reload's versions were not recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(gw);
    // Restarted on the original file: a changed definition is the next version, not v1.
    let gw = start(with_data_dir(&upstream, &data_dir, &backend)).await;
    assert_eq!(version(&gw).await, "v3");
    drop(gw);
    // Restarted unchanged: the same version.
    let gw = start(with_data_dir(&upstream, &data_dir, &backend)).await;
    assert_eq!(version(&gw).await, "v3");
}
