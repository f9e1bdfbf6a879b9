//! Opening files the VMM thread reads (modules, snapshot files): never
//! blocking on it.

use std::fs::{File, Metadata};
use std::path::Path;

/// Opens `path` for reading without blocking (a FIFO would otherwise wait
/// for a writer); returns it with its metadata, for the caller to check
/// that it is a regular file of an acceptable size before reading.
pub fn open_nonblocking(path: &Path) -> std::io::Result<(File, Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    Ok((file, meta))
}
