//! `PUT /boot-source`: the guest image and its command line.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Longest `boot_args` accepted (ember-vmm appends its own parameters).
pub const MAX_BOOT_ARGS: usize = 2048;

/// The body of `PUT /boot-source`, as Firecracker defines it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    /// Host path of the guest image: an x86-64 ELF (vmlinux-style).
    pub kernel_image_path: String,
    /// An initial ramdisk: not supported (the Ember guest has no use for one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// The guest command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// Why a boot source was refused.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BootSourceError {
    /// Cannot open kernel_image_path {path}: {source}
    Open {
        /// The path given.
        path: PathBuf,
        /// The error from open(2).
        source: std::io::Error,
    },
    /// kernel_image_path {path} is not an ELF kernel: {reason}
    NotElf {
        /// The path given.
        path: PathBuf,
        /// What is wrong with its header.
        reason: &'static str,
    },
    /// initrd_path is not supported by ember-vmm: the Ember guest boots without one
    InitrdUnsupported,
    /// boot_args is {len} bytes long; at most {max} are accepted
    BootArgsTooLong {
        /// Length given.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// boot_args must be printable ASCII without NUL bytes
    BootArgsNotPrintable,
}

/// A validated boot source: the image file is open and looks like an
/// x86-64 ELF executable.
#[derive(Debug)]
pub struct BootSource {
    /// What was asked for.
    pub config: BootSourceConfig,
    /// The image, open for loading.
    pub kernel_file: File,
}

impl BootSource {
    /// Opens and checks the image named in `config`.
    pub fn new(config: BootSourceConfig) -> Result<BootSource, BootSourceError> {
        if config.initrd_path.is_some() {
            return Err(BootSourceError::InitrdUnsupported);
        }
        if let Some(args) = &config.boot_args {
            if args.len() > MAX_BOOT_ARGS {
                return Err(BootSourceError::BootArgsTooLong {
                    len: args.len(),
                    max: MAX_BOOT_ARGS,
                });
            }
            if !args.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                return Err(BootSourceError::BootArgsNotPrintable);
            }
        }
        let path = PathBuf::from(&config.kernel_image_path);
        let mut kernel_file = File::open(&path).map_err(|source| BootSourceError::Open {
            path: path.clone(),
            source,
        })?;
        let mut header = [0u8; 64];
        let read =
            read_up_to(&mut kernel_file, &mut header).map_err(|source| BootSourceError::Open {
                path: path.clone(),
                source,
            })?;
        check_elf_header(&header[..read])
            .map_err(|reason| BootSourceError::NotElf { path, reason })?;
        Ok(BootSource {
            config,
            kernel_file,
        })
    }
}

/// Reads until `buf` is full or the file ends.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        match file.read(&mut buf[total..])? {
            0 => break,
            n => total += n,
        }
    }
    Ok(total)
}

/// Checks the ELF identification and machine of a 64-byte ELF header.
fn check_elf_header(header: &[u8]) -> Result<(), &'static str> {
    const ET_EXEC: u16 = 2;
    const EM_X86_64: u16 = 62;
    if header.len() < 64 {
        return Err("the file is shorter than an ELF header");
    }
    if header[0..4] != *b"\x7fELF" {
        return Err("no ELF magic at the start of the file");
    }
    if header[4] != 2 {
        return Err("not a 64-bit ELF (EI_CLASS)");
    }
    if header[5] != 1 {
        return Err("not little-endian (EI_DATA)");
    }
    if u16::from_le_bytes([header[16], header[17]]) != ET_EXEC {
        return Err("not an executable (e_type is not ET_EXEC)");
    }
    if u16::from_le_bytes([header[18], header[19]]) != EM_X86_64 {
        return Err("not built for x86-64 (e_machine)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_header() -> [u8; 64] {
        let mut h = [0u8; 64];
        h[0..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[16] = 2;
        h[18] = 62;
        h
    }

    #[test]
    fn accepts_x86_64_executable() {
        assert_eq!(check_elf_header(&elf_header()), Ok(()));
    }

    #[test]
    fn refuses_other_files() {
        assert!(check_elf_header(b"#!/bin/sh\n").is_err());
        let mut h = elf_header();
        h[0] = b'X';
        assert_eq!(
            check_elf_header(&h),
            Err("no ELF magic at the start of the file")
        );
        let mut h = elf_header();
        h[4] = 1;
        assert!(check_elf_header(&h).is_err());
        let mut h = elf_header();
        h[18] = 183; // aarch64
        assert_eq!(
            check_elf_header(&h),
            Err("not built for x86-64 (e_machine)")
        );
        let mut h = elf_header();
        h[16] = 3; // ET_DYN
        assert!(check_elf_header(&h).is_err());
    }

    #[test]
    fn refuses_missing_file_and_bad_args() {
        let missing = BootSourceConfig {
            kernel_image_path: "/nonexistent/ember-guest".into(),
            initrd_path: None,
            boot_args: None,
        };
        let err = BootSource::new(missing).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ember-guest"), "{err}");
        assert!(err.contains("No such file"), "{err}");

        let initrd = BootSourceConfig {
            kernel_image_path: "/dev/null".into(),
            initrd_path: Some("/x".into()),
            boot_args: None,
        };
        assert!(matches!(
            BootSource::new(initrd),
            Err(BootSourceError::InitrdUnsupported)
        ));

        let long = BootSourceConfig {
            kernel_image_path: "/dev/null".into(),
            initrd_path: None,
            boot_args: Some("a".repeat(MAX_BOOT_ARGS + 1)),
        };
        assert!(matches!(
            BootSource::new(long),
            Err(BootSourceError::BootArgsTooLong { .. })
        ));

        let not_elf = BootSourceConfig {
            kernel_image_path: "/dev/null".into(),
            initrd_path: None,
            boot_args: Some("console=ttyS0".into()),
        };
        let err = BootSource::new(not_elf).unwrap_err().to_string();
        assert!(err.contains("is not an ELF kernel"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let parsed: Result<BootSourceConfig, _> =
            serde_json::from_str(r#"{"kernel_image_path": "/k", "kernel_path": "/k"}"#);
        assert!(parsed.is_err());
    }
}
