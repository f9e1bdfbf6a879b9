//! The VMM thread: an event-manager epoll loop that owns the microVM.
//!
//! Its events: the control socket and its connections (served here, see
//! [`crate::api`]), vCPU events (an eventfd the vCPU threads signal:
//! doorbells, pause acks, stops), the i8042 reset line, a timerfd for the
//! mailbox deadline, and console input (stdin, forwarded to the UART as
//! Firecracker does; the console output is written by the vCPU thread in
//! the exit, a line at a time). Nothing here sleeps; the one poll is the
//! short watch of guest memory after a request (below).
//!
//! The host side of the mailbox lives here. A request is written into guest
//! memory while the guest is parked in its doorbell exit (or on its way to
//! it, its answer already taken), or while it prepares its next instance
//! and will look for one; then vCPU 0 is told to continue (unless it is
//! still running). The answer is taken from guest memory if it comes within
//! `--mailbox-poll-us`, else when the doorbell is reported; either way each
//! doorbell is matched to exactly one message. Requests made while the
//! guest still boots wait for its `ready`. The guest's messages are checked
//! before use; a message that breaks the protocol is refused with an error
//! to the caller, and the guest is left parked, so the VMM keeps serving.

mod snapshot;
pub use snapshot::check_guest_protocol;

use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_abi::function::{
    ErrorKind, GuestStats, InvokeParams, LoadedInfo, Outcome, OutcomeHeader, MAX_EVENT_BYTES,
};
use ember_abi::mailbox::{CrashReport, GuestInfo, MessageKind, RequestKind};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::api::ApiServer;
use crate::builder::{build_microvm_for_boot, BuildOptions, Microvm, StartMicrovmError};
use crate::devices::legacy::serial::{ConsoleOutput, ConsoleSink};
use crate::devices::mailbox::{GuestMessage, ProtocolError};
use crate::resources::VmResources;
use crate::rpc_interface::{
    CrashInfo, EmberStatus, GuestEnd, GuestTest, InstanceInfo, Invocation, MailboxStatus,
    VmmAction, VmmActionError, VmmData, VmmResponse,
};
use crate::seccomp::{self, ThreadKind};
use crate::vmm_config::function::FunctionBundle;
use crate::vstate::kvm::KvmContext;
use crate::vstate::vcpu::{VcpuCommand, VcpuEvent, VcpuEventSender, VcpuStop};
use crate::{ExitCode, VMM_VERSION};

/// Settings from the command line.
#[derive(Debug, Clone)]
pub struct VmmOptions {
    /// Instance id (`--id`).
    pub id: String,
    /// Install seccomp filters (false with `--no-seccomp`).
    pub seccomp: bool,
    /// Serve `/ember/test/*` (`--test-commands`).
    pub test_commands: bool,
    /// Announce a mailbox to the guest (false with `--no-mailbox`).
    pub mailbox: bool,
    /// How long the guest may take to answer a mailbox request.
    pub mailbox_timeout: Duration,
    /// How long the VMM thread watches guest memory for the answer to a
    /// request it has just delivered, before it waits for the doorbell
    /// (`--mailbox-poll-us`; zero turns watching off).
    pub mailbox_poll: Duration,
    /// Count the boot path's ring-0 instructions (`--count-ring0`).
    pub count_ring0: bool,
}

/// Firecracker's instance states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InstanceState {
    NotStarted,
    Running,
    Paused,
}

impl InstanceState {
    fn name(self) -> &'static str {
        match self {
            InstanceState::NotStarted => "Not started",
            InstanceState::Running => "Running",
            InstanceState::Paused => "Paused",
        }
    }
}

/// What the guest is doing, as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GuestState {
    NotStarted,
    /// Started, no `ready` yet.
    Booting,
    /// Parked in the doorbell exit, waiting for a request.
    Idle,
    /// Serving request `seq`.
    Busy(u64),
    /// Answered request `seq` and preparing for the next (a fresh
    /// instance); it posts `idle` when done, unless a request came
    /// meanwhile, which it then serves without exiting.
    Preparing(u64),
    /// Serving request `seq`, written while it prepared after answering
    /// `answered`: an `idle` for `answered` means it looked before the
    /// request was there, and it is let go on to find it.
    BusyAfterPreparing {
        answered: u64,
        seq: u64,
    },
    /// Ended; the text says how.
    Stopped(String),
}

/// What a request to the guest carries: a small head (an invocation's
/// parameters) and a body (an event, a module, echo bytes), written into
/// the mailbox one after the other so that the body is not copied to join
/// them.
#[derive(Debug, Default)]
struct Payload {
    head: Vec<u8>,
    body: Vec<u8>,
}

impl Payload {
    fn body(body: Vec<u8>) -> Payload {
        Payload {
            head: Vec::new(),
            body,
        }
    }

    fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }
}

/// The request to the guest that an API call waits on.
struct Pending {
    kind: RequestKind,
    /// Emptied once written to the mailbox.
    payload: Payload,
    /// A load: the function's time limit, the VM's once it is loaded.
    function_timeout_ms: Option<u64>,
    /// Set once written to the mailbox.
    seq: Option<u64>,
    sent_at: Option<Instant>,
    /// When the request was made.
    asked_at: Instant,
    deadline: Instant,
}

/// A pause or resume waiting for every vCPU to acknowledge.
struct Transition {
    target: InstanceState,
    remaining: usize,
}

const TOKEN_VCPU: u32 = 2;
const TOKEN_RESET: u32 = 3;
const TOKEN_TIMER: u32 = 4;
const TOKEN_CONSOLE_IN: u32 = 5;

/// How long past its allowance the guest may take to answer a load, or to
/// become idle for a pause, before ember-vmm stops the VM.
const BACKSTOP_GRACE: Duration = Duration::from_secs(2);

/// How long past an invocation's time limit ember-vmm waits for the answer
/// before it stops the VM. Compiled code carries no time checks, so this is
/// how a function computing past its limit is stopped (docs/functions.md,
/// "Time limits"); the guest itself stops one waiting in a host call at the
/// limit, and answers.
const INVOKE_GRACE: Duration = Duration::from_millis(100);

/// What a command's next instance may take to prepare (zeroing its
/// memory, writing its data segments), beyond a request's own time limit
/// when the request arrives while the guest prepares it.
const PREPARE_ALLOWANCE: Duration = Duration::from_secs(1);

/// What the guest may spend before it starts on a request: running a
/// reactor's `_initialize` (at load, or rebuilding after a failure).
const INITIALIZE_ALLOWANCE: Duration =
    Duration::from_millis(ember_abi::function::INITIALIZE_TIMEOUT_MS);

/// The VMM: configuration, the microVM once started, and the host side of
/// the mailbox.
pub struct Vmm {
    options: VmmOptions,
    process_start: Instant,
    resources: VmResources,
    console: ConsoleSink,
    kvm: Option<KvmContext>,
    /// `/dev/kvm` again, for a start retried after a failed one.
    kvm_spare: Option<std::os::fd::OwnedFd>,
    api: Option<ApiServer>,
    vcpu_events: Receiver<(u8, VcpuEvent)>,
    vcpu_event_sender: VcpuEventSender,
    vcpu_evt: Arc<EventFd>,
    reset_evt: EventFd,
    timer: TimerFd,
    microvm: Option<Microvm>,
    state: InstanceState,
    guest: GuestState,
    pending: Option<Pending>,
    /// The loaded function's time limit per invocation, ms.
    function_timeout_ms: Option<u64>,
    /// A load sent with a module from the compiled-module cache: if the
    /// guest refuses that compilation, it is compiled anew and sent again.
    cached_load: Option<Box<FunctionBundle>>,
    /// The guest answered a `load` with `loaded` (even a malformed one): its
    /// code area holds a live module, never to be written again.
    code_area_in_use: bool,
    /// The 2 MiB regions of guest memory (first pages) that ember-vmm wrote
    /// a compiled module into: the next Diff stores them whole.
    module_regions: Vec<u64>,
    /// How the module of the load in flight was compiled, and its size.
    load_compiled: Option<(crate::vmm_config::function::CompileInfo, u64)>,
    /// How much longer than its own limit a request delivered while the
    /// guest prepares may take (set with each `outcome_preparing`).
    preparing_allowance: Duration,
    /// The pause or resume waiting for every vCPU's acknowledgement.
    transition: Option<Transition>,
    next_seq: u64,
    started_at: Option<Instant>,
    ready_at: Option<Instant>,
    guest_info: Option<GuestInfo>,
    requests: u64,
    protocol_errors: u64,
    /// Messages taken from guest memory before their doorbell exit was
    /// reported: that many doorbells bring nothing new.
    early_messages: u32,
    /// Counters for `GET /ember/status`.
    answers_from_memory: u64,
    deliveries_while_preparing: u64,
    ring0_instructions: Option<u64>,
    exit_code: Option<ExitCode>,
    /// Times this VM was restored (written into the guest's restore block).
    generation: u64,
    snapshots_created: u64,
    /// The working set to record after the first invocation of a restored VM.
    working_set: Option<snapshot::WorkingSetRecording>,
    /// A restored VM's working set for the guest to touch once the load is
    /// answered (a [`ember_abi::mailbox::TouchList`]).
    touch_due: Option<Vec<u8>>,
    /// That touch is in flight: API requests wait for it, and what answers
    /// the request in flight is not an API answer.
    touching: bool,
    /// The last touch's answer.
    touched: Option<crate::rpc_interface::TouchStatus>,
    /// A pause asked while the guest prepared its next instance: it pauses
    /// once the guest is idle (the mailbox quiet).
    pause_when_idle: bool,
    /// Built by `--prepare`, waiting for a snapshot load.
    prepared: bool,
    /// Restored paused: the guest learns of the restore when resumed.
    restore_block_due: bool,
    /// When a deferred pause gives up on the guest.
    pause_deadline: Option<Instant>,
    /// Pause/resume acknowledgements still to come for commands no
    /// transition waits for (a load's resume): they must not complete the
    /// next transition.
    unclaimed_acks: usize,
    /// `--prepare --track-dirty-pages`.
    prepared_tracking: bool,
    pauses_deferred: u64,
    /// Populates working sets off the restore path.
    prefetcher: Option<crate::snapshot::memory::Prefetcher>,
}

/// Errors setting up the VMM thread.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum VmmError {
    /// cannot create {what}: {source}
    Setup {
        /// Which file descriptor.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

impl Vmm {
    /// A VMM with `resources` configured, its console on `console`, the
    /// VM prepared in `kvm`, serving the control socket `api` (none with
    /// `--config-file` alone).
    pub fn new(
        options: VmmOptions,
        process_start: Instant,
        resources: VmResources,
        console: ConsoleSink,
        kvm: KvmContext,
        api: Option<ApiServer>,
    ) -> Result<Vmm, VmmError> {
        let setup = |what| move |source| VmmError::Setup { what, source };
        let vcpu_evt =
            Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(setup("the vCPU eventfd"))?);
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(setup("the reset eventfd"))?;
        let timer = TimerFd::new()
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
            .and_then(|timer| set_nonblocking(&timer).map(|()| timer))
            .map_err(setup("the mailbox timer"))?;
        let (tx, vcpu_events) = std::sync::mpsc::channel();
        Ok(Vmm {
            options,
            process_start,
            resources,
            console,
            kvm_spare: kvm.dup_kvm(),
            kvm: Some(kvm),
            api,
            vcpu_events,
            vcpu_event_sender: VcpuEventSender::new(tx, vcpu_evt.clone()),
            vcpu_evt,
            reset_evt,
            timer,
            microvm: None,
            state: InstanceState::NotStarted,
            guest: GuestState::NotStarted,
            pending: None,
            function_timeout_ms: None,
            cached_load: None,
            code_area_in_use: false,
            load_compiled: None,
            module_regions: Vec::new(),
            preparing_allowance: INITIALIZE_ALLOWANCE + BACKSTOP_GRACE,
            transition: None,
            next_seq: 1,
            started_at: None,
            ready_at: None,
            guest_info: None,
            requests: 0,
            protocol_errors: 0,
            early_messages: 0,
            answers_from_memory: 0,
            deliveries_while_preparing: 0,
            ring0_instructions: None,
            exit_code: None,
            generation: 0,
            snapshots_created: 0,
            working_set: None,
            touch_due: None,
            touching: false,
            touched: None,
            pause_when_idle: false,
            prepared: false,
            restore_block_due: false,
            pause_deadline: None,
            unclaimed_acks: 0,
            prepared_tracking: false,
            pauses_deferred: 0,
            prefetcher: None,
        })
    }

    /// The exit code, once the VMM has decided to end.
    pub fn exit_code(&self) -> Option<ExitCode> {
        self.exit_code
    }

    /// Builds and starts the microVM (InstanceStart). The VMM thread's
    /// seccomp filter is installed here, before any vCPU runs guest code.
    pub fn start_microvm(&mut self) -> Result<(), VmmActionError> {
        if self.state != InstanceState::NotStarted || self.microvm.is_some() {
            return Err(VmmActionError::AlreadyStarted);
        }
        if self.resources.boot_source.is_none() {
            return Err(StartMicrovmError::MissingBootSource.into());
        }
        // A failed start leaves nothing half-used: the console is a fresh
        // handle each time, and the VM prepared at process start is replaced.
        let (console, kvm) = self.console_and_kvm()?;
        let build = BuildOptions {
            mailbox: self.options.mailbox,
            seccomp: self.options.seccomp,
            count_ring0: self.options.count_ring0,
        };
        let started_at = Instant::now();
        let microvm = build_microvm_for_boot(
            &mut self.resources,
            &build,
            kvm,
            console,
            &self.reset_evt,
            &self.vcpu_event_sender,
        )?;
        seccomp::apply(ThreadKind::Vmm, "vmm", self.options.seccomp)
            .map_err(|e| VmmActionError::Internal(e.to_string()))?;
        for vcpu in &microvm.vcpus {
            vcpu.send(VcpuCommand::Start);
        }
        log::info!(
            "microVM started: {} vCPU(s), {} MiB, built in {} us",
            microvm.vcpus.len(),
            self.resources.machine_config.mem_size_mib,
            started_at.elapsed().as_micros()
        );
        self.started_at = Some(started_at);
        self.microvm = Some(microvm);
        self.state = InstanceState::Running;
        self.guest = GuestState::Booting;
        Ok(())
    }

    /// A fresh handle on the console, and the KVM context made at process
    /// start (or a new one, after a failed start used it).
    fn console_and_kvm(&mut self) -> Result<(ConsoleOutput, KvmContext), VmmActionError> {
        let console = self
            .console
            .try_clone()
            .map(ConsoleOutput::new)
            .map_err(|e| VmmActionError::Internal(format!("cannot reopen the console: {e}")))?;
        let kvm = match self.kvm.take() {
            Some(kvm) => kvm,
            None => {
                let kvm = self.kvm_spare.as_ref().and_then(|fd| fd.try_clone().ok());
                KvmContext::open(kvm).map_err(StartMicrovmError::Kvm)?
            }
        };
        Ok((console, kvm))
    }

    /// Runs one API action; `None` when the answer comes later (from the guest).
    fn handle_action(&mut self, action: VmmAction) -> Option<VmmResponse> {
        let started = self.state != InstanceState::NotStarted;
        Some(match action {
            VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo(InstanceInfo {
                id: self.options.id.clone(),
                state: self.state.name(),
                vmm_version: VMM_VERSION,
                app_name: "ember-vmm",
            })),
            VmmAction::PutBootSource(_) | VmmAction::PutMachineConfig(_)
                if started || self.microvm.is_some() =>
            {
                Err(VmmActionError::OperationNotSupportedPostBoot)
            }
            VmmAction::PutBootSource(config) => self
                .resources
                .set_boot_source(config)
                .map(|()| VmmData::Empty)
                .map_err(Into::into),
            VmmAction::PutMachineConfig(config) => self
                .resources
                .set_machine_config(config)
                .map(|()| VmmData::Empty)
                .map_err(Into::into),
            VmmAction::GetMachineConfig => Ok(VmmData::MachineConfig(
                self.resources.machine_config.clone(),
            )),
            VmmAction::InstanceStart => self.start_microvm().map(|()| VmmData::Empty),
            VmmAction::Pause => return self.begin_transition(InstanceState::Paused),
            VmmAction::Resume => return self.begin_transition(InstanceState::Running),
            VmmAction::CreateSnapshot(params) => self.create_snapshot(&params),
            VmmAction::LoadSnapshot(params) => self.load_snapshot(&params),
            VmmAction::GetEmberStatus => Ok(VmmData::Status(Box::new(self.status()))),
            VmmAction::SendCtrlAltDel => return self.ask(RequestKind::Shutdown),
            VmmAction::Ping => return self.ask(RequestKind::Ping),
            VmmAction::Echo(payload) => {
                return self.request_guest(
                    RequestKind::Echo,
                    Payload::body(payload),
                    self.options.mailbox_timeout,
                    None,
                )
            }
            VmmAction::GetGuestStats => return self.ask(RequestKind::Stats),
            VmmAction::LoadFunction(bundle) => return self.load_function(bundle),
            VmmAction::Invoke(event) => return self.invoke(event),
            VmmAction::TestGuest(_) | VmmAction::TestForbiddenSyscall(_)
                if !self.options.test_commands =>
            {
                Err(VmmActionError::TestCommandsDisabled)
            }
            VmmAction::TestGuest(test) => {
                let (kind, payload) = match test {
                    GuestTest::Crash => (RequestKind::TestCrash, Vec::new()),
                    GuestTest::Reset => (RequestKind::TestReset, Vec::new()),
                    GuestTest::BadLength => (RequestKind::TestBadLength, Vec::new()),
                    GuestTest::Hang => (RequestKind::TestHang, Vec::new()),
                    GuestTest::DoorbellLoop => (RequestKind::TestDoorbellLoop, Vec::new()),
                    GuestTest::MaximalAnswer(code) => {
                        (RequestKind::TestMaximalAnswer, code.to_le_bytes().to_vec())
                    }
                    GuestTest::ConsoleFlood(bytes) => {
                        (RequestKind::TestConsoleFlood, bytes.to_le_bytes().to_vec())
                    }
                };
                return self.request_guest(
                    kind,
                    Payload::body(payload),
                    self.options.mailbox_timeout,
                    None,
                );
            }
            VmmAction::TestForbiddenSyscall(ThreadKind::Vcpu) => {
                // A paused vCPU takes the command at once; a running one
                // when it next leaves the guest.
                match self.microvm.as_ref().and_then(|m| m.vcpus.first()) {
                    Some(vcpu) => {
                        vcpu.send(VcpuCommand::TestForbiddenSyscall);
                        Ok(VmmData::Empty)
                    }
                    None => Err(VmmActionError::Internal("no vCPU yet".into())),
                }
            }
            VmmAction::TestForbiddenSyscall(ThreadKind::Prefetch) => match &self.prefetcher {
                Some(prefetcher) if prefetcher.test_forbidden_syscall() => Ok(VmmData::Empty),
                _ => Err(VmmActionError::Internal(
                    "no prefetch thread (it starts with a prepared or restored VM)".into(),
                )),
            },
            VmmAction::TestForbiddenSyscall(_) => Err(forbidden_syscall()),
        })
    }

    /// A request without payload, with the usual time to answer.
    fn ask(&mut self, kind: RequestKind) -> Option<VmmResponse> {
        self.request_guest(kind, Payload::default(), self.options.mailbox_timeout, None)
    }

    /// Queues a request for the guest; it is delivered now if the guest
    /// waits (or prepares, and will look), or when it becomes ready. A
    /// load carries the function's time limit.
    fn request_guest(
        &mut self,
        kind: RequestKind,
        payload: Payload,
        timeout: Duration,
        function_timeout_ms: Option<u64>,
    ) -> Option<VmmResponse> {
        let refuse = |e| Some(Err(e));
        if let Err(e) = self.can_request() {
            return refuse(e);
        }
        let Some(mailbox) = self.microvm.as_ref().and_then(|m| m.mailbox.as_ref()) else {
            return refuse(VmmActionError::NoMailbox);
        };
        if payload.len() as u64 > mailbox.max_payload() {
            return refuse(
                crate::devices::mailbox::MailboxError::PayloadTooLarge {
                    len: payload.len(),
                    max: mailbox.max_payload(),
                }
                .into(),
            );
        }
        // The request's own time starts after the preparation.
        let timeout = match self.guest {
            GuestState::Preparing(_) => timeout + self.preparing_allowance,
            _ => timeout,
        };
        let asked_at = Instant::now();
        self.pending = Some(Pending {
            asked_at,
            kind,
            payload,
            function_timeout_ms,
            seq: None,
            sent_at: None,
            deadline: asked_at + timeout,
        });
        self.arm_timer(timeout);
        if matches!(self.guest, GuestState::Idle | GuestState::Preparing(_)) {
            self.deliver();
        }
        None
    }

    /// Sends the function to the guest to compile, instantiate and initialise.
    fn load_function(&mut self, bundle: Box<FunctionBundle>) -> Option<VmmResponse> {
        self.compile_and_load(bundle, false)
    }

    /// Compiles the function for this guest's CPU (from the cache unless
    /// `fresh`) and sends it.
    fn compile_and_load(
        &mut self,
        mut bundle: Box<FunctionBundle>,
        fresh: bool,
    ) -> Option<VmmResponse> {
        // (Requests are served one at a time: no other load is pending.)
        if self.function_timeout_ms.is_some() || self.code_area_in_use {
            return Some(Err(VmmActionError::FunctionAlreadyLoaded));
        }
        // Everything that would refuse the request, before the module is
        // compiled and written into guest memory.
        if let Err(e) = self.can_request() {
            return Some(Err(e));
        }
        // Compiled for the CPU the guest itself reports (GuestInfo): on
        // some KVMs its `cpuid` is not the table ember-vmm set.
        let Some(info) = self.guest_info else {
            return Some(Err(VmmActionError::LoadFailed(
                "the guest has not said `ready` (with its CPU's features) yet".into(),
            )));
        };
        let [leaf1, leaf7, ext1] = info.cpuid;
        let features = ember_compile::CpuFeatures::from_cpuid(leaf1, leaf7, ext1);
        log::info!("compiling for CPU features {}", features.to_line());
        if let Err(e) = bundle.compile(features, fresh) {
            return Some(Err(VmmActionError::LoadFailed(e.to_string())));
        }
        log::info!(
            "function compiled ({}) in {} us",
            if bundle.compiled.from_cache {
                "from the cache"
            } else {
                "by Cranelift"
            },
            bundle.compiled.micros
        );
        // The compiled module goes straight where the guest runs it.
        let Some(mailbox) = self.microvm.as_ref().and_then(|m| m.mailbox.as_ref()) else {
            return Some(Err(VmmActionError::NoMailbox));
        };
        if let Err(e) = mailbox.write_module(info.code_area, info.code_area_bytes, &bundle.module) {
            return Some(Err(VmmActionError::LoadFailed(e.to_string())));
        }
        self.module_regions = crate::snapshot::memory::whole_regions(
            info.code_area,
            info.code_area_bytes,
            bundle.module.len() as u64,
        );
        let payload = Payload::body(bundle.encode(self.microvm.as_ref().map_or(0, |m| m.tsc_khz)));
        self.load_compiled = Some((bundle.compiled.clone(), bundle.module.len() as u64));
        let timeout_ms = bundle.timeout_ms;
        self.cached_load = bundle.compiled.from_cache.then_some(bundle);
        // Loading gets the usual time to answer, `_initialize` its own
        // limit on top (the guest stops it then and answers).
        self.request_guest(
            RequestKind::Load,
            payload,
            self.options.mailbox_timeout + INITIALIZE_ALLOWANCE + BACKSTOP_GRACE,
            Some(timeout_ms),
        )
    }

    /// Sends an invocation: the event, the time limit and the wall clock.
    /// ember-vmm waits the time limit plus [`INVOKE_GRACE`]; a guest that
    /// has not answered by then is stopped for good.
    fn invoke(&mut self, event: Vec<u8>) -> Option<VmmResponse> {
        let Some(timeout_ms) = self.function_timeout_ms else {
            return Some(Err(VmmActionError::NoFunction));
        };
        if event.len() > MAX_EVENT_BYTES {
            return Some(Err(VmmActionError::EventTooLarge {
                len: event.len(),
                max: MAX_EVENT_BYTES,
            }));
        }
        let params = InvokeParams {
            timeout_ms,
            realtime_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        };
        let payload = Payload {
            head: params.encode().to_vec(),
            body: event,
        };
        let backstop = Duration::from_millis(timeout_ms) + INVOKE_GRACE;
        self.request_guest(RequestKind::Invoke, payload, backstop, None)
    }

    /// Whether the guest can be sent a request now (running, with a
    /// mailbox, not stopped, paused or busy); the reason if not.
    fn can_request(&self) -> Result<(), VmmActionError> {
        let Some(microvm) = &self.microvm else {
            return Err(VmmActionError::NotRunning(self.state.name()));
        };
        if microvm.mailbox.is_none() {
            return Err(VmmActionError::NoMailbox);
        }
        if let GuestState::Stopped(how) = &self.guest {
            return Err(VmmActionError::GuestStopped(how.clone()));
        }
        if self.state == InstanceState::Paused {
            return Err(VmmActionError::Paused);
        }
        if self.pending.is_some() || self.transition.is_some() {
            return Err(VmmActionError::Busy);
        }
        Ok(())
    }

    /// Asks a just-restored guest to touch its working set (after the load
    /// was answered): the first-touch faults, ~2.5–10 µs a page on our KVM,
    /// are then taken before the first invocation rather than in it.
    fn start_touch(&mut self) {
        let Some(list) = self.touch_due.take() else {
            return;
        };
        // Set first: the answer may be taken from memory before
        // request_guest returns.
        self.touching = true;
        let timeout = self.options.mailbox_timeout;
        if let Some(Err(e)) =
            self.request_guest(RequestKind::Touch, Payload::body(list), timeout, None)
        {
            self.touching = false;
            log::warn!("cannot ask the guest to touch its working set: {e}");
        }
    }

    /// Writes the pending request into the mailbox and lets vCPU 0 go on;
    /// while the guest prepares, it finds the request itself.
    fn deliver(&mut self) {
        let seq = self.next_seq;
        let written = {
            let (Some(microvm), Some(pending)) = (&self.microvm, &self.pending) else {
                return;
            };
            let Some(mailbox) = &microvm.mailbox else {
                return;
            };
            let payload = &pending.payload;
            mailbox.write_request(seq, pending.kind, &[&payload.head, &payload.body])
        };
        if let Err(e) = written {
            self.pending = None;
            self.disarm_timer();
            self.respond(Err(e.into()));
            return;
        }
        self.next_seq += 1;
        if let Some(pending) = &mut self.pending {
            pending.seq = Some(seq);
            pending.sent_at = Some(Instant::now());
            pending.payload = Payload::default();
        }
        self.guest = match self.guest {
            // The vCPU runs: it reads the request after preparing, or
            // posts `idle` first and is let go on then (see on_idle).
            GuestState::Preparing(answered) => {
                self.deliveries_while_preparing += 1;
                GuestState::BusyAfterPreparing { answered, seq }
            }
            _ => {
                self.continue_vcpu();
                GuestState::Busy(seq)
            }
        };
        self.watch_for_answer(seq);
    }

    /// Watches guest memory for the answer to request `seq` for a short
    /// while, and takes it from there when it comes. On our KVM the
    /// doorbell exit and the wake-up of this thread that follow it cost
    /// ~40 µs, most of a short function's round trip; the guest writes its
    /// message's sequence number last, so the message is whole once the
    /// number appears. The exit is then reported later and counted off
    /// ([`Vmm::early_messages`]). Costs up to `mailbox_poll` of this
    /// thread's CPU time per request, as KVM's halt polling does.
    fn watch_for_answer(&mut self, seq: u64) {
        let window = self.options.mailbox_poll;
        if window.is_zero() {
            return;
        }
        let Some(mailbox) = self.microvm.as_ref().and_then(|m| m.mailbox.as_ref()) else {
            return;
        };
        let deadline = Instant::now() + window;
        loop {
            for _ in 0..64 {
                let seen = mailbox.response_seq().ok();
                if seen == Some(seq) {
                    return match mailbox.read_message() {
                        Ok(message) if message.seq == seq => {
                            self.early_messages += 1;
                            self.answers_from_memory += 1;
                            self.on_message(message)
                        }
                        // Not what the number promised (a guest rewriting
                        // its message): the doorbell path reads it again.
                        _ => {}
                    };
                }
                // Delivered while it prepared, but it looked too early and
                // is posting `idle` (same seq as the answer before it, a new
                // kind): let it go on to the request now.
                if let GuestState::BusyAfterPreparing { answered, .. } = self.guest {
                    if seen == Some(answered)
                        && mailbox.response_kind().ok() == Some(MessageKind::Idle as u32)
                    {
                        self.guest = GuestState::Busy(seq);
                        self.early_messages += 1;
                        self.continue_vcpu();
                    }
                }
                std::hint::spin_loop();
            }
            if Instant::now() >= deadline {
                return;
            }
            // Where the scheduler put the vCPU thread on this CPU, let it
            // run: watching must not slow the guest it waits for.
            // SAFETY: sched_yield(2) takes no arguments and cannot fail.
            unsafe { libc::sched_yield() };
        }
    }

    /// vCPU 0 rang the doorbell: read and act on the guest's message.
    fn on_doorbell(&mut self) {
        if self.early_messages > 0 {
            // The exit behind a message already taken from memory.
            self.early_messages -= 1;
            self.pause_if_quiet();
            return;
        }
        let Some(mailbox) = self.microvm.as_ref().and_then(|m| m.mailbox.as_ref()) else {
            return;
        };
        match mailbox.read_message() {
            Ok(message) => self.on_message(message),
            Err(e) => self.protocol_error(VmmActionError::Protocol(e)),
        }
    }

    fn on_message(&mut self, message: GuestMessage) {
        match message.kind {
            MessageKind::Ready => {
                if self.guest != GuestState::Booting {
                    return self.protocol_error(unexpected(format!(
                        "guest posted `ready` while {:?}",
                        self.guest
                    )));
                }
                self.on_ready(&message);
            }
            MessageKind::Idle => self.on_idle(message.seq),
            MessageKind::Crash => self.on_crash(&message.payload),
            _ => self.on_answer(message),
        }
    }

    /// The guest touched its working set: API requests go on.
    fn on_touched(&mut self, pending: &Pending, message: &GuestMessage) {
        self.touching = false;
        let Some(touched) = ember_abi::mailbox::Touched::decode(&message.payload) else {
            self.protocol_errors += 1;
            return log::warn!(
                "guest's `touched` carried {} bytes, not a Touched",
                message.payload.len()
            );
        };
        let status = crate::rpc_interface::TouchStatus {
            read_pages: touched.read,
            written_pages: touched.written,
            guest_us: touched.ns / 1000,
            round_trip_us: pending.asked_at.elapsed().as_micros() as u64,
        };
        log::info!("working set touched by the guest: {status:?}");
        self.touched = Some(status);
    }

    /// The guest finished its work after an outcome and waits.
    fn on_idle(&mut self, seq: u64) {
        if let GuestState::BusyAfterPreparing {
            answered,
            seq: request,
        } = self.guest
        {
            if answered == seq {
                // It missed the request delivered while it prepared: it is
                // in the exit now, and reads the request when it goes on.
                self.guest = GuestState::Busy(request);
                self.continue_vcpu();
                return self.watch_for_answer(request);
            }
        }
        let waiting_after_outcome = matches!(self.guest, GuestState::Busy(s) | GuestState::Preparing(s) if s == seq)
            && self.pending.as_ref().is_none_or(|p| p.seq.is_none());
        if !waiting_after_outcome {
            return self.protocol_error(unexpected(format!(
                "guest posted `idle` for request {seq} while {:?}",
                self.guest
            )));
        }
        self.guest = GuestState::Idle;
        self.pause_if_quiet();
        self.deliver_if_waiting();
    }

    /// A deferred pause goes ahead once the mailbox is quiet: the guest
    /// idle in its doorbell exit, no request pending, and no answer taken
    /// from memory whose exit is still to come (a vCPU paused on its way
    /// to that `out` would be saved outside the exit).
    fn pause_if_quiet(&mut self) {
        let quiet =
            self.guest == GuestState::Idle && self.early_messages == 0 && self.pending.is_none();
        if !(self.pause_when_idle && quiet) {
            return;
        }
        self.pause_when_idle = false;
        self.pause_deadline = None;
        self.disarm_timer();
        if let Some(Err(e)) = self.begin_transition(InstanceState::Paused) {
            self.respond(Err(e));
        }
    }

    fn on_ready(&mut self, message: &GuestMessage) {
        let now = Instant::now();
        self.ready_at = Some(now);
        self.guest = GuestState::Idle;
        match GuestInfo::decode(&message.payload) {
            Some(info) => self.guest_info = Some(info),
            None => {
                self.protocol_errors += 1;
                log::warn!(
                    "guest `ready` carried {} bytes, not a GuestInfo",
                    message.payload.len()
                );
            }
        }
        let since_start = self.started_at.map_or(0, |t| (now - t).as_micros());
        log::info!(
            "guest ready: {} us after ember-vmm started, {} us after InstanceStart",
            (now - self.process_start).as_micros(),
            since_start
        );
        self.deliver_if_waiting();
    }

    fn deliver_if_waiting(&mut self) {
        if self.guest == GuestState::Idle && self.pending.as_ref().is_some_and(|p| p.seq.is_none())
        {
            self.deliver();
        }
    }

    /// An answer to the request in flight.
    fn on_answer(&mut self, message: GuestMessage) {
        let in_flight = self.pending.as_ref().and_then(|p| p.seq);
        if in_flight != Some(message.seq) {
            return self.protocol_error(unexpected(format!(
                "guest answered request {} but {} is in flight",
                message.seq,
                in_flight.map_or("none".to_string(), |s| s.to_string())
            )));
        }
        let Some(pending) = self.pending.take() else {
            return;
        };
        self.disarm_timer();
        self.guest = GuestState::Idle;
        if pending.kind == RequestKind::Touch && message.kind == MessageKind::Touched {
            return self.on_touched(&pending, &message);
        }
        self.requests += 1;
        let round_trip_us = pending
            .sent_at
            .map_or(0, |t| t.elapsed().as_micros() as u64);
        let expected: &[MessageKind] = match pending.kind {
            RequestKind::Ping => &[MessageKind::Pong],
            RequestKind::Echo => &[MessageKind::EchoReply],
            RequestKind::Shutdown => &[MessageKind::ShutdownAck],
            RequestKind::Load => &[MessageKind::Loaded, MessageKind::LoadFailed],
            RequestKind::Invoke => &[MessageKind::Outcome, MessageKind::OutcomePreparing],
            RequestKind::Stats => &[MessageKind::Stats],
            RequestKind::Touch => &[MessageKind::Touched],
            RequestKind::TestMaximalAnswer | RequestKind::TestConsoleFlood => &[MessageKind::Pong],
            _ => &[],
        };
        if message.kind != MessageKind::Error && !expected.contains(&message.kind) {
            self.protocol_errors += 1;
            // The guest said it waits (or not) by the kind it chose; believe
            // that much, so the vCPU is not left parked forever.
            if !message.kind.awaits_request() {
                self.guest = GuestState::Busy(message.seq);
                self.continue_vcpu();
            }
            return self.respond(Err(unexpected(format!(
                "guest answered {:?} with {:?}",
                pending.kind, message.kind
            ))));
        }
        if message.kind == MessageKind::Loaded {
            self.code_area_in_use = true;
        }
        let response = match message.kind {
            MessageKind::Error => Err(VmmActionError::GuestError(guest_text(&message.payload))),
            MessageKind::Pong => Ok(VmmData::Pong { round_trip_us }),
            MessageKind::EchoReply => Ok(VmmData::Echo {
                payload: message.payload,
                round_trip_us,
            }),
            MessageKind::ShutdownAck => {
                self.respond(Ok(VmmData::Empty));
                self.end_guest("shut down".into(), ExitCode::Ok);
                return;
            }
            MessageKind::Loaded => match LoadedInfo::decode(&message.payload) {
                Ok(info) => {
                    self.function_timeout_ms = pending.function_timeout_ms;
                    log::info!(
                        "function loaded: {:?} in {} us",
                        info.model,
                        info.load_ns / 1000
                    );
                    let mut info: crate::rpc_interface::FunctionInfo = info.into();
                    if let Some((compiled, bytes)) = self.load_compiled.take() {
                        info.compile_us = compiled.micros;
                        info.compiled = if compiled.from_cache {
                            "cache"
                        } else {
                            "compiler"
                        };
                        info.compiled_bytes = bytes;
                    }
                    Ok(VmmData::FunctionLoaded(info))
                }
                Err(e) => {
                    self.protocol_errors += 1;
                    Err(unexpected(format!("guest's `loaded` is malformed: {e}")))
                }
            },
            MessageKind::LoadFailed => {
                let why = guest_text(&message.payload);
                // A cached compilation the guest's Wasmtime refused (made
                // for other CPU features or settings, or damaged): drop it,
                // compile anew, and load that instead.
                if let Some(bundle) = self.cached_load.take() {
                    if why.starts_with(ember_abi::function::LOAD_REFUSED_PREFIX) {
                        log::warn!(
                            "the guest refused the cached compilation {} ({why}); compiling again",
                            bundle.compiled.key
                        );
                        bundle.forget_compiled();
                        // The caller's request stays unanswered until the
                        // guest answers this load.
                        if let Some(response) = self.compile_and_load(bundle, true) {
                            self.respond(response);
                        }
                        return;
                    }
                }
                Err(VmmActionError::LoadFailed(why))
            }
            MessageKind::Outcome | MessageKind::OutcomePreparing => {
                if message.kind == MessageKind::OutcomePreparing {
                    // The guest goes on to prepare the next instance, and
                    // says `idle` when done. After a failure that may be a
                    // reactor's rebuild, `_initialize` and all; otherwise
                    // it is a command's next instance.
                    let failed =
                        Outcome::decode(&message.payload).map_or(true, |o| o.header.status != 0);
                    self.preparing_allowance = if failed {
                        INITIALIZE_ALLOWANCE + BACKSTOP_GRACE
                    } else {
                        PREPARE_ALLOWANCE
                    };
                    self.guest = GuestState::Preparing(message.seq);
                    self.continue_vcpu();
                }
                match Outcome::decode(&message.payload) {
                    Ok(outcome) => {
                        let log = outcome.log.to_vec();
                        let duration_us = outcome.header.duration_ns / 1000;
                        let result = match outcome.result {
                            // The result stays where it was copied out of
                            // guest memory: trimmed in place, not copied.
                            Ok(body) => {
                                let len = body.len();
                                let mut payload = message.payload;
                                payload.truncate(OutcomeHeader::SIZE + len);
                                payload.drain(..OutcomeHeader::SIZE);
                                Ok(payload)
                            }
                            Err((kind, text)) => Err((kind, guest_text(text))),
                        };
                        if let Some(recording) = &mut self.working_set {
                            recording.due = true;
                        }
                        Ok(VmmData::Invoked(Box::new(Invocation {
                            result,
                            log,
                            duration_us,
                            round_trip_us,
                        })))
                    }
                    Err(e) => {
                        self.protocol_errors += 1;
                        Err(unexpected(format!("guest's outcome is malformed: {e}")))
                    }
                }
            }
            MessageKind::Stats => match GuestStats::decode(&message.payload) {
                Ok(stats) => Ok(VmmData::GuestStats(stats.into())),
                Err(e) => {
                    self.protocol_errors += 1;
                    Err(unexpected(format!("guest's stats are malformed: {e}")))
                }
            },
            other => Err(unexpected(format!("guest answered with {other:?}"))),
        };
        self.respond(response);
    }

    /// Lets vCPU 0 leave the doorbell exit without a new request.
    fn continue_vcpu(&self) {
        if let Some(microvm) = &self.microvm {
            microvm.vcpus[0].send(VcpuCommand::Continue);
        }
    }

    /// The guest crashed (and has stopped: a crash message is its last).
    fn on_crash(&mut self, payload: &[u8]) {
        let report = CrashReport::decode(payload);
        let info = report.as_ref().map(CrashInfo::from);
        let description = match &info {
            Some(info) => info.to_string(),
            None => {
                self.protocol_errors += 1;
                format!(
                    "its crash report of {} bytes is unreadable (expected {})",
                    payload.len(),
                    CrashReport::SIZE
                )
            }
        };
        log::error!("guest crashed: {description}");
        let pending = self.pending.take();
        self.disarm_timer();
        if let Some(pending) = pending {
            let since_sent_us = pending
                .sent_at
                .map_or(0, |t| t.elapsed().as_micros() as u64);
            let response = match (pending.kind, info) {
                (RequestKind::TestCrash, Some(info)) => {
                    Ok(VmmData::GuestEnded(GuestEnd::Crash(info)))
                }
                (RequestKind::Invoke, _) => Ok(VmmData::Invoked(Box::new(Invocation::failed(
                    ErrorKind::Crash,
                    format!("the guest crashed while running the function: {description}"),
                    since_sent_us,
                )))),
                _ => Err(VmmActionError::GuestCrashed(description.clone())),
            };
            self.respond(response);
        }
        self.end_guest(format!("crashed: {description}"), ExitCode::GuestCrashed);
    }

    /// The guest broke the protocol: refuse the message, answer the caller,
    /// leave the guest parked in its exit (it waits for a request).
    fn protocol_error(&mut self, error: VmmActionError) {
        self.protocol_errors += 1;
        log::warn!("{error}");
        if matches!(
            self.guest,
            GuestState::Booting
                | GuestState::Busy(_)
                | GuestState::Preparing(_)
                | GuestState::BusyAfterPreparing { .. }
        ) {
            self.guest = GuestState::Idle;
        }
        if self.pending.as_ref().is_some_and(|p| p.seq.is_some()) {
            self.pending = None;
            self.disarm_timer();
            self.respond(Err(error));
        }
        self.pause_if_quiet();
        self.deliver_if_waiting();
    }

    fn on_vcpu_event(&mut self, index: u8, event: VcpuEvent) {
        match event {
            VcpuEvent::Doorbell if index == 0 => self.on_doorbell(),
            VcpuEvent::Doorbell => {
                // Only vCPU 0 runs the guest; an AP ringing is left parked.
                self.protocol_errors += 1;
                log::warn!("vCPU {index} rang the mailbox doorbell; it stays parked");
            }
            VcpuEvent::Paused | VcpuEvent::Resumed => self.on_transition_ack(),
            VcpuEvent::Ring0Instructions { count, complete } => {
                log::info!(
                    "ring-0 boot path: {count} instructions from entry to ring 3{}",
                    if complete {
                        ""
                    } else {
                        " (count interrupted by an exit)"
                    }
                );
                self.ring0_instructions = Some(count);
            }
            VcpuEvent::Stopped(reason) => {
                log::error!("vCPU {index} stopped: {reason}");
                let code = match reason {
                    VcpuStop::TripleFault => ExitCode::GuestTripleFault,
                    VcpuStop::SystemEvent("reset") | VcpuStop::SystemEvent("shutdown") => {
                        ExitCode::Ok
                    }
                    VcpuStop::Seccomp(_) => ExitCode::GenericError,
                    _ => ExitCode::KvmError,
                };
                if let Some(_pending) = self.pending.take() {
                    self.disarm_timer();
                    self.respond(Err(VmmActionError::GuestStopped(reason.to_string())));
                }
                self.end_guest(reason.to_string(), code);
            }
        }
    }

    fn begin_transition(&mut self, target: InstanceState) -> Option<VmmResponse> {
        if self.state == InstanceState::NotStarted || self.microvm.is_none() {
            return Some(Err(VmmActionError::NotRunning(self.state.name())));
        }
        if self.transition.is_some() || self.pause_when_idle {
            return Some(Err(VmmActionError::TransitionInProgress));
        }
        if self.state == target {
            return Some(Ok(VmmData::Empty));
        }
        if target == InstanceState::Paused
            && (self.early_messages > 0
                || matches!(
                    self.guest,
                    GuestState::Preparing(_) | GuestState::BusyAfterPreparing { .. }
                ))
        {
            // The guest answered and prepares its next instance, or is on
            // its way to the exit behind an answer already taken: pause
            // once the mailbox is quiet (see `pause_if_quiet`), or give up
            // on the guest if it never is.
            self.pause_when_idle = true;
            self.pauses_deferred += 1;
            let wait = self.options.mailbox_timeout + INITIALIZE_ALLOWANCE + BACKSTOP_GRACE;
            self.pause_deadline = Some(Instant::now() + wait);
            self.arm_timer(wait);
            return None;
        }
        if target == InstanceState::Running {
            if let Err(e) = self.write_restore_block() {
                return Some(Err(VmmActionError::Internal(e)));
            }
        }
        let Some(microvm) = &self.microvm else {
            return Some(Err(VmmActionError::NotRunning(self.state.name())));
        };
        for vcpu in &microvm.vcpus {
            vcpu.send(if target == InstanceState::Paused {
                VcpuCommand::Pause
            } else {
                VcpuCommand::Resume
            });
        }
        self.transition = Some(Transition {
            target,
            remaining: microvm.vcpus.len(),
        });
        None
    }

    fn on_transition_ack(&mut self) {
        if self.unclaimed_acks > 0 {
            // The answer to a resume no transition waits for (a load's).
            self.unclaimed_acks -= 1;
            return;
        }
        let Some(transition) = &mut self.transition else {
            return;
        };
        transition.remaining = transition.remaining.saturating_sub(1);
        if transition.remaining == 0 {
            self.state = transition.target;
            self.transition = None;
            log::info!("microVM {}", self.state.name().to_lowercase());
            self.respond(Ok(VmmData::Empty));
        }
    }

    fn on_reset(&mut self) {
        log::info!("guest reset itself through the i8042");
        if let Some(pending) = self.pending.take() {
            self.disarm_timer();
            let response = match pending.kind {
                RequestKind::TestReset => Ok(VmmData::GuestEnded(GuestEnd::Reset)),
                _ => Err(VmmActionError::GuestStopped(
                    "the guest reset itself".into(),
                )),
            };
            self.respond(response);
        }
        self.end_guest("reset".into(), ExitCode::Ok);
    }

    /// A request's deadline passed: the guest did not answer in time. It is
    /// not trusted again: the VM is stopped and ember-vmm exits (code 13).
    fn on_timer(&mut self) {
        if let Some(deadline) = self.pause_deadline.filter(|_| self.pending.is_none()) {
            let now = Instant::now();
            if now < deadline {
                return self.arm_timer(deadline - now);
            }
            log::error!("the guest did not become idle for a pause in time; stopping the VM");
            self.pause_when_idle = false;
            self.pause_deadline = None;
            self.respond(Err(VmmActionError::GuestTimeout(
                (self.options.mailbox_timeout + INITIALIZE_ALLOWANCE + BACKSTOP_GRACE).as_millis()
                    as u64,
            )));
            return self.end_guest("unresponsive".into(), ExitCode::GuestUnresponsive);
        }
        let Some(deadline) = self.pending.as_ref().map(|p| p.deadline) else {
            return;
        };
        let now = Instant::now();
        if now < deadline {
            return self.arm_timer(deadline - now);
        }
        let Some(pending) = self.pending.take() else {
            return;
        };
        let waited = pending.asked_at.elapsed().as_millis() as u64;
        log::error!(
            "the guest did not answer {:?} within its deadline ({waited} ms after it was asked); stopping the VM",
            pending.kind
        );
        let response = match pending.kind {
            RequestKind::Invoke => Ok(VmmData::Invoked(Box::new(Invocation::failed(
                ErrorKind::Timeout,
                format!(
                    "the function ran past its limit of {} ms; ember-vmm stopped the VM {waited} ms after the invocation was asked, and it will not be reused",
                    self.function_timeout_ms.unwrap_or(0)
                ),
                waited * 1000,
            )))),
            _ => Err(VmmActionError::GuestTimeout(waited)),
        };
        self.respond(response);
        self.end_guest("unresponsive".into(), ExitCode::GuestUnresponsive);
    }

    /// Stdin has bytes (or ended): hand them to the UART.
    fn on_console_input(&mut self, events: &Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        // SAFETY: read(2) into a local buffer of the given length; stdin was
        // reported readable, so this does not block.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            // End of input (or an error): stop watching it.
            let _ = ops.remove(Events::empty_raw(events.fd()));
            return;
        }
        match &self.microvm {
            Some(microvm) => {
                crate::devices::lock(&microvm.devices.serial).receive(&buf[..n as usize])
            }
            None => log::debug!("dropping {n} bytes of console input: the microVM is not running"),
        }
    }

    fn end_guest(&mut self, how: String, code: ExitCode) {
        if let Some(microvm) = &self.microvm {
            // A last partial console line (no newline) is not lost.
            crate::devices::lock(&microvm.devices.serial).flush_console();
        }
        self.guest = GuestState::Stopped(how);
        self.exit_code.get_or_insert(code);
    }

    /// Answers the API request being served.
    fn respond(&mut self, response: VmmResponse) {
        if std::mem::take(&mut self.touching) {
            // The touch in flight failed (its success is taken in
            // on_answer); the VM goes on as it is, or has stopped.
            if let Err(e) = response {
                log::warn!("the guest's touch of its working set failed: {e}");
            }
            return;
        }
        if let Some(api) = &mut self.api {
            api.respond(response);
        }
    }

    /// Serves the API requests that can be served now, in order, and
    /// updates what the event loop watches for the control socket.
    fn serve_api(&mut self, ops: &mut EventOps) {
        // While the guest touches its working set, requests wait for it.
        while !self.touching {
            let Some(action) = self.api.as_mut().and_then(ApiServer::next_request) else {
                break;
            };
            if self.exit_code.is_some() {
                // Deciding to exit answers what is still queued.
                self.respond(Err(VmmActionError::Exiting));
                continue;
            }
            match self.handle_action(action) {
                Some(response) => {
                    self.respond(response);
                    self.start_touch();
                }
                // The guest answers later (the next request waits), unless
                // its answer was taken from memory already.
                None if self.api.as_ref().is_some_and(ApiServer::busy) => break,
                None => {}
            }
        }
        if let Some(api) = &mut self.api {
            api.sync(ops);
        }
    }

    fn arm_timer(&mut self, after: Duration) {
        if let Err(e) = self.timer.reset(after.max(Duration::from_millis(1)), None) {
            log::error!("cannot arm the mailbox timer: {e}");
        }
    }

    fn disarm_timer(&mut self) {
        if let Err(e) = self.timer.clear() {
            log::error!("cannot clear the mailbox timer: {e}");
        }
    }

    fn status(&self) -> EmberStatus {
        let guest = match &self.guest {
            GuestState::NotStarted => "not started".to_string(),
            GuestState::Booting => "booting".to_string(),
            GuestState::Idle => "ready".to_string(),
            GuestState::Busy(_)
            | GuestState::Preparing(_)
            | GuestState::BusyAfterPreparing { .. } => "busy".to_string(),
            GuestState::Stopped(how) => format!("stopped: {how}"),
        };
        let micros = |from: Option<Instant>| match (from, self.ready_at) {
            (Some(from), Some(ready)) => Some((ready - from).as_micros() as u64),
            _ => None,
        };
        let mailbox = self
            .microvm
            .as_ref()
            .and_then(|m| m.mailbox.as_ref())
            .map(|mb| MailboxStatus {
                gpa: mb.gpa(),
                size: mb.layout().size,
                port: mb.port(),
                max_payload: mb.max_payload(),
            });
        let serial = self
            .microvm
            .as_ref()
            .map(|m| crate::devices::lock(&m.devices.serial));
        let serial = serial.as_deref();
        EmberStatus {
            guest,
            state: self.state.name(),
            vcpu_count: self.resources.machine_config.vcpu_count,
            mem_size_mib: self.resources.machine_config.mem_size_mib,
            ready_after_process_start_us: micros(Some(self.process_start)),
            ready_after_instance_start_us: micros(self.started_at),
            mailbox,
            guest_ram_bytes: self.guest_info.map(|i| i.ram_bytes),
            guest_heap_bytes: self.guest_info.map(|i| i.heap_bytes),
            guest_cpu_features: self.guest_info.map(|i| {
                let [leaf1, leaf7, ext1] = i.cpuid;
                ember_compile::CpuFeatures::from_cpuid(leaf1, leaf7, ext1).to_line()
            }),
            requests: self.requests,
            protocol_errors: self.protocol_errors,
            answers_from_memory: self.answers_from_memory,
            delivered_while_preparing: self.deliveries_while_preparing,
            console_lost_bytes: serial.map_or(0, |s| s.lost_bytes),
            console_dropped_bytes: self.console.dropped_bytes(),
            console_input_bytes: serial.map_or(0, |s| s.input_bytes),
            console_input_dropped_bytes: serial.map_or(0, |s| s.dropped_input_bytes),
            generation: self.generation,
            snapshots_created: self.snapshots_created,
            pauses_deferred: self.pauses_deferred,
            track_dirty_pages: self.microvm.as_ref().is_some_and(|m| m.vm.dirty_logging()),
            ring0_instructions: self.ring0_instructions,
            touch: self.touched,
        }
    }

    /// ember-vmm is exiting: answers a request still in flight, then
    /// writes out what is pending on the control socket.
    pub fn stop_api(&mut self) {
        if self.api.as_ref().is_some_and(ApiServer::busy) {
            self.respond(Err(VmmActionError::Exiting));
        }
        if let Some(api) = &mut self.api {
            api.finish();
        }
    }
}

/// The most of a text from the guest (an error, a load failure, a
/// function's error message) that goes into an API answer and a log line.
const MAX_GUEST_TEXT: usize = 4096;

/// A text the guest wrote, as UTF-8 (invalid sequences replaced) and cut
/// to [`MAX_GUEST_TEXT`] bytes of the guest's, saying how much was cut: a
/// guest may fill its whole response area (megabytes) with one.
fn guest_text(bytes: &[u8]) -> String {
    if bytes.len() <= MAX_GUEST_TEXT {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    format!(
        "{}… ({} more bytes cut)",
        String::from_utf8_lossy(&bytes[..MAX_GUEST_TEXT]),
        bytes.len() - MAX_GUEST_TEXT
    )
}

/// The guest posted something that does not fit the exchange.
fn unexpected(what: String) -> VmmActionError {
    VmmActionError::Protocol(ProtocolError::Unexpected(what))
}

/// Makes a descriptor non-blocking: an event may be stale by the time it is
/// handled (the timer may be cleared between epoll and the read).
fn set_nonblocking(fd: &impl std::os::fd::AsRawFd) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with plain integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `--test-commands` only: a system call no thread's filter allows
/// (socket(AF_INET)); under seccomp it ends the process with exit code 148.
pub(crate) fn forbidden_syscall() -> VmmActionError {
    // SAFETY: socket(2) with constant arguments; the descriptor, if any, is closed.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: fd is a descriptor we just opened.
        unsafe { libc::close(fd) };
    }
    VmmActionError::Internal("socket(AF_INET) was allowed: seccomp is off (--no-seccomp)".into())
}

impl MutEventSubscriber for Vmm {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_VCPU => {
                let _ = self.vcpu_evt.read();
                while let Ok((index, event)) = self.vcpu_events.try_recv() {
                    self.on_vcpu_event(index, event);
                }
            }
            TOKEN_RESET => {
                let _ = self.reset_evt.read();
                self.on_reset();
            }
            TOKEN_TIMER => {
                let _ = self.timer.wait();
                self.on_timer();
            }
            TOKEN_CONSOLE_IN => self.on_console_input(&events, ops),
            token if ApiServer::owns(token) => {
                if let Some(api) = &mut self.api {
                    api.on_event(&events, ops);
                }
            }
            other => log::warn!("event for unknown token {other}"),
        }
        self.serve_api(ops);
        // After the answer is on its way: the first invocation of a
        // restored VM leaves its working set to record.
        self.record_working_set();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: &dyn std::os::fd::AsRawFd, token: u32, what: &str| {
            if let Err(e) = ops.add(Events::with_data_raw(fd.as_raw_fd(), token, EventSet::IN)) {
                log::error!("cannot watch {what}: {e:?}");
            }
        };
        add(self.vcpu_evt.as_ref(), TOKEN_VCPU, "vCPU events");
        add(&self.reset_evt, TOKEN_RESET, "the i8042 reset line");
        add(&self.timer, TOKEN_TIMER, "the mailbox timer");
        if let Some(api) = &self.api {
            api.register(ops);
        }
        // Console input, where stdin can be watched (a pipe or a terminal;
        // not /dev/null or a file).
        let stdin = Events::with_data_raw(libc::STDIN_FILENO, TOKEN_CONSOLE_IN, EventSet::IN);
        if let Err(e) = ops.add(stdin) {
            log::debug!("no console input: stdin cannot be watched ({e:?})");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_text_is_cut_and_says_so() {
        assert_eq!(guest_text(b"no such file"), "no such file");
        assert_eq!(guest_text(b"\xff!"), "\u{fffd}!");
        let long = vec![b'x'; MAX_GUEST_TEXT + 10];
        let text = guest_text(&long);
        assert!(text.starts_with(&"x".repeat(MAX_GUEST_TEXT)));
        assert!(text.ends_with("… (10 more bytes cut)"), "{text}");
        // Invalid bytes grow threefold as replacement characters: the cut
        // is made on the guest's bytes, before.
        let garbage = vec![0xffu8; 8 << 20];
        assert!(guest_text(&garbage).len() < 4 * MAX_GUEST_TEXT);
    }
}
