//! The disk queue records wait in while the store is down: one JSON-lines file per batch,
//! named by the batch's sequence number, so replay goes in the order the batches were
//! formed (a batch that failed after newer ones were spilled still sorts first). Files are
//! written whole (temp file, fsync, rename): a crash leaves either the whole batch or none.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use super::TraceRow;

pub struct Spill {
    dir: PathBuf,
    /// Sequence number → (file, rows in it, bytes).
    files: BTreeMap<u64, (PathBuf, u64, u64)>,
    rows: u64,
    bytes: u64,
}

/// The front of the queue, read for one replay.
pub struct Front {
    pub seqs: Vec<u64>,
    pub rows: Vec<TraceRow>,
    /// Lines that no longer parse (written by another version, or damaged on disk).
    pub bad_lines: Vec<String>,
}

impl Spill {
    /// Opens the queue in `dir`, picking up files a previous run left.
    pub fn open(dir: &Path) -> io::Result<Spill> {
        fs::create_dir_all(dir)?;
        let mut files = BTreeMap::new();
        let mut rows = 0;
        let mut bytes = 0;
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if let Some(seq) = name.strip_suffix(".jsonl").and_then(|s| s.parse::<u64>().ok()) {
                let n = io::BufReader::new(fs::File::open(&path)?).lines().count() as u64;
                let size = fs::metadata(&path)?.len();
                rows += n;
                bytes += size;
                files.insert(seq, (path, n, size));
            } else if name.ends_with(".tmp") {
                // A write that never finished: its batch was never acknowledged as spilled.
                let _ = fs::remove_file(&path);
            }
        }
        Ok(Spill { dir: dir.to_path_buf(), files, rows, bytes })
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Records waiting on disk.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Bytes of the files waiting on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The highest sequence number on disk (new batches must be numbered above it).
    pub fn last_seq(&self) -> u64 {
        self.files.keys().next_back().copied().unwrap_or(0)
    }

    pub fn push(&mut self, seq: u64, rows: &[TraceRow]) -> io::Result<()> {
        let path = self.dir.join(format!("{seq:020}.jsonl"));
        let tmp = self.dir.join(format!("{seq:020}.tmp"));
        let mut out = io::BufWriter::new(fs::File::create(&tmp)?);
        for row in rows {
            serde_json::to_writer(&mut out, row)?;
            out.write_all(b"\n")?;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let size = file.metadata()?.len();
        fs::rename(&tmp, &path)?;
        self.rows += rows.len() as u64;
        self.bytes += size;
        self.files.insert(seq, (path, rows.len() as u64, size));
        Ok(())
    }

    /// Reads whole files from the front until `max_rows` is reached (at least one file).
    pub fn front(&self, max_rows: usize) -> io::Result<Front> {
        let mut front = Front { seqs: Vec::new(), rows: Vec::new(), bad_lines: Vec::new() };
        for (&seq, (path, n, _)) in &self.files {
            if !front.seqs.is_empty() && front.rows.len() + *n as usize > max_rows {
                break;
            }
            for line in io::BufReader::new(fs::File::open(path)?).lines() {
                let line = line?;
                match serde_json::from_str::<TraceRow>(&line) {
                    Ok(row) => front.rows.push(row),
                    Err(_) => front.bad_lines.push(line),
                }
            }
            front.seqs.push(seq);
        }
        Ok(front)
    }

    /// Forgets files whose rows reached the store (or the dead-letter file).
    pub fn remove(&mut self, seqs: &[u64]) -> io::Result<()> {
        for seq in seqs {
            if let Some((path, n, size)) = self.files.get(seq) {
                // Forgotten only once gone from disk, so the byte count never undercounts.
                match fs::remove_file(path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                self.rows -= n;
                self.bytes -= size;
                self.files.remove(seq);
            }
        }
        Ok(())
    }
}

/// Appends refused records, one JSON object per line with the reason, for an operator to
/// inspect and re-insert by hand.
pub fn dead_letter(path: &Path, reason: &str, rows: &[TraceRow], bad_lines: &[String]) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut out = io::BufWriter::new(fs::OpenOptions::new().create(true).append(true).open(path)?);
    for row in rows {
        serde_json::to_writer(&mut out, &serde_json::json!({ "error": reason, "row": row }))?;
        out.write_all(b"\n")?;
    }
    for line in bad_lines {
        serde_json::to_writer(&mut out, &serde_json::json!({ "error": reason, "line": line }))?;
        out.write_all(b"\n")?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}
