//! A throwaway PostgreSQL server for the state-store tests: `initdb` into a temp dir, the
//! server on a free loopback port, stopped by PID when dropped. As root (CI), the server
//! runs as the `postgres` user (it refuses root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct PgServer {
    pub port: u16,
    dir: tempfile::TempDir,
    /// The server (or, as root, `runuser` waiting on it).
    child: std::process::Child,
}

/// The PostgreSQL server binaries: `MODELUX_PG_BIN`, else the newest under
/// /usr/lib/postgresql/*/bin (Debian's layout), else `pg_config --bindir`.
fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("MODELUX_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("postgres").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    if let Some(newest) = versions.pop() {
        return newest;
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("PostgreSQL server binaries (apt-get install postgresql)");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run(as_user: Option<&str>, program: &Path, args: &[&str]) -> Command {
    match as_user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(program).args(args);
            c
        }
        None => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    }
}

impl PgServer {
    pub fn start() -> PgServer {
        let bin = bin_dir();
        let dir = tempfile::tempdir().unwrap();
        let as_user = is_root().then(|| "postgres".to_string());
        if let Some(user) = &as_user {
            assert!(Command::new("chown").args(["-R", user]).arg(dir.path()).status().unwrap().success());
        }
        let data = dir.path().join("data");
        let data_s = data.to_str().unwrap().to_string();
        let out = run(
            as_user.as_deref(),
            &bin.join("initdb"),
            &["-D", &data_s, "-A", "trust", "-U", "modelux", "--no-sync", "-E", "UTF8"],
        )
        .output()
        .unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let port = super::free_port();
        let sock = dir.path().to_str().unwrap().to_string();
        let log = std::fs::File::create(dir.path().join("postgres.log")).unwrap();
        if let Some(user) = &as_user {
            let _ = Command::new("chown").arg(user).arg(dir.path().join("postgres.log")).status();
        }
        let child = run(
            as_user.as_deref(),
            &bin.join("postgres"),
            &[
                "-D",
                &data_s,
                "-p",
                &port.to_string(),
                "-k",
                &sock,
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ],
        )
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
        let server = PgServer { port, dir, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "postgres did not start: {}", server.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// A fresh database on this server, as a URL.
    pub async fn database(&self, name: &str) -> String {
        let admin = format!("postgres://modelux@127.0.0.1:{}/postgres", self.port);
        // The port opens before the server takes connections ("starting up"): retry.
        let deadline = Instant::now() + Duration::from_secs(30);
        let (client, conn) = loop {
            match tokio_postgres::connect(&admin, tokio_postgres::NoTls).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("postgres did not accept connections: {e}\n{}", self.log()),
            }
        };
        let task = tokio::spawn(conn);
        client.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await.unwrap();
        drop(client);
        let _ = task.await;
        format!("postgres://modelux@127.0.0.1:{}/{name}", self.port)
    }

    /// Every file of the cluster's data (to search for what must never be stored).
    pub fn files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push(path);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.dir.path().join("data"), &mut out);
        out
    }

    /// The postmaster's PID, from its pid file.
    fn pid(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid")).ok()?;
        text.lines().next().map(str::to_string)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Fast shutdown of the postmaster by PID, then reap what we started.
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args(["-INT", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.pid().is_some() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
