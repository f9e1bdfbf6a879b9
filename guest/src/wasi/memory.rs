//! Bounds-checked access to a function's linear memory: every pointer a
//! function passes is checked before use; a bad one is `EFAULT`, never a
//! fault of the runtime.

/// A pointer or length outside the linear memory.
#[derive(Debug, Clone, Copy)]
pub struct MemoryError;

impl From<MemoryError> for i32 {
    fn from(_: MemoryError) -> i32 {
        super::errno::FAULT
    }
}

/// A function's linear memory.
pub struct Guest<'a> {
    bytes: &'a mut [u8],
}

impl<'a> Guest<'a> {
    /// Memory over `bytes`.
    pub fn new(bytes: &'a mut [u8]) -> Guest<'a> {
        Guest { bytes }
    }

    fn range(&self, at: u32, len: u32) -> Result<core::ops::Range<usize>, MemoryError> {
        let start = at as usize;
        let end = start.checked_add(len as usize).ok_or(MemoryError)?;
        if end > self.bytes.len() {
            return Err(MemoryError);
        }
        Ok(start..end)
    }

    /// Checks that `len` bytes at `at` lie in memory. A record checked
    /// whole can then be written field by field: `at + offset` within it
    /// cannot wrap.
    pub fn check(&self, at: u32, len: u32) -> Result<(), MemoryError> {
        self.range(at, len).map(|_| ())
    }

    /// `len` bytes at `at`.
    pub fn slice(&self, at: u32, len: u32) -> Result<&[u8], MemoryError> {
        let range = self.range(at, len)?;
        Ok(&self.bytes[range])
    }

    /// `len` bytes at `at`, writable.
    pub fn slice_mut(&mut self, at: u32, len: u32) -> Result<&mut [u8], MemoryError> {
        let range = self.range(at, len)?;
        Ok(&mut self.bytes[range])
    }

    /// Copies `data` to `at`.
    pub fn write_bytes(&mut self, at: u32, data: &[u8]) -> Result<(), MemoryError> {
        let len = u32::try_from(data.len()).map_err(|_| MemoryError)?;
        self.slice_mut(at, len)?.copy_from_slice(data);
        Ok(())
    }

    fn read<const N: usize>(&self, at: u32) -> Result<[u8; N], MemoryError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.slice(at, N as u32)?);
        Ok(out)
    }

    /// A byte.
    pub fn read_u8(&self, at: u32) -> Result<u8, MemoryError> {
        Ok(self.read::<1>(at)?[0])
    }

    /// A little-endian `u16`.
    pub fn read_u16(&self, at: u32) -> Result<u16, MemoryError> {
        Ok(u16::from_le_bytes(self.read(at)?))
    }

    /// A little-endian `u32`.
    pub fn read_u32(&self, at: u32) -> Result<u32, MemoryError> {
        Ok(u32::from_le_bytes(self.read(at)?))
    }

    /// A little-endian `u64`.
    pub fn read_u64(&self, at: u32) -> Result<u64, MemoryError> {
        Ok(u64::from_le_bytes(self.read(at)?))
    }

    /// Writes a byte.
    pub fn write_u8(&mut self, at: u32, value: u8) -> Result<(), MemoryError> {
        self.write_bytes(at, &[value])
    }

    /// Writes a little-endian `u16`.
    pub fn write_u16(&mut self, at: u32, value: u16) -> Result<(), MemoryError> {
        self.write_bytes(at, &value.to_le_bytes())
    }

    /// Writes a little-endian `u32`.
    pub fn write_u32(&mut self, at: u32, value: u32) -> Result<(), MemoryError> {
        self.write_bytes(at, &value.to_le_bytes())
    }

    /// Writes a little-endian `u64`.
    pub fn write_u64(&mut self, at: u32, value: u64) -> Result<(), MemoryError> {
        self.write_bytes(at, &value.to_le_bytes())
    }

    /// Checks an iovec array of `count` entries (8 bytes each) at `at`;
    /// then [`Guest::iovec`] reads its entries without wrapping.
    pub fn check_iovecs(&self, at: u32, count: u32) -> Result<(), MemoryError> {
        self.check(at, count.checked_mul(8).ok_or(MemoryError)?)
    }

    /// Entry `i` of an iovec array checked by [`Guest::check_iovecs`]: the
    /// buffer's address and length.
    pub fn iovec(&self, at: u32, i: u32) -> Result<(u32, u32), MemoryError> {
        Ok((self.read_u32(at + 8 * i)?, self.read_u32(at + 8 * i + 4)?))
    }
}
