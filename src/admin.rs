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
