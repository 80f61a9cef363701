//! `multipart/form-data` bodies (RFC 7578), read just enough to route them: the OpenAI
//! audio endpoints carry `model` as a form field beside the audio file. Fields are found by
//! their byte ranges, so the body is forwarded as sent with only `model`'s value replaced.

use std::ops::Range;

/// One form field: its name and where its value lies in the body.
#[derive(Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// `filename` (or RFC 5987's `filename*`): the part is a file.
    pub filename: Option<String>,
    pub value: Range<usize>,
}

/// A parsed form: its fields, and where its closing delimiter (`CRLF--boundary--`) starts.
#[derive(Debug)]
pub struct Form {
    pub fields: Vec<Field>,
    pub closing: usize,
}

/// More parts than any real upload has: refused rather than allocated.
pub const MAX_PARTS: usize = 1000;

/// The `boundary` parameter of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Option<&str> {
    let mut params = content_type.split(';');
    let mime = params.next()?.trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|b| !b.is_empty() && b.len() <= 70)
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    memchr::memmem::find(hay.get(from..)?, needle).map(|i| i + from)
}

/// The next `CRLF--boundary` that is a delimiter: followed by `--` (the last) or by optional
/// padding and a line break. A line of data that merely starts like it is data.
fn find_delimiter(body: &[u8], next: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let at = find(body, next, from)?;
        let mut after = at + next.len();
        if body.get(after..after + 2) == Some(b"--") {
            return Some(at);
        }
        while body.get(after).is_some_and(|b| *b == b' ' || *b == b'\t') {
            after += 1;
        }
        if body.get(after..after + 2) == Some(b"\r\n") {
            return Some(at);
        }
        from = at + 1;
    }
}

/// The fields of `body`, in order. `Err` says what is malformed.
pub fn fields(boundary: &str, body: &[u8]) -> Result<Vec<Field>, String> {
    parse(boundary, body).map(|f| f.fields)
}

/// The form in `body`. `Err` says what is malformed.
pub fn parse(boundary: &str, body: &[u8]) -> Result<Form, String> {
    let delimiter = format!("--{boundary}");
    let next = format!("\r\n--{boundary}");
    let mut at = match find(body, delimiter.as_bytes(), 0) {
        Some(0) => delimiter.len(),
        // A preamble is allowed before the first delimiter, after a line break.
        Some(_) => match find_delimiter(body, next.as_bytes(), 0) {
            Some(i) => i + next.len(),
            None => return Err("the multipart body has no boundary line".into()),
        },
        None => return Err("the multipart body has no boundary line".into()),
    };
    let mut out = Vec::new();
    // Where the delimiter just passed starts (the closing one, once it ends the form).
    let mut delimiter_at = at.saturating_sub(next.len());
    loop {
        if body.get(at..at + 2) == Some(b"--") {
            return Ok(Form { fields: out, closing: delimiter_at });
        }
        if out.len() >= MAX_PARTS {
            return Err(format!("the multipart body has more than {MAX_PARTS} parts"));
        }
        // Transport padding after a delimiter, then its line break.
        while body.get(at).is_some_and(|b| *b == b' ' || *b == b'\t') {
            at += 1;
        }
        if body.get(at..at + 2) != Some(b"\r\n") {
            return Err("a multipart boundary line is not followed by a line break".into());
        }
        at += 2;
        let head_end = find(body, b"\r\n\r\n", at).ok_or("a multipart part has no end of headers")?;
        let head = String::from_utf8_lossy(&body[at..head_end]);
        let value_start = head_end + 4;
        let value_end =
            find_delimiter(body, next.as_bytes(), value_start).ok_or("a multipart part is not terminated")?;
        let (mut name, mut filename) = (None, None);
        for line in head.split("\r\n") {
            let Some((header, value)) = line.split_once(':') else { continue };
            if !header.trim().eq_ignore_ascii_case("content-disposition") {
                continue;
            }
            for param in value.split(';').skip(1) {
                let Some((k, v)) = param.trim().split_once('=') else { continue };
                let v = v.trim().trim_matches('"').to_string();
                match k.trim().to_ascii_lowercase().as_str() {
                    "name" => name = Some(v),
                    "filename" | "filename*" => filename = Some(v),
                    _ => {}
                }
            }
        }
        let name = name.ok_or("a multipart part has no name")?;
        out.push(Field { name, filename, value: value_start..value_end });
        delimiter_at = value_end;
        at = value_end + next.len();
    }
}

/// `body` with `range` replaced by `value`.
pub fn replace(body: &[u8], range: Range<usize>, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + value.len());
    out.extend_from_slice(&body[..range.start]);
    out.extend_from_slice(value);
    out.extend_from_slice(&body[range.end..]);
    out
}

/// `body` with a text field inserted before its closing delimiter, at `closing`
/// (`Form::closing`).
pub fn insert(boundary: &str, body: &[u8], closing: usize, name: &str, value: &[u8]) -> Option<Vec<u8>> {
    let at = closing;
    if body.get(at..at + 2) != Some(b"\r\n") {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + value.len() + 128);
    out.extend_from_slice(&body[..at]);
    out.extend_from_slice(
        format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
    );
    out.extend_from_slice(value);
    out.extend_from_slice(&body[at..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = b"--b0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n--b0x\r\n--b0\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n@voice\r\n--b0--\r\n";

    #[test]
    fn fields_are_found_and_model_replaced_or_added() {
        assert_eq!(boundary("multipart/form-data; boundary=b0"), Some("b0"));
        assert_eq!(boundary("Multipart/Form-Data; charset=x; boundary=\"b0\""), Some("b0"));
        assert_eq!(boundary("application/json"), None);
        let f = fields("b0", BODY).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!((f[0].name.as_str(), f[0].filename.as_deref()), ("file", Some("a.wav")));
        // A line inside the file that merely starts like the boundary is data.
        assert_eq!(&BODY[f[0].value.clone()], b"RIFF\r\n--b0x");
        assert_eq!(&BODY[f[1].value.clone()], b"@voice");
        let out = replace(BODY, f[1].value.clone(), b"whisper-1");
        let again = fields("b0", &out).unwrap();
        assert_eq!(&out[again[1].value.clone()], b"whisper-1");
        assert_eq!(&out[again[0].value.clone()], b"RIFF\r\n--b0x");
        let no_model =
            b"--b0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nx\r\n--b0--\r\n";
        let form = parse("b0", no_model).unwrap();
        let added = insert("b0", no_model, form.closing, "model", b"whisper-1").unwrap();
        let f = fields("b0", &added).unwrap();
        assert_eq!((f[1].name.as_str(), &added[f[1].value.clone()]), ("model", &b"whisper-1"[..]));
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        for bad in [&b""[..], b"--b0", b"--b0\r\nno headers end", b"--b0\r\n\r\nvalue without end", b"--b0xx"]
        {
            assert!(fields("b0", bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(
            fields("b0", b"--b0\r\nContent-Type: x\r\n\r\nv\r\n--b0--").is_err(),
            "a part without a name"
        );
    }
}
