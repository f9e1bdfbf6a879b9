//! ember-vmm's log, forwarded into emberd's.
//!
//! Every VMM's stderr is a pipe that one thread (`ember_vmm_log`) reads
//! through epoll. Each line becomes a `tracing` event of the level the VMM
//! gave it (target `ember_vmm`), tagged with the VMM's id and pid and — once
//! the VMM serves an instance — the instance, function and version, so an
//! instance's VMM lines sit in emberd's log (and journal) beside emberd's own
//! lines about it, and outlive the VMM.
//!
//! A VMM's lines may carry what a guest wrote (a hostile guest can make its
//! VMM warn on every request): control characters are escaped, lines are
//! cut at [`MAX_LINE`] bytes, each VMM may log [`RATE_PER_S`] lines a second
//! (bursts of [`BURST`]) and all of them together [`TOTAL_RATE_PER_S`]
//! (bursts of [`TOTAL_BURST`]) — well under the journal's own limit, which
//! would otherwise drop emberd's lines too; what is dropped is counted and
//! said, per VMM.
//!
//! The thread never waits for its output (emberd's log is written through
//! a bounded, lossy queue: `crate::logging`), so a VMM never waits for its
//! stderr longer than the thread takes to read a pipe. Should the thread
//! die, no new VMM is started: [`VmmLogs::pipe`] fails and says why.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing::Level;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::host::lock;

/// The longest line forwarded, bytes; the rest of a longer line is dropped.
pub const MAX_LINE: usize = 2048;
/// Lines a VMM may log per second, sustained.
pub const RATE_PER_S: f64 = 50.0;
/// Lines a VMM may log at once, after being quiet.
pub const BURST: f64 = 200.0;
/// Lines all VMMs together may log per second, sustained.
pub const TOTAL_RATE_PER_S: f64 = 200.0;
/// Lines all VMMs together may log at once.
pub const TOTAL_BURST: f64 = 1000.0;
/// Lines of a VMM kept for error messages (a VMM that did not start).
pub const TAIL_LINES: usize = 20;
/// Bytes read from one pipe per wake-up, so that one talkative VMM cannot
/// keep the thread from the others (epoll reports the rest again).
const READ_PER_WAKEUP: usize = 64 << 10;

/// What a VMM's lines are tagged with once it works for a function: the
/// instance it serves, or none while it builds the function's template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceTag {
    /// The instance id.
    pub instance: Option<String>,
    /// Its function.
    pub function: String,
    /// The version it runs.
    pub version: u64,
}

/// One VMM's log: its tags, its last lines, whether its pipe has closed.
#[derive(Debug)]
pub struct VmmLog {
    /// The VMM's id (its file names in the run directory).
    pub vmm: String,
    pid: AtomicU32,
    instance: Mutex<Option<InstanceTag>>,
    tail: Mutex<VecDeque<String>>,
    closed: Mutex<bool>,
    closed_changed: Condvar,
}

impl VmmLog {
    fn new(vmm: &str) -> VmmLog {
        VmmLog {
            vmm: vmm.to_string(),
            pid: AtomicU32::new(0),
            instance: Mutex::new(None),
            tail: Mutex::new(VecDeque::new()),
            closed: Mutex::new(false),
            closed_changed: Condvar::new(),
        }
    }

    /// Tags the lines to come with the instance the VMM now serves.
    pub fn set_instance(&self, tag: InstanceTag) {
        *lock(&self.instance) = Some(tag);
    }

    /// Records the VMM's pid (known once it is spawned).
    pub fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::Relaxed);
    }

    /// The last lines, oldest first, once the VMM's stderr has closed or
    /// `wait` has passed (a VMM that exited has written them all).
    pub fn tail(&self, wait: Duration) -> Vec<String> {
        let closed = lock(&self.closed);
        let _closed = self
            .closed_changed
            .wait_timeout_while(closed, wait, |closed| !*closed)
            .map(|(guard, _)| guard)
            .unwrap_or_else(|p| p.into_inner().0);
        lock(&self.tail).iter().cloned().collect()
    }

    fn keep(&self, line: &str) {
        let mut tail = lock(&self.tail);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_string());
    }

    fn close(&self) {
        *lock(&self.closed) = true;
        self.closed_changed.notify_all();
    }

    /// Emits one line (already cut and escaped) at `level`.
    fn emit(&self, level: Level, message: &str) {
        let pid = self.pid.load(Ordering::Relaxed);
        let instance = lock(&self.instance).clone();
        macro_rules! at_level {
            ($($fields:tt)*) => {
                match level {
                    Level::ERROR => tracing::error!(target: "ember_vmm", $($fields)*),
                    Level::WARN => tracing::warn!(target: "ember_vmm", $($fields)*),
                    Level::INFO => tracing::info!(target: "ember_vmm", $($fields)*),
                    Level::DEBUG => tracing::debug!(target: "ember_vmm", $($fields)*),
                    Level::TRACE => tracing::trace!(target: "ember_vmm", $($fields)*),
                }
            };
        }
        // Fields of value None are left out of the line.
        at_level!(
            vmm = self.vmm.as_str(),
            pid,
            instance = instance.as_ref().and_then(|t| t.instance.as_deref()),
            function = instance.as_ref().map(|t| t.function.as_str()),
            version = instance.as_ref().map(|t| t.version),
            "{message}"
        )
    }
}

/// The level and message of one line ember-vmm wrote: its logger writes
/// `ember-vmm[ID] <ms>ms LEVEL message`; anything else (a panic report, an
/// argument error) is a warning, whole.
pub fn parse_line(line: &str) -> (Level, &str) {
    let parsed = (|| {
        let rest = line.strip_prefix("ember-vmm[")?;
        let rest = &rest[rest.find("] ")? + 2..];
        let rest = rest.trim_start();
        let (stamp, rest) = rest.split_once(' ')?;
        stamp.strip_suffix("ms")?.parse::<f64>().ok()?;
        let rest = rest.trim_start();
        let (level, message) = rest.split_once(' ').unwrap_or((rest, ""));
        let level = match level {
            "ERROR" => Level::ERROR,
            "WARN" => Level::WARN,
            "INFO" => Level::INFO,
            "DEBUG" => Level::DEBUG,
            "TRACE" => Level::TRACE,
            _ => return None,
        };
        Some((level, message.trim_start()))
    })();
    parsed.unwrap_or((Level::WARN, line))
}

/// `bytes` as text fit for a log line: invalid UTF-8 replaced, control
/// characters escaped, at most [`MAX_LINE`] bytes (cut on a character
/// boundary, marked with `…`).
pub fn sanitize(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len().min(MAX_LINE + 4));
    for c in text.chars() {
        let before = out.len();
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() > MAX_LINE {
            out.truncate(before);
            out.push('…');
            break;
        }
    }
    out
}

/// A token bucket: `rate` lines a second, `burst` at most.
#[derive(Debug, Clone)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// Lines refused since the last one let through.
    pub suppressed: u64,
}

impl RateLimit {
    /// A full bucket at `now`.
    pub fn new(rate: f64, burst: f64, now: Instant) -> RateLimit {
        RateLimit {
            rate,
            burst,
            tokens: burst,
            last: now,
            suppressed: 0,
        }
    }

    /// Whether a line at `now` may go out; a refused one is counted.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// One VMM's pipe and what is half read of it.
struct Source {
    pipe: File,
    log: Arc<VmmLog>,
    partial: Vec<u8>,
    /// The current line passed [`MAX_LINE`]: drop the rest of it.
    discarding: bool,
    limit: RateLimit,
}

impl Source {
    /// Reads what the pipe holds, up to [`READ_PER_WAKEUP`]; true once it
    /// is closed (the VMM exited).
    fn drain(&mut self, total: &mut RateLimit) -> bool {
        let mut buf = [0u8; 16 << 10];
        let mut read = 0;
        while read < READ_PER_WAKEUP {
            match self.pipe.read(&mut buf) {
                Ok(0) => {
                    if !self.partial.is_empty() {
                        let line = std::mem::take(&mut self.partial);
                        self.line(&line, total);
                    }
                    return true;
                }
                Ok(n) => {
                    read += n;
                    self.feed(&buf[..n], total);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
        false
    }

    fn feed(&mut self, mut bytes: &[u8], total: &mut RateLimit) {
        while let Some(at) = bytes.iter().position(|&b| b == b'\n') {
            if self.discarding {
                self.discarding = false;
            } else {
                self.partial.extend_from_slice(&bytes[..at]);
                let line = std::mem::take(&mut self.partial);
                self.line(&line, total);
            }
            bytes = &bytes[at + 1..];
        }
        if self.discarding {
            return;
        }
        self.partial.extend_from_slice(bytes);
        if self.partial.len() > MAX_LINE {
            // Said now, cut; the rest up to the newline is dropped.
            let line = std::mem::take(&mut self.partial);
            self.line(&line, total);
            self.discarding = true;
        }
    }

    fn line(&mut self, bytes: &[u8], total: &mut RateLimit) {
        let text = sanitize(bytes);
        self.log.keep(&text);
        let now = Instant::now();
        if !self.limit.allow(now) {
            return;
        }
        if !total.allow(now) {
            // Counted as this VMM's: it says so when its lines flow again.
            self.limit.suppressed += 1;
            return;
        }
        self.report_dropped();
        let (level, message) = parse_line(&text);
        self.log.emit(level, message);
    }

    /// Says how many lines were dropped since the last one let through.
    fn report_dropped(&mut self) {
        let n = std::mem::take(&mut self.limit.suppressed);
        if n > 0 {
            self.log.emit(
                Level::WARN,
                &format!(
                    "{n} lines of this VMM's log were dropped (over {RATE_PER_S} lines/s, or all VMMs over {TOTAL_RATE_PER_S})"
                ),
            );
        }
    }

    fn finish(mut self) {
        self.report_dropped();
        self.log.close();
    }
}

/// The forwarding thread and the pipes it reads.
#[derive(Clone)]
pub struct VmmLogs {
    inner: Arc<Inner>,
}

struct Inner {
    epoll: Epoll,
    /// Registered, not yet taken by the thread (pushed before the pipe is
    /// added to epoll, so an event always finds its source).
    pending: Mutex<Vec<(u64, Source)>>,
    /// Sources whose pipe could not be added to epoll after the thread may
    /// already have taken them: the thread drops them.
    cancelled: Mutex<Vec<u64>>,
    next: AtomicU64,
    /// Cleared when the thread ends (it should not).
    alive: std::sync::atomic::AtomicBool,
}

impl VmmLogs {
    /// Starts the forwarding thread.
    pub fn start() -> std::io::Result<VmmLogs> {
        let inner = Arc::new(Inner {
            epoll: Epoll::new()?,
            pending: Mutex::new(Vec::new()),
            cancelled: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            alive: std::sync::atomic::AtomicBool::new(true),
        });
        let thread = inner.clone();
        std::thread::Builder::new()
            .name("ember_vmm_log".into())
            .spawn(move || {
                let result =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| thread.run()));
                thread.alive.store(false, Ordering::SeqCst);
                let why = match result {
                    Ok(e) => e.to_string(),
                    Err(_) => "it panicked".into(),
                };
                tracing::error!("the VMM log thread stopped ({why}): no new VMM can start");
                // Pipes registered meanwhile are read by nobody: close them.
                lock(&thread.pending).clear();
            })?;
        Ok(VmmLogs { inner })
    }

    /// A pipe for the stderr of VMM `vmm`: the write end to give the child,
    /// and its log. Lines are forwarded until every copy of the write end
    /// is closed.
    pub fn pipe(&self, vmm: &str) -> std::io::Result<(OwnedFd, Arc<VmmLog>)> {
        if !self.inner.alive.load(Ordering::SeqCst) {
            return Err(std::io::Error::other(
                "the VMM log thread has stopped (see emberd's log)",
            ));
        }
        let mut fds = [0; 2];
        // SAFETY: pipe2(2) fills the two descriptors of the array we own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: pipe2 just returned these descriptors; nothing else owns them.
        let (read, write) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // The child's end blocks: a VMM whose log backs up waits rather
        // than losing lines (the thread reads as fast as emberd can log).
        // SAFETY: fcntl(2) on a descriptor we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETFL, 0) };
        let log = Arc::new(VmmLog::new(vmm));
        let token = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let fd = read.as_raw_fd();
        lock(&self.inner.pending).push((
            token,
            Source {
                pipe: read,
                log: log.clone(),
                partial: Vec::new(),
                discarding: false,
                limit: RateLimit::new(RATE_PER_S, BURST, Instant::now()),
            },
        ));
        if let Err(e) = self.inner.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN | EventSet::HANG_UP, token),
        ) {
            let mut pending = lock(&self.inner.pending);
            let before = pending.len();
            pending.retain(|(t, _)| *t != token);
            if pending.len() == before {
                // The thread took it already: it drops it when it wakes.
                lock(&self.inner.cancelled).push(token);
            }
            log.close();
            return Err(e);
        }
        Ok((write, log))
    }
}

impl Inner {
    /// Forwards lines until epoll fails (it does not: the error is returned).
    fn run(&self) -> std::io::Error {
        let mut sources: HashMap<u64, Source> = HashMap::new();
        let mut events = vec![EpollEvent::default(); 64];
        let mut total = RateLimit::new(TOTAL_RATE_PER_S, TOTAL_BURST, Instant::now());
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return e,
            };
            for token in lock(&self.cancelled).drain(..) {
                if let Some(source) = sources.remove(&token) {
                    source.log.close();
                }
            }
            for event in &events[..n] {
                let token = event.data();
                if !sources.contains_key(&token) {
                    sources.extend(lock(&self.pending).drain(..));
                }
                let Some(source) = sources.get_mut(&token) else {
                    continue;
                };
                if source.drain(&mut total) {
                    if let Some(source) = sources.remove(&token) {
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            source.pipe.as_raw_fd(),
                            EpollEvent::default(),
                        );
                        source.finish();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn vmm_lines_keep_their_level_and_lose_their_prefix() {
        assert_eq!(
            parse_line("ember-vmm[p3]     1.234ms WARN  guest answered Ping with Pong"),
            (Level::WARN, "guest answered Ping with Pong")
        );
        assert_eq!(
            parse_line("ember-vmm[anonymous-instance] 12345.000ms ERROR cannot map"),
            (Level::ERROR, "cannot map")
        );
        assert_eq!(parse_line("ember-vmm[x] 0.001ms INFO  "), (Level::INFO, ""));
        // Not the logger's shape: a warning, whole.
        for line in [
            "ember-vmm: thread 'vcpu0' panicked: boom",
            "ember-vmm[p3] soon INFO x",
            "ember-vmm[p3] 1.0ms LOUD x",
            "error: unexpected argument '--nope' found",
        ] {
            assert_eq!(parse_line(line), (Level::WARN, line), "{line}");
        }
    }

    #[test]
    fn hostile_bytes_are_escaped_and_cut() {
        assert_eq!(sanitize(b"plain text"), "plain text");
        assert_eq!(sanitize(b"a\x1b[31mred\r\x00"), "a\\u{1b}[31mred\\r\\u{0}");
        assert_eq!(sanitize(b"\xff\xfe!"), "\u{fffd}\u{fffd}!");
        let long = "é".repeat(MAX_LINE);
        let cut = sanitize(long.as_bytes());
        assert!(cut.len() <= MAX_LINE + '…'.len_utf8(), "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(cut.is_char_boundary(cut.len()));
    }

    #[test]
    fn the_rate_limit_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut limit = RateLimit::new(RATE_PER_S, BURST, start);
        let burst = (0..1000).filter(|_| limit.allow(start)).count();
        assert_eq!(burst, BURST as usize);
        assert_eq!(limit.suppressed, 1000 - BURST as u64);
        // One second later: RATE_PER_S more, no more.
        let later = start + Duration::from_secs(1);
        let refilled = (0..1000).filter(|_| limit.allow(later)).count();
        assert_eq!(refilled, RATE_PER_S as usize);
        // A long quiet spell refills to the burst, not beyond.
        let much_later = later + Duration::from_secs(3600);
        let again = (0..1000).filter(|_| limit.allow(much_later)).count();
        assert_eq!(again, BURST as usize);
        // Time going backwards (it does not, but) refills nothing.
        assert!(!limit.allow(start));
    }

    #[test]
    fn lines_split_across_reads_and_overlong_lines_are_cut_once() {
        let logs = VmmLogs::start().unwrap();
        let (write, log) = logs.pipe("t1").unwrap();
        log.set_pid(42);
        let mut write = File::from(write);
        write.write_all(b"ember-vmm[t1] 1.0ms INFO  first").unwrap();
        write.write_all(b" line\nsecond\n").unwrap();
        let mut long = vec![b'x'; MAX_LINE * 3];
        long.push(b'\n');
        write.write_all(&long).unwrap();
        write
            .write_all(b"after the long one\nno newline at the end")
            .unwrap();
        drop(write);
        let tail = log.tail(Duration::from_secs(10));
        assert_eq!(tail.len(), 5, "{tail:?}");
        assert_eq!(tail[0], "ember-vmm[t1] 1.0ms INFO  first line");
        assert_eq!(tail[1], "second");
        assert!(tail[2].starts_with("xxx") && tail[2].ends_with('…'));
        assert!(tail[2].len() <= MAX_LINE + 3);
        assert_eq!(tail[3], "after the long one");
        assert_eq!(tail[4], "no newline at the end");
    }

    #[test]
    fn the_tail_keeps_the_last_lines() {
        let logs = VmmLogs::start().unwrap();
        let (write, log) = logs.pipe("t2").unwrap();
        let mut write = File::from(write);
        for i in 0..(TAIL_LINES + 5) {
            writeln!(write, "line {i}").unwrap();
        }
        drop(write);
        let tail = log.tail(Duration::from_secs(10));
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail[0], "line 5");
        assert_eq!(tail[TAIL_LINES - 1], format!("line {}", TAIL_LINES + 4));
    }
}
