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
//! let form = parse(body, boundary(ct).unwrap_or_default()).unwrap_or_default();
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
}

/// The `boundary` parameter of a `multipart/form-data` content type, or
/// `None` for another content type or a missing or invalid boundary
/// (RFC 2046: 1 to 70 characters).
pub fn boundary(content_type: &str) -> Option<&str> {
    let mut params = content_type.split(';');
    let kind = params.next()?.trim();
    if !kind.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    let value = params.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case("boundary").then_some(v.trim())
    })?;
    let value = match value.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"')?,
        None => value,
    };
    let valid = !value.is_empty() && value.len() <= 70 && value.bytes().all(|b| (0x20..0x7f).contains(&b));
    valid.then_some(value)
}

/// Whether `content_type` names a multipart form at all (with or without a
/// usable boundary).
pub fn is_form(content_type: &str) -> bool {
    content_type.split(';').next().is_some_and(|k| k.trim().eq_ignore_ascii_case("multipart/form-data"))
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let first = *needle.first()?;
    let mut i = from;
    while i + needle.len() <= hay.len() {
        let at = i + hay.get(i..)?.iter().position(|&b| b == first)?;
        if hay.get(at..at + needle.len())? == needle {
            return Some(at);
        }
        i = at + 1;
    }
    None
}

/// Reads `body`, a whole `multipart/form-data` body with `boundary`.
pub fn parse(body: &[u8], boundary: &str) -> Result<Form, FormError> {
    if boundary.is_empty() {
        return Err(FormError::NoBoundary);
    }
    // Every delimiter after the first is preceded by CRLF; the first may
    // open the body or follow a preamble.
    let delimiter = [b"\r\n--".as_slice(), boundary.as_bytes()].concat();
    let mut at = if body.starts_with(&delimiter[2..]) {
        delimiter.len() - 2
    } else {
        find(body, &delimiter, 0).ok_or(FormError::NoDelimiter)? + delimiter.len()
    };
    let mut form = Form::default();
    for _ in 0..=MAX_PARTS {
        // After a delimiter: `--` closes the body; otherwise optional
        // whitespace and CRLF open a part.
        let rest = body.get(at..).unwrap_or_default();
        if rest.starts_with(b"--") {
            return Ok(form);
        }
        let line_end = find(body, b"\r\n", at).ok_or(FormError::Truncated)?;
        if body.get(at..line_end).is_some_and(|pad| pad.iter().any(|&b| b != b' ' && b != b'\t')) {
            return Err(FormError::NoDelimiter);
        }
        let headers_start = line_end + 2;
        let (headers, content_start) = if body.get(headers_start..headers_start + 2) == Some(b"\r\n".as_slice()) {
            (&[][..], headers_start + 2)
        } else {
            let end = find(body, b"\r\n\r\n", headers_start).ok_or(FormError::Truncated)?;
            if end - headers_start > MAX_PART_HEADERS {
                return Err(FormError::BadPartHeaders);
            }
            (body.get(headers_start..end).unwrap_or_default(), end + 4)
        };
        let content_end = find(body, &delimiter, content_start).ok_or(FormError::Truncated)?;
        let (name, is_file) = disposition(headers)?;
        if !is_file {
            read_field(&mut form, name.as_deref(), body, content_start..content_end)?;
        } else if name.as_deref() == Some("model") {
            return Err(FormError::BadValue("model"));
        }
        at = content_end + delimiter.len();
    }
    Err(FormError::TooManyParts)
}

/// Keeps the value of a field the router reads.
fn read_field(form: &mut Form, name: Option<&str>, body: &[u8], range: Range<usize>) -> Result<(), FormError> {
    let raw = body.get(range.clone()).unwrap_or_default();
    match name {
        Some("model") => {
            if form.model.is_some() {
                return Err(FormError::Duplicate("model"));
            }
            let value = std::str::from_utf8(raw).map_err(|_| FormError::BadValue("model"))?;
            if value.is_empty() || value.len() > MAX_MODEL || value.bytes().any(|b| b.is_ascii_control()) {
                return Err(FormError::BadValue("model"));
            }
            form.model = Some(Field { value: value.to_string(), range });
        }
        Some("n") => {
            if form.n.is_some() {
                return Err(FormError::Duplicate("n"));
            }
            let n = std::str::from_utf8(raw).ok().and_then(|s| s.trim().parse::<u64>().ok());
            form.n = Some(n.ok_or(FormError::BadValue("n"))?);
        }
        Some("stream") => form.stream = raw.eq_ignore_ascii_case(b"true"),
        _ => {}
    }
    Ok(())
}

/// The `name` of a part's `Content-Disposition`, and whether it is a file
/// (has a `filename`). Forms a provider might read differently are errors:
/// two dispositions, an RFC 2231 `name*`, a transfer encoding.
fn disposition(headers: &[u8]) -> Result<(Option<String>, bool), FormError> {
    let text = std::str::from_utf8(headers).map_err(|_| FormError::BadPartHeaders)?;
    let mut found = None;
    for line in text.split("\r\n") {
        let (k, v) = line.split_once(':').ok_or(FormError::BadPartHeaders)?;
        let k = k.trim();
        if k.eq_ignore_ascii_case("content-transfer-encoding")
            && !["7bit", "8bit", "binary"].iter().any(|e| v.trim().eq_ignore_ascii_case(e))
        {
            return Err(FormError::BadPartHeaders);
        }
        if !k.eq_ignore_ascii_case("content-disposition") {
            continue;
        }
        if found.is_some() {
            return Err(FormError::BadPartHeaders);
        }
        let mut name = None;
        let mut is_file = false;
        for param in params(v) {
            let (pk, pv) = param?;
            if pk.eq_ignore_ascii_case("name*") {
                return Err(FormError::BadPartHeaders);
            } else if pk.eq_ignore_ascii_case("name") {
                name = Some(pv);
            } else if pk.eq_ignore_ascii_case("filename") || pk.eq_ignore_ascii_case("filename*") {
                is_file = true;
            }
        }
        found = Some((name, is_file));
    }
    Ok(found.unwrap_or((None, false)))
}

/// The `key=value` parameters after `form-data`, values unquoted
/// (backslash escapes resolved).
fn params(v: &str) -> impl Iterator<Item = Result<(String, String), FormError>> + '_ {
    let mut rest = v.split_once(';').map_or("", |(_, r)| r);
    std::iter::from_fn(move || {
        rest = rest.trim_start_matches([' ', '\t', ';']);
        if rest.is_empty() {
            return None;
        }
        let Some((k, after)) = rest.split_once('=') else {
            return Some(Err(FormError::BadPartHeaders));
        };
        let k = k.trim().to_string();
        let after = after.trim_start();
        if let Some(q) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = q.char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => {
                        rest = q.get(i + 1..).unwrap_or_default();
                        return Some(Ok((k, value)));
                    }
                    '\\' => value.extend(chars.next().map(|(_, c)| c)),
                    c => value.push(c),
                }
            }
            Some(Err(FormError::BadPartHeaders))
        } else {
            let end = after.find(';').unwrap_or(after.len());
            let value = after.get(..end).unwrap_or_default().trim().to_string();
            rest = after.get(end..).unwrap_or_default();
            Some(Ok((k, value)))
        }
    })
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
        assert_eq!(boundary("multipart/form-data; boundary=abc"), Some("abc"));
        assert_eq!(boundary("Multipart/Form-Data;charset=utf-8; BOUNDARY=\"a b:c\""), Some("a b:c"));
        assert_eq!(boundary("multipart/form-data"), None);
        assert_eq!(boundary("multipart/form-data; boundary="), None);
        assert_eq!(boundary("multipart/form-data; boundary=\"open"), None);
        assert_eq!(boundary(&format!("multipart/form-data; boundary={}", "x".repeat(71))), None);
        assert_eq!(boundary("application/json; boundary=abc"), None);
        assert!(is_form("multipart/form-data") && !is_form("text/plain"));
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
