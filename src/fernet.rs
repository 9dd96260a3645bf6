//! Fernet tokens (`fernet:gAAAA...`) for encrypted key material in config,
//! compatible with the original design's `APIKEYROUTER_ENCRYPTION_KEY`.
//!
//! A token is base64url of `0x80 | timestamp:u64 | iv[16] | ciphertext |
//! hmac[32]`; the 32-byte key is a 16-byte HMAC-SHA256 signing key followed
//! by a 16-byte AES-128-CBC encryption key
//! (<https://github.com/fernet/spec/blob/master/Spec.md>).
//!
//! Fleet mode also encrypts ([`FernetKey::encrypt`]): the records of runtime
//! keys and budget limits it keeps in etcd.

use crate::encoding::base64_decode;
use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use aes::Aes128;
use hmac::{Hmac, Mac};
use sha2::Sha256;
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

/// Whether `tag` is the HMAC-SHA256 of `msg` under `key`, compared in
/// constant time.
fn hmac_sha256_verifies(key: &[u8], msg: &[u8], tag: &[u8]) -> bool {
    Hmac::<Sha256>::new_from_slice(key).is_ok_and(|mac| mac.chain_update(msg).verify_slice(tag).is_ok())
}

/// Decrypts a Fernet token (without the `fernet:` prefix) with a base64url
/// key. Token age is not checked: key material does not expire.
pub fn decrypt(key_b64: &str, token: &str) -> Result<Vec<u8>, FernetError> {
    decrypt_with(&FernetKey::parse(key_b64)?.0, token)
}

fn decrypt_with(key: &[u8; 32], token: &str) -> Result<Vec<u8>, FernetError> {
    let raw = base64_decode(token).ok_or(FernetError::Malformed)?;
    if raw.len() < 1 + 8 + 16 + 16 + 32 || raw[0] != 0x80 || (raw.len() - 57) % 16 != 0 {
        return Err(FernetError::Malformed);
    }
    let (signed, mac) = raw.split_at(raw.len() - 32);
    if !hmac_sha256_verifies(&key[..16], signed, mac) {
        return Err(FernetError::WrongKeyOrDamaged);
    }
    let (iv, ciphertext) = signed[9..].split_at(16);
    let cipher = cbc::Decryptor::<Aes128>::new_from_slices(&key[16..], iv).map_err(|_| FernetError::Malformed)?;
    let mut out = ciphertext.to_vec();
    let len = cipher.decrypt_padded_mut::<Pkcs7>(&mut out).map_err(|_| FernetError::BadPadding)?.len();
    out.truncate(len);
    Ok(out)
}

/// A Fernet key (32 bytes: HMAC key, then AES key). Its `Debug` never
/// shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct FernetKey([u8; 32]);

impl fmt::Debug for FernetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FernetKey(<redacted>)")
    }
}

impl FernetKey {
    /// A key written as 32 bytes of base64url (the original design's
    /// `APIKEYROUTER_ENCRYPTION_KEY`).
    pub fn parse(key_b64: &str) -> Result<FernetKey, FernetError> {
        let key = base64_decode(key_b64).ok_or(FernetError::BadKey)?;
        <[u8; 32]>::try_from(key.as_slice()).map(FernetKey).map_err(|_| FernetError::BadKey)
    }

    /// A Fernet token (base64url with padding, without the `fernet:`
    /// prefix) of `plaintext`, stamped `now_s`. The IV is the HMAC of
    /// `nonce`, the time and the plaintext under the signing key: as
    /// unpredictable as `nonce` (fresh random bytes), and never reused for
    /// two plaintexts even if a nonce repeats.
    pub fn encrypt(&self, plaintext: &[u8], now_s: u64, nonce: [u8; 16]) -> String {
        let mut iv = nonce;
        if let Ok(mac) = Hmac::<Sha256>::new_from_slice(&self.0[..16]) {
            let tag = mac.chain_update(nonce).chain_update(now_s.to_be_bytes()).chain_update(plaintext).finalize();
            iv.copy_from_slice(&tag.into_bytes()[..16]);
        }
        self.seal(plaintext, now_s, iv)
    }

    /// The token of `plaintext` with this IV.
    fn seal(&self, plaintext: &[u8], now_s: u64, iv: [u8; 16]) -> String {
        use base64::Engine;
        let (signing, encryption) = self.0.split_at(16);
        let mut out = Vec::with_capacity(57 + plaintext.len() + 16);
        out.push(0x80);
        out.extend_from_slice(&now_s.to_be_bytes());
        out.extend_from_slice(&iv);
        if let Ok(cipher) = cbc::Encryptor::<Aes128>::new_from_slices(encryption, &iv) {
            out.extend_from_slice(&cipher.encrypt_padded_vec_mut::<Pkcs7>(plaintext));
        }
        if let Ok(mac) = Hmac::<Sha256>::new_from_slice(signing) {
            let tag = mac.chain_update(&out).finalize().into_bytes();
            out.extend_from_slice(&tag);
        }
        base64::engine::general_purpose::URL_SAFE.encode(out)
    }

    /// Decrypts a token (without the `fernet:` prefix).
    pub fn decrypt(&self, token: &str) -> Result<Vec<u8>, FernetError> {
        decrypt_with(&self.0, token)
    }
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
        let hex = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        let mut tag: Vec<u8> = (0..64).step_by(2).filter_map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok()).collect();
        assert!(hmac_sha256_verifies(b"Jefe", b"what do ya want for nothing?", &tag));
        tag[31] ^= 1;
        assert!(!hmac_sha256_verifies(b"Jefe", b"what do ya want for nothing?", &tag));
    }

    #[test]
    fn encrypted_tokens_decrypt_to_the_plaintext_and_differ_for_each_nonce() {
        let key = FernetKey::parse(KEY).unwrap_or_else(|e| panic!("{e}"));
        let a = key.encrypt(b"sk-secret-material", 499_162_800, [1; 16]);
        let b = key.encrypt(b"sk-secret-material", 499_162_800, [2; 16]);
        assert_ne!(a, b, "a fresh IV each time");
        assert!(a.starts_with("gAAAAA") && !a.contains("sk-secret"), "{a}");
        assert_eq!(decrypt(KEY, &a), Ok(b"sk-secret-material".to_vec()));
        assert_eq!(key.decrypt(&b), Ok(b"sk-secret-material".to_vec()));
        assert_eq!(decrypt("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", &a), Err(FernetError::WrongKeyOrDamaged));
        assert_eq!(key.decrypt(&key.encrypt(b"", 0, [0; 16])), Ok(Vec::new()));
        assert_eq!(format!("{key:?}"), "FernetKey(<redacted>)");
        // The specification's generation vector: its time and IV give its token.
        let iv: [u8; 16] = core::array::from_fn(|i| i as u8);
        assert_eq!(key.seal(b"hello", 499_162_800, iv), TOKEN);
    }
}
