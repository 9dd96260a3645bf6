//! The proxy-wasm header-map wire format: `count:u32`, then `(name_len:u32,
//! value_len:u32)` per pair, then each name and value followed by a NUL.
//! Decoding never panics: malformed input is an error, and bytes that are not
//! UTF-8 (legal in header values) are replaced rather than trusted.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

fn u32_at(b: &[u8], at: usize) -> Result<usize, Malformed> {
    let w = b.get(at..at + 4).ok_or(Malformed)?;
    Ok(u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize)
}

/// Decodes a serialized header map.
pub fn decode(b: &[u8]) -> Result<Vec<(String, String)>, Malformed> {
    if b.is_empty() {
        return Ok(Vec::new());
    }
    let n = u32_at(b, 0)?;
    let table_end = n.checked_mul(8).and_then(|t| t.checked_add(4)).ok_or(Malformed)?;
    if table_end > b.len() {
        return Err(Malformed);
    }
    let mut out = Vec::with_capacity(n);
    let mut p = table_end;
    for i in 0..n {
        let klen = u32_at(b, 4 + i * 8)?;
        let vlen = u32_at(b, 8 + i * 8)?;
        let key = b.get(p..p + klen).ok_or(Malformed)?;
        p = p.checked_add(klen + 1).ok_or(Malformed)?;
        let val = b.get(p..p + vlen).ok_or(Malformed)?;
        p = p.checked_add(vlen + 1).ok_or(Malformed)?;
        out.push((String::from_utf8_lossy(key).into_owned(), String::from_utf8_lossy(val).into_owned()));
    }
    Ok(out)
}

/// Encodes pairs in the same format.
pub fn encode(pairs: &[(&str, &str)]) -> Vec<u8> {
    let size = 4 + pairs.iter().map(|(k, v)| k.len() + v.len() + 10).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip() {
        let pairs = [("content-type", "application/json"), ("x-a", ""), ("", "v")];
        let got = decode(&encode(&pairs));
        let want: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(got, Ok(want));
        assert_eq!(decode(&[]), Ok(vec![]));
    }

    #[test]
    fn truncated_or_lying_maps_are_errors() {
        let good = encode(&[("abc", "def")]);
        for cut in 1..good.len() - 1 {
            assert_eq!(decode(&good[..cut]), Err(Malformed), "cut at {cut}");
        }
        assert_eq!(decode(&[255, 255, 255, 255]), Err(Malformed));
        let mut lying = good.clone();
        lying[4] = 200;
        assert_eq!(decode(&lying), Err(Malformed));
    }

    #[test]
    fn non_utf8_header_values_do_not_fail() {
        let mut b = encode(&[("x", "ab")]);
        let n = b.len();
        b[n - 3] = 0xff;
        assert_eq!(decode(&b).map(|v| v[0].1.clone()), Ok("\u{fffd}b".to_string()));
    }
}
