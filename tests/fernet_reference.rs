//! `fernet::decrypt` against tokens it did not make: the Fernet
//! specification's own vectors (github.com/fernet/spec, verify.json and
//! invalid.json) and tokens made by Python's `cryptography`
//! (`tests/fixtures/fernet_reference.py` writes `fernet_reference.json`).

use apikeyrouter::encoding::{base64_decode, base64_encode};
use apikeyrouter::fernet::{decrypt, FernetError};
use serde_json::Value;

const REFERENCE: &str = include_str!("fixtures/fernet_reference.json");
const SPEC_KEY: &str = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=";

fn reference(list: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(REFERENCE).unwrap_or(Value::Null);
    let items = v[list].as_array().cloned().unwrap_or_default();
    assert!(!items.is_empty(), "no {list:?} in fernet_reference.json");
    items
}

/// A string field; "" when missing, which no assertion below accepts.
fn field<'a>(v: &'a Value, name: &str) -> &'a str {
    v[name].as_str().unwrap_or_default()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).filter_map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[test]
fn tokens_made_by_python_cryptography_decrypt_to_their_plaintext() {
    let tokens = reference("tokens");
    assert_eq!(tokens.len(), 50, "every plaintext length 0..50");
    for t in &tokens {
        let want = unhex(field(t, "plaintext_hex"));
        assert_eq!(decrypt(field(t, "key"), field(t, "token")), Ok(want), "{t}");
    }
}

#[test]
fn reference_tokens_decrypt_in_either_base64_alphabet_with_or_without_padding() {
    for t in reference("tokens") {
        let (key, token) = (field(&t, "key"), field(&t, "token"));
        let want = decrypt(key, token);
        assert!(want.is_ok(), "{t}");
        let standard = |s: &str| s.replace('-', "+").replace('_', "/");
        for (k, tok) in [
            (key.to_string(), token.trim_end_matches('=').to_string()),
            (standard(key), standard(token)),
            (standard(key).trim_end_matches('=').to_string(), standard(token).trim_end_matches('=').to_string()),
        ] {
            assert_eq!(decrypt(&k, &tok), want, "{k} {tok}");
        }
    }
}

#[test]
fn reference_tokens_under_another_key_are_refused_as_wrong_key() {
    let tokens = reference("tokens");
    for pair in tokens.windows(2) {
        assert_eq!(decrypt(field(&pair[1], "key"), field(&pair[0], "token")), Err(FernetError::WrongKeyOrDamaged));
    }
}

#[test]
fn any_flipped_bit_of_a_reference_token_is_refused() {
    for t in reference("tokens").iter().take(3) {
        let raw = base64_decode(field(t, "token")).unwrap_or_default();
        for i in 0..raw.len() * 8 {
            let mut bent = raw.clone();
            bent[i / 8] ^= 1 << (i % 8);
            let got = decrypt(field(t, "key"), &base64_encode(&bent));
            let want = if i < 8 { FernetError::Malformed } else { FernetError::WrongKeyOrDamaged };
            assert_eq!(got, Err(want), "bit {i} of {t}");
        }
    }
}

#[test]
fn a_valid_mac_over_bad_pkcs7_padding_is_refused_as_bad_padding() {
    for t in reference("bad_padding") {
        assert_eq!(decrypt(field(&t, "key"), field(&t, "token")), Err(FernetError::BadPadding), "{t}");
    }
    // invalid.json: "payload padding error" and "incorrect IV (causes padding error)".
    for token in [
        "gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0ODz4LEpdELGQAad7aNEHbf-JkLPIpuiYRLQ3RtXatOYREu2FWke6CnJNYIbkuKNqOhw==",
        "gAAAAAAdwJ6xBQECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAkLhFLHpGtDBRLRTZeUfWgHSv49TF2AUEZ1TIvcZjK1zQ==",
    ] {
        assert_eq!(decrypt(SPEC_KEY, token), Err(FernetError::BadPadding), "{token}");
    }
}

#[test]
fn the_spec_vectors_are_read_and_only_the_age_checks_are_waived() {
    // verify.json
    let hello = "gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==";
    assert_eq!(decrypt(SPEC_KEY, hello), Ok(b"hello".to_vec()));
    // invalid.json, refused for what the token is.
    for (desc, token, want) in [
        (
            "incorrect mac",
            "gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAl1-szkFVzXTuGb4hR8AKtwcaX1YdykQUFBQUFBQUFBQQ==",
            FernetError::WrongKeyOrDamaged,
        ),
        ("too short", "gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPA==", FernetError::Malformed),
        (
            "invalid base64",
            "%%%%%%%%%%%%%AECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAl1-szkFVzXTuGb4hR8AKtwcaX1YdykRtfsH-p1YsUD2Q==",
            FernetError::Malformed,
        ),
        (
            "payload size not multiple of block size",
            "gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPOm73QeoCk9uGib28Xe5vz6oxq5nmxbx_v7mrfyudzUm",
            FernetError::Malformed,
        ),
    ] {
        assert_eq!(decrypt(SPEC_KEY, token), Err(want), "{desc}");
    }
    // invalid.json only for their age ("far-future TS", "expired TTL"): key
    // material does not expire, so these decrypt (to the empty plaintext, as
    // `cryptography` reads them with the age check skipped).
    for token in [
        "gAAAAAAdwStRAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAnja1xKYyhd-Y6mSkTOyTGJmw2Xc2a6kBd-iX9b_qXQcw==",
        "gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0OD3HkMATM5lFqGaerZ-fWPAl1-szkFVzXTuGb4hR8AKtwcaX1YdykRtfsH-p1YsUD2Q==",
    ] {
        assert_eq!(decrypt(SPEC_KEY, token), Ok(Vec::new()), "{token}");
    }
}
