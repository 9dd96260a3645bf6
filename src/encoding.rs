//! Base64, over the `base64` crate: the lenient decoder that Fernet keys and
//! tokens and etcd's answers go through, and the standard encoder etcd's JSON
//! gateway expects.

use base64::alphabet::STANDARD;
use base64::engine::general_purpose::{self, GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;

/// The standard alphabet, no padding, and no stray bits after the last byte.
const UNPADDED: GeneralPurpose = GeneralPurpose::new(
    &STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::RequireNone),
);

/// Decodes standard or URL-safe base64, padding optional.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let standard: String = s
        .trim()
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    UNPADDED.decode(standard).ok()
}

/// Standard base64 with padding (etcd's JSON gateway encodes bytes so).
pub fn base64_encode(b: &[u8]) -> String {
    general_purpose::STANDARD.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_accepts_both_alphabets_and_rejects_garbage() {
        assert_eq!(base64_decode("aGVsbG8="), Some(b"hello".to_vec()));
        assert_eq!(base64_decode("aGVsbG8"), Some(b"hello".to_vec()));
        assert_eq!(base64_decode("-_8"), Some(vec![0xfb, 0xff]));
        assert_eq!(base64_decode("a"), None);
        assert_eq!(base64_decode("a*b="), None);
    }

    #[test]
    fn base64_matches_the_standard_alphabet_with_padding() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"/apikeyrouter/"), "L2FwaWtleXJvdXRlci8=");
        assert_eq!(base64_decode(&base64_encode(&[0xfb, 0xff, 0x00])), Some(vec![0xfb, 0xff, 0x00]));
    }
}
