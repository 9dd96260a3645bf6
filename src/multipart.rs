//! `multipart/form-data` request bodies (`/v1/audio/transcriptions`,
//! `/v1/images/edits`, ...): the few text fields admission needs (`model`
//! and `n`) read from the whole buffered body, with the byte range of
//! `model` so the router can rewrite it.
//!
//! The parser is bounded and never panics: at most [`MAX_PARTS`] parts, part
//! headers of at most [`MAX_PART_HEADERS`] bytes, and a `model` of at most
//! [`MAX_MODEL`] bytes. A field the router reads that appears twice is an
//! error (a provider might act on the other copy), as is a body without its
//! closing delimiter.
//!
//! ```
//! use apikeyrouter::multipart::{boundary, parse};
//! let ct = "multipart/form-data; boundary=XyZ";
//! let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ--\r\n";
//! let b = boundary(ct).and_then(Result::ok).unwrap_or_default();
//! let form = parse(body, b).unwrap_or_default();
//! assert_eq!(form.model.map(|m| m.value), Some("whisper-1".to_string()));
//! ```

use std::fmt;
use std::ops::Range;

/// The most parts a body may have.
pub const MAX_PARTS: usize = 1000;
/// The largest header block of one part.
pub const MAX_PART_HEADERS: usize = 8 << 10;
/// The longest `model` value.
pub const MAX_MODEL: usize = 256;

/// Why a multipart body could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormError {
    /// The content type has no usable `boundary` parameter.
    NoBoundary,
    /// The body does not start with the boundary's delimiter.
    NoDelimiter,
    /// A part's headers are malformed or longer than [`MAX_PART_HEADERS`].
    BadPartHeaders,
    /// The body ends before its closing delimiter.
    Truncated,
    TooManyParts,
    /// A field the router reads appears more than once.
    Duplicate(&'static str),
    /// A field the router reads has a value it cannot use.
    BadValue(&'static str),
}

impl fmt::Display for FormError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormError::NoBoundary => f.write_str("the content type has no multipart boundary"),
            FormError::NoDelimiter => f.write_str("the body does not start with its multipart boundary"),
            FormError::BadPartHeaders => f.write_str("a multipart part has malformed headers"),
            FormError::Truncated => f.write_str("the multipart body ends before its closing boundary"),
            FormError::TooManyParts => write!(f, "the multipart body has more than {MAX_PARTS} parts"),
            FormError::Duplicate(name) => write!(f, "the multipart field '{name}' appears more than once"),
            FormError::BadValue(name) => write!(f, "the multipart field '{name}' has an unusable value"),
        }
    }
}

/// A text field's value and where it lies in the body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Field {
    pub value: String,
    pub range: Range<usize>,
}

/// What the router reads from a form.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Form {
    pub model: Option<Field>,
    /// `n` (images: how many to make).
    pub n: Option<u64>,
    /// `stream` is `true`.
    pub stream: bool,
    /// Text fields whose value is an object id (at most one more than
    /// [`crate::objects::MAX_REFS`]).
    pub refs: Vec<String>,
}

/// The `boundary` of a `multipart/form-data` content type: `None` for
/// another content type, `Some(Err)` for a form without one usable boundary
/// (RFC 2046: 1 to 70 characters). A content type the router might split
/// differently from the provider (two boundaries, a quoted `;`) has none.
pub fn boundary(content_type: &str) -> Option<Result<&str, FormError>> {
    let mut params = content_type.split(';');
    if !params.next()?.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    let mut found = None;
    for p in params {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        if k.trim().eq_ignore_ascii_case("boundary") {
            let v = v.trim();
            let v = v.strip_prefix('"').and_then(|q| q.strip_suffix('"')).unwrap_or(v);
            // Two boundaries: none.
            found = Some(if found.is_none() { v } else { "" });
        }
    }
    let ok = |b: &&str| !b.is_empty() && b.len() <= 70 && b.bytes().all(|c| (0x20..0x7f).contains(&c) && c != b'"');
    Some(found.filter(ok).ok_or(FormError::NoBoundary))
}

#[inline(never)]
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut i = from;
    loop {
        i += hay.get(i..)?.iter().position(|&b| b == first)?;
        if hay.get(i + 1..)?.starts_with(rest) {
            return Some(i);
        }
        i += 1;
    }
}

/// Reads `body`, a whole `multipart/form-data` body with `boundary`.
pub fn parse(body: &[u8], boundary: &str) -> Result<Form, FormError> {
    if boundary.is_empty() {
        return Err(FormError::NoBoundary);
    }
    // Every delimiter after the first is preceded by CRLF; the first may
    // open the body or follow a preamble.
    let delimiter = [b"\r\n--", boundary.as_bytes()].concat();
    let mut at = match body.strip_prefix(&delimiter[2..]) {
        Some(_) => delimiter.len() - 2,
        None => find(body, &delimiter, 0).ok_or(FormError::NoDelimiter)? + delimiter.len(),
    };
    let mut form = Form::default();
    for _ in 0..=MAX_PARTS {
        // After a delimiter: `--` closes the body; otherwise optional
        // whitespace and CRLF open a part, then headers and a blank line.
        if body.get(at..at + 2) == Some(b"--") {
            return Ok(form);
        }
        let eol = find(body, b"\r\n", at).ok_or(FormError::Truncated)?;
        if body.get(at..eol).unwrap_or_default().iter().any(|&b| b != b' ' && b != b'\t') {
            return Err(FormError::NoDelimiter);
        }
        let blank = find(body, b"\r\n\r\n", eol).ok_or(FormError::Truncated)?;
        if blank - eol > MAX_PART_HEADERS {
            return Err(FormError::BadPartHeaders);
        }
        let headers = body.get(eol + 2..blank).unwrap_or_default();
        let content = blank + 4..find(body, &delimiter, blank + 4).ok_or(FormError::Truncated)?;
        at = content.end + delimiter.len();
        let (name, is_file) = disposition(headers)?;
        let raw = body.get(content.clone()).unwrap_or_default();
        match name.as_deref() {
            Some(b"model") if is_file => return Err(FormError::BadValue("model")),
            Some(b"model") => {
                let value = std::str::from_utf8(raw)
                    .ok()
                    .filter(|v| !v.is_empty() && v.len() <= MAX_MODEL && !v.bytes().any(|b| b.is_ascii_control()));
                let value = value.ok_or(FormError::BadValue("model"))?.to_string();
                if form.model.replace(Field { value, range: content }).is_some() {
                    return Err(FormError::Duplicate("model"));
                }
            }
            Some(b"n") if !is_file => {
                let n = std::str::from_utf8(raw).ok().and_then(|s| s.trim().parse::<u64>().ok());
                if form.n.replace(n.ok_or(FormError::BadValue("n"))?).is_some() {
                    return Err(FormError::Duplicate("n"));
                }
            }
            Some(b"stream") if !is_file => form.stream = raw.eq_ignore_ascii_case(b"true"),
            _ if !is_file && form.refs.len() <= crate::objects::MAX_REFS => {
                let id = std::str::from_utf8(raw).ok().map(str::trim);
                form.refs.extend(id.filter(|v| crate::objects::kind_of(v).is_some()).map(str::to_string));
            }
            _ => {}
        }
    }
    Err(FormError::TooManyParts)
}

/// The `name` of a part's `Content-Disposition` (lowercased: a field named
/// `Model` counts as `model`), and whether it is a file (has a
/// `filename`). Forms a provider might read differently are errors: two
/// dispositions, an RFC 2231 `name*`, a transfer encoding, a header line
/// without a colon.
fn disposition(headers: &[u8]) -> Result<(Option<Vec<u8>>, bool), FormError> {
    let headers = headers.to_ascii_lowercase();
    let mut found = None;
    for line in headers.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let colon = line.iter().position(|&b| b == b':').ok_or(FormError::BadPartHeaders)?;
        let v = line.get(colon + 1..).unwrap_or_default().trim_ascii();
        match (line.get(..colon).unwrap_or_default().trim_ascii(), found.is_some()) {
            (b"content-transfer-encoding", _) if !matches!(v, b"7bit" | b"8bit" | b"binary") => {
                return Err(FormError::BadPartHeaders)
            }
            (b"content-disposition", false) => found = Some(params(v)?),
            (b"content-disposition", true) => return Err(FormError::BadPartHeaders),
            _ => {}
        }
    }
    Ok(found.unwrap_or((None, false)))
}

/// `name` (unquoted, backslash escapes resolved) and whether a `filename`
/// is present, from the parameters of a `Content-Disposition` value.
fn params(v: &[u8]) -> Result<(Option<Vec<u8>>, bool), FormError> {
    let (mut name, mut is_file) = (None, false);
    let mut i = v.iter().position(|&b| b == b';').unwrap_or(v.len());
    while i < v.len() {
        let rest = v.get(i..).unwrap_or_default();
        i += rest.iter().position(|b| !b" \t;".contains(b)).unwrap_or(rest.len());
        let Some(eq) = v.get(i..).and_then(|r| r.iter().position(|&b| b == b'=')) else {
            return if i < v.len() { Err(FormError::BadPartHeaders) } else { Ok((name, is_file)) };
        };
        let key = v.get(i..i + eq).unwrap_or_default().trim_ascii();
        i += eq + 1;
        let mut value = Vec::new();
        let quoted = v.get(i..).unwrap_or_default().trim_ascii_start().first() == Some(&b'"');
        if quoted {
            i += v.get(i..).unwrap_or_default().iter().position(|&b| b == b'"').unwrap_or(0) + 1;
            loop {
                match v.get(i) {
                    None => return Err(FormError::BadPartHeaders),
                    Some(b'"') => break,
                    Some(b'\\') => {
                        i += 1;
                        value.extend(v.get(i));
                    }
                    Some(&b) => value.push(b),
                }
                i += 1;
            }
            i += 1;
        } else {
            let end = v.get(i..).unwrap_or_default().iter().position(|&b| b == b';').map_or(v.len(), |e| i + e);
            value.extend_from_slice(v.get(i..end).unwrap_or_default().trim_ascii());
            i = end;
        }
        match key {
            b"name*" => return Err(FormError::BadPartHeaders),
            b"name" => name = Some(value),
            b"filename" | b"filename*" => is_file = true,
            _ => {}
        }
    }
    Ok((name, is_file))
}

/// `body` with the `model` field's value replaced by `model`.
pub fn with_model(body: &[u8], field: &Field, model: &str) -> Option<Vec<u8>> {
    let before = body.get(..field.range.start)?;
    let after = body.get(field.range.end..)?;
    Some([before, model.as_bytes(), after].concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(parts: &[(&str, &str)], boundary: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for (headers, value) in parts {
            out.extend_from_slice(format!("--{boundary}\r\n{headers}\r\n\r\n{value}\r\n").as_bytes());
        }
        out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        out
    }

    fn text(name: &str) -> String {
        format!("Content-Disposition: form-data; name=\"{name}\"")
    }

    #[test]
    fn the_boundary_comes_from_the_content_type_quoted_or_not() {
        assert_eq!(boundary("multipart/form-data; boundary=abc"), Some(Ok("abc")));
        assert_eq!(boundary("Multipart/Form-Data;charset=utf-8; BOUNDARY=\"a b:c\""), Some(Ok("a b:c")));
        assert_eq!(boundary("multipart/form-data; x=\"boundary=A\"; boundary=B"), Some(Ok("B")));
        let none = Some(Err(FormError::NoBoundary));
        assert_eq!(boundary("multipart/form-data"), none);
        assert_eq!(boundary("multipart/form-data; boundary="), none);
        assert_eq!(boundary("multipart/form-data; boundary=\"open"), none);
        assert_eq!(boundary("multipart/form-data; boundary=\"a;b\""), none, "a quoted ';' is not split on");
        assert_eq!(boundary("multipart/form-data; x=\"a;boundary=A\"; boundary=B"), none, "two boundaries");
        assert_eq!(boundary(&format!("multipart/form-data; boundary={}", "x".repeat(71))), none);
        assert_eq!(boundary("application/json; boundary=abc"), None);
        assert_eq!(boundary("text/plain"), None);
    }

    #[test]
    fn model_n_and_stream_are_read_and_files_are_skipped() {
        let file = "Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav";
        let body = form(
            &[
                (file, "RIFF\r\n--not-the-boundary\r\nmodel"),
                (&text("model"), "gpt-4o-transcribe"),
                (&text("n"), " 3 "),
                (&text("stream"), "true"),
                ("content-disposition: form-data; name=prompt", "hello"),
            ],
            "BOUNDARY",
        );
        let f = parse(&body, "BOUNDARY").unwrap_or_else(|e| panic!("{e}"));
        let m = f.model.clone().unwrap_or_default();
        assert_eq!(m.value, "gpt-4o-transcribe");
        assert_eq!(&body[m.range.clone()], b"gpt-4o-transcribe");
        assert_eq!((f.n, f.stream), (Some(3), true));
        let out = with_model(&body, &m, "whisper-1").unwrap_or_default();
        let again = parse(&out, "BOUNDARY").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.model.map(|m| m.value).as_deref(), Some("whisper-1"));
    }

    #[test]
    fn a_preamble_and_quoted_names_with_escapes_are_understood() {
        let mut body = b"preamble text\r\n".to_vec();
        body.extend(form(&[("Content-Disposition: form-data; name=\"a\\\"b\"", "x"), (&text("model"), "m")], "b"));
        let f = parse(&body, "b").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.model.map(|m| m.value).as_deref(), Some("m"));
        // An escaped name that reads as `model` is `model`: a second copy.
        let twice = form(&[("Content-Disposition: form-data; name=\"mo\\del\"", "x"), (&text("model"), "m")], "b");
        assert_eq!(parse(&twice, "b"), Err(FormError::Duplicate("model")));
    }

    #[test]
    fn field_names_are_compared_without_case() {
        let body = form(&[("content-disposition: Form-Data; NAME=\"Model\"", "m"), (&text("model"), "n")], "b");
        assert_eq!(parse(&body, "b"), Err(FormError::Duplicate("model")));
    }

    #[test]
    fn a_form_without_a_model_reads_as_none() {
        let body = form(&[(&text("purpose"), "batch")], "b");
        assert_eq!(parse(&body, "b"), Ok(Form::default()));
    }

    #[test]
    fn malformed_forms_are_errors_not_panics() {
        let ok = form(&[(&text("model"), "m")], "b");
        let cases: Vec<(Vec<u8>, FormError)> = vec![
            (b"".to_vec(), FormError::NoDelimiter),
            (b"no delimiter here".to_vec(), FormError::NoDelimiter),
            (ok[..ok.len() - 6].to_vec(), FormError::Truncated),
            (b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n".to_vec(), FormError::Truncated),
            (b"--bx\r\n\r\nv\r\n--b--".to_vec(), FormError::NoDelimiter),
            (b"--b\r\nno colon\r\n\r\nv\r\n--b--".to_vec(), FormError::BadPartHeaders),
            (form(&[(&text("model"), "a"), (&text("model"), "b")], "b"), FormError::Duplicate("model")),
            (form(&[(&text("n"), "two")], "b"), FormError::BadValue("n")),
            (form(&[(&text("model"), "")], "b"), FormError::BadValue("model")),
            (form(&[(&text("model"), &"m".repeat(MAX_MODEL + 1))], "b"), FormError::BadValue("model")),
            (form(&[("Content-Disposition: form-data; name=\"model", "m")], "b"), FormError::BadPartHeaders),
            (form(&[("Content-Disposition: form-data; name*=utf-8''model", "m")], "b"), FormError::BadPartHeaders),
            (
                form(&[(&format!("{}\r\nContent-Transfer-Encoding: base64", text("model")), "bQ==")], "b"),
                FormError::BadPartHeaders,
            ),
            (
                form(&[("Content-Disposition: form-data; name=model; filename=m.txt", "m")], "b"),
                FormError::BadValue("model"),
            ),
            (form(&[(&format!("{}\r\n{}", text("model"), text("x")), "m")], "b"), FormError::BadPartHeaders),
        ];
        for (body, want) in cases {
            assert_eq!(parse(&body, "b"), Err(want.clone()), "{}", String::from_utf8_lossy(&body));
            assert!(!want.to_string().is_empty());
        }
        let many: Vec<(String, &str)> = (0..=MAX_PARTS).map(|i| (text(&format!("f{i}")), "v")).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(h, v)| (h.as_str(), *v)).collect();
        assert_eq!(parse(&form(&many, "b"), "b"), Err(FormError::TooManyParts));
        let long = format!("{}\r\nX-Pad: {}", text("model"), "p".repeat(MAX_PART_HEADERS));
        assert_eq!(parse(&form(&[(&long, "m")], "b"), "b"), Err(FormError::BadPartHeaders));
        assert_eq!(parse(&ok, ""), Err(FormError::NoBoundary));
    }
}
