//! The management CLI: `modelux projects|keys|configs|budgets …`, a client of the
//! management API (`--manage-url`, key from `MODELUX_ADMIN_KEY`). Tables for people,
//! `--json` for scripts (the API's `data`, unchanged).

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

#[derive(Args)]
pub struct Conn {
    /// The management listener.
    #[arg(long, env = "MODELUX_MANAGE_URL", default_value = "http://127.0.0.1:5100", global = true)]
    pub manage_url: String,
    /// A management key (mlx_mk_…).
    #[arg(long, env = "MODELUX_ADMIN_KEY", hide_env_values = true, global = true)]
    pub admin_key: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum ProjectsCommand {
    List,
    Create {
        name: String,
        #[arg(long)]
        slug: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum ConfigsCommand {
    List {
        #[arg(long)]
        project: Option<String>,
    },
    /// The active version's body.
    Show { slug: String },
    /// Every version, newest first.
    History { slug: String },
    /// What changed between two versions.
    Diff {
        slug: String,
        #[arg(long)]
        from: u32,
        #[arg(long)]
        to: u32,
    },
    /// Make a new version equal to an old one.
    Rollback {
        slug: String,
        #[arg(long)]
        to: u32,
    },
}

#[derive(Subcommand)]
pub enum BudgetsCommand {
    List,
}

/// One management call; `Err` is the message to print.
fn request(conn: &Conn, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let key =
        conn.admin_key.as_deref().ok_or("set MODELUX_ADMIN_KEY (or --admin-key) to a management key")?;
    let url = format!("{}/manage/v1{path}", conn.manage_url.trim_end_matches('/'));
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let auth = format!("Bearer {key}");
    let resp = match (method, body) {
        ("GET", _) => agent.get(&url).header("authorization", &auth).call(),
        ("DELETE", _) => agent.delete(&url).header("authorization", &auth).call(),
        ("POST", b) => {
            agent.post(&url).header("authorization", &auth).send_json(b.cloned().unwrap_or(json!({})))
        }
        (_, b) => agent.patch(&url).header("authorization", &auth).send_json(b.cloned().unwrap_or(json!({}))),
    };
    let mut resp = resp.map_err(|e| format!("cannot reach {url}: {e}"))?;
    let status = resp.status().as_u16();
    let value: Value =
        resp.body_mut().read_json().map_err(|e| format!("{url} answered {status} without JSON: {e}"))?;
    if status >= 400 {
        let e = &value["error"];
        let mut msg = format!(
            "{status} {}: {}",
            e["code"].as_str().unwrap_or("error"),
            e["message"].as_str().unwrap_or("")
        );
        for item in e["errors"].as_array().into_iter().flatten() {
            msg.push_str(&format!(
                "\n  {}: {}",
                item["path"].as_str().unwrap_or(""),
                item["message"].as_str().unwrap_or("")
            ));
        }
        return Err(msg);
    }
    Ok(value)
}

/// Every page of a list.
fn list_all(conn: &Conn, path: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let sep = if path.contains('?') { '&' } else { '?' };
        let page_path = match &cursor {
            Some(c) => format!("{path}{sep}limit=200&cursor={c}"),
            None => format!("{path}{sep}limit=200"),
        };
        let page = request(conn, "GET", &page_path, None)?;
        out.extend(page["data"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) if page["has_more"] == true => cursor = Some(c.to_string()),
            _ => return Ok(out),
        }
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A table of `columns` (header, field) over `rows`.
fn table(rows: &[Value], columns: &[(&str, &str)]) -> String {
    let cells: Vec<Vec<String>> =
        rows.iter().map(|r| columns.iter().map(|(_, f)| cell(&r[*f])).collect()).collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| cells.iter().map(|r| r[i].chars().count()).chain([h.len()]).max().unwrap_or(0))
        .collect();
    let line = |parts: Vec<String>| {
        parts
            .iter()
            .zip(&widths)
            .map(|(p, w)| format!("{p:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(columns.iter().map(|(h, _)| h.to_string()).collect())];
    out.extend(cells.into_iter().map(line));
    out.join("\n")
}

fn print(conn: &Conn, data: &Value, human: impl FnOnce(&Value) -> String) {
    if conn.json {
        println!("{}", serde_json::to_string_pretty(data).unwrap_or_default());
    } else {
        println!("{}", human(data));
    }
}

fn run(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn projects(conn: &Conn, command: ProjectsCommand) -> ExitCode {
    run((|| {
        match command {
            ProjectsCommand::List => {
                let rows = list_all(conn, "/projects")?;
                print(conn, &json!(rows), |_| {
                    table(
                        &rows,
                        &[
                            ("SLUG", "slug"),
                            ("NAME", "name"),
                            ("ID", "id"),
                            ("MANAGED BY", "managed_by"),
                            ("CREATED", "created_at"),
                        ],
                    )
                });
            }
            ProjectsCommand::Create { name, slug, description } => {
                let body = json!({"name": name, "slug": slug, "description": description});
                let body = strip_nulls(body);
                let made = request(conn, "POST", "/projects", Some(&body))?;
                print(conn, &made["data"], |p| {
                    format!("created project {} ({})", cell(&p["slug"]), cell(&p["id"]))
                });
            }
        }
        Ok(())
    })())
}

fn strip_nulls(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.retain(|_, x| !x.is_null());
    }
    v
}

/// `modelux keys create|revoke` (project keys, or management keys with `--management`).
pub fn create_key(
    conn: &Conn,
    project: Option<String>,
    name: String,
    rpm: Option<u64>,
    management: bool,
) -> ExitCode {
    run((|| {
        let path = if management { "/management-keys" } else { "/api-keys" };
        let body = strip_nulls(json!({"project": project, "name": name, "requests_per_minute": rpm}));
        let made = request(conn, "POST", path, Some(&body))?;
        print(conn, &made["data"], |k| {
            format!(
                "created key {} ({})\n{}\nThis is the only time the key is shown: store it now.",
                cell(&k["name"]),
                cell(&k["id"]),
                cell(&k["key"])
            )
        });
        Ok(())
    })())
}

pub fn revoke_key(conn: &Conn, id: String, management: bool) -> ExitCode {
    run((|| {
        let path = if management { "/management-keys" } else { "/api-keys" };
        let gone = request(conn, "DELETE", &format!("{path}/{id}"), None)?;
        print(conn, &gone["data"], |k| format!("revoked key {} ({})", cell(&k["name"]), cell(&k["id"])));
        Ok(())
    })())
}

pub fn configs(conn: &Conn, command: ConfigsCommand) -> ExitCode {
    run((|| {
        match command {
            ConfigsCommand::List { project } => {
                let path = match project {
                    Some(p) => format!("/routing-configs?project={p}"),
                    None => "/routing-configs".into(),
                };
                let rows = list_all(conn, &path)?;
                print(conn, &json!(rows), |_| {
                    table(
                        &rows,
                        &[
                            ("SLUG", "slug"),
                            ("PROJECT", "project"),
                            ("STRATEGY", "strategy"),
                            ("VERSION", "version"),
                            ("MANAGED BY", "managed_by"),
                        ],
                    )
                });
            }
            ConfigsCommand::Show { slug } => {
                let c = request(conn, "GET", &format!("/routing-configs/{slug}"), None)?;
                print(conn, &c["data"], |c| serde_json::to_string_pretty(c).unwrap_or_default());
            }
            ConfigsCommand::History { slug } => {
                let rows = list_all(conn, &format!("/routing-configs/{slug}/versions"))?;
                print(conn, &json!(rows), |_| {
                    let rows: Vec<Value> = rows
                        .iter()
                        .map(|v| {
                            let mut v = v.clone();
                            v["by"] = v["actor"]["id"].clone();
                            v["active"] = json!(if v["active"] == true { "*" } else { "" });
                            v
                        })
                        .collect();
                    table(
                        &rows,
                        &[
                            ("VERSION", "version"),
                            ("ACTIVE", "active"),
                            ("CREATED", "created_at"),
                            ("BY", "by"),
                        ],
                    )
                });
            }
            ConfigsCommand::Diff { slug, from, to } => {
                let d = request(
                    conn,
                    "GET",
                    &format!("/routing-configs/{slug}/versions/diff?from={from}&to={to}"),
                    None,
                )?;
                print(conn, &d["data"], |d| {
                    let changes = d.as_array().cloned().unwrap_or_default();
                    if changes.is_empty() {
                        return format!("v{from} and v{to} are the same");
                    }
                    changes
                        .iter()
                        .map(|c| {
                            format!("{} {}: {} -> {}", cell(&c["op"]), cell(&c["path"]), c["from"], c["to"])
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                });
            }
            ConfigsCommand::Rollback { slug, to } => {
                let r = request(
                    conn,
                    "POST",
                    &format!("/routing-configs/{slug}/rollback"),
                    Some(&json!({"version": to})),
                )?;
                print(conn, &r["data"], |c| {
                    format!("@{} is now v{} (the body of v{to})", cell(&c["slug"]), cell(&c["version"]))
                });
            }
        }
        Ok(())
    })())
}

pub fn budgets(conn: &Conn, command: BudgetsCommand) -> ExitCode {
    run((|| {
        match command {
            BudgetsCommand::List => {
                let rows = list_all(conn, "/budgets")?;
                print(conn, &json!(rows), |_| {
                    table(
                        &rows,
                        &[
                            ("NAME", "name"),
                            ("PERIOD", "period"),
                            ("CAP USD", "cap_usd"),
                            ("SPEND USD", "spend_usd"),
                            ("FORECAST USD", "forecast_usd"),
                            ("RESETS", "period_resets_at"),
                            ("ACTION", "action"),
                        ],
                    )
                });
            }
        }
        Ok(())
    })())
}

/// Unix ms of `text`: a duration back from `now_ms` (90s, 15m, 1h, 7d) or an ISO 8601 time.
pub fn when(text: &str, now_ms: u64) -> Option<u64> {
    let text = text.trim();
    let unit = match text.chars().last()? {
        's' => 1_000,
        'm' => 60_000,
        'h' => 3_600_000,
        'd' => 86_400_000,
        _ => 0,
    };
    if unit > 0 {
        if let Ok(n) = text[..text.len() - 1].parse::<u64>() {
            return Some(now_ms.saturating_sub(n.saturating_mul(unit)));
        }
    }
    modelux::spend::period::parse_iso8601(text).and_then(|ms| u64::try_from(ms).ok())
}

#[derive(Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// A routing-config file (YAML or JSON: one config's body, or a `routing_configs:`
    /// map with one entry, whose slug is the config it stands in for), or `@slug` /
    /// `@slug@vN` of a stored config.
    #[arg(long)]
    pub candidate: String,
    /// Replay traffic newer than this: 90m, 24h, 7d, or an ISO 8601 time.
    #[arg(long, default_value = "24h")]
    pub since: String,
    /// ...and older than this (same forms; default now).
    #[arg(long)]
    pub until: Option<String>,
    /// Only traffic that named this config (@slug); also the config promote writes.
    #[arg(long)]
    pub routing_config: Option<String>,
    /// Project (id or slug); needed when nothing else names one.
    #[arg(long)]
    pub project: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub end_user: Option<String>,
    /// Only requests with this tag (repeatable; all must match).
    #[arg(long, value_name = "KEY=VALUE")]
    pub tag: Vec<String>,
    /// At most this many requests (1 to 50,000; default every request in the window).
    #[arg(long)]
    pub sample_size: Option<u64>,
    /// routing_only (decisions only, no provider call) or with_responses (the sample sent
    /// through the candidate for real: real spend; default sample 100).
    #[arg(long, default_value = "routing_only")]
    pub mode: String,
    /// with_responses: requests in flight at once (1 to 32; default 4).
    #[arg(long)]
    pub concurrency: Option<u64>,
    /// with_responses: the cosine similarity that counts as the same answer (default 0.9).
    #[arg(long)]
    pub similarity_threshold: Option<f64>,
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Subcommand)]
pub enum ExperimentsCommand {
    List {
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        status: Option<String>,
    },
    /// An experiment's status and result.
    Show {
        id: String,
    },
    /// Make the candidate the next version of a routing config.
    Promote {
        id: String,
        /// The config to write (@slug); default the one the experiment replayed.
        #[arg(long)]
        to: Option<String>,
    },
    Cancel {
        id: String,
    },
    Delete {
        id: String,
    },
}

/// The candidate as the API takes it, and the config a `routing_configs:` file names.
fn candidate_arg(text: &str) -> Result<(Value, Option<String>), String> {
    if text.starts_with('@') {
        return Ok((json!(text), None));
    }
    let raw = std::fs::read_to_string(text).map_err(|e| format!("--candidate {text}: {e}"))?;
    let doc: Value = serde_yaml_ng::from_str(&raw).map_err(|e| format!("--candidate {text}: {e}"))?;
    if let Some(Value::Object(configs)) = doc.get("routing_configs") {
        let mut entries = configs.iter();
        return match (entries.next(), entries.next()) {
            (Some((slug, body)), None) => Ok((body.clone(), Some(slug.clone()))),
            _ => Err(format!("--candidate {text}: routing_configs must hold exactly one config")),
        };
    }
    match doc {
        Value::Object(_) => Ok((doc, None)),
        _ => Err(format!("--candidate {text}: expected a routing config (a mapping)")),
    }
}

fn pct(v: &Value) -> String {
    match v.as_f64() {
        Some(p) => format!("{p:+.1}%"),
        None => "-".into(),
    }
}

fn num(v: &Value, decimals: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.decimals$}"),
        None => "-".into(),
    }
}

/// The side-by-side table of a finished experiment.
pub fn comparison(e: &Value) -> String {
    let (b, c) = (&e["baseline_summary"], &e["candidate_summary"]);
    let mut out = vec![format!(
        "experiment {}  {}  {} requests replayed ({}), {} to {}",
        cell(&e["id"]),
        cell(&e["status"]),
        cell(&e["requests"]),
        cell(&e["mode"]),
        cell(&e["window"]["start"]),
        cell(&e["window"]["end"]),
    )];
    if e["status"] != "completed" {
        if let Some(m) = e["error"]["message"].as_str() {
            out.push(format!("error: {m}"));
        }
        return out.join("\n");
    }
    let errors = |s: &Value| {
        format!("{} ({:.2}%)", cell(&s["errors"]), s["error_rate"].as_f64().unwrap_or(0.0) * 100.0)
    };
    let rows = [
        json!({"m": "cost (USD)", "b": num(&b["cost_usd"], 6), "c": num(&c["cost_usd"], 6), "d": pct(&e["cost_delta_pct"])}),
        json!({"m": "p50 latency (ms)", "b": num(&b["p50_ms"], 1), "c": num(&c["p50_ms"], 1), "d": pct(&e["p50_latency_delta_pct"])}),
        json!({"m": "p95 latency (ms)", "b": num(&b["p95_ms"], 1), "c": num(&c["p95_ms"], 1), "d": pct(&e["p95_latency_delta_pct"])}),
        json!({"m": "errors", "b": errors(b), "c": errors(c), "d": pct(&e["error_rate_delta_pct"])}),
    ];
    out.push(String::new());
    out.push(table(&rows, &[("", "m"), ("BASELINE", "b"), ("CANDIDATE", "c"), ("DELTA", "d")]));
    let mut routes: Vec<String> = Vec::new();
    for dist in ["baseline_route_distribution", "route_distribution"] {
        for k in e[dist].as_object().into_iter().flat_map(|m| m.keys()) {
            if !routes.contains(k) {
                routes.push(k.clone());
            }
        }
    }
    routes.sort();
    let share = |dist: &str, k: &str| match e[dist][k].as_f64() {
        Some(s) => format!("{:.1}%", s * 100.0),
        None => "-".into(),
    };
    let route_rows: Vec<Value> = routes
        .iter()
        .map(|k| json!({"r": k, "b": share("baseline_route_distribution", k), "c": share("route_distribution", k)}))
        .collect();
    out.push(String::new());
    out.push(table(&route_rows, &[("ROUTE (model:provider)", "r"), ("BASELINE", "b"), ("CANDIDATE", "c")]));
    let sim = &e["similarity"];
    if sim.is_object() {
        match sim["unavailable"].as_str() {
            Some(why) => out.push(format!("\nanswers not compared: {why}")),
            None => out.push(format!(
                "\nanswer similarity ({}): {} pairs compared, mean {}, p10 {}, p50 {}; {}% at or above {} ({} not compared)",
                cell(&sim["embedding_model"]),
                cell(&sim["compared"]),
                num(&sim["mean"], 3),
                num(&sim["p10"], 3),
                num(&sim["p50"], 3),
                num(&sim["pct_above_threshold"], 1),
                cell(&sim["threshold"]),
                cell(&sim["not_compared"]),
            )),
        }
    }
    let unknown = c["latency_unknown"].as_u64().unwrap_or(0) + c["cost_unknown"].as_u64().unwrap_or(0);
    if unknown > 0 {
        out.push(format!(
            "\ncandidate latency unknown for {} requests, cost unknown for {} (left out of the figures)",
            cell(&c["latency_unknown"]),
            cell(&c["cost_unknown"])
        ));
    }
    out.join("\n")
}

/// Polls experiment `id` until it is completed, failed or cancelled.
fn wait(conn: &Conn, id: &str) -> Result<Value, String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3600);
    loop {
        let e = request(conn, "GET", &format!("/experiments/{id}"), None)?["data"].clone();
        if matches!(e["status"].as_str(), Some("completed" | "failed" | "cancelled")) {
            return Ok(e);
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("experiment {id} is still {} after an hour", cell(&e["status"])));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

pub fn replay(args: ReplayArgs) -> ExitCode {
    let conn = &args.conn;
    run((|| {
        // Milliseconds: traffic of the last second is in the window.
        let now_ms = modelux::spend::unix_now_us() / 1000;
        let start = when(&args.since, now_ms).ok_or_else(|| {
            format!("--since: \"{}\" is not a duration (90m, 24h, 7d) or an ISO 8601 time", args.since)
        })?;
        let end = match &args.until {
            Some(u) => {
                when(u, now_ms).ok_or_else(|| format!("--until: \"{u}\" is not a duration or a time"))?
            }
            None => now_ms,
        };
        let (candidate, file_slug) = candidate_arg(&args.candidate)?;
        let mut filters = serde_json::Map::new();
        if let Some(rc) = &args.routing_config {
            filters.insert("routing_config".into(), json!(rc));
        }
        if let Some(m) = &args.model {
            filters.insert("model".into(), json!(m));
        }
        if let Some(u) = &args.end_user {
            filters.insert("end_user".into(), json!(u));
        }
        if !args.tag.is_empty() {
            filters.insert("tags".into(), json!(args.tag));
        }
        let mut body = json!({
            "candidate": candidate,
            "window_start": start,
            "window_end": end,
            "mode": args.mode,
            "filters": filters,
        });
        if let Some(slug) = file_slug.or_else(|| args.routing_config.clone()) {
            body["routing_config"] = json!(format!("@{}", slug.trim_start_matches('@')));
        }
        for (k, v) in [
            ("project_id", args.project.as_ref().map(|p| json!(p))),
            ("name", args.name.as_ref().map(|n| json!(n))),
            ("sample_size", args.sample_size.map(|n| json!(n))),
            ("concurrency", args.concurrency.map(|n| json!(n))),
            ("similarity_threshold", args.similarity_threshold.map(|t| json!(t))),
        ] {
            if let Some(v) = v {
                body[k] = v;
            }
        }
        let created = request(conn, "POST", "/experiments", Some(&body))?;
        let id = created["data"]["id"].as_str().ok_or("the API gave the experiment no id")?.to_string();
        let e = wait(conn, &id)?;
        print(conn, &e, comparison);
        match e["status"].as_str() {
            Some("completed") => {
                if !conn.json {
                    println!("\npromote with: modelux experiments promote {id}");
                }
                Ok(())
            }
            _ => Err(format!("experiment {id} ended {}", cell(&e["status"]))),
        }
    })())
}

pub fn experiments(conn: &Conn, command: ExperimentsCommand) -> ExitCode {
    run((|| {
        match command {
            ExperimentsCommand::List { project, status } => {
                let mut params = Vec::new();
                if let Some(p) = project {
                    params.push(format!("project={p}"));
                }
                if let Some(s) = status {
                    params.push(format!("status={s}"));
                }
                let path = if params.is_empty() {
                    "/experiments".into()
                } else {
                    format!("/experiments?{}", params.join("&"))
                };
                let rows = list_all(conn, &path)?;
                print(conn, &json!(rows), |_| {
                    let rows: Vec<Value> = rows
                        .iter()
                        .map(|e| {
                            let mut e = e.clone();
                            e["cost_delta"] = json!(pct(&e["cost_delta_pct"]));
                            e
                        })
                        .collect();
                    table(
                        &rows,
                        &[
                            ("ID", "id"),
                            ("NAME", "name"),
                            ("STATUS", "status"),
                            ("CONFIG", "routing_config"),
                            ("REQUESTS", "requests"),
                            ("COST DELTA", "cost_delta"),
                            ("CREATED", "created_at"),
                        ],
                    )
                });
            }
            ExperimentsCommand::Show { id } => {
                let e = request(conn, "GET", &format!("/experiments/{id}"), None)?;
                print(conn, &e["data"], comparison);
            }
            ExperimentsCommand::Promote { id, to } => {
                let body = match to {
                    Some(t) => json!({"routing_config": t}),
                    None => json!({}),
                };
                let r = request(conn, "POST", &format!("/experiments/{id}/promote"), Some(&body))?;
                print(conn, &r["data"], |e| {
                    format!(
                        "{} is now v{} (the candidate of experiment {id})",
                        cell(&e["promoted"]["routing_config"]),
                        cell(&e["promoted"]["version"])
                    )
                });
            }
            ExperimentsCommand::Cancel { id } => {
                let r = request(conn, "POST", &format!("/experiments/{id}/cancel"), None)?;
                print(conn, &r["data"], |e| format!("experiment {id} is {}", cell(&e["status"])));
            }
            ExperimentsCommand::Delete { id } => {
                let r = request(conn, "DELETE", &format!("/experiments/{id}"), None)?;
                print(conn, &r["data"], |_| format!("experiment {id} deleted"));
            }
        }
        Ok(())
    })())
}
