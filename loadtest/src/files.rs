//! Files and batches for the mock upstream, in the shapes of the providers' API
//! references: OpenAI `/v1/files` (multipart upload, list with `purpose`/`limit`/`order`/
//! `after`, metadata, `content`, delete) and `/v1/batches` (create from an uploaded JSONL
//! file, list, retrieve, cancel); Anthropic `/v1/messages/batches` (create, list,
//! retrieve, `results` as JSONL, cancel, delete) and `/v1/files` (beta). State lives in the
//! mock that created it, so a call reaching the wrong mock gets the provider's 404.
//!
//! A batch finishes when it is first retrieved after creation: OpenAI's then names an
//! output file holding one chat completion per input line; Anthropic's has a
//! `results_url` on this mock.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::answer::{self, Answer, Ctx};

/// What was asked, by path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    OpenAiUpload,
    OpenAiListFiles,
    OpenAiFile,
    OpenAiDeleteFile,
    OpenAiFileContent,
    OpenAiCreateBatch,
    OpenAiListBatches,
    OpenAiBatch,
    OpenAiCancelBatch,
    AnthropicCreateBatch,
    AnthropicListBatches,
    AnthropicBatch,
    AnthropicDeleteBatch,
    AnthropicBatchResults,
    AnthropicCancelBatch,
    AnthropicUpload,
    AnthropicListFiles,
    AnthropicFile,
    AnthropicDeleteFile,
    AnthropicFileContent,
}

impl Op {
    /// `path` without its query; returns the op and the id in the path. Anthropic's and
    /// OpenAI's `/v1/files` share a path: Anthropic's calls carry `anthropic-version`.
    pub(crate) fn from_path(method: &str, path: &str, anthropic: bool) -> Option<(Op, Option<String>)> {
        let rest = path.strip_prefix("/v1/")?;
        let parts: Vec<&str> = rest.split('/').collect();
        let id = |i: usize| parts.get(i).map(|s| answer::percent_decode(s));
        let op = match (method, parts.as_slice(), anthropic) {
            ("POST", ["files"], false) => Op::OpenAiUpload,
            ("GET", ["files"], false) => Op::OpenAiListFiles,
            ("GET", ["files", _], false) => Op::OpenAiFile,
            ("DELETE", ["files", _], false) => Op::OpenAiDeleteFile,
            ("GET", ["files", _, "content"], false) => Op::OpenAiFileContent,
            ("POST", ["batches"], _) => Op::OpenAiCreateBatch,
            ("GET", ["batches"], _) => Op::OpenAiListBatches,
            ("GET", ["batches", _], _) => Op::OpenAiBatch,
            ("POST", ["batches", _, "cancel"], _) => Op::OpenAiCancelBatch,
            ("POST", ["messages", "batches"], _) => Op::AnthropicCreateBatch,
            ("GET", ["messages", "batches"], _) => Op::AnthropicListBatches,
            ("GET", ["messages", "batches", _], _) => Op::AnthropicBatch,
            ("DELETE", ["messages", "batches", _], _) => Op::AnthropicDeleteBatch,
            ("GET", ["messages", "batches", _, "results"], _) => Op::AnthropicBatchResults,
            ("POST", ["messages", "batches", _, "cancel"], _) => Op::AnthropicCancelBatch,
            ("POST", ["files"], true) => Op::AnthropicUpload,
            ("GET", ["files"], true) => Op::AnthropicListFiles,
            ("GET", ["files", _], true) => Op::AnthropicFile,
            ("DELETE", ["files", _], true) => Op::AnthropicDeleteFile,
            ("GET", ["files", _, "content"], true) => Op::AnthropicFileContent,
            _ => return None,
        };
        let id = match parts.first() {
            Some(&"messages") => id(2),
            _ => id(1),
        };
        Some((op, id))
    }

    pub(crate) fn anthropic(self) -> bool {
        matches!(
            self,
            Op::AnthropicCreateBatch
                | Op::AnthropicListBatches
                | Op::AnthropicBatch
                | Op::AnthropicDeleteBatch
                | Op::AnthropicBatchResults
                | Op::AnthropicCancelBatch
                | Op::AnthropicUpload
                | Op::AnthropicListFiles
                | Op::AnthropicFile
                | Op::AnthropicDeleteFile
                | Op::AnthropicFileContent
        )
    }
}

struct File {
    meta: Value,
    bytes: Vec<u8>,
}

struct Batch {
    object: Value,
    /// The input lines (OpenAI: the JSONL file's; Anthropic: the `requests`).
    requests: Vec<Value>,
    finished: bool,
}

#[derive(Default)]
struct State {
    files: BTreeMap<String, File>,
    batches: BTreeMap<String, Batch>,
}

/// The files and batches one mock holds.
pub(crate) struct Store {
    nonce: u64,
    /// `http://127.0.0.1:PORT`, for Anthropic's `results_url`.
    origin: String,
    state: Mutex<State>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// RFC 3339 of a Unix time (Anthropic's timestamps).
fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000000Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn openai_error(status: u16, message: &str) -> Answer {
    let body =
        json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}});
    Answer::json(status, answer::pretty(&body))
}

fn anthropic_error(status: u16, kind: &str, message: &str) -> Answer {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    Answer::json(status, answer::compact(&body))
}

/// One part of a multipart body.
pub(crate) struct Part<'a> {
    pub(crate) name: String,
    pub(crate) filename: Option<String>,
    pub(crate) content_type: Option<String>,
    pub(crate) data: &'a [u8],
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The parts of a `multipart/form-data` body (RFC 7578).
pub(crate) fn multipart<'a>(content_type: &str, body: &'a [u8]) -> Option<Vec<Part<'a>>> {
    let boundary =
        content_type.split(';').find_map(|p| p.trim().strip_prefix("boundary="))?.trim_matches('"');
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut rest = &body[find(body, delimiter.as_bytes())? + delimiter.len()..];
    loop {
        if rest.starts_with(b"--") {
            return Some(parts);
        }
        rest = rest.strip_prefix(b"\r\n")?;
        let head_end = find(rest, b"\r\n\r\n")?;
        let head = std::str::from_utf8(&rest[..head_end]).ok()?;
        rest = &rest[head_end + 4..];
        let end = find(rest, format!("\r\n{delimiter}").as_bytes())?;
        let data = &rest[..end];
        rest = &rest[end + 2 + delimiter.len()..];
        let mut part = Part { name: String::new(), filename: None, content_type: None, data };
        for line in head.split("\r\n") {
            let (name, value) = line.split_once(':')?;
            if name.eq_ignore_ascii_case("content-disposition") {
                for param in value.split(';').map(str::trim) {
                    if let Some(v) = param.strip_prefix("name=") {
                        part.name = v.trim_matches('"').to_string();
                    } else if let Some(v) = param.strip_prefix("filename=") {
                        part.filename = Some(v.trim_matches('"').to_string());
                    }
                }
            } else if name.eq_ignore_ascii_case("content-type") {
                part.content_type = Some(value.trim().to_string());
            }
        }
        parts.push(part);
    }
}

/// A list page of `items` (newest first unless `order=asc`), OpenAI's or Anthropic's.
fn page(mut items: Vec<Value>, query: &str, anthropic: bool) -> Value {
    if answer::query_param(query, "order") == Some("asc") {
        items.reverse();
    }
    let id_of = |v: &Value| v.get("id").and_then(Value::as_str).map(str::to_string);
    for (param, skip_through) in [("after", true), ("after_id", true), ("before_id", false)] {
        if let Some(cursor) = answer::query_param(query, param) {
            if let Some(at) = items.iter().position(|i| id_of(i).as_deref() == Some(cursor)) {
                if skip_through {
                    items.drain(..=at);
                } else {
                    items.truncate(at);
                }
            }
        }
    }
    let limit = answer::query_param(query, "limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(20);
    let has_more = items.len() > limit;
    items.truncate(limit);
    let first = items.first().and_then(id_of);
    let last = items.last().and_then(id_of);
    if anthropic {
        json!({"data": items, "has_more": has_more, "first_id": first, "last_id": last})
    } else {
        json!({"object": "list", "data": items, "first_id": first, "last_id": last, "has_more": has_more})
    }
}

impl Store {
    pub(crate) fn new(port: u16) -> Store {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        Store {
            nonce: nanos ^ (u64::from(port) << 48),
            origin: format!("http://127.0.0.1:{port}"),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn new_id(&self, prefix: &str, seq: u64, n: usize) -> String {
        format!("{prefix}{:016x}{seq:016x}{n:04x}", self.nonce)
    }

    pub(crate) fn answer(
        &self,
        ctx: &Ctx<'_>,
        op: Op,
        id: Option<&str>,
        query: &str,
        content_type: &str,
        body: &[u8],
    ) -> Answer {
        let id = id.unwrap_or("");
        let mut st = self.lock();
        let file_gone = |id: &str| openai_error(404, &format!("No such File object: {id}"));
        let batch_gone = |id: &str| openai_error(404, &format!("No batch found with id '{id}'."));
        let msgbatch_gone = || anthropic_error(404, "not_found_error", "Message batch not found.");
        let afile_gone = |id: &str| anthropic_error(404, "not_found_error", &format!("File not found: {id}"));
        match op {
            Op::OpenAiUpload | Op::AnthropicUpload => {
                let Some(parts) = multipart(content_type, body) else {
                    return match op {
                        Op::OpenAiUpload => openai_error(400, "Expected multipart/form-data with a file."),
                        _ => {
                            anthropic_error(400, "invalid_request_error", "Expected a multipart file upload.")
                        }
                    };
                };
                let Some(file) = parts.iter().find(|p| p.name == "file") else {
                    return openai_error(400, "Missing required parameter: 'file'.");
                };
                let filename = file.filename.clone().unwrap_or_else(|| "upload".into());
                let meta = if op == Op::OpenAiUpload {
                    let Some(purpose) = parts.iter().find(|p| p.name == "purpose") else {
                        return openai_error(400, "Missing required parameter: 'purpose'.");
                    };
                    let purpose = String::from_utf8_lossy(purpose.data).to_string();
                    json!({
                        "object": "file", "id": self.new_id("file-", ctx.seq, 0), "purpose": purpose,
                        "filename": filename, "bytes": file.data.len(), "created_at": now(),
                        "expires_at": null, "status": "processed", "status_details": null,
                    })
                } else {
                    json!({
                        "id": self.new_id("file_", ctx.seq, 0), "type": "file", "filename": filename,
                        "mime_type": file.content_type.clone().unwrap_or_else(|| "application/octet-stream".into()),
                        "size_bytes": file.data.len(), "created_at": rfc3339(now()), "downloadable": false,
                    })
                };
                let id = meta["id"].as_str().unwrap_or_default().to_string();
                st.files.insert(id, File { meta: meta.clone(), bytes: file.data.to_vec() });
                Answer::json(200, answer::pretty(&meta))
            }
            Op::OpenAiListFiles | Op::AnthropicListFiles => {
                let anthropic = op == Op::AnthropicListFiles;
                let purpose = answer::query_param(query, "purpose");
                let mut items: Vec<Value> = st
                    .files
                    .values()
                    .filter(|f| f.meta.get("object").is_some() != anthropic)
                    .filter(|f| purpose.is_none_or(|p| f.meta["purpose"] == p))
                    .map(|f| f.meta.clone())
                    .collect();
                items.reverse();
                Answer::json(200, answer::pretty(&page(items, query, anthropic)))
            }
            Op::OpenAiFile | Op::AnthropicFile => match st.files.get(id) {
                Some(f) => Answer::json(200, answer::pretty(&f.meta)),
                None if op == Op::OpenAiFile => file_gone(id),
                None => afile_gone(id),
            },
            Op::OpenAiDeleteFile => match st.files.remove(id) {
                Some(_) => {
                    Answer::json(200, answer::pretty(&json!({"id": id, "object": "file", "deleted": true})))
                }
                None => file_gone(id),
            },
            Op::AnthropicDeleteFile => match st.files.remove(id) {
                Some(_) => Answer::json(200, answer::compact(&json!({"id": id, "type": "file_deleted"}))),
                None => afile_gone(id),
            },
            Op::OpenAiFileContent | Op::AnthropicFileContent => match st.files.get(id) {
                Some(f) => Answer::Body {
                    status: 200,
                    content_type: "application/octet-stream",
                    body: f.bytes.clone(),
                    headers: std::borrow::Cow::Borrowed(""),
                },
                None if op == Op::OpenAiFileContent => file_gone(id),
                None => afile_gone(id),
            },
            Op::OpenAiCreateBatch => {
                let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let Some(input) = req.get("input_file_id").and_then(Value::as_str) else {
                    return openai_error(400, "Missing required parameter: 'input_file_id'.");
                };
                let Some(file) = st.files.get(input) else { return file_gone(input) };
                let requests: Vec<Value> = file
                    .bytes
                    .split(|&b| b == b'\n')
                    .filter_map(|l| serde_json::from_slice(l).ok())
                    .collect();
                let batch_id = self.new_id("batch_", ctx.seq, 0);
                let object = json!({
                    "id": batch_id, "object": "batch", "endpoint": req.get("endpoint").cloned().unwrap_or(Value::Null),
                    "errors": null, "input_file_id": input,
                    "completion_window": req.get("completion_window").cloned().unwrap_or("24h".into()),
                    "status": "validating", "output_file_id": null, "error_file_id": null,
                    "created_at": now(), "in_progress_at": null, "expires_at": now() + 86_400,
                    "finalizing_at": null, "completed_at": null, "failed_at": null, "expired_at": null,
                    "cancelling_at": null, "cancelled_at": null,
                    "request_counts": {"total": requests.len(), "completed": 0, "failed": 0},
                    "metadata": req.get("metadata").cloned().unwrap_or(Value::Null),
                });
                st.batches.insert(batch_id, Batch { object: object.clone(), requests, finished: false });
                Answer::json(200, answer::pretty(&object))
            }
            Op::OpenAiListBatches => {
                let mut items: Vec<Value> = st
                    .batches
                    .values()
                    .filter(|b| b.object["object"] == "batch")
                    .map(|b| b.object.clone())
                    .collect();
                items.reverse();
                Answer::json(200, answer::pretty(&page(items, query, false)))
            }
            Op::OpenAiBatch => {
                let State { files, batches } = &mut *st;
                let Some(batch) = batches.get_mut(id).filter(|b| b.object["object"] == "batch") else {
                    return batch_gone(id);
                };
                if !batch.finished && batch.object["status"] == "validating" {
                    batch.finished = true;
                    let out_id = self.new_id("file-", ctx.seq, 1);
                    let mut jsonl = Vec::new();
                    for (i, line) in batch.requests.iter().enumerate() {
                        let model = line.pointer("/body/model").cloned().unwrap_or(Value::Null);
                        let text = answer::text(ctx.cfg.tokens);
                        let result = json!({
                            "id": format!("batch_req_{:08x}", i), "custom_id": line.get("custom_id"),
                            "response": {"status_code": 200, "request_id": format!("req_{:08x}", i), "body": {
                                "id": format!("chatcmpl-batch{i}"), "object": "chat.completion",
                                "created": now(), "model": model,
                                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                             "finish_reason": "stop"}],
                                "usage": {"prompt_tokens": 10, "completion_tokens": ctx.cfg.tokens,
                                          "total_tokens": 10 + ctx.cfg.tokens},
                            }},
                            "error": null,
                        });
                        jsonl.extend_from_slice(&answer::compact(&result));
                        jsonl.push(b'\n');
                    }
                    let meta = json!({
                        "object": "file", "id": out_id, "purpose": "batch_output",
                        "filename": "batch_output.jsonl", "bytes": jsonl.len(), "created_at": now(),
                        "expires_at": null, "status": "processed", "status_details": null,
                    });
                    files.insert(out_id.clone(), File { meta, bytes: jsonl });
                    let n = batch.requests.len();
                    let o = &mut batch.object;
                    o["status"] = "completed".into();
                    o["output_file_id"] = out_id.into();
                    o["completed_at"] = now().into();
                    o["request_counts"] = json!({"total": n, "completed": n, "failed": 0});
                }
                Answer::json(200, answer::pretty(&batch.object))
            }
            Op::OpenAiCancelBatch => {
                let Some(batch) = st.batches.get_mut(id).filter(|b| b.object["object"] == "batch") else {
                    return batch_gone(id);
                };
                if batch.object["status"] == "completed" {
                    return openai_error(400, "Cannot cancel a batch with status 'completed'.");
                }
                batch.finished = true;
                batch.object["status"] = "cancelling".into();
                batch.object["cancelling_at"] = now().into();
                Answer::json(200, answer::pretty(&batch.object))
            }
            Op::AnthropicCreateBatch => {
                let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let Some(requests) = req.get("requests").and_then(Value::as_array).filter(|r| !r.is_empty())
                else {
                    return anthropic_error(400, "invalid_request_error", "requests: Field required");
                };
                let batch_id = self.new_id("msgbatch_", ctx.seq, 0);
                let object = json!({
                    "id": batch_id, "type": "message_batch", "processing_status": "in_progress",
                    "request_counts": {"processing": requests.len(), "succeeded": 0, "errored": 0,
                                       "canceled": 0, "expired": 0},
                    "ended_at": null, "created_at": rfc3339(now()), "expires_at": rfc3339(now() + 86_400),
                    "archived_at": null, "cancel_initiated_at": null, "results_url": null,
                });
                st.batches.insert(
                    batch_id,
                    Batch { object: object.clone(), requests: requests.clone(), finished: false },
                );
                Answer::json(200, answer::compact(&object))
            }
            Op::AnthropicListBatches => {
                let mut items: Vec<Value> = st
                    .batches
                    .values()
                    .filter(|b| b.object["type"] == "message_batch")
                    .map(|b| b.object.clone())
                    .collect();
                items.reverse();
                Answer::json(200, answer::compact(&page(items, query, true)))
            }
            Op::AnthropicBatch => {
                let Some(batch) = st.batches.get_mut(id).filter(|b| b.object["type"] == "message_batch")
                else {
                    return msgbatch_gone();
                };
                if !batch.finished {
                    batch.finished = true;
                    let n = batch.requests.len();
                    let o = &mut batch.object;
                    o["processing_status"] = "ended".into();
                    o["ended_at"] = rfc3339(now()).into();
                    o["request_counts"] =
                        json!({"processing": 0, "succeeded": n, "errored": 0, "canceled": 0, "expired": 0});
                    o["results_url"] = format!("{}/v1/messages/batches/{id}/results", self.origin).into();
                }
                Answer::json(200, answer::compact(&batch.object))
            }
            Op::AnthropicBatchResults => {
                let Some(batch) = st.batches.get(id).filter(|b| b.object["type"] == "message_batch") else {
                    return msgbatch_gone();
                };
                if batch.object["processing_status"] != "ended" {
                    return anthropic_error(400, "invalid_request_error", "Batch is still processing.");
                }
                let mut jsonl = Vec::new();
                for (i, r) in batch.requests.iter().enumerate() {
                    let model = r.pointer("/params/model").cloned().unwrap_or(Value::Null);
                    let line = json!({"custom_id": r.get("custom_id"), "result": {"type": "succeeded", "message": {
                        "id": format!("msg_batch{i:08x}"), "type": "message", "role": "assistant", "model": model,
                        "content": [{"type": "text", "text": answer::text(ctx.cfg.tokens)}],
                        "stop_reason": "end_turn", "stop_sequence": null,
                        "usage": {"input_tokens": 10, "output_tokens": ctx.cfg.tokens},
                    }}});
                    jsonl.extend_from_slice(&answer::compact(&line));
                    jsonl.push(b'\n');
                }
                Answer::Body {
                    status: 200,
                    content_type: "application/binary",
                    body: jsonl,
                    headers: std::borrow::Cow::Borrowed(""),
                }
            }
            Op::AnthropicCancelBatch => {
                let Some(batch) = st.batches.get_mut(id).filter(|b| b.object["type"] == "message_batch")
                else {
                    return msgbatch_gone();
                };
                if batch.object["processing_status"] == "in_progress" {
                    batch.finished = true;
                    batch.object["processing_status"] = "canceling".into();
                    batch.object["cancel_initiated_at"] = rfc3339(now()).into();
                }
                Answer::json(200, answer::compact(&batch.object))
            }
            Op::AnthropicDeleteBatch => {
                match st.batches.get(id).filter(|b| b.object["type"] == "message_batch") {
                    None => return msgbatch_gone(),
                    Some(b) if b.object["processing_status"] == "in_progress" => {
                        return anthropic_error(
                            400,
                            "invalid_request_error",
                            "Batches can only be deleted once they have finished processing.",
                        )
                    }
                    Some(_) => {}
                }
                st.batches.remove(id);
                Answer::json(200, answer::compact(&json!({"id": id, "type": "message_batch_deleted"})))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_multipart() {
        assert_eq!(Op::from_path("POST", "/v1/files", false), Some((Op::OpenAiUpload, None)));
        assert_eq!(
            Op::from_path("GET", "/v1/files/f1/content", true),
            Some((Op::AnthropicFileContent, Some("f1".into())))
        );
        assert_eq!(
            Op::from_path("GET", "/v1/messages/batches/b1/results", false),
            Some((Op::AnthropicBatchResults, Some("b1".into())))
        );
        assert_eq!(Op::from_path("PUT", "/v1/batches", false), None);
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\nline1\nline2\r\n--XyZ--\r\n";
        let parts = multipart("multipart/form-data; boundary=XyZ", body).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].data, b"batch");
        assert_eq!(parts[1].filename.as_deref(), Some("a.jsonl"));
        assert_eq!(parts[1].data, b"line1\nline2");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(1_727_203_044), "2024-09-24T18:37:24.000000Z");
    }
}
