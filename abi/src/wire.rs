//! A small length-checked wire format: little-endian integers and
//! `u32`-length-prefixed byte strings, read with every bound checked.
//!
//! Used for the payloads of `load` and of invocation outcomes. The host
//! decodes what the guest wrote as hostile input: [`Reader`] never reads
//! past its slice, never allocates from a length it was given, and says
//! which field was wrong.

use alloc::vec::Vec;

/// A payload that does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireError {
    /// The field being read.
    pub field: &'static str,
    /// Its offset in the payload.
    pub offset: usize,
}

impl core::fmt::Display for WireError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "truncated or malformed {} at byte {}",
            self.field, self.offset
        )
    }
}

/// Appends fields to a byte vector.
#[derive(Debug, Default)]
pub struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    /// An empty payload with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Writer {
        Writer {
            bytes: Vec::with_capacity(capacity),
        }
    }

    /// Appends a `u32`.
    pub fn u32(&mut self, value: u32) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// Appends a `u64`.
    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// Appends a `u32` length, then the bytes. Slices longer than `u32::MAX`
    /// are the caller's bug; they are cut at `u32::MAX`.
    pub fn bytes(&mut self, value: &[u8]) -> &mut Self {
        let len = value.len().min(u32::MAX as usize);
        self.u32(len as u32);
        self.bytes.extend_from_slice(&value[..len]);
        self
    }

    /// Appends bytes as they are (a fixed-size field).
    pub fn raw(&mut self, value: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(value);
        self
    }

    /// The payload.
    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

/// Reads fields from a payload, checking every bound.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `data`.
    pub fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        let error = WireError {
            field,
            offset: self.pos,
        };
        let end = self.pos.checked_add(len).ok_or(error)?;
        let slice = self.data.get(self.pos..end).ok_or(error)?;
        self.pos = end;
        Ok(slice)
    }

    /// Reads a `u32`.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        let raw = self.take(4, field)?;
        Ok(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
    }

    /// Reads a `u64`.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        let raw = self.take(8, field)?;
        let mut le = [0u8; 8];
        le.copy_from_slice(raw);
        Ok(u64::from_le_bytes(le))
    }

    /// Reads a `u32`-length-prefixed byte string.
    pub fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], WireError> {
        let len = self.u32(field)? as usize;
        self.take(len, field)
    }

    /// Reads `len` bytes as they are.
    pub fn slice(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        self.take(len, field)
    }

    /// Reads `N` bytes as they are.
    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let raw = self.take(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(raw);
        Ok(out)
    }

    /// Reads a count of items that each take at least `min_item` bytes; a
    /// count the remaining bytes cannot hold is refused before anything is
    /// allocated for it.
    pub fn count(&mut self, field: &'static str, min_item: usize) -> Result<usize, WireError> {
        let at = self.pos;
        let count = self.u32(field)? as usize;
        if count.saturating_mul(min_item.max(1)) > self.remaining() {
            return Err(WireError { field, offset: at });
        }
        Ok(count)
    }

    /// Checks that nothing is left.
    pub fn end(&self, field: &'static str) -> Result<(), WireError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(WireError {
                field,
                offset: self.pos,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn round_trip() {
        let mut w = Writer::default();
        w.u32(7)
            .u64(u64::MAX)
            .bytes(b"hello")
            .bytes(b"")
            .raw(&[1, 2]);
        let bytes = w.finish();
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u32("a"), Ok(7));
        assert_eq!(r.u64("b"), Ok(u64::MAX));
        assert_eq!(r.bytes("c"), Ok(&b"hello"[..]));
        assert_eq!(r.bytes("d"), Ok(&b""[..]));
        assert_eq!(r.array::<2>("e"), Ok([1, 2]));
        assert_eq!(r.end("end"), Ok(()));
    }

    #[test]
    fn refuses_lengths_past_the_end() {
        let mut w = Writer::default();
        w.u32(1000).raw(b"short");
        let bytes = w.finish();
        let err = Reader::new(&bytes).bytes("module").unwrap_err();
        assert_eq!(
            err,
            WireError {
                field: "module",
                offset: 4
            }
        );
        assert_eq!(err.to_string(), "truncated or malformed module at byte 4");
        assert!(Reader::new(&[1, 2, 3]).u32("x").is_err());
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff]);
        assert!(r.count("files", 8).is_err());
        assert!(Reader::new(&[1]).end("tail").is_err());
    }
}
