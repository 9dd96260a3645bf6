//! multipart/form-data bodies: `multipart::boundary`, `multipart::parse`,
//! the `model` rewrite and `request::read` on arbitrary bytes.
//!
//! The input's first line is the content type, the rest the body. Properties
//! checked, beyond "never panics":
//! - both readers are deterministic, and a boundary is 1 to 70 printable
//!   characters without a quote;
//! - `request::read` of a form agrees with `parse`;
//! - a `model` read lies in the body at its range, within the size bound,
//!   and rewriting it gives a form that reads back the new model with the
//!   same `n` and `stream`;
//! - a well-formed form built from the input's bytes (as the model, a text
//!   field and a file) reads back exactly the model and `n` it was built
//!   with.
#![no_main]

use apikeyrouter::multipart::{boundary, parse, with_model, Form, MAX_MODEL};
use apikeyrouter::request::{self, Form as Read};
use libfuzzer_sys::fuzz_target;

fn check(body: &[u8], b: &str) -> Option<Form> {
    let form = parse(body, b);
    assert_eq!(form, parse(body, b), "parse is not deterministic");
    let form = form.ok()?;
    if let Some(m) = &form.model {
        assert_eq!(body.get(m.range.clone()), Some(m.value.as_bytes()), "the model is not at its range");
        assert!(!m.value.is_empty() && m.value.len() <= MAX_MODEL);
        let out = match with_model(body, m, "m") {
            Some(o) => o,
            None => panic!("a model read could not be rewritten"),
        };
        let again = match parse(&out, b) {
            Ok(f) => f,
            Err(e) => panic!("the rewritten form does not read: {e}"),
        };
        assert_eq!(again.model.map(|f| f.value).as_deref(), Some("m"));
        assert_eq!((again.n, again.stream), (form.n, form.stream));
    }
    Some(form)
}

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let ct = String::from_utf8_lossy(head);
    let b = boundary(&ct);
    assert_eq!(b, boundary(&ct), "boundary is not deterministic");
    let read = request::read(&ct, body);
    if let Some(Ok(b)) = b {
        assert!(!b.is_empty() && b.len() <= 70 && b.bytes().all(|c| (0x20..0x7f).contains(&c) && c != b'"'));
        let form = check(body, b);
        match (form, read) {
            (Some(f), Ok((info, Read::Multipart(model)))) => {
                assert_eq!(info.model, f.model.as_ref().map(|m| m.value.clone()));
                assert_eq!(model, f.model);
                assert_eq!(info.choices, f.n.unwrap_or(1).max(1));
                assert_eq!(info.body_len, body.len());
            }
            (None, Ok((info, Read::Unreadable(_)))) => assert_eq!(info.model, None),
            (f, r) => panic!("read {r:?} disagrees with parse {f:?}"),
        }
    }

    // A well-formed form of the input's bytes: the model (printable, no
    // CRLF), a text field and a file holding anything.
    let model: String = body.iter().filter(|c| c.is_ascii_graphic()).take(MAX_MODEL).map(|&c| char::from(c)).collect();
    let n = body.len() as u64 % 1000;
    let bd = "fuzz-7MA4YWxkTrZu0gW";
    let mut form = Vec::new();
    let mut part = |name: &str, value: &[u8]| {
        form.extend_from_slice(format!("--{bd}\r\nContent-Disposition: form-data; {name}\r\n\r\n").as_bytes());
        form.extend_from_slice(value);
        form.extend_from_slice(b"\r\n");
    };
    // No CR in the file, so it cannot hold the delimiter.
    let file: Vec<u8> = body.iter().map(|&c| if c == b'\r' { b' ' } else { c }).collect();
    part("name=\"file\"; filename=\"a.bin\"", &file);
    if !model.is_empty() {
        part("name=\"model\"", model.as_bytes());
    }
    part("name=\"n\"", n.to_string().as_bytes());
    form.extend_from_slice(format!("--{bd}--\r\n").as_bytes());
    let f = match check(&form, bd) {
        Some(f) => f,
        None => panic!("a well-formed form does not read: {:?}", parse(&form, bd)),
    };
    assert_eq!(f.model.map(|m| m.value), (!model.is_empty()).then_some(model));
    assert_eq!(f.n, Some(n));
});
