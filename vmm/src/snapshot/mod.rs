//! Snapshot files: the checked container every state file uses, the
//! [`Persist`] trait, and guest memory files ([`memory`]).
//!
//! A container (docs/snapshot-format.md):
//!
//! ```text
//! offset  size  field
//! 0       8     magic: the file kind and the architecture ("EMBRSx86": state)
//! 8       2     format major version (little-endian)
//! 10      2     format minor version
//! 12      4     reserved, zero
//! 16      8     payload length n
//! 24      n     payload: postcard
//! 24+n    4     CRC-32 (IEEE, crc32fast) of bytes 0 .. 24+n
//! ```
//!
//! A reader refuses another major version or a newer minor one, caps the
//! payload before reading it, and checks the length and the checksum before
//! decoding. Everything is checked before anything is touched.

pub mod memory;

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Magic of a snapshot state file on x86_64.
pub const STATE_MAGIC: [u8; 8] = *b"EMBRSx86";
/// Magic of a working-set file on x86_64 (see [`memory::WorkingSet`]).
pub const WORKING_SET_MAGIC: [u8; 8] = *b"EMBRWx86";

/// The container format's major version: a reader refuses any other.
/// 2: a state file names its memory layers by file name, in its own
/// directory (1 recorded absolute paths).
pub const FORMAT_MAJOR: u16 = 2;
/// The container format's minor version: a reader refuses a newer one
/// (added fields it would not understand), reads older ones.
pub const FORMAT_MINOR: u16 = 0;

/// The largest payload a reader accepts (a state file is a few KiB per
/// vCPU; this bounds what a corrupt length field can make us allocate).
pub const MAX_PAYLOAD: u64 = 16 << 20;

const HEADER_LEN: usize = 24;
const CHECKSUM_LEN: usize = 4;

/// What survives a snapshot. The state is a plain serde struct, separate
/// from the live object; what is not in the file (guest memory, file
/// descriptors) comes in as constructor arguments. Nothing live is ever
/// serialised.
pub trait Persist<'a>: Sized {
    /// The saved form.
    type State;
    /// What restoring needs besides the state.
    type ConstructorArgs;
    /// Why a restore failed.
    type Error;
    /// The object's state, to be saved.
    fn save(&self) -> Self::State;
    /// The object, rebuilt from `state`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Errors reading or writing a container file.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SnapshotFileError {
    /// cannot read {path}: {source}
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// {path} is not a regular file
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// {path} is {len} bytes: too short for a {what} (truncated?)
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// What kind of file.
        what: &'static str,
    },
    /// {path} is not an Ember {what} for x86_64 (magic {found:?})
    Magic {
        /// The file.
        path: PathBuf,
        /// What kind of file.
        what: &'static str,
        /// The magic found, lossily as text.
        found: String,
    },
    /// {path} has format version {major}.{minor}; this ember-vmm reads {reads_major}.0 to {reads_major}.{reads_minor}
    Version {
        /// The file.
        path: PathBuf,
        /// Its major version.
        major: u16,
        /// Its minor version.
        minor: u16,
        /// [`FORMAT_MAJOR`].
        reads_major: u16,
        /// [`FORMAT_MINOR`].
        reads_minor: u16,
    },
    /// {path} is {len} bytes, larger than any {what} can be ({limit}): the wrong file?
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The largest valid file.
        limit: u64,
        /// What kind of file.
        what: &'static str,
    },
    /// {path} declares a payload of {declared} bytes, over the limit of {limit} (corrupt?)
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The declared length.
        declared: u64,
        /// [`MAX_PAYLOAD`].
        limit: u64,
    },
    /// {path} declares a payload of {declared} bytes but the file holds {actual} (truncated or corrupt)
    Length {
        /// The file.
        path: PathBuf,
        /// The declared payload length.
        declared: u64,
        /// The payload bytes present.
        actual: u64,
    },
    /// {path} is corrupt: its checksum is {stored:#010x}, its contents sum to {computed:#010x}
    Checksum {
        /// The file.
        path: PathBuf,
        /// The checksum in the file.
        stored: u32,
        /// The checksum of what is there.
        computed: u32,
    },
    /// {path} passed its checksum but its state cannot be decoded (written by an incompatible build?): {source}
    Decode {
        /// The file.
        path: PathBuf,
        /// What postcard reported.
        source: postcard::Error,
    },
    /// cannot encode the state: {0}
    Encode(postcard::Error),
    /// cannot write {path}: {source}
    Write {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// Encodes `value` into a container with `magic`.
pub fn encode<T: Serialize>(magic: [u8; 8], value: &T) -> Result<Vec<u8>, SnapshotFileError> {
    let payload = postcard::to_allocvec(value).map_err(SnapshotFileError::Encode)?;
    Ok(wrap_payload(magic, &payload))
}

/// A container with `magic` around `payload` as it is (this format's
/// version, the length, the checksum).
pub fn wrap_payload(magic: [u8; 8], payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len() + CHECKSUM_LEN);
    bytes.extend_from_slice(&magic);
    bytes.extend_from_slice(&FORMAT_MAJOR.to_le_bytes());
    bytes.extend_from_slice(&FORMAT_MINOR.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(payload);
    let checksum = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    bytes
}

/// Checks a container read from `path` and decodes its payload.
pub fn decode<T: DeserializeOwned>(
    magic: [u8; 8],
    what: &'static str,
    path: &Path,
    bytes: &[u8],
) -> Result<T, SnapshotFileError> {
    let path_buf = || path.to_path_buf();
    if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(SnapshotFileError::TooShort {
            path: path_buf(),
            len: bytes.len() as u64,
            what,
        });
    }
    if bytes[..8] != magic {
        return Err(SnapshotFileError::Magic {
            path: path_buf(),
            what,
            found: String::from_utf8_lossy(&bytes[..8]).into_owned(),
        });
    }
    let major = u16::from_le_bytes([bytes[8], bytes[9]]);
    let minor = u16::from_le_bytes([bytes[10], bytes[11]]);
    if major != FORMAT_MAJOR || minor > FORMAT_MINOR {
        return Err(SnapshotFileError::Version {
            path: path_buf(),
            major,
            minor,
            reads_major: FORMAT_MAJOR,
            reads_minor: FORMAT_MINOR,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let declared = u64::from_le_bytes(len);
    if declared > MAX_PAYLOAD {
        return Err(SnapshotFileError::TooLarge {
            path: path_buf(),
            declared,
            limit: MAX_PAYLOAD,
        });
    }
    let actual = (bytes.len() - HEADER_LEN - CHECKSUM_LEN) as u64;
    if declared != actual {
        return Err(SnapshotFileError::Length {
            path: path_buf(),
            declared,
            actual,
        });
    }
    let end = HEADER_LEN + declared as usize;
    let mut stored = [0u8; 4];
    stored.copy_from_slice(&bytes[end..end + CHECKSUM_LEN]);
    let stored = u32::from_le_bytes(stored);
    let computed = crc32fast::hash(&bytes[..end]);
    if stored != computed {
        return Err(SnapshotFileError::Checksum {
            path: path_buf(),
            stored,
            computed,
        });
    }
    postcard::from_bytes(&bytes[HEADER_LEN..end]).map_err(|source| SnapshotFileError::Decode {
        path: path_buf(),
        source,
    })
}

/// Reads a container file, refusing one larger than any valid container
/// before reading it.
pub fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, SnapshotFileError> {
    let read = |source| SnapshotFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    // Not blocking on a FIFO: it is refused just below.
    let (file, meta) = crate::files::open_nonblocking(path).map_err(read)?;
    if !meta.is_file() {
        return Err(SnapshotFileError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let max = (HEADER_LEN + CHECKSUM_LEN) as u64 + MAX_PAYLOAD;
    if meta.len() > max {
        return Err(SnapshotFileError::FileTooLarge {
            path: path.to_path_buf(),
            len: meta.len(),
            limit: max,
            what,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(file, max + 1), &mut bytes)
        .map_err(read)?;
    if bytes.is_empty() {
        return Err(SnapshotFileError::TooShort {
            path: path.to_path_buf(),
            len: 0,
            what,
        });
    }
    Ok(bytes)
}

/// A file written beside its final name and renamed into place by
/// [`PendingFile::commit`]; removed if dropped before that. A snapshot's
/// files are all written first and renamed last, so a failure on the way
/// changes no file under its final name — and a file that VMs map is
/// replaced, never rewritten under them.
pub struct PendingFile {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl PendingFile {
    /// Creates the temporary file for `path`: `<path>.tmp<pid>`.
    pub fn create(path: &Path) -> std::io::Result<(std::fs::File, PendingFile)> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let file = std::fs::File::create(&tmp)?;
        Ok((
            file,
            PendingFile {
                tmp,
                path: path.to_path_buf(),
                committed: false,
            },
        ))
    }

    /// The final name.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the file into place.
    pub fn commit(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.tmp, &self.path)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` beside `path` and syncs them; [`PendingFile::commit`]
/// puts them in place.
pub fn write_pending(path: &Path, bytes: &[u8]) -> Result<PendingFile, SnapshotFileError> {
    let write = |source| SnapshotFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let (mut file, pending) = PendingFile::create(path).map_err(write)?;
    file.write_all(bytes).map_err(write)?;
    file.sync_all().map_err(write)?;
    Ok(pending)
}

/// Writes `bytes` to `path` durably: beside it, synced, renamed into place.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), SnapshotFileError> {
    write_pending(path, bytes)?
        .commit()
        .map_err(|source| SnapshotFileError::Write {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        a: u64,
        b: Vec<u8>,
        c: String,
    }

    fn sample() -> Sample {
        Sample {
            a: 0x1234_5678_9abc,
            b: vec![1, 2, 3, 250],
            c: "state".into(),
        }
    }

    fn decode_sample(bytes: &[u8]) -> Result<Sample, SnapshotFileError> {
        decode(STATE_MAGIC, "snapshot", Path::new("s"), bytes)
    }

    #[test]
    fn round_trip() {
        let bytes = encode(STATE_MAGIC, &sample()).unwrap();
        assert_eq!(decode_sample(&bytes).unwrap(), sample());
    }

    #[test]
    fn truncated_is_refused_with_lengths() {
        let bytes = encode(STATE_MAGIC, &sample()).unwrap();
        let err = decode_sample(&bytes[..bytes.len() - 3]).unwrap_err();
        assert!(matches!(err, SnapshotFileError::Length { .. }), "{err}");
        let err = decode_sample(&bytes[..10]).unwrap_err();
        assert!(matches!(err, SnapshotFileError::TooShort { .. }), "{err}");
    }

    #[test]
    fn bit_flip_is_caught_by_the_checksum() {
        let mut bytes = encode(STATE_MAGIC, &sample()).unwrap();
        bytes[HEADER_LEN + 2] ^= 0x10;
        let err = decode_sample(&bytes).unwrap_err();
        assert!(matches!(err, SnapshotFileError::Checksum { .. }), "{err}");
    }

    #[test]
    fn other_major_and_newer_minor_are_refused() {
        let mut bytes = encode(STATE_MAGIC, &sample()).unwrap();
        bytes[8] = (FORMAT_MAJOR + 1) as u8;
        assert!(matches!(
            decode_sample(&bytes).unwrap_err(),
            SnapshotFileError::Version { major, .. } if major == FORMAT_MAJOR + 1
        ));
        let mut bytes = encode(STATE_MAGIC, &sample()).unwrap();
        bytes[8] = (FORMAT_MAJOR - 1) as u8;
        assert!(matches!(
            decode_sample(&bytes).unwrap_err(),
            SnapshotFileError::Version { .. }
        ));
        let mut bytes = encode(STATE_MAGIC, &sample()).unwrap();
        bytes[10] = (FORMAT_MINOR + 1) as u8;
        assert!(matches!(
            decode_sample(&bytes).unwrap_err(),
            SnapshotFileError::Version { .. }
        ));
    }

    #[test]
    fn a_payload_of_another_shape_is_a_decode_error() {
        // A valid container whose payload is not a `Sample`.
        let bytes = encode(STATE_MAGIC, &(1u8,)).unwrap();
        let err = decode_sample(&bytes).unwrap_err();
        assert!(matches!(err, SnapshotFileError::Decode { .. }), "{err}");
    }

    #[test]
    fn read_file_refuses_what_is_no_container() {
        let dir = std::env::temp_dir().join(format!("ember-readfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            read_file(&empty, "state").unwrap_err(),
            SnapshotFileError::TooShort { .. }
        ));
        let big = dir.join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_PAYLOAD + 64)
            .unwrap();
        assert!(matches!(
            read_file(&big, "state").unwrap_err(),
            SnapshotFileError::FileTooLarge { .. }
        ));
        assert!(matches!(
            read_file(&dir, "state").unwrap_err(),
            SnapshotFileError::NotAFile { .. }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wrong_magic_and_oversized_payload_are_refused() {
        let bytes = encode(WORKING_SET_MAGIC, &sample()).unwrap();
        assert!(matches!(
            decode_sample(&bytes).unwrap_err(),
            SnapshotFileError::Magic { .. }
        ));
        let mut bytes = encode(STATE_MAGIC, &sample()).unwrap();
        bytes[16..24].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            decode_sample(&bytes).unwrap_err(),
            SnapshotFileError::TooLarge { .. }
        ));
    }
}
