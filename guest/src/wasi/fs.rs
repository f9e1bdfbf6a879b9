//! File descriptors: stdin, stdout, stderr, and the read-only preopened
//! directory `/var/task` (descriptor 3) with the files shipped beside the
//! module, flat (no subdirectories). Writes, creation and removal under it
//! are `ENOTCAPABLE`; unknown descriptors are `EBADF`.

use alloc::vec::Vec;

use ember_abi::function::{MAX_RESULT_BYTES, TASK_DIR};
use wasmtime::{Error, Linker};

use super::memory::Guest;
use super::{errno, with, Ctx, Wasi, MODULE};

/// A file of `/var/task`.
#[derive(Debug)]
pub struct TaskFile {
    /// Its name in the directory.
    pub name: Vec<u8>,
    /// Its contents.
    pub contents: Vec<u8>,
}

/// What a descriptor refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fd {
    /// The event.
    Stdin,
    /// The result.
    Stdout,
    /// The log.
    Stderr,
    /// `/var/task` itself.
    Dir,
    /// A file of `/var/task`, by index, and the read position.
    File { index: usize, pos: u64 },
}

/// The descriptor table.
#[derive(Debug)]
pub struct FdTable {
    slots: Vec<Option<Fd>>,
}

/// The preopened directory's descriptor.
const DIR_FD: u32 = 3;

/// Most descriptors open at once.
const MAX_FDS: usize = 1024;

// File types.
const FILETYPE_CHARACTER_DEVICE: u8 = 2;
const FILETYPE_DIRECTORY: u8 = 3;
const FILETYPE_REGULAR_FILE: u8 = 4;

// `path_open` flags that ask to create or change something.
const OFLAGS_CREAT: u32 = 1;
const OFLAGS_DIRECTORY: u32 = 2;
const OFLAGS_EXCL: u32 = 4;
const OFLAGS_TRUNC: u32 = 8;
// Rights that write.
const RIGHT_FD_WRITE: u64 = 1 << 6;
const RIGHT_FD_ALLOCATE: u64 = 1 << 8;
const RIGHT_FD_FILESTAT_SET_SIZE: u64 = 1 << 22;
const WRITE_RIGHTS: u64 = RIGHT_FD_WRITE | RIGHT_FD_ALLOCATE | RIGHT_FD_FILESTAT_SET_SIZE;
// `fdflags` that write.
const FDFLAGS_APPEND: u32 = 1;
/// Every right: rights are not how access is enforced here.
const ALL_RIGHTS: u64 = (1 << 29) - 1;

impl FdTable {
    /// stdin, stdout, stderr and the directory.
    pub fn new() -> FdTable {
        FdTable {
            slots: alloc::vec![
                Some(Fd::Stdin),
                Some(Fd::Stdout),
                Some(Fd::Stderr),
                Some(Fd::Dir)
            ],
        }
    }

    /// What `fd` refers to.
    pub fn get(&self, fd: u32) -> Option<Fd> {
        self.slots.get(fd as usize).copied().flatten()
    }

    /// `Ok` when `fd` is the directory; `ENOTDIR` or `EBADF` otherwise.
    pub fn dir(&self, fd: u32) -> Result<(), i32> {
        match self.get(fd) {
            Some(Fd::Dir) => Ok(()),
            Some(_) => Err(errno::NOTDIR),
            None => Err(errno::BADF),
        }
    }

    fn set(&mut self, fd: u32, value: Fd) {
        if let Some(slot) = self.slots.get_mut(fd as usize) {
            *slot = Some(value);
        }
    }

    fn open(&mut self, fd: Fd) -> Result<u32, i32> {
        if let Some(free) = self.slots.iter().skip(4).position(Option::is_none) {
            self.slots[free + 4] = Some(fd);
            return Ok((free + 4) as u32);
        }
        if self.slots.len() >= MAX_FDS {
            return Err(errno::MFILE);
        }
        self.slots.push(Some(fd));
        Ok((self.slots.len() - 1) as u32)
    }

    fn close(&mut self, fd: u32) -> Result<(), i32> {
        match self.slots.get_mut(fd as usize) {
            Some(slot @ Some(_)) => {
                *slot = None;
                Ok(())
            }
            _ => Err(errno::BADF),
        }
    }
}

/// The index of the file `path` names under `/var/task`, or the directory itself.
enum Lookup {
    Dir,
    File(usize),
}

fn lookup(files: &[TaskFile], path: &[u8]) -> Result<Lookup, i32> {
    // Accept "name", "./name", "." and "" (the directory); nothing else.
    let path = path.strip_prefix(b"./").unwrap_or(path);
    if path.is_empty() || path == b"." {
        return Ok(Lookup::Dir);
    }
    if path.starts_with(b"/") || path.split(|&b| b == b'/').any(|part| part == b"..") {
        return Err(errno::NOTCAPABLE);
    }
    if path.contains(&b'/') {
        return Err(errno::NOENT);
    }
    files
        .iter()
        .position(|f| f.name == path)
        .map(Lookup::File)
        .ok_or(errno::NOENT)
}

/// Writes a `filestat` (64 bytes) for a file of `size` bytes or the directory.
fn write_filestat(
    g: &mut Guest<'_>,
    at: u32,
    filetype: u8,
    ino: u64,
    size: u64,
) -> Result<(), i32> {
    // Checked whole: the field offsets cannot wrap.
    g.check(at, 64)?;
    g.write_u64(at, 1)?; // dev
    g.write_u64(at + 8, ino)?;
    g.write_u8(at + 16, filetype)?;
    g.write_u64(at + 24, 1)?; // nlink
    g.write_u64(at + 32, size)?;
    g.write_u64(at + 40, 0)?;
    g.write_u64(at + 48, 0)?;
    g.write_u64(at + 56, 0)?;
    Ok(())
}

/// Scatters `data` into the iovecs at `iovs`; returns the bytes written.
fn scatter(g: &mut Guest<'_>, iovs: u32, count: u32, data: &[u8]) -> Result<u32, i32> {
    let mut done = 0usize;
    g.check_iovecs(iovs, count)?;
    for i in 0..count {
        let (buf, len) = g.iovec(iovs, i)?;
        if done == data.len() {
            break;
        }
        let take = (len as usize).min(data.len() - done);
        g.write_bytes(buf, &data[done..done + take])?;
        done += take;
    }
    Ok(done as u32)
}

/// Reads from `fd` at its position (or at `offset`) into the iovecs.
fn read(
    g: &mut Guest<'_>,
    w: &mut Wasi,
    fd: u32,
    iovs: u32,
    count: u32,
    offset: Option<u64>,
) -> Result<u32, i32> {
    match w.fds.get(fd) {
        Some(Fd::Stdin) => {
            if offset.is_some() {
                return Err(errno::SPIPE);
            }
            let n = scatter(g, iovs, count, &w.stdin[w.stdin_pos..])?;
            w.stdin_pos += n as usize;
            Ok(n)
        }
        Some(Fd::File { index, pos }) => {
            let contents = &w.config.files[index].contents;
            let at = offset.unwrap_or(pos).min(contents.len() as u64) as usize;
            let n = scatter(g, iovs, count, &contents[at..])?;
            if offset.is_none() {
                w.fds.set(
                    fd,
                    Fd::File {
                        index,
                        pos: pos + n as u64,
                    },
                );
            }
            Ok(n)
        }
        Some(Fd::Dir) => Err(errno::ISDIR),
        Some(Fd::Stdout | Fd::Stderr) => Err(errno::NOTCAPABLE),
        None => Err(errno::BADF),
    }
}

/// Defines the descriptor and path functions.
pub fn define(linker: &mut Linker<Wasi>) -> Result<(), Error> {
    linker.func_wrap(
        MODULE,
        "fd_write",
        |mut c: Ctx<'_>, fd: u32, iovs: u32, count: u32, nwritten: u32| -> i32 {
            with(&mut c, |g, w| {
                let to_stdout = match w.fds.get(fd) {
                    Some(Fd::Stdout) => true,
                    Some(Fd::Stderr) => false,
                    Some(_) => return Err(errno::NOTCAPABLE),
                    None => return Err(errno::BADF),
                };
                // Every buffer checked before any is taken: a bad one
                // writes nothing.
                g.check_iovecs(iovs, count)?;
                let mut total = 0usize;
                for i in 0..count {
                    let (buf, len) = g.iovec(iovs, i)?;
                    g.check(buf, len)?;
                    total += len as usize;
                }
                if to_stdout && w.stdout.len() + total > MAX_RESULT_BYTES {
                    // Past the result limit: the write is dropped, and the
                    // invocation fails when it ends.
                    w.stdout_overflow = true;
                } else {
                    for i in 0..count {
                        let (buf, len) = g.iovec(iovs, i)?;
                        let data = g.slice(buf, len)?;
                        if to_stdout {
                            w.stdout.extend_from_slice(data);
                        } else {
                            w.stderr.push(data);
                        }
                    }
                }
                g.write_u32(nwritten, total as u32)?;
                Ok(errno::SUCCESS)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_pwrite",
        |mut c: Ctx<'_>, fd: u32, _iovs: u32, _count: u32, _offset: u64, _nwritten: u32| -> i32 {
            with(&mut c, |_, w| match w.fds.get(fd) {
                None => Err(errno::BADF),
                Some(Fd::Stdout | Fd::Stderr) => Err(errno::SPIPE),
                Some(_) => Err(errno::NOTCAPABLE),
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_read",
        |mut c: Ctx<'_>, fd: u32, iovs: u32, count: u32, nread: u32| -> i32 {
            with(&mut c, |g, w| {
                let n = read(g, w, fd, iovs, count, None)?;
                g.write_u32(nread, n)?;
                Ok(errno::SUCCESS)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_pread",
        |mut c: Ctx<'_>, fd: u32, iovs: u32, count: u32, offset: u64, nread: u32| -> i32 {
            with(&mut c, |g, w| {
                let n = read(g, w, fd, iovs, count, Some(offset))?;
                g.write_u32(nread, n)?;
                Ok(errno::SUCCESS)
            })
        },
    )?;
    linker.func_wrap(MODULE, "fd_close", |mut c: Ctx<'_>, fd: u32| -> i32 {
        with(&mut c, |_, w| {
            w.fds.close(fd)?;
            Ok(errno::SUCCESS)
        })
    })?;
    linker.func_wrap(
        MODULE,
        "fd_seek",
        |mut c: Ctx<'_>, fd: u32, offset: i64, whence: u32, newoffset: u32| -> i32 {
            with(&mut c, |g, w| match w.fds.get(fd) {
                Some(Fd::File { index, pos }) => {
                    let size = w.config.files[index].contents.len() as i64;
                    let base = match whence {
                        0 => 0,
                        1 => pos as i64,
                        2 => size,
                        _ => return Err(errno::INVAL),
                    };
                    let new = base.checked_add(offset).ok_or(errno::OVERFLOW)?;
                    if new < 0 {
                        return Err(errno::INVAL);
                    }
                    w.fds.set(
                        fd,
                        Fd::File {
                            index,
                            pos: new as u64,
                        },
                    );
                    g.write_u64(newoffset, new as u64)?;
                    Ok(errno::SUCCESS)
                }
                Some(Fd::Stdin | Fd::Stdout | Fd::Stderr) => Err(errno::SPIPE),
                Some(Fd::Dir) => Err(errno::ISDIR),
                None => Err(errno::BADF),
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_tell",
        |mut c: Ctx<'_>, fd: u32, offset: u32| -> i32 {
            with(&mut c, |g, w| match w.fds.get(fd) {
                Some(Fd::File { pos, .. }) => {
                    g.write_u64(offset, pos)?;
                    Ok(errno::SUCCESS)
                }
                Some(_) => Err(errno::SPIPE),
                None => Err(errno::BADF),
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_get",
        |mut c: Ctx<'_>, fd: u32, stat: u32| -> i32 {
            with(&mut c, |g, w| {
                let filetype = match w.fds.get(fd) {
                    Some(Fd::Stdin | Fd::Stdout | Fd::Stderr) => FILETYPE_CHARACTER_DEVICE,
                    Some(Fd::Dir) => FILETYPE_DIRECTORY,
                    Some(Fd::File { .. }) => FILETYPE_REGULAR_FILE,
                    None => return Err(errno::BADF),
                };
                // An fdstat, 24 bytes, checked whole.
                g.check(stat, 24)?;
                g.write_u8(stat, filetype)?;
                g.write_u8(stat + 1, 0)?;
                g.write_u16(stat + 2, 0)?;
                g.write_u32(stat + 4, 0)?;
                g.write_u64(stat + 8, ALL_RIGHTS)?;
                g.write_u64(stat + 16, ALL_RIGHTS)?;
                Ok(errno::SUCCESS)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_set_flags",
        |mut c: Ctx<'_>, fd: u32, _flags: u32| -> i32 { not_capable(&mut c, fd) },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_set_rights",
        |mut c: Ctx<'_>, fd: u32, _base: u64, _inheriting: u64| -> i32 {
            // Narrowing rights is always allowed (and not how access is enforced).
            is_open(&mut c, fd)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_filestat_get",
        |mut c: Ctx<'_>, fd: u32, stat: u32| -> i32 {
            with(&mut c, |g, w| {
                match w.fds.get(fd) {
                    Some(Fd::File { index, .. }) => {
                        let size = w.config.files[index].contents.len() as u64;
                        write_filestat(g, stat, FILETYPE_REGULAR_FILE, index as u64 + 2, size)?
                    }
                    Some(Fd::Dir) => write_filestat(g, stat, FILETYPE_DIRECTORY, 1, 0)?,
                    Some(_) => write_filestat(g, stat, FILETYPE_CHARACTER_DEVICE, 0, 0)?,
                    None => return Err(errno::BADF),
                }
                Ok(errno::SUCCESS)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_get",
        |mut c: Ctx<'_>, fd: u32, prestat: u32| -> i32 {
            with(&mut c, |g, _| {
                if fd != DIR_FD {
                    return Err(errno::BADF);
                }
                g.check(prestat, 8)?;
                g.write_u32(prestat, 0)?; // tag: directory
                g.write_u32(prestat + 4, TASK_DIR.len() as u32)?;
                Ok(errno::SUCCESS)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_dir_name",
        |mut c: Ctx<'_>, fd: u32, path: u32, len: u32| -> i32 {
            with(&mut c, |g, _| {
                if fd != DIR_FD {
                    return Err(errno::BADF);
                }
                let name = TASK_DIR.as_bytes();
                let n = (len as usize).min(name.len());
                g.write_bytes(path, &name[..n])?;
                Ok(errno::SUCCESS)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_readdir",
        |mut c: Ctx<'_>, fd: u32, buf: u32, len: u32, cookie: u64, used: u32| -> i32 {
            with(&mut c, |g, w| {
                w.fds.dir(fd)?;
                // Entries: ".", "..", then the files; a dirent is 24 bytes and
                // the name; an entry cut at the end of the buffer is partial,
                // as the interface allows.
                let mut entries: Vec<(&[u8], u8, u64)> = alloc::vec![
                    (&b"."[..], FILETYPE_DIRECTORY, 1),
                    (&b".."[..], FILETYPE_DIRECTORY, 1),
                ];
                for (i, file) in w.config.files.iter().enumerate() {
                    entries.push((&file.name, FILETYPE_REGULAR_FILE, i as u64 + 2));
                }
                let mut out = Vec::new();
                for (i, (name, filetype, ino)) in entries.iter().enumerate().skip(cookie as usize) {
                    out.extend_from_slice(&(i as u64 + 1).to_le_bytes());
                    out.extend_from_slice(&ino.to_le_bytes());
                    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
                    out.extend_from_slice(&[*filetype, 0, 0, 0]);
                    out.extend_from_slice(name);
                    if out.len() >= len as usize {
                        break;
                    }
                }
                let n = out.len().min(len as usize);
                g.write_bytes(buf, &out[..n])?;
                g.write_u32(used, n as u32)?;
                Ok(errno::SUCCESS)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_open",
        |mut c: Ctx<'_>,
         dirfd: u32,
         _dirflags: u32,
         path: u32,
         path_len: u32,
         oflags: u32,
         rights: u64,
         _inheriting: u64,
         fdflags: u32,
         opened: u32|
         -> i32 {
            with(&mut c, |g, w| {
                w.fds.dir(dirfd)?;
                let found = lookup(&w.config.files, g.slice(path, path_len)?);
                if oflags & (OFLAGS_CREAT | OFLAGS_EXCL | OFLAGS_TRUNC) != 0
                    || rights & WRITE_RIGHTS != 0
                    || fdflags & FDFLAGS_APPEND != 0
                {
                    // /var/task is read-only.
                    return Err(match found {
                        Err(errno::NOENT) if oflags & OFLAGS_CREAT == 0 => errno::NOENT,
                        _ => errno::NOTCAPABLE,
                    });
                }
                let fd = match found? {
                    Lookup::Dir => Fd::Dir,
                    Lookup::File(_) if oflags & OFLAGS_DIRECTORY != 0 => return Err(errno::NOTDIR),
                    Lookup::File(index) => Fd::File { index, pos: 0 },
                };
                let new = w.fds.open(fd)?;
                g.write_u32(opened, new)?;
                Ok(errno::SUCCESS)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_filestat_get",
        |mut c: Ctx<'_>, dirfd: u32, _flags: u32, path: u32, path_len: u32, stat: u32| -> i32 {
            with(&mut c, |g, w| {
                w.fds.dir(dirfd)?;
                let found = lookup(&w.config.files, g.slice(path, path_len)?)?;
                match found {
                    Lookup::Dir => write_filestat(g, stat, FILETYPE_DIRECTORY, 1, 0)?,
                    Lookup::File(index) => {
                        let size = w.config.files[index].contents.len() as u64;
                        write_filestat(g, stat, FILETYPE_REGULAR_FILE, index as u64 + 2, size)?
                    }
                }
                Ok(errno::SUCCESS)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_readlink",
        |mut c: Ctx<'_>,
         dirfd: u32,
         path: u32,
         path_len: u32,
         _buf: u32,
         _len: u32,
         _used: u32|
         -> i32 {
            with(&mut c, |g, w| {
                if w.fds.get(dirfd) != Some(Fd::Dir) {
                    return Err(errno::BADF);
                }
                lookup(&w.config.files, g.slice(path, path_len)?)?;
                Err(errno::INVAL) // Nothing here is a symbolic link.
            })
        },
    )?;

    // Everything that would change a descriptor's file or the directory.
    linker.func_wrap(
        MODULE,
        "fd_advise",
        |mut c: Ctx<'_>, fd: u32, _o: u64, _l: u64, _a: u32| -> i32 { is_open(&mut c, fd) },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_allocate",
        |mut c: Ctx<'_>, fd: u32, _o: u64, _l: u64| -> i32 { not_capable(&mut c, fd) },
    )?;
    for name in ["fd_datasync", "fd_sync"] {
        linker.func_wrap(MODULE, name, |mut c: Ctx<'_>, fd: u32| -> i32 {
            not_capable(&mut c, fd)
        })?;
    }
    linker.func_wrap(
        MODULE,
        "fd_filestat_set_size",
        |mut c: Ctx<'_>, fd: u32, _size: u64| -> i32 { not_capable(&mut c, fd) },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_filestat_set_times",
        |mut c: Ctx<'_>, fd: u32, _a: u64, _m: u64, _f: u32| -> i32 { not_capable(&mut c, fd) },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_renumber",
        |mut c: Ctx<'_>, fd: u32, to: u32| -> i32 {
            with(&mut c, |_, w| {
                if w.fds.get(fd).is_none() || w.fds.get(to).is_none() {
                    return Err(errno::BADF);
                }
                Err(errno::NOTCAPABLE)
            })
        },
    )?;
    for name in [
        "path_create_directory",
        "path_remove_directory",
        "path_unlink_file",
    ] {
        linker.func_wrap(
            MODULE,
            name,
            |mut c: Ctx<'_>, fd: u32, _p: u32, _l: u32| -> i32 { not_capable(&mut c, fd) },
        )?;
    }
    linker.func_wrap(
        MODULE,
        "path_filestat_set_times",
        |mut c: Ctx<'_>, fd: u32, _f: u32, _p: u32, _l: u32, _a: u64, _m: u64, _s: u32| -> i32 {
            not_capable(&mut c, fd)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_link",
        |mut c: Ctx<'_>,
         fd: u32,
         _f: u32,
         _p: u32,
         _l: u32,
         _nfd: u32,
         _np: u32,
         _nl: u32|
         -> i32 { not_capable(&mut c, fd) },
    )?;
    linker.func_wrap(
        MODULE,
        "path_rename",
        |mut c: Ctx<'_>, fd: u32, _p: u32, _l: u32, _nfd: u32, _np: u32, _nl: u32| -> i32 {
            not_capable(&mut c, fd)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_symlink",
        |mut c: Ctx<'_>, _p: u32, _l: u32, fd: u32, _np: u32, _nl: u32| -> i32 {
            not_capable(&mut c, fd)
        },
    )?;
    Ok(())
}

/// Success for an open descriptor (an operation with nothing to do),
/// `EBADF` for any other.
fn is_open(c: &mut Ctx<'_>, fd: u32) -> i32 {
    with(c, |_, w| {
        w.fds.get(fd).map(|_| errno::SUCCESS).ok_or(errno::BADF)
    })
}

/// `EBADF` for an unknown descriptor, else `ENOTCAPABLE`: nothing here can
/// be changed.
fn not_capable(c: &mut Ctx<'_>, fd: u32) -> i32 {
    with(c, |_, w| match w.fds.get(fd) {
        None => Err(errno::BADF),
        Some(_) => Err(errno::NOTCAPABLE),
    })
}
