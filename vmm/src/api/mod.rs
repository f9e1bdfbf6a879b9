//! The control socket (`--api-sock`): a Unix-socket HTTP server served on
//! the VMM thread's event loop.
//!
//! A complete request is routed ([`parsed_request`]) to a [`VmmAction`];
//! the VMM answers it at once or, for work the guest does, when the guest
//! replies. Requests are served one at a time, in arrival order (round
//! robin over connections), as Firecracker's API thread serves them — but
//! without a thread of its own: on our KVM every hand-off between threads
//! is a wake-up that costs up to ~20 µs when it crosses CPUs, and an
//! invocation would pay two more of them (docs/decisions.md).
//!
//! Connections are non-blocking. A connection that sent more than one
//! request waits with its input unread (no EPOLLIN) until its request is
//! answered, so a client cannot make ember-vmm buffer without bound.

pub mod client;
pub mod http;
pub mod parsed_request;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;

use self::http::{parse_request, Parsed, CONTINUE};
use crate::rpc_interface::{VmmAction, VmmResponse};

/// Most connections served at once; more are refused.
const MAX_CONNECTIONS: usize = 64;

/// How long responses may take to drain when ember-vmm exits.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Event tokens at and above this belong to the API server.
const TOKEN_BASE: u32 = 1 << 20;
const TOKEN_LISTENER: u32 = TOKEN_BASE;

/// Most input buffered per connection: one whole request.
const MAX_INPUT: usize = http::MAX_HEAD + http::MAX_BODY;

/// One client connection.
struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    continue_sent: bool,
    /// Close once the output is written (the client asked, or it sent
    /// something unparseable).
    close_after_output: bool,
    /// The client hung up (or the socket failed): no more input.
    peer_closed: bool,
    /// A write failed: the connection is dropped.
    broken: bool,
    /// The events epoll reports for it now.
    interest: EventSet,
}

/// The control socket's listener and connections.
pub struct ApiServer {
    listener: UnixListener,
    connections: HashMap<RawFd, Connection>,
    /// Connections in the order they are offered a turn.
    turns: VecDeque<RawFd>,
    /// The connection whose request the VMM is serving, and whether it
    /// asked to close afterwards.
    in_flight: Option<(RawFd, bool)>,
}

/// Binds the control socket at `path`.
pub fn bind(path: &std::path::Path) -> std::io::Result<ApiServer> {
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    Ok(ApiServer {
        listener,
        connections: HashMap::new(),
        turns: VecDeque::new(),
        in_flight: None,
    })
}

impl ApiServer {
    /// Whether `token` is one of the server's.
    pub fn owns(token: u32) -> bool {
        token >= TOKEN_BASE
    }

    /// Adds the listener to the event loop.
    pub fn register(&self, ops: &mut EventOps) {
        let events = Events::with_data_raw(self.listener.as_raw_fd(), TOKEN_LISTENER, EventSet::IN);
        if let Err(e) = ops.add(events) {
            log::error!("cannot watch the API socket: {e:?}");
        }
    }

    /// Handles readiness of the listener or of a connection.
    pub fn on_event(&mut self, events: &Events, ops: &mut EventOps) {
        if events.data() == TOKEN_LISTENER {
            return self.accept(ops);
        }
        let Some(conn) = self.connections.get_mut(&events.fd()) else {
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
        if set.contains(EventSet::OUT) && flush(conn).is_err() {
            conn.broken = true;
        }
    }

    /// The next request to serve, if none is in flight: requests that do
    /// not route (bad path, bad JSON) are answered here and skipped.
    pub fn next_request(&mut self) -> Option<VmmAction> {
        if self.in_flight.is_some() {
            return None;
        }
        for _ in 0..self.turns.len() {
            let fd = self.turns.pop_front()?;
            self.turns.push_back(fd);
            let Some(conn) = self.connections.get_mut(&fd) else {
                continue;
            };
            while !conn.close_after_output && !conn.broken {
                match parse_request(&conn.input, conn.continue_sent) {
                    Parsed::Incomplete => break,
                    Parsed::ExpectsContinue => {
                        conn.output.extend_from_slice(CONTINUE);
                        conn.continue_sent = true;
                        break;
                    }
                    Parsed::Invalid(response) => {
                        conn.output.extend_from_slice(&response.encode(true));
                        conn.close_after_output = true;
                    }
                    Parsed::Request(request, used) => {
                        conn.input.drain(..used);
                        conn.continue_sent = false;
                        match parsed_request::parse(&request) {
                            Ok(action) => {
                                self.in_flight = Some((fd, request.close));
                                return Some(action);
                            }
                            Err(response) => {
                                conn.output
                                    .extend_from_slice(&response.encode(request.close));
                                conn.close_after_output |= request.close;
                            }
                        }
                    }
                }
            }
        }
        None
    }

    /// Answers the request in flight.
    pub fn respond(&mut self, answer: VmmResponse) {
        let Some((fd, close)) = self.in_flight.take() else {
            log::warn!("an answer with no request in flight was dropped");
            return;
        };
        // The client may have gone meanwhile: then the answer has no reader.
        let Some(conn) = self.connections.get_mut(&fd) else {
            return;
        };
        let response = parsed_request::response(answer);
        conn.output.extend_from_slice(&response.encode(close));
        conn.close_after_output |= close;
        if flush(conn).is_err() {
            conn.broken = true;
        }
    }

    /// After events: drops finished connections and sets what epoll
    /// watches on the others.
    pub fn sync(&mut self, ops: &mut EventOps) {
        let in_flight = self.in_flight.map(|(fd, _)| fd);
        let mut done = Vec::new();
        for (&fd, conn) in &mut self.connections {
            let drained = conn.output.is_empty();
            // A client that sent its request and then hung up (or shut
            // down its writing side) still gets served.
            let served = || {
                in_flight != Some(fd)
                    && matches!(
                        parse_request(&conn.input, conn.continue_sent),
                        Parsed::Incomplete
                    )
            };
            let finished = conn.broken
                || (drained && conn.close_after_output)
                || (drained && conn.peer_closed && served());
            if finished {
                done.push(fd);
                continue;
            }
            // Read while there is room and nothing of this connection's is
            // waiting to be served; write while output is pending.
            let mut interest = EventSet::empty();
            let waiting = in_flight == Some(fd) || conn.input.len() >= MAX_INPUT;
            if !conn.peer_closed && !conn.close_after_output && !waiting {
                interest |= EventSet::IN;
            }
            if !drained {
                interest |= EventSet::OUT;
            }
            if interest != conn.interest {
                let events = Events::with_data_raw(fd, token(fd), interest);
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
                        done.push(fd);
                    }
                }
            }
        }
        for fd in done {
            if let Some(conn) = self.connections.remove(&fd) {
                if !conn.interest.is_empty() {
                    // Leave the epoll set before the descriptor closes: the
                    // next connection may get the same number.
                    let _ = ops.remove(Events::empty_raw(fd));
                }
            }
            self.turns.retain(|&t| t != fd);
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
            if conn.output.is_empty() || conn.broken {
                continue;
            }
            let _ = conn.stream.set_nonblocking(false);
            let _ = conn.stream.set_write_timeout(Some(FINAL_WRITE_TIMEOUT));
            let _ = conn.stream.write_all(&conn.output);
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
                    let fd = stream.as_raw_fd();
                    if let Err(e) = ops.add(Events::with_data_raw(fd, token(fd), EventSet::IN)) {
                        log::warn!("cannot watch an API connection: {e:?}");
                        continue;
                    }
                    self.connections.insert(
                        fd,
                        Connection {
                            stream,
                            input: Vec::new(),
                            output: Vec::new(),
                            continue_sent: false,
                            close_after_output: false,
                            peer_closed: false,
                            broken: false,
                            interest: EventSet::IN,
                        },
                    );
                    self.turns.push_back(fd);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("cannot accept an API connection: {e}");
                    return;
                }
            }
        }
    }
}

/// The event token of connection `fd`.
fn token(fd: RawFd) -> u32 {
    TOKEN_BASE + 1 + fd as u32
}

/// Reads what the client sent, up to one request's worth of buffer.
fn read_available(conn: &mut Connection) {
    let mut chunk = [0u8; 64 * 1024];
    while conn.input.len() < MAX_INPUT {
        match conn.stream.read(&mut chunk) {
            Ok(0) => {
                conn.peer_closed = true;
                return;
            }
            Ok(n) => conn.input.extend_from_slice(&chunk[..n]),
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

/// Writes as much pending output as the socket takes.
fn flush(conn: &mut Connection) -> std::io::Result<()> {
    while !conn.output.is_empty() {
        match conn.stream.write(&conn.output) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                conn.output.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
