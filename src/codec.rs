//! Fixed-width little-endian fields for the binary records kept in shared
//! data: a [`Writer`] that appends them, and a [`Reader`] that takes them
//! back in the same order and answers `None` when the bytes run out, never
//! panicking on any input.
//!
//! Fields: `u8`, `u32`, `u64` and `f64` (little-endian), a decimal as the 16
//! bytes of `Decimal::serialize`, and a short string as a `u8` length then
//! at most 255 bytes (longer strings are cut at 255 bytes; the reader
//! replaces bytes that are not UTF-8).

use rust_decimal::Decimal;

/// Appends fields to a record.
#[derive(Debug, Default)]
pub struct Writer(Vec<u8>);

impl Writer {
    pub fn with_capacity(n: usize) -> Writer {
        Writer(Vec::with_capacity(n))
    }

    fn put(&mut self, b: &[u8]) -> &mut Writer {
        self.0.extend_from_slice(b);
        self
    }

    pub fn u8(&mut self, v: u8) -> &mut Writer {
        self.put(&[v])
    }

    pub fn u32(&mut self, v: u32) -> &mut Writer {
        self.put(&v.to_le_bytes())
    }

    pub fn u64(&mut self, v: u64) -> &mut Writer {
        self.put(&v.to_le_bytes())
    }

    pub fn f64(&mut self, v: f64) -> &mut Writer {
        self.put(&v.to_le_bytes())
    }

    pub fn decimal(&mut self, v: Decimal) -> &mut Writer {
        self.put(&v.serialize())
    }

    /// A `u8` length and the string's first 255 bytes at most.
    pub fn short_str(&mut self, s: &str) -> &mut Writer {
        let b = s.as_bytes().get(..255).unwrap_or(s.as_bytes());
        self.u8(b.len() as u8).put(b)
    }

    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// Takes fields from the front of a record; a field that does not fit in
/// what is left is `None` and takes nothing.
#[derive(Debug)]
pub struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b, at: 0 }
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let w = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(w)
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    pub fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }

    pub fn f64(&mut self) -> Option<f64> {
        self.take().map(f64::from_le_bytes)
    }

    /// `Decimal::deserialize` masks the flags it does not know.
    pub fn decimal(&mut self) -> Option<Decimal> {
        self.take().map(Decimal::deserialize)
    }

    pub fn short_str(&mut self) -> Option<String> {
        let n = self.u8()?;
        let s = self.bytes(usize::from(n))?;
        Some(String::from_utf8_lossy(s).into_owned())
    }
}

/// Test helpers: bytes as lowercase hex and back.
#[cfg(test)]
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Asserts that `encoded` is `pinned` (hex); returns the pinned bytes, for
/// the decoder.
#[cfg(test)]
pub(crate) fn pinned(encoded: &[u8], pinned: &str) -> Vec<u8> {
    assert_eq!(hex(encoded), pinned, "the bytes of a shared-data record changed");
    unhex(pinned)
}

#[cfg(test)]
pub(crate) fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    let nibble = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
    digits.chunks(2).map(|p| (nibble(p[0]) << 4) | nibble(p[1])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn fields_are_little_endian_and_read_back_in_order() {
        let d = Decimal::from_str("-12.5").unwrap_or_else(|e| panic!("{e}"));
        let mut w = Writer::default();
        w.u8(7).u32(0x0102_0304).u64(u64::MAX - 1).f64(0.5).decimal(d).short_str("hé");
        let b = w.finish();
        assert_eq!(
            hex(&b),
            concat!(
                "07",
                "04030201",
                "feffffffffffffff",
                "000000000000e03f",
                "00000180", // flags: negative, scale 1
                "7d000000", // lo: 125
                "00000000", // mid
                "00000000", // hi
                "03",
                "68c3a9",
            )
        );
        assert_eq!(unhex(&hex(&b)), b);
        let mut r = Reader::new(&b);
        assert_eq!(r.u8(), Some(7));
        assert_eq!(r.u32(), Some(0x0102_0304));
        assert_eq!(r.u64(), Some(u64::MAX - 1));
        assert_eq!(r.f64(), Some(0.5));
        assert_eq!(r.decimal(), Some(d));
        assert_eq!(r.short_str().as_deref(), Some("hé"));
        assert_eq!(r.u8(), None, "nothing left");
    }

    #[test]
    fn short_strings_are_cut_at_255_bytes_and_read_lossily() {
        let mut w = Writer::default();
        w.short_str(&"x".repeat(300));
        let b = w.finish();
        assert_eq!((b.len(), b[0]), (256, 255));
        assert_eq!(Reader::new(&b).short_str(), Some("x".repeat(255)));
        assert_eq!(Reader::new(&[2, 0xff, b'a']).short_str().as_deref(), Some("\u{fffd}a"));
    }

    #[test]
    fn a_field_that_does_not_fit_is_none_and_takes_nothing() {
        let b = [1u8, 2, 3, 4, 5];
        let mut r = Reader::new(&b);
        assert_eq!(r.u64(), None);
        assert_eq!(r.u32(), Some(0x0403_0201));
        assert_eq!((r.u32(), r.decimal(), r.f64()), (None, None, None));
        assert_eq!(r.u8(), Some(5));
        assert_eq!(r.u8(), None);
        assert_eq!(Reader::new(&[4, b'a']).short_str(), None, "length past the end");
        assert_eq!(Reader::new(&[]).short_str(), None);
        // Any input: every read ends in None, never a panic.
        for len in 0..40 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let mut r = Reader::new(&junk);
            while r.short_str().is_some() || r.u64().is_some() || r.decimal().is_some() || r.u8().is_some() {}
        }
    }
}
