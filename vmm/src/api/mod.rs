//! The control socket (`--api-sock`): a Unix-socket HTTP server served on
//! the VMM thread's event loop.
//!
//! A complete request is routed ([`parsed_request`]) to a [`VmmAction`];
//! the VMM answers it at once or, for work the guest does, when the guest
//! replies. Requests are served one at a time — in order on a connection,
//! round robin across connections — as Firecracker's API thread serves
//! them, but without a thread of its own: on our KVM every hand-off between
//! threads is a wake-up that costs up to ~20 µs when it crosses CPUs, and
//! an invocation would pay two more of them (docs/decisions.md).
//!
//! Connections are non-blocking. A connection is not read (no EPOLLIN)
//! while its request is being served or its last response is not yet
//! written out, and holds at most one request's worth of input: a client
//! cannot make ember-vmm buffer without bound. Each connection has its own
//! id, used as its event token and to match an answer to its request, so a
//! descriptor number reused by a new connection never receives an old
//! connection's answer or events.

pub mod client;
pub mod http;
pub mod parsed_request;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use self::http::{parse_request, Parsed, CONTINUE};
use crate::rpc_interface::{VmmAction, VmmResponse};

/// Most connections served at once; more are refused.
const MAX_CONNECTIONS: usize = 64;

/// How long responses may take to drain when ember-vmm exits.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the listener rests after accept(2) failed for want of
/// descriptors or memory (instead of spinning on a readable listener).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Event tokens at and above this belong to the API server.
const TOKEN_BASE: u32 = 1 << 20;
const TOKEN_LISTENER: u32 = TOKEN_BASE;
const TOKEN_LISTENER_PAUSE: u32 = TOKEN_BASE + 1;
/// Connection tokens: `TOKEN_CONNECTIONS + id`.
const TOKEN_CONNECTIONS: u32 = TOKEN_BASE + 2;

/// Most input buffered per connection: one whole request (a longer head
/// or body is refused as soon as it is seen).
const MAX_INPUT: usize = http::MAX_HEAD + http::MAX_BODY;

/// Populates the pages of a buffer's spare capacity for writing when it
/// is large (best effort: a refusal leaves the faults to the reads).
fn populate_spare(buf: &mut Vec<u8>) {
    const PAGE: usize = 4096;
    let spare = buf.spare_capacity_mut();
    let start = spare.as_mut_ptr() as usize;
    let first = start.next_multiple_of(PAGE);
    let end = (start + spare.len()) & !(PAGE - 1);
    if end <= first || end - first < 16 * PAGE {
        return;
    }
    // SAFETY: the range lies inside the vector's own allocation;
    // populating only faults its pages in, leaving their bytes alone.
    unsafe {
        libc::madvise(
            first as *mut libc::c_void,
            end - first,
            libc::MADV_POPULATE_WRITE,
        )
    };
}

/// A connection's id: its event token less [`TOKEN_CONNECTIONS`].
type ConnId = u32;

/// One client connection.
struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    /// Responses to write; the first `written` bytes are out.
    output: Vec<u8>,
    written: usize,
    continue_sent: bool,
    /// Close once the output is written (the client asked, or it sent
    /// something unparseable).
    close_after_output: bool,
    /// The client hung up (or the socket failed): no more input.
    peer_closed: bool,
    /// Reading or writing failed: the connection is dropped.
    broken: bool,
    /// The events epoll reports for it now.
    interest: EventSet,
}

impl Connection {
    /// Whether everything queued has been written.
    fn drained(&self) -> bool {
        self.written == self.output.len()
    }

    /// Queues `bytes` and writes what the socket takes.
    fn send(&mut self, bytes: &[u8]) {
        self.output.extend_from_slice(bytes);
        self.flush();
    }

    /// Queues a response and writes what the socket takes.
    fn send_response(&mut self, response: &http::Response, close: bool) {
        response.encode_into(close, &mut self.output);
        self.close_after_output |= close;
        self.flush();
    }

    /// Writes as much queued output as the socket takes; a failed write
    /// breaks the connection. (The written part is dropped once all is
    /// out, not after each write: a large response is not moved around.)
    fn flush(&mut self) {
        while !self.drained() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => {
                    self.broken = true;
                    return;
                }
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.broken = true;
                    return;
                }
            }
        }
        self.output.clear();
        self.written = 0;
    }
}

/// The control socket's listener and connections.
pub struct ApiServer {
    listener: UnixListener,
    /// Armed while the listener rests after a failed accept.
    pause: TimerFd,
    listener_paused: bool,
    connections: HashMap<ConnId, Connection>,
    last_id: ConnId,
    /// Connections in the order they are offered a turn.
    turns: VecDeque<ConnId>,
    /// The connection whose request the VMM is serving, and whether it
    /// asked to close afterwards.
    in_flight: Option<(ConnId, bool)>,
}

/// Binds the control socket at `path`.
pub fn bind(path: &std::path::Path) -> std::io::Result<ApiServer> {
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    let pause = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    Ok(ApiServer {
        listener,
        pause,
        listener_paused: false,
        connections: HashMap::new(),
        last_id: 0,
        turns: VecDeque::new(),
        in_flight: None,
    })
}

impl ApiServer {
    /// Whether `token` is one of the server's.
    pub fn owns(token: u32) -> bool {
        token >= TOKEN_BASE
    }

    /// Adds the listener (and its pause timer) to the event loop.
    pub fn register(&self, ops: &mut EventOps) {
        let listener =
            Events::with_data_raw(self.listener.as_raw_fd(), TOKEN_LISTENER, EventSet::IN);
        if let Err(e) = ops.add(listener) {
            log::error!("cannot watch the API socket: {e:?}");
        }
        let pause =
            Events::with_data_raw(self.pause.as_raw_fd(), TOKEN_LISTENER_PAUSE, EventSet::IN);
        if let Err(e) = ops.add(pause) {
            log::error!("cannot watch the API socket's pause timer: {e:?}");
        }
    }

    /// Handles readiness of the listener, its pause timer or a connection.
    pub fn on_event(&mut self, events: &Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_LISTENER => return self.accept(ops),
            TOKEN_LISTENER_PAUSE => return self.resume_listener(ops),
            _ => {}
        }
        // An event for a connection closed earlier in the same batch finds
        // nothing under its token: a live id is never given out again.
        let id = events.data().wrapping_sub(TOKEN_CONNECTIONS);
        let Some(conn) = self.connections.get_mut(&id) else {
            return;
        };
        let set = events.event_set();
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP) {
            read_available(conn);
        }
        if set.contains(EventSet::ERROR) {
            conn.peer_closed = true;
            conn.broken = true;
        }
        if set.contains(EventSet::OUT) {
            conn.flush();
        }
    }

    /// The next request to serve, if none is in flight: requests that do
    /// not route (bad path, bad JSON) are answered here and skipped.
    pub fn next_request(&mut self) -> Option<VmmAction> {
        if self.in_flight.is_some() {
            return None;
        }
        for _ in 0..self.turns.len() {
            let id = self.turns.pop_front()?;
            self.turns.push_back(id);
            let Some(conn) = self.connections.get_mut(&id) else {
                continue;
            };
            // A client that does not read its responses is served no more
            // until it does.
            while !conn.close_after_output && !conn.broken && conn.drained() {
                match parse_request(&mut conn.input, conn.continue_sent) {
                    Parsed::Incomplete => break,
                    Parsed::ExpectsContinue => {
                        conn.send(CONTINUE);
                        conn.continue_sent = true;
                        break;
                    }
                    Parsed::Invalid(response) => conn.send_response(&response, true),
                    Parsed::Request(request) => {
                        conn.continue_sent = false;
                        let close = request.close;
                        match parsed_request::parse(request) {
                            Ok(action) => {
                                self.in_flight = Some((id, close));
                                return Some(action);
                            }
                            Err(response) => conn.send_response(&response, close),
                        }
                    }
                }
            }
        }
        None
    }

    /// Answers the request in flight.
    pub fn respond(&mut self, answer: VmmResponse) {
        let Some((id, close)) = self.in_flight.take() else {
            log::warn!("an answer with no request in flight was dropped");
            return;
        };
        // The client may have gone meanwhile: then the answer has no reader.
        let Some(conn) = self.connections.get_mut(&id) else {
            return;
        };
        if !conn.broken {
            conn.send_response(&parsed_request::response(answer), close);
        }
    }

    /// After events: drops finished connections and sets what epoll
    /// watches on the others.
    pub fn sync(&mut self, ops: &mut EventOps) {
        let in_flight = self.in_flight.map(|(id, _)| id);
        let mut done = Vec::new();
        for (&id, conn) in &mut self.connections {
            let drained = conn.drained();
            // The connection whose request is being served stays, even if
            // its client went, until the answer comes.
            let serving = in_flight == Some(id);
            // A client that sent its request and then hung up (or shut
            // down its writing side) is still served.
            let has_request = || http::has_request(&conn.input, conn.continue_sent);
            let finished = !serving
                && (conn.broken
                    || (drained && conn.close_after_output)
                    || (drained && conn.peer_closed && !has_request()));
            if finished {
                done.push(id);
                continue;
            }
            // Read while nothing of this connection's is being served, its
            // responses are written out and there is room; write while
            // output is pending.
            let mut interest = EventSet::empty();
            if !conn.peer_closed
                && !conn.close_after_output
                && !conn.broken
                && !serving
                && drained
                && conn.input.len() < MAX_INPUT
            {
                interest |= EventSet::IN;
            }
            if !drained && !conn.broken {
                interest |= EventSet::OUT;
            }
            if interest == conn.interest {
                continue;
            }
            let fd = conn.stream.as_raw_fd();
            let events = Events::with_data_raw(fd, TOKEN_CONNECTIONS + id, interest);
            // A hung-up socket with nothing to read or write would be
            // reported forever: it leaves the epoll set until then.
            let result = if interest.is_empty() {
                ops.remove(events)
            } else if conn.interest.is_empty() {
                ops.add(events)
            } else {
                ops.modify(events)
            };
            match result {
                Ok(()) => conn.interest = interest,
                Err(e) => {
                    log::warn!("cannot watch an API connection: {e:?}");
                    conn.broken = true;
                    if !serving {
                        done.push(id);
                    }
                }
            }
        }
        for id in done {
            if let Some(conn) = self.connections.remove(&id) {
                if !conn.interest.is_empty() {
                    // Leave the epoll set before the descriptor closes.
                    let _ = ops.remove(Events::empty_raw(conn.stream.as_raw_fd()));
                }
            }
            self.turns.retain(|&t| t != id);
        }
    }

    /// Whether a request is being served.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    /// ember-vmm is exiting: writes out what is pending, waiting a little
    /// for slow readers.
    pub fn finish(&mut self) {
        for conn in self.connections.values_mut() {
            if conn.drained() || conn.broken {
                continue;
            }
            let _ = conn.stream.set_nonblocking(false);
            let _ = conn.stream.set_write_timeout(Some(FINAL_WRITE_TIMEOUT));
            let _ = conn.stream.write_all(&conn.output[conn.written..]);
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.connections.len() >= MAX_CONNECTIONS {
                        log::warn!("refusing an API connection: {MAX_CONNECTIONS} already open");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("cannot make an API connection non-blocking: {e}");
                        continue;
                    }
                    let id = self.new_id();
                    let fd = stream.as_raw_fd();
                    let events = Events::with_data_raw(fd, TOKEN_CONNECTIONS + id, EventSet::IN);
                    if let Err(e) = ops.add(events) {
                        log::warn!("cannot watch an API connection: {e:?}");
                        continue;
                    }
                    self.connections.insert(
                        id,
                        Connection {
                            stream,
                            input: Vec::new(),
                            output: Vec::new(),
                            written: 0,
                            continue_sent: false,
                            close_after_output: false,
                            peer_closed: false,
                            broken: false,
                            interest: EventSet::IN,
                        },
                    );
                    self.turns.push_back(id);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    // Out of descriptors or memory: the listener stays
                    // readable, so rest it rather than spin.
                    log::warn!(
                        "cannot accept an API connection: {e}; not accepting for {ACCEPT_PAUSE:?}"
                    );
                    return self.pause_listener(ops);
                }
            }
        }
    }

    fn pause_listener(&mut self, ops: &mut EventOps) {
        if self.listener_paused {
            return;
        }
        if ops
            .remove(Events::empty_raw(self.listener.as_raw_fd()))
            .is_ok()
        {
            self.listener_paused = true;
            if let Err(e) = self.pause.reset(ACCEPT_PAUSE, None) {
                log::error!("cannot arm the API socket's pause timer: {e}");
            }
        }
    }

    fn resume_listener(&mut self, ops: &mut EventOps) {
        let _ = self.pause.wait();
        if !self.listener_paused {
            return;
        }
        self.listener_paused = false;
        let events = Events::with_data_raw(self.listener.as_raw_fd(), TOKEN_LISTENER, EventSet::IN);
        if let Err(e) = ops.add(events) {
            log::error!("cannot watch the API socket again: {e:?}");
        }
    }

    /// An id no open connection has.
    fn new_id(&mut self) -> ConnId {
        loop {
            // Ids stay below u32::MAX - TOKEN_CONNECTIONS: tokens never wrap.
            self.last_id = (self.last_id + 1) % (u32::MAX - TOKEN_CONNECTIONS);
            if !self.connections.contains_key(&self.last_id) {
                return self.last_id;
            }
        }
    }
}

/// Bytes read at a time into the stack, then appended to the buffer.
const READ_CHUNK: usize = 64 * 1024;

/// Reads what the client sent, up to one request's worth of buffer. Once
/// a head announces a large body ([`http::LARGE_BODY`]), the buffer is
/// made the request's length at once, its pages are populated in one call
/// and the rest is read straight into it: in a process just restored,
/// every fresh page is a fault, dear on our host (docs/platform.md), and a
/// megabyte event read into doubling buffers and copied cost ~1.8 ms.
fn read_available(conn: &mut Connection) {
    let mut chunk = [0u8; READ_CHUNK];
    while conn.input.len() < MAX_INPUT {
        let len = conn.input.len();
        let remaining = http::request_len(&conn.input).map_or(0, |total| total.saturating_sub(len));
        let result = if remaining >= http::LARGE_BODY {
            if conn.input.capacity() - len < remaining {
                conn.input.reserve_exact(remaining);
                populate_spare(&mut conn.input);
            }
            let spare = conn.input.spare_capacity_mut();
            // SAFETY: reads at most `spare.len()` bytes into the vector's
            // spare capacity, which it owns; only what was read is kept.
            let read = unsafe {
                libc::read(
                    conn.stream.as_raw_fd(),
                    spare.as_mut_ptr().cast(),
                    spare.len().min(MAX_INPUT - len),
                )
            };
            match usize::try_from(read) {
                Ok(n) => {
                    // SAFETY: the kernel wrote `n` bytes after the
                    // initialised ones.
                    unsafe { conn.input.set_len(len + n) };
                    Ok(n)
                }
                Err(_) => Err(std::io::Error::last_os_error()),
            }
        } else {
            conn.stream
                .read(&mut chunk)
                .inspect(|&n| conn.input.extend_from_slice(&chunk[..n]))
        };
        match result {
            Ok(0) => {
                conn.peer_closed = true;
                return;
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                conn.peer_closed = true;
                conn.broken = true;
                return;
            }
        }
    }
}
