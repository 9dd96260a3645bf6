//! Fernet tokens (`fernet:gAAAA...`) for encrypted key material in config,
//! compatible with the original design's `APIKEYROUTER_ENCRYPTION_KEY`.
//!
//! A token is base64url of `0x80 | timestamp:u64 | iv[16] | ciphertext |
//! hmac[32]`; the 32-byte key is a 16-byte HMAC-SHA256 signing key followed
//! by a 16-byte AES-128-CBC encryption key
//! (<https://github.com/fernet/spec/blob/master/Spec.md>).

use crate::crypto::{constant_time_eq, sha256 as digest};
use aes::cipher::{generic_array::GenericArray, BlockDecrypt, KeyInit};
use aes::Aes128;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FernetError {
    /// The key is not 32 bytes of base64url.
    BadKey,
    /// The token is not base64url, is too short, or has another version.
    Malformed,
    /// The HMAC does not match: a wrong key or a damaged token.
    WrongKeyOrDamaged,
    /// The plaintext's padding is invalid.
    BadPadding,
}

impl fmt::Display for FernetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FernetError::BadKey => "the encryption key is not 32 bytes of URL-safe base64",
            FernetError::Malformed => "the token is not a Fernet token",
            FernetError::WrongKeyOrDamaged => "wrong encryption key, or a damaged token",
            FernetError::BadPadding => "the token decrypts to invalid padding",
        })
    }
}

/// Decodes standard or URL-safe base64, padding optional.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    let s = s.trim().trim_end_matches('=');
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    // Leftover bits must be padding zeros, and a lone 6-bit group is invalid.
    if bits >= 6 || acc & ((1 << bits) - 1) != 0 {
        return None;
    }
    Some(out)
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Vec::with_capacity(64 + msg.len());
    inner.extend(k.iter().map(|b| b ^ 0x36));
    inner.extend_from_slice(msg);
    let mut outer = Vec::with_capacity(96);
    outer.extend(k.iter().map(|b| b ^ 0x5c));
    outer.extend_from_slice(&digest(&inner));
    digest(&outer)
}

/// Decrypts a Fernet token (without the `fernet:` prefix) with a base64url
/// key. Token age is not checked: key material does not expire.
pub fn decrypt(key_b64: &str, token: &str) -> Result<Vec<u8>, FernetError> {
    let key = base64_decode(key_b64).filter(|k| k.len() == 32).ok_or(FernetError::BadKey)?;
    let raw = base64_decode(token).ok_or(FernetError::Malformed)?;
    if raw.len() < 1 + 8 + 16 + 16 + 32 || raw[0] != 0x80 || (raw.len() - 57) % 16 != 0 {
        return Err(FernetError::Malformed);
    }
    let (signed, mac) = raw.split_at(raw.len() - 32);
    if !constant_time_eq(&hmac_sha256(&key[..16], signed), mac) {
        return Err(FernetError::WrongKeyOrDamaged);
    }
    let iv = &signed[9..25];
    let ciphertext = &signed[25..];
    let cipher = Aes128::new(GenericArray::from_slice(&key[16..]));
    let mut prev = [0u8; 16];
    prev.copy_from_slice(iv);
    let mut out = Vec::with_capacity(ciphertext.len());
    for block in ciphertext.chunks_exact(16) {
        let mut b = GenericArray::clone_from_slice(block);
        cipher.decrypt_block(&mut b);
        for (x, p) in b.iter_mut().zip(prev.iter()) {
            *x ^= p;
        }
        out.extend_from_slice(&b);
        prev.copy_from_slice(block);
    }
    let pad = *out.last().ok_or(FernetError::BadPadding)? as usize;
    if pad == 0 || pad > 16 || pad > out.len() || !out[out.len() - pad..].iter().all(|&b| b as usize == pad) {
        return Err(FernetError::BadPadding);
    }
    out.truncate(out.len() - pad);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The Fernet specification's test vector.
    const KEY: &str = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=";
    const TOKEN: &str =
        "gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==";

    #[test]
    fn the_spec_test_vector_decrypts_to_hello() {
        assert_eq!(decrypt(KEY, TOKEN).map(|b| String::from_utf8_lossy(&b).into_owned()), Ok("hello".to_string()));
    }

    #[test]
    fn a_wrong_key_or_a_touched_token_is_refused() {
        let other = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        assert_eq!(decrypt(other, TOKEN), Err(FernetError::WrongKeyOrDamaged));
        let mut t = TOKEN.to_string();
        t.replace_range(30..31, if &TOKEN[30..31] == "A" { "B" } else { "A" });
        assert_eq!(decrypt(KEY, &t), Err(FernetError::WrongKeyOrDamaged));
        assert_eq!(decrypt("short", TOKEN), Err(FernetError::BadKey));
        assert_eq!(decrypt(KEY, "not a token!"), Err(FernetError::Malformed));
        assert_eq!(decrypt(KEY, "gAAAAA"), Err(FernetError::Malformed));
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn base64_accepts_both_alphabets_and_rejects_garbage() {
        assert_eq!(base64_decode("aGVsbG8="), Some(b"hello".to_vec()));
        assert_eq!(base64_decode("aGVsbG8"), Some(b"hello".to_vec()));
        assert_eq!(base64_decode("-_8"), Some(vec![0xfb, 0xff]));
        assert_eq!(base64_decode("a"), None);
        assert_eq!(base64_decode("a*b="), None);
    }
}
