//! What a control-socket request asks of the VMM, and the answers.

use ember_abi::function::{ErrorKind, GuestStats, LoadedInfo, Model};
use ember_abi::mailbox::CrashReport;
use serde::Serialize;

use crate::builder::StartMicrovmError;
use crate::devices::mailbox::{MailboxError, ProtocolError};
use crate::resources::ResourcesError;
use crate::vmm_config::boot_source::BootSourceConfig;
use crate::vmm_config::function::FunctionBundle;
use crate::vmm_config::machine_config::MachineConfig;
use crate::vmm_config::snapshot::{CreateSnapshotParams, LoadSnapshotParams};

/// What a request asks of the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmAction {
    /// `GET /`.
    GetInstanceInfo,
    /// `PUT /boot-source`.
    PutBootSource(BootSourceConfig),
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /actions` InstanceStart.
    InstanceStart,
    /// `PUT /actions` SendCtrlAltDel: for an Ember guest, a mailbox `shutdown`.
    SendCtrlAltDel,
    /// `PATCH /vm` Paused.
    Pause,
    /// `PATCH /vm` Resumed.
    Resume,
    /// `PUT /snapshot/create`.
    CreateSnapshot(CreateSnapshotParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(LoadSnapshotParams),
    /// `GET /ember/status`.
    GetEmberStatus,
    /// `POST /ember/ping`.
    Ping,
    /// `POST /ember/echo` with the payload.
    Echo(Vec<u8>),
    /// `PUT /ember/function`, its files read.
    LoadFunction(Box<FunctionBundle>),
    /// `POST /ember/invoke` with the event.
    Invoke(Vec<u8>),
    /// `GET /ember/stats`.
    GetGuestStats,
    /// `POST /ember/test/{crash,reset,bad-length}` (with `--test-commands`).
    TestGuest(GuestTest),
    /// `POST /ember/test/forbidden-syscall[/vcpu|/prefetch]` (with
    /// `--test-commands`): that thread (the VMM thread by default) makes a
    /// system call outside its seccomp filter.
    TestForbiddenSyscall(crate::seccomp::ThreadKind),
}

/// Test-only guest commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestTest {
    /// The guest faults (a page fault at an unmapped address).
    Crash,
    /// The guest writes the i8042 reset command from ring 3.
    Reset,
    /// The guest posts a message whose length exceeds the mailbox.
    BadLength,
    /// The guest never answers (it spins in ring 3).
    Hang,
    /// The guest rings the doorbell over and over with garbage messages.
    DoorbellLoop,
    /// The guest answers the next request with random bytes as long as
    /// its response area, in a message of this kind (0: the kind that
    /// request expects).
    MaximalAnswer(u32),
    /// The guest writes this many bytes to its console, then answers.
    ConsoleFlood(u32),
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmData {
    /// Nothing to say (HTTP 204).
    Empty,
    /// `GET /`.
    InstanceInfo(InstanceInfo),
    /// `GET /machine-config`.
    MachineConfig(MachineConfig),
    /// `GET /ember/status`.
    Status(Box<EmberStatus>),
    /// `POST /ember/ping`: the guest answered.
    Pong {
        /// Host → guest → host inside the VMM, microseconds.
        round_trip_us: u64,
    },
    /// `POST /ember/echo`: the payload the guest sent back.
    Echo {
        /// The bytes.
        payload: Vec<u8>,
        /// Host → guest → host inside the VMM, microseconds.
        round_trip_us: u64,
    },
    /// A test command ended the guest as asked.
    GuestEnded(GuestEnd),
    /// `PUT /ember/function`: loaded.
    FunctionLoaded(FunctionInfo),
    /// `POST /ember/invoke`: the function ran (successfully or not).
    Invoked(Box<Invocation>),
    /// `GET /ember/stats`.
    GuestStats(StatsInfo),
    /// `PUT /snapshot/create`: written.
    SnapshotCreated(SnapshotCreated),
    /// `PUT /snapshot/load`: restored.
    SnapshotLoaded(SnapshotLoaded),
}

/// What `PUT /snapshot/create` did, for JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotCreated {
    /// "Full" or "Diff".
    pub snapshot_type: &'static str,
    /// Request to state file synced, µs.
    pub duration_us: u64,
    /// Guest pages written into the memory file (or layer).
    pub memory_pages: u64,
    /// Runs in the memory file (Diff: each is one mmap at restore).
    pub memory_runs: u64,
    /// The memory file's length (holes included), bytes.
    pub memory_file_bytes: u64,
    /// The state file's length, bytes.
    pub state_bytes: u64,
    /// Memory files a restore maps (this one and its parents).
    pub layers: usize,
    /// Mappings a restore makes, over all layers.
    pub restore_runs: usize,
}

/// What `PUT /snapshot/load` did, for JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotLoaded {
    /// Request to guest ready to run (resumed, or paused when not asked
    /// to resume), µs; from process start for a process that was not
    /// prepared.
    pub restore_us: u64,
    /// Since this process started, µs.
    pub since_process_start_us: u64,
    /// Whether the process was prepared (`--prepare`) for this restore.
    pub prepared: bool,
    /// Memory mappings made.
    pub memory_runs: usize,
    /// Pages mapped as whole 2 MiB regions (a template's compiled code),
    /// present for reading before the guest runs.
    pub whole_region_pages: u64,
    /// "prefetching" (on a helper thread), "prefetched" (before the
    /// answer, with `ember_prefetch_sync`), "recording" (on the first
    /// invocation), or "off".
    pub working_set: &'static str,
    /// Pages populated for reading, and for writing.
    pub prefetched_read_pages: u64,
    /// Pages populated for writing.
    pub prefetched_write_pages: u64,
    /// Time spent populating before the answer, µs (0 when a helper
    /// thread populates).
    pub prefetch_us: u64,
    /// Pages the guest is asked to touch once the load is answered (the
    /// working set and the whole regions; 0: none, see `ember_touch`).
    pub touch_pages: u64,
    /// 2 MiB regions copied into anonymous huge pages (`ember_hot_region_pages`).
    pub hot_regions: usize,
    /// Time spent copying them, µs.
    pub hot_us: u64,
    /// The restore generation given to the guest.
    pub generation: u64,
}

/// A loaded function, for JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionInfo {
    /// "reactor" or "command".
    pub model: &'static str,
    /// Linear memory of the first instance, bytes.
    pub memory_bytes: u64,
    /// The most its linear memory may grow to, MiB.
    pub memory_limit_mib: u64,
    /// Time to load (check the compiled code where ember-vmm wrote it),
    /// instantiate and initialise in the guest, µs.
    pub load_us: u64,
    /// … of which checking the compiled module, its imports and exports
    /// (before the first instance), µs.
    pub load_module_us: u64,
    /// Time ember-vmm took to compile the module, or to read it compiled
    /// from the cache, µs.
    pub compile_us: u64,
    /// "compiler" (compiled for this load) or "cache".
    pub compiled: &'static str,
    /// Size of the compiled module sent to the guest, bytes.
    pub compiled_bytes: u64,
}

impl From<LoadedInfo> for FunctionInfo {
    fn from(info: LoadedInfo) -> Self {
        FunctionInfo {
            model: match info.model {
                Model::Reactor => "reactor",
                Model::Command => "command",
            },
            memory_bytes: info.memory_bytes,
            memory_limit_mib: info.memory_limit >> 20,
            load_us: info.load_ns / 1000,
            load_module_us: info.module_ns / 1000,
            compile_us: 0,
            compiled: "compiler",
            compiled_bytes: 0,
        }
    }
}

/// One invocation's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The result (stdout), or how the function failed.
    pub result: Result<Vec<u8>, (ErrorKind, String)>,
    /// The end of its stderr.
    pub log: Vec<u8>,
    /// Time in the function, µs (0 when the guest could not say).
    pub duration_us: u64,
    /// Time from writing the event into the mailbox to reading the
    /// outcome, µs: the function plus the mailbox and the guest's runtime.
    pub round_trip_us: u64,
}

impl Invocation {
    /// A failure the host reports (the guest crashed, or never answered):
    /// no log, and the time is the host's.
    pub fn failed(kind: ErrorKind, message: String, elapsed_us: u64) -> Invocation {
        Invocation {
            result: Err((kind, message)),
            log: Vec::new(),
            duration_us: elapsed_us,
            round_trip_us: elapsed_us,
        }
    }
}

/// The guest's counters, for JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatsInfo {
    /// Invocations served.
    pub invocations: u64,
    /// Failed invocations by kind.
    pub errors: std::collections::BTreeMap<&'static str, u64>,
    /// Guest heap in use, bytes.
    pub heap_used: u64,
    /// Guest heap in all, bytes.
    pub heap_total: u64,
    /// Fresh instances prepared ahead of invocations.
    pub instances_prepared: u64,
    /// Time spent preparing instances after replies, in all, µs.
    pub prepare_us_total: u64,
}

impl From<GuestStats> for StatsInfo {
    fn from(stats: GuestStats) -> Self {
        let kinds = [
            ErrorKind::HandlerError,
            ErrorKind::Trap,
            ErrorKind::Timeout,
            ErrorKind::OutOfMemory,
        ];
        StatsInfo {
            invocations: stats.invocations,
            errors: kinds
                .iter()
                .zip(stats.errors)
                .map(|(k, n)| (k.name(), n))
                .collect(),
            heap_used: stats.heap_used,
            heap_total: stats.heap_total,
            instances_prepared: stats.instances_prepared,
            prepare_us_total: stats.prepare_ns / 1000,
        }
    }
}

/// How a test command ended the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestEnd {
    /// The guest crashed and reported it.
    Crash(CrashInfo),
    /// The guest reset itself through the i8042.
    Reset,
}

/// A guest crash report, for JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CrashInfo {
    /// Exception vector.
    pub vector: u64,
    /// Its mnemonic (`#PF`).
    pub exception: &'static str,
    /// The CPU's error code.
    pub error_code: u64,
    /// Where it happened.
    pub rip: u64,
    /// The faulting address (page faults).
    pub cr2: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Code segment (low bits: privilege level).
    pub cs: u64,
    /// RFLAGS.
    pub rflags: u64,
}

impl From<&CrashReport> for CrashInfo {
    fn from(report: &CrashReport) -> Self {
        CrashInfo {
            vector: report.vector,
            exception: ember_abi::exception_name(report.vector),
            error_code: report.error_code,
            rip: report.rip,
            cr2: report.cr2,
            rsp: report.rsp,
            cs: report.cs,
            rflags: report.rflags,
        }
    }
}

impl std::fmt::Display for CrashInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vector {} ({}) error {:#x} at rip {:#x} (ring {}), cr2 {:#x}, rsp {:#x}",
            self.vector,
            self.exception,
            self.error_code,
            self.rip,
            self.cs & 3,
            self.cr2,
            self.rsp
        )
    }
}

/// `GET /`: Firecracker's instance info.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    /// The instance id (`--id`).
    pub id: String,
    /// "Not started", "Running" or "Paused".
    pub state: &'static str,
    /// This build's version.
    pub vmm_version: &'static str,
    /// "ember-vmm".
    pub app_name: &'static str,
}

/// `GET /ember/status`: the guest and its mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EmberStatus {
    /// "not started", "booting", "ready", "busy" or "stopped: <why>".
    pub guest: String,
    /// "Not started", "Running" or "Paused".
    pub state: &'static str,
    /// vCPUs (only vCPU 0 runs the guest).
    pub vcpu_count: u8,
    /// Guest memory.
    pub mem_size_mib: usize,
    /// From ember-vmm's start to the guest's `ready`, microseconds.
    pub ready_after_process_start_us: Option<u64>,
    /// From InstanceStart to the guest's `ready`, microseconds.
    pub ready_after_instance_start_us: Option<u64>,
    /// The mailbox, if the guest has one.
    pub mailbox: Option<MailboxStatus>,
    /// What the guest reported in its `ready`.
    pub guest_ram_bytes: Option<u64>,
    /// The guest runtime's heap.
    pub guest_heap_bytes: Option<u64>,
    /// The CPU features functions are compiled for (as the guest reported
    /// its CPU in `ready`): Cranelift flag names, comma-separated.
    pub guest_cpu_features: Option<String>,
    /// Requests the guest answered.
    pub requests: u64,
    /// Guest messages rejected for breaking the protocol.
    pub protocol_errors: u64,
    /// Answers taken from guest memory before their doorbell exit
    /// (`--mailbox-poll-us`).
    pub answers_from_memory: u64,
    /// Requests delivered while the guest prepared a fresh instance (it
    /// found them without another exit, or was continued from `idle`).
    pub delivered_while_preparing: u64,
    /// Console bytes the output refused.
    pub console_lost_bytes: u64,
    /// Console bytes dropped because the console reached its limit
    /// (`--serial-out-limit`).
    pub console_dropped_bytes: u64,
    /// Console input (stdin) bytes handed to the guest's UART.
    pub console_input_bytes: u64,
    /// Console input bytes dropped because the UART's receive FIFO was full.
    pub console_input_dropped_bytes: u64,
    /// Times this VM was restored into a process (0: booted here).
    pub generation: u64,
    /// Snapshots taken by this process.
    pub snapshots_created: u64,
    /// Pauses that waited for the mailbox to be quiet (the guest
    /// preparing, or on its way to the exit behind an answer).
    pub pauses_deferred: u64,
    /// Whether dirty pages are logged (Diff snapshots possible).
    pub track_dirty_pages: bool,
    /// With `--count-ring0`: instructions the boot path ran in ring 0.
    pub ring0_instructions: Option<u64>,
    /// The guest's touch of its working set after the last restore, once
    /// answered (`ember_touch`).
    pub touch: Option<TouchStatus>,
}

/// The guest's touch of a restored VM's working set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TouchStatus {
    /// Pages the guest read.
    pub read_pages: u64,
    /// Pages the guest touched for writing.
    pub written_pages: u64,
    /// The guest's own time for them, µs.
    pub guest_us: u64,
    /// From the load's answer to the guest's, µs.
    pub round_trip_us: u64,
}

/// Where the mailbox is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MailboxStatus {
    /// Guest-physical address.
    pub gpa: u64,
    /// Region size in bytes.
    pub size: u64,
    /// Doorbell port.
    pub port: u16,
    /// Largest payload either way.
    pub max_payload: u64,
}

/// Why an action failed. Each maps to an HTTP status ([`VmmActionError::status`]).
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum VmmActionError {
    /// {0}
    Resources(#[from] ResourcesError),
    /// The requested operation is not supported after starting the microVM.
    OperationNotSupportedPostBoot,
    /// Cannot start the microVM: {0}
    StartMicrovm(#[from] StartMicrovmError),
    /// The microVM is already running: InstanceStart may be sent only once.
    AlreadyStarted,
    /// The microVM is not running (state: {0}).
    NotRunning(&'static str),
    /// The microVM is paused: resume it first (PATCH /vm {{"state": "Resumed"}}).
    Paused,
    /// A pause or resume is already in progress.
    TransitionInProgress,
    /// The guest has no mailbox: ember-vmm was started with --no-mailbox.
    NoMailbox,
    /// The guest has stopped ({0}); it serves no more requests.
    GuestStopped(String),
    /// Another request to the guest is in flight.
    Busy,
    /// {0}
    Mailbox(#[from] MailboxError),
    /// The guest broke the mailbox protocol: {0}
    Protocol(#[from] ProtocolError),
    /// The guest did not answer within {0} ms.
    GuestTimeout(u64),
    /// The guest could not serve the request: {0}
    GuestError(String),
    /// The guest crashed while serving the request: {0}
    GuestCrashed(String),
    /// Test commands are disabled: start ember-vmm with --test-commands.
    TestCommandsDisabled,
    /// No function is loaded: PUT /ember/function first.
    NoFunction,
    /// A function is already loaded in this VM; start another VM for another function.
    FunctionAlreadyLoaded,
    /// Cannot load the function: {0}
    LoadFailed(String),
    /// The event of {len} bytes exceeds the limit of {max} bytes.
    EventTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Internal error: {0}
    Internal(String),
    /// ember-vmm is exiting; the request was not served.
    Exiting,
    /// Cannot create the snapshot: {0}
    CreateSnapshot(String),
    /// Cannot load the snapshot: {0}
    LoadSnapshot(String),
    /// The snapshot was partly restored and failed ({0}); this ember-vmm process is exiting: start a fresh one
    RestoreFailed(String),
}

impl VmmActionError {
    /// The HTTP status this error is reported with.
    pub fn status(&self) -> u16 {
        match self {
            VmmActionError::GuestTimeout(_) => 504,
            VmmActionError::Exiting => 503,
            VmmActionError::GuestError(_)
            | VmmActionError::GuestCrashed(_)
            | VmmActionError::RestoreFailed(_)
            | VmmActionError::Internal(_) => 500,
            // Like Firecracker: every refused request is a 400.
            _ => 400,
        }
    }
}

/// The VMM thread's answer to one [`VmmAction`].
pub type VmmResponse = Result<VmmData, VmmActionError>;
