//! Object ids and references (`objects`): what a request refers to, what
//! an answer creates, a stream's id, list filtering and the shared-data
//! records, on arbitrary bytes.
//!
//! The input's first line is a request path, the rest a body. Properties
//! checked, beyond "never panics":
//! - every id found (path, body, answer, stream) is one `kind_of` accepts,
//!   so no id with `/`, `%`, `.` or spaces ever names an object;
//! - a body names at most `MAX_REFS` distinct ids, or is refused;
//! - filtering a list keeps a subset of its items, and keeping all of them
//!   keeps them all;
//! - any bytes decode as records or as nothing, and records read back as
//!   written.
#![no_main]

use apikeyrouter::objects::{
    body_refs, created_ids, decode, encode, filter_list, kind_of, path_refs, streamed_id, unreadable_path, Kind,
    MAX_REFS,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (first, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let path = String::from_utf8_lossy(first);
    let refs = path_refs(&path);
    assert!(refs.iter().all(|id| kind_of(id).is_some()), "{refs:?}");
    if !unreadable_path(&path) {
        assert!(refs.iter().all(|id| path.contains(id.as_str())));
    }
    if let Ok(found) = body_refs(body) {
        assert!(found.len() <= MAX_REFS);
        assert!(found.iter().all(|id| kind_of(id).is_some()), "{found:?}");
    }
    for kind in [Kind::Response, Kind::File, Kind::Thread] {
        for id in created_ids(kind, body).into_iter().chain(streamed_id(kind, body)) {
            assert_eq!(kind_of(&id), Some(kind), "{id}");
        }
    }
    if let Some(all) = filter_list(body, |_| true) {
        let some = filter_list(body, |id| id.len() % 2 == 0).unwrap_or_default();
        assert!(some.len() <= all.len() + 64, "a filtered list grew");
        let items = |b: &[u8]| -> usize {
            serde_json::from_slice::<serde_json::Value>(b).ok().and_then(|v| v["data"].as_array().map(Vec::len)).unwrap_or(0)
        };
        assert!(items(&some) <= items(&all));
    }
    if let Some(records) = decode(body) {
        assert_eq!(decode(&encode(&records)), Some(records), "records do not round-trip");
    }
});
