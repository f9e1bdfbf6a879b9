//! WASI preview 1 for functions.
//!
//! - stdin is the event, stdout the result (capped at 6 MiB), stderr the
//!   log (its last 4 KiB come back with the outcome);
//! - args and environment from the function's configuration;
//! - clocks from the TSC ([`crate::clock`]), randomness from the seeded
//!   ChaCha20 ([`crate::rng`]), `poll_oneoff` for clock sleeps (spun: the
//!   guest has no timer), `sched_yield`, `proc_exit`;
//! - a read-only preopened directory `/var/task` with the files shipped
//!   beside the module ([`fs`]).
//!
//! Every other function of the interface is defined too and returns a
//! proper errno (`ENOSYS`, `EBADF`, `ENOTCAPABLE`), so a module importing it
//! links, and nothing a module does traps the runtime itself.

pub mod fs;
mod memory;

use alloc::sync::Arc;
use alloc::vec::Vec;

use ember_abi::function::LOG_TAIL_BYTES;
use wasmtime::{Caller, Error, Linker};

use self::fs::{Fd, FdTable, TaskFile};
use self::memory::Guest;
use crate::clock;

/// The import module every WASI preview 1 function lives in.
pub const MODULE: &str = "wasi_snapshot_preview1";

/// Every function of WASI preview 1; [`define`] defines them all.
pub const NAMES: [&str; 46] = [
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "sched_yield",
    "random_get",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

/// WASI errno values used here.
pub mod errno {
    /// No error.
    pub const SUCCESS: i32 = 0;
    /// Bad file descriptor.
    pub const BADF: i32 = 8;
    /// Bad address.
    pub const FAULT: i32 = 21;
    /// Invalid argument.
    pub const INVAL: i32 = 28;
    /// Is a directory.
    pub const ISDIR: i32 = 31;
    /// Too many open files.
    pub const MFILE: i32 = 33;
    /// No such file or directory.
    pub const NOENT: i32 = 44;
    /// Function not supported.
    pub const NOSYS: i32 = 52;
    /// Not a directory.
    pub const NOTDIR: i32 = 54;
    /// Value too large.
    pub const OVERFLOW: i32 = 61;
    /// Invalid seek.
    pub const SPIPE: i32 = 70;
    /// Capabilities insufficient.
    pub const NOTCAPABLE: i32 = 76;
}

/// What a function runs with, the same for every invocation.
#[derive(Debug)]
pub struct Config {
    /// `argv`, `argv[0]` being the function's name.
    pub args: Vec<Vec<u8>>,
    /// `KEY=VALUE` entries.
    pub env: Vec<Vec<u8>>,
    /// The files of `/var/task`.
    pub files: Vec<TaskFile>,
}

/// The last [`LOG_TAIL_BYTES`] of what the function wrote to stderr.
#[derive(Debug, Default)]
pub struct LogTail {
    buf: Vec<u8>,
    /// Bytes dropped from the front.
    pub dropped: u64,
}

impl LogTail {
    fn push(&mut self, bytes: &[u8]) {
        // Only the end of a long write can stay.
        let skip = bytes.len().saturating_sub(LOG_TAIL_BYTES);
        self.dropped += skip as u64;
        self.buf.extend_from_slice(&bytes[skip..]);
        if self.buf.len() > LOG_TAIL_BYTES {
            let excess = self.buf.len() - LOG_TAIL_BYTES;
            self.buf.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    /// The tail.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.dropped = 0;
    }
}

/// Memory growth past the limit, refused and remembered.
#[derive(Debug)]
pub struct Limits {
    /// The most linear memory the function may have, in bytes.
    pub memory: usize,
    /// A growth was refused (by the limit or for want of heap) since the
    /// invocation began.
    pub refused: bool,
}

impl wasmtime::ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.memory;
        self.refused |= !allowed;
        Ok(allowed)
    }

    fn memory_grow_failed(&mut self, _error: Error) -> wasmtime::Result<()> {
        self.refused = true;
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        16
    }

    fn memories(&self) -> usize {
        1
    }
}

/// The stdout buffer, handed from one invocation to the next so it is not
/// allocated (and grown) anew each time. (stdin is the event where it lies,
/// in the mailbox: [`Wasi::begin`].)
#[derive(Debug, Default)]
pub struct Buffers {
    stdout: Vec<u8>,
}

/// A store's host state: the configuration and one invocation's I/O.
pub struct Wasi {
    config: Arc<Config>,
    /// The instance's exported memory, once instantiated.
    pub memory: Option<wasmtime::Memory>,
    /// The event, read in place: see [`Wasi::begin`]. Empty between
    /// invocations.
    stdin: &'static [u8],
    stdin_pos: usize,
    /// What the function wrote to stdout.
    pub stdout: Vec<u8>,
    /// It tried to write more than [`ember_abi::function::MAX_RESULT_BYTES`].
    pub stdout_overflow: bool,
    /// What it wrote to stderr.
    pub stderr: LogTail,
    fds: FdTable,
    /// When the invocation must end (TSC).
    pub deadline_tsc: u64,
    /// A host function found the deadline passed.
    pub timed_out: bool,
    /// Memory limits.
    pub limits: Limits,
}

impl Wasi {
    /// A fresh state for `config` with a `memory_limit`.
    pub fn new(config: Arc<Config>, memory_limit: usize) -> Wasi {
        Wasi {
            config,
            memory: None,
            stdin: &[],
            stdin_pos: 0,
            stdout: Vec::new(),
            stdout_overflow: false,
            stderr: LogTail::default(),
            fds: FdTable::new(),
            deadline_tsc: u64::MAX,
            timed_out: false,
            limits: Limits {
                memory: memory_limit,
                refused: false,
            },
        }
    }

    /// Starts an invocation: `event` on stdin, read where it lies (copying
    /// a 1 MiB event would write 256 more pages, each a page fault in a
    /// VM just restored), empty outputs (in `buffers`), `deadline_tsc`.
    ///
    /// # Safety
    /// `event` stays valid and unchanged until [`Wasi::take_buffers`]: it is
    /// the request area of the mailbox, which the host does not write while
    /// the guest serves a request (it writes the next one only after the
    /// answer is posted, docs/guest-abi.md), or a static.
    pub unsafe fn begin(&mut self, event: &[u8], deadline_tsc: u64, buffers: Buffers) {
        // SAFETY: per the contract, `event` stays valid and unchanged until
        // `take_buffers`, which forgets it.
        self.stdin = unsafe { core::slice::from_raw_parts(event.as_ptr(), event.len()) };
        self.stdin_pos = 0;
        self.stdout = buffers.stdout;
        self.stdout.clear();
        self.stdout_overflow = false;
        self.stderr.clear();
        self.deadline_tsc = deadline_tsc;
        self.timed_out = false;
        self.limits.refused = false;
    }

    /// Ends an invocation: forgets the event and hands back the buffers
    /// (stdout read first).
    pub fn take_buffers(&mut self) -> Buffers {
        self.stdin = &[];
        self.stdin_pos = 0;
        Buffers {
            stdout: core::mem::take(&mut self.stdout),
        }
    }

    /// Whether the deadline has passed (remembered as a timeout).
    pub(crate) fn past_deadline(&mut self) -> bool {
        if clock::rdtsc() >= self.deadline_tsc {
            self.timed_out = true;
        }
        self.timed_out
    }
}

/// The host error that stops a function at its deadline.
pub(crate) fn deadline_error() -> Error {
    Error::msg("the function ran past its time limit")
}

/// How `proc_exit` stops a function: its status.
#[derive(Debug, Clone, Copy)]
pub struct Exit(pub i32);

impl core::fmt::Display for Exit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "exited with status {}", self.0)
    }
}

impl core::error::Error for Exit {}

type Ctx<'a> = Caller<'a, Wasi>;

/// Runs `f` with the caller's memory and state; `EFAULT`-style errors
/// become their errno.
fn with<F>(caller: &mut Ctx<'_>, f: F) -> i32
where
    F: FnOnce(&mut Guest<'_>, &mut Wasi) -> Result<i32, i32>,
{
    // Looked up by name only while the instance is being created (a
    // start function calling WASI); afterwards the handle is kept.
    let memory = caller.data().memory.or_else(|| {
        caller
            .get_export("memory")
            .and_then(|export| export.into_memory())
    });
    let Some(memory) = memory else {
        return errno::INVAL;
    };
    let (bytes, wasi) = memory.data_and_store_mut(caller);
    let mut guest = Guest::new(bytes);
    f(&mut guest, wasi).unwrap_or_else(|errno| errno)
}

/// Writes a list of byte strings the way `args_get` and `environ_get` do.
fn put_strings(guest: &mut Guest<'_>, list: &[Vec<u8>], ptrs: u32, buf: u32) -> Result<i32, i32> {
    // Both arrays checked whole first: the offsets within cannot wrap.
    let (count, bytes) = sizes(list);
    guest.check(ptrs, count.checked_mul(4).ok_or(errno::FAULT)?)?;
    guest.check(buf, bytes)?;
    let mut at = buf;
    for (i, item) in list.iter().enumerate() {
        guest.write_u32(ptrs + 4 * i as u32, at)?;
        guest.write_bytes(at, item)?;
        guest.write_bytes(at + item.len() as u32, &[0])?;
        at += item.len() as u32 + 1;
    }
    Ok(errno::SUCCESS)
}

fn sizes(list: &[Vec<u8>]) -> (u32, u32) {
    let bytes: usize = list.iter().map(|s| s.len() + 1).sum();
    (list.len() as u32, bytes as u32)
}

/// Defines every WASI preview 1 function in `linker`.
pub fn define(linker: &mut Linker<Wasi>) -> Result<(), Error> {
    // Arguments and environment: the same pair of calls over two lists.
    type List = fn(&Config) -> &[Vec<u8>];
    let lists: [(&str, &str, List); 2] = [
        ("args_get", "args_sizes_get", |config| &config.args),
        ("environ_get", "environ_sizes_get", |config| &config.env),
    ];
    for (get, sizes_get, list) in lists {
        linker.func_wrap(
            MODULE,
            get,
            move |mut c: Ctx<'_>, ptrs: u32, buf: u32| -> i32 {
                with(&mut c, |g, w| put_strings(g, list(&w.config), ptrs, buf))
            },
        )?;
        linker.func_wrap(
            MODULE,
            sizes_get,
            move |mut c: Ctx<'_>, count: u32, size: u32| -> i32 {
                with(&mut c, |g, w| {
                    let (n, bytes) = sizes(list(&w.config));
                    g.write_u32(count, n)?;
                    g.write_u32(size, bytes)?;
                    Ok(errno::SUCCESS)
                })
            },
        )?;
    }
    linker.func_wrap(
        MODULE,
        "clock_res_get",
        |mut c: Ctx<'_>, id: u32, res: u32| -> i32 {
            with(&mut c, |g, _| {
                clock::now_ns(id).ok_or(errno::INVAL)?;
                g.write_u64(res, 1)?;
                Ok(errno::SUCCESS)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "clock_time_get",
        |mut c: Ctx<'_>, id: u32, _precision: u64, time: u32| -> i32 {
            with(&mut c, |g, _| {
                let now = clock::now_ns(id).ok_or(errno::INVAL)?;
                g.write_u64(time, now)?;
                Ok(errno::SUCCESS)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "random_get",
        |mut c: Ctx<'_>, buf: u32, len: u32| -> i32 {
            with(&mut c, |g, _| {
                let out = g.slice_mut(buf, len)?;
                if crate::rng::fill(out) {
                    Ok(errno::SUCCESS)
                } else {
                    Err(errno::NOSYS)
                }
            })
        },
    )?;
    linker.func_wrap(MODULE, "sched_yield", || -> i32 { errno::SUCCESS })?;
    linker.func_wrap(MODULE, "proc_exit", |code: u32| -> Result<(), Error> {
        Err(Error::new(Exit(code as i32)))
    })?;
    linker.func_wrap(MODULE, "proc_raise", |_sig: u32| -> i32 { errno::NOSYS })?;
    linker.func_wrap(
        MODULE,
        "poll_oneoff",
        |mut c: Ctx<'_>, subs: u32, events: u32, count: u32, nevents: u32| -> Result<i32, Error> {
            poll_oneoff(&mut c, subs, events, count, nevents)
        },
    )?;

    fs::define(linker)?;

    linker.func_wrap(MODULE, "sock_accept", |_: u32, _: u32, _: u32| -> i32 {
        errno::NOSYS
    })?;
    linker.func_wrap(
        MODULE,
        "sock_recv",
        |_: u32, _: u32, _: u32, _: u32, _: u32, _: u32| -> i32 { errno::NOSYS },
    )?;
    linker.func_wrap(
        MODULE,
        "sock_send",
        |_: u32, _: u32, _: u32, _: u32, _: u32| -> i32 { errno::NOSYS },
    )?;
    linker.func_wrap(MODULE, "sock_shutdown", |_: u32, _: u32| -> i32 {
        errno::NOSYS
    })?;
    Ok(())
}

/// Subscription and event layouts of `poll_oneoff`.
const SUBSCRIPTION_SIZE: u32 = 48;
/// Most subscriptions one `poll_oneoff` takes.
const MAX_SUBSCRIPTIONS: u32 = 1024;
const EVENT_SIZE: u32 = 32;
const EVENTTYPE_CLOCK: u8 = 0;
const EVENTTYPE_FD_READ: u8 = 1;
const EVENTTYPE_FD_WRITE: u8 = 2;
const SUBCLOCKFLAGS_ABSTIME: u16 = 1;

/// `poll_oneoff`: file descriptors are always ready; clock subscriptions
/// are slept out by spinning on the TSC, never past the invocation's
/// deadline (which ends the function with a timeout instead).
fn poll_oneoff(
    c: &mut Ctx<'_>,
    subs: u32,
    events: u32,
    count: u32,
    nevents: u32,
) -> Result<i32, Error> {
    struct Sub {
        userdata: u64,
        tag: u8,
        fd: u32,
        deadline_tsc: u64,
    }
    // The list is allocated from the runtime's own heap: bounded.
    if count == 0 || count > MAX_SUBSCRIPTIONS {
        return Ok(errno::INVAL);
    }
    // Read the subscriptions (the array checked whole: offsets within it
    // cannot wrap).
    let mut list = Vec::new();
    let mut bad_clock = false;
    let read = with(c, |g, _| {
        g.check(
            subs,
            count.checked_mul(SUBSCRIPTION_SIZE).ok_or(errno::FAULT)?,
        )?;
        for i in 0..count {
            let at = subs + i * SUBSCRIPTION_SIZE;
            let userdata = g.read_u64(at)?;
            let tag = g.read_u8(at + 8)?;
            let (fd, deadline_tsc) = match tag {
                EVENTTYPE_CLOCK => {
                    let id = g.read_u32(at + 16)?;
                    let timeout = g.read_u64(at + 24)?;
                    let flags = g.read_u16(at + 40)?;
                    let now_ns = clock::now_ns(id).unwrap_or_else(|| {
                        bad_clock = true;
                        0
                    });
                    let wait_ns = if flags & SUBCLOCKFLAGS_ABSTIME != 0 {
                        timeout.saturating_sub(now_ns)
                    } else {
                        timeout
                    };
                    (
                        0,
                        clock::rdtsc().saturating_add(clock::ns_to_ticks(wait_ns)),
                    )
                }
                EVENTTYPE_FD_READ | EVENTTYPE_FD_WRITE => (g.read_u32(at + 16)?, 0),
                _ => return Err(errno::INVAL),
            };
            list.push(Sub {
                userdata,
                tag,
                fd,
                deadline_tsc,
            });
        }
        Ok(errno::SUCCESS)
    });
    if read != errno::SUCCESS {
        return Ok(read);
    }
    if bad_clock {
        return Ok(errno::INVAL);
    }
    // File descriptors are ready at once; otherwise wait for the first clock.
    let any_fd = list.iter().any(|s| s.tag != EVENTTYPE_CLOCK);
    if !any_fd {
        let first = list.iter().map(|s| s.deadline_tsc).min().unwrap_or(0);
        loop {
            let now = clock::rdtsc();
            if now >= first {
                break;
            }
            if c.data_mut().past_deadline() {
                return Err(deadline_error());
            }
            core::hint::spin_loop();
        }
    }
    let now = clock::rdtsc();
    Ok(with(c, |g, w| {
        let mut written = 0u32;
        for sub in &list {
            let ready = match sub.tag {
                EVENTTYPE_CLOCK => !any_fd && now >= sub.deadline_tsc,
                _ => true,
            };
            if !ready {
                continue;
            }
            // Each event checked whole: offsets within it cannot wrap.
            let at = events
                .checked_add(written * EVENT_SIZE)
                .ok_or(errno::FAULT)?;
            g.check(at, EVENT_SIZE)?;
            let (error, nbytes) = match sub.tag {
                EVENTTYPE_CLOCK => (errno::SUCCESS, 0),
                _ => match w.fds.get(sub.fd) {
                    Some(Fd::Stdin) => (errno::SUCCESS, (w.stdin.len() - w.stdin_pos) as u64),
                    Some(_) => (errno::SUCCESS, 0),
                    None => (errno::BADF, 0),
                },
            };
            g.write_u64(at, sub.userdata)?;
            g.write_u16(at + 8, error as u16)?;
            g.write_u8(at + 10, sub.tag)?;
            g.write_u64(at + 16, nbytes)?;
            g.write_u16(at + 24, 0)?;
            written += 1;
        }
        g.write_u32(nevents, written)?;
        Ok(errno::SUCCESS)
    }))
}
