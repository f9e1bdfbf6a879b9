//! The control socket (`--api-sock`): a Unix-socket HTTP server on its own
//! thread, under the `api` seccomp filter.
//!
//! The thread runs an event-manager epoll loop over the listener and its
//! connections. A complete request is routed ([`parsed_request`]) to a
//! [`VmmAction`], handed to the VMM thread (channel + eventfd), and the
//! thread waits for the one answer before it writes the response — as
//! Firecracker's API thread does. Requests are thus served one at a time,
//! in arrival order.

pub mod client;
pub mod http;
pub mod parsed_request;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{
    EventManager, EventOps, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use self::http::{parse_request, Parsed, CONTINUE};
use crate::rpc_interface::{VmmAction, VmmResponse};
use crate::seccomp::{self, ThreadKind};
use crate::vmm::ApiChannels;

/// Most connections served at once; more are refused.
const MAX_CONNECTIONS: usize = 64;

/// How long a response may take to drain when the VMM exits.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// One client connection.
struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    continue_sent: bool,
    close_after_output: bool,
    watching_output: bool,
}

/// The API thread's state: the listener, its connections, and its end of
/// the channels to the VMM thread.
struct ApiServer {
    listener: UnixListener,
    connections: HashMap<RawFd, Connection>,
    to_vmm: Sender<VmmAction>,
    from_vmm: Receiver<VmmResponse>,
    vmm_evt: EventFd,
    exit_evt: Arc<EventFd>,
    done: Sender<()>,
    finished: bool,
}

/// Binds the control socket at `path`.
pub fn bind(path: &std::path::Path) -> std::io::Result<UnixListener> {
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Starts the API thread on `listener`; returns the VMM thread's ends of
/// the channels.
pub fn start_api_thread(
    listener: UnixListener,
    seccomp_enabled: bool,
) -> std::io::Result<ApiChannels> {
    let (to_vmm, requests) = std::sync::mpsc::channel();
    let (responses, from_vmm) = std::sync::mpsc::channel();
    let (done_tx, done) = std::sync::mpsc::channel();
    let request_evt = EventFd::new(libc::EFD_NONBLOCK)?;
    let exit_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    let server = ApiServer {
        listener,
        connections: HashMap::new(),
        to_vmm,
        from_vmm,
        vmm_evt: request_evt.try_clone()?,
        exit_evt: exit_evt.clone(),
        done: done_tx,
        finished: false,
    };
    // The event loop is set up here, so that a failure stops ember-vmm at
    // start rather than leaving it unreachable, and before the thread's
    // filter goes on (creating it needs epoll_create1 and getrandom).
    let mut manager = EventManager::<ApiServer>::new()
        .map_err(|e| std::io::Error::other(format!("cannot create the API event loop: {e:?}")))?;
    let id = manager.add_subscriber(server);
    std::thread::Builder::new()
        .name("ember_api".into())
        .spawn(move || run(manager, id, seccomp_enabled))?;
    Ok(ApiChannels {
        requests,
        responses,
        request_evt,
        exit_evt,
        done,
    })
}

fn run(mut manager: EventManager<ApiServer>, id: SubscriberId, seccomp_enabled: bool) {
    if let Err(e) = seccomp::apply(ThreadKind::Api, "api", seccomp_enabled) {
        fatal(&format!("{e}; the control socket cannot be served"));
    }
    loop {
        if let Err(e) = manager.run() {
            fatal(&format!("the API event loop failed: {e:?}"));
        }
        if manager
            .subscriber_mut(id)
            .map_or(true, |server| server.finished)
        {
            break;
        }
    }
    // The process is about to exit: stay out of the way rather than run
    // the thread-exit path (which the filter does not allow).
    loop {
        std::thread::park();
    }
}

/// Without its control socket ember-vmm cannot be driven: say why and end.
fn fatal(message: &str) -> ! {
    log::error!("{message}");
    // SAFETY: _exit ends the process at once (exit_group, which every filter allows).
    unsafe { libc::_exit(crate::ExitCode::GenericError.code()) }
}

const TOKEN_LISTENER: u32 = u32::MAX;
const TOKEN_EXIT: u32 = u32::MAX - 1;

impl ApiServer {
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
                    if let Err(e) = ops.add(Events::with_data_raw(fd, fd as u32, EventSet::IN)) {
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
                            watching_output: false,
                        },
                    );
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

    /// Reads what the client sent, serves every complete request, writes
    /// what can be written. Returns false when the connection is done.
    fn serve(&mut self, fd: RawFd, readable: bool) -> bool {
        let Some(conn) = self.connections.get_mut(&fd) else {
            return false;
        };
        let mut peer_closed = false;
        if readable {
            let mut chunk = [0u8; 64 * 1024];
            loop {
                match conn.stream.read(&mut chunk) {
                    Ok(0) => {
                        peer_closed = true;
                        break;
                    }
                    Ok(n) => {
                        conn.input.extend_from_slice(&chunk[..n]);
                        // Enough for any request we accept: serve before
                        // reading more (epoll reports the rest again).
                        if conn.input.len() > http::MAX_HEAD + http::MAX_BODY {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return false,
                }
            }
        }

        while !conn.close_after_output {
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
                    let response = match parsed_request::parse(&request) {
                        Ok(action) => parsed_request::response(ask_vmm(
                            &self.to_vmm,
                            &self.from_vmm,
                            &self.vmm_evt,
                            action,
                        )),
                        Err(response) => response,
                    };
                    conn.output
                        .extend_from_slice(&response.encode(request.close));
                    conn.close_after_output |= request.close;
                }
            }
        }

        match flush(conn) {
            Ok(true) if conn.close_after_output || peer_closed => false,
            Ok(_) => !peer_closed || !conn.output.is_empty(),
            Err(_) => false,
        }
    }

    fn close(&mut self, fd: RawFd, ops: &mut EventOps) {
        // Leave the epoll set before the descriptor closes: the next
        // connection may get the same number.
        if let Err(e) = ops.remove(Events::empty_raw(fd)) {
            log::warn!("cannot stop watching an API connection: {e:?}");
        }
        self.connections.remove(&fd);
    }

    /// The VMM is exiting: write out what is pending, then report done.
    fn finish(&mut self) {
        for conn in self.connections.values_mut() {
            if conn.output.is_empty() {
                continue;
            }
            let _ = conn.stream.set_nonblocking(false);
            let _ = conn.stream.set_write_timeout(Some(FINAL_WRITE_TIMEOUT));
            let _ = conn.stream.write_all(&conn.output);
        }
        self.finished = true;
        let _ = self.done.send(());
    }
}

/// Hands `action` to the VMM thread and waits for its answer.
fn ask_vmm(
    to_vmm: &Sender<VmmAction>,
    from_vmm: &Receiver<VmmResponse>,
    evt: &EventFd,
    action: VmmAction,
) -> VmmResponse {
    let gone = || crate::rpc_interface::VmmActionError::Exiting;
    to_vmm.send(action).map_err(|_| gone())?;
    evt.write(1).map_err(|_| gone())?;
    from_vmm.recv().map_err(|_| gone())?
}

/// Writes as much pending output as the socket takes; `Ok(true)` when all is out.
fn flush(conn: &mut Connection) -> std::io::Result<bool> {
    while !conn.output.is_empty() {
        match conn.stream.write(&conn.output) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                conn.output.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_LISTENER => self.accept(ops),
            TOKEN_EXIT => {
                let _ = self.exit_evt.read();
                self.finish();
            }
            _ => {
                let fd = events.fd();
                let set = events.event_set();
                let readable = set.contains(EventSet::IN);
                let keep = !set.intersects(EventSet::ERROR)
                    && self.serve(fd, readable || set.contains(EventSet::HANG_UP));
                if !keep {
                    return self.close(fd, ops);
                }
                // Watch for writability only while output is pending.
                if let Some(conn) = self.connections.get_mut(&fd) {
                    let want_output = !conn.output.is_empty();
                    if want_output != conn.watching_output {
                        let set = if want_output {
                            EventSet::IN | EventSet::OUT
                        } else {
                            EventSet::IN
                        };
                        if ops
                            .modify(Events::with_data_raw(fd, fd as u32, set))
                            .is_ok()
                        {
                            conn.watching_output = want_output;
                        }
                    }
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let listener =
            Events::with_data_raw(self.listener.as_raw_fd(), TOKEN_LISTENER, EventSet::IN);
        let exit = Events::with_data_raw(self.exit_evt.as_raw_fd(), TOKEN_EXIT, EventSet::IN);
        if ops.add(listener).is_err() || ops.add(exit).is_err() {
            log::error!("cannot watch the API socket");
        }
    }
}
