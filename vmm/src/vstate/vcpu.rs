//! vCPU threads.
//!
//! Each vCPU runs on its own thread under the `vcpu` seccomp filter. The
//! thread runs KVM_RUN and handles port I/O exits with the shared devices;
//! when the guest rings the mailbox doorbell, the thread tells the VMM
//! thread and stays *parked in that exit* (blocked on its command channel,
//! outside KVM_RUN) until the VMM has posted the next request and says
//! [`VcpuCommand::Continue`]. An idle guest therefore costs no CPU. A
//! Continue may come before its exit (the VMM thread can read the guest's
//! message while the guest is still on its way to the `out`); it is kept
//! and spent on that exit. (The
//! `out` itself completes — RIP moves past it — on the next KVM_RUN;
//! whoever saves vCPU state here must first complete it with a KVM_RUN
//! under `immediate_exit`, as KVM's documentation asks.)
//!
//! To get a thread out of KVM_RUN (pause), the VMM queues the command and
//! sends the thread [`kick_signal`]; the handler sets `immediate_exit` in
//! the thread's `kvm_run`, so a signal that lands just before KVM_RUN is not
//! lost. APs (vCPUs other than 0) are never started by the guest: KVM holds
//! them in KVM_RUN, waiting for an INIT/SIPI that does not come.

use std::cell::Cell;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_guest_debug, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable};

use crate::devices::{PioAction, PioDevices};
use crate::seccomp::{self, ThreadKind};

/// What the VMM thread tells a vCPU thread.
pub enum VcpuCommand {
    /// Enter the guest for the first time (sent once the VMM thread's own
    /// seccomp filter is installed).
    Start,
    /// Leave KVM_RUN and wait; answered with [`VcpuEvent::Paused`].
    Pause,
    /// Undo [`VcpuCommand::Pause`]; answered with [`VcpuEvent::Resumed`].
    Resume,
    /// Leave the doorbell exit: a request has been posted.
    Continue,
    /// Save the vCPU's state (it must be paused or not yet started):
    /// complete a pending `out` first, then read the MSRs in `msrs` and
    /// the rest.
    Save {
        /// The MSRs to save, TSC deadline after TSC.
        msrs: Arc<Vec<u32>>,
        /// Where the state (or why not) goes.
        reply: Sender<Result<Box<VcpuState>, String>>,
    },
    /// Set the vCPU's state from a snapshot (only before it ever ran), and
    /// wait paused until [`VcpuCommand::Resume`] (nothing runs before the
    /// VM's own state is restored too).
    Restore {
        /// The state.
        state: Box<VcpuState>,
        /// Done, or why not.
        reply: Sender<Result<(), String>>,
    },
    /// `--test-commands`: make a system call the vCPU filter forbids.
    TestForbiddenSyscall,
}

impl std::fmt::Debug for VcpuCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VcpuCommand::Start => "Start",
            VcpuCommand::Pause => "Pause",
            VcpuCommand::Resume => "Resume",
            VcpuCommand::Continue => "Continue",
            VcpuCommand::Save { .. } => "Save",
            VcpuCommand::Restore { .. } => "Restore",
            VcpuCommand::TestForbiddenSyscall => "TestForbiddenSyscall",
        })
    }
}

/// Everything KVM keeps for one vCPU, as a snapshot saves it. Saved in
/// this order (KVM_GET_MP_STATE may change LAPIC state, and the vCPU events
/// go last) and restored in Firecracker's order: CPUID, TSC frequency, MP
/// state, registers, special registers, XSAVE, XCRs, debug registers,
/// LAPIC, MSRs (TSC deadline after TSC), vCPU events.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as the vCPU had it.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Guest TSC frequency, if KVM told it.
    pub tsc_khz: Option<u32>,
    /// Multiprocessing state (running, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers KVM could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts and NMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// The vCPU had entered the guest.
    pub started: bool,
    /// Parked in the doorbell exit (its `out` completed): it waits for a
    /// request when resumed.
    pub parked: bool,
}

/// Why a vCPU stopped running the guest for good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum VcpuStop {
    /// the guest triple-faulted (KVM_EXIT_SHUTDOWN)
    TripleFault,
    /// the guest requested a system {0} (KVM_EXIT_SYSTEM_EVENT)
    SystemEvent(&'static str),
    /// KVM internal error, suberror {0} (KVM_EXIT_INTERNAL_ERROR)
    InternalError(u32),
    /// KVM could not enter the guest, hardware reason {0:#x} (KVM_EXIT_FAIL_ENTRY)
    FailEntry(u64),
    /// unexpected vCPU exit: {0}
    Unexpected(String),
    /// KVM_RUN failed: {0}
    RunFailed(String),
    /// the vCPU thread could not install its seccomp filter: {0}
    Seccomp(String),
}

/// What a vCPU thread tells the VMM thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest rang the mailbox doorbell; the vCPU is parked in the exit.
    Doorbell,
    /// The vCPU left KVM_RUN and waits.
    Paused,
    /// The vCPU runs again (or stays parked in the doorbell exit).
    Resumed,
    /// The vCPU stopped for good.
    Stopped(VcpuStop),
    /// `--count-ring0`: instructions executed in ring 0 from entry to the
    /// first ring-3 instruction; `complete` is false if another exit
    /// interrupted the count.
    Ring0Instructions {
        /// Instructions counted.
        count: u64,
        /// Whether the count reached ring 3 by single-stepping alone.
        complete: bool,
    },
}

/// The channel vCPU threads report on, and the eventfd that wakes the VMM
/// thread's event loop for it.
#[derive(Clone)]
pub struct VcpuEventSender {
    tx: Sender<(u8, VcpuEvent)>,
    evt: Arc<EventFd>,
}

impl VcpuEventSender {
    /// A sender on `tx` that signals `evt`.
    pub fn new(tx: Sender<(u8, VcpuEvent)>, evt: Arc<EventFd>) -> Self {
        VcpuEventSender { tx, evt }
    }

    fn send(&self, index: u8, event: VcpuEvent) {
        // The VMM thread outlives every vCPU thread: a failed send means the
        // process is exiting, and there is no one left to tell.
        if self.tx.send((index, event)).is_ok() {
            let _ = self.evt.write(1);
        }
    }
}

/// MSRs per KVM_GET_MSRS / KVM_SET_MSRS (the wrapper holds at most 256).
const MSR_CHUNK: usize = 128;

/// Offset from SIGRTMIN of the signal that kicks a vCPU out of KVM_RUN
/// (the offset Firecracker uses).
const KICK_SIGNAL_OFFSET: libc::c_int = 0;

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

thread_local! {
    /// This thread's `kvm_run`, for the kick handler (null on other threads).
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN_PTR.with(|ptr| ptr.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set
        // before the thread first entered KVM_RUN and valid while the vCPU
        // fd lives (for the thread's whole life). A byte store is
        // async-signal-safe.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

/// Installs the kick handler; call once, before any vCPU thread starts.
pub fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), handle_kick)
}

/// Parks a vCPU thread whose VMM side is gone (a start that failed after the
/// threads were spawned): its filter does not allow the thread-exit path,
/// and the process ends soon or retries with new threads.
fn park_forever() {
    loop {
        std::thread::park();
    }
}

/// A vCPU, before its thread starts.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    devices: PioDevices,
    events: VcpuEventSender,
    count_ring0: bool,
}

/// The VMM thread's handle on a running vCPU thread.
pub struct VcpuHandle {
    /// The vCPU index.
    pub index: u8,
    tx: Sender<VcpuCommand>,
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Sends `command`; a pause also kicks the thread out of KVM_RUN.
    pub fn send(&self, command: VcpuCommand) {
        let pause = matches!(command, VcpuCommand::Pause);
        if self.tx.send(command).is_err() {
            // The thread is gone, which happens only when the process exits.
            return;
        }
        if pause {
            if let Err(e) = self.thread.kill(kick_signal()) {
                log::error!("cannot kick vCPU {}: {e}", self.index);
            }
        }
    }
}

/// How one KVM_RUN ended, once handled.
enum Outcome {
    /// Run the guest on.
    Continue,
    /// The guest rang the doorbell.
    Doorbell,
    /// A single-step exit (counting ring-0 instructions).
    Stepped,
    /// KVM_RUN was interrupted by a signal (a kick).
    Interrupted,
    /// The vCPU stops for good.
    Stop(VcpuStop),
}

/// Where the vCPU is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    /// Waiting for [`VcpuCommand::Start`].
    NotStarted,
    /// In (or about to enter) KVM_RUN.
    Running,
    /// Parked in the doorbell exit, waiting for [`VcpuCommand::Continue`].
    Parked,
    /// Stopped for good.
    Stopped,
}

impl Vcpu {
    /// A vCPU `index` on `fd`, handling port I/O with `devices` and
    /// reporting on `events`. With `count_ring0`, the vCPU single-steps from
    /// entry until it reaches ring 3 and reports the count.
    pub fn new(
        index: u8,
        fd: VcpuFd,
        devices: PioDevices,
        events: VcpuEventSender,
        count_ring0: bool,
    ) -> Self {
        Vcpu {
            index,
            fd,
            devices,
            events,
            count_ring0,
        }
    }

    /// Starts the thread. It installs the `vcpu` seccomp filter (unless
    /// `seccomp` is false), then waits for [`VcpuCommand::Start`].
    pub fn start_thread(self, seccomp: bool) -> std::io::Result<VcpuHandle> {
        let (tx, rx) = std::sync::mpsc::channel();
        let index = self.index;
        let thread = std::thread::Builder::new()
            .name(format!("ember_vcpu{index}"))
            .spawn(move || self.run_thread(rx, seccomp))?;
        Ok(VcpuHandle { index, tx, thread })
    }

    fn run_thread(mut self, rx: Receiver<VcpuCommand>, seccomp_enabled: bool) {
        // Named for the SIGSYS report, which needs a 'static name; a few
        // bytes per vCPU for the life of the process.
        let label: &'static str = Box::leak(format!("vcpu{}", self.index).into_boxed_str());
        KVM_RUN_PTR.with(|ptr| ptr.set(self.fd.get_kvm_run() as *mut kvm_run));
        if let Err(e) = seccomp::apply(ThreadKind::Vcpu, label, seccomp_enabled) {
            self.events.send(
                self.index,
                VcpuEvent::Stopped(VcpuStop::Seccomp(e.to_string())),
            );
            return;
        }

        let mut state = RunState::NotStarted;
        let mut paused = false;
        // Continues that came before their doorbell exit: the VMM thread
        // may take the guest's message from memory while the guest is
        // still on its way to the `out`, and answer it at once.
        let mut early_continues = 0u32;
        let mut ring0 = self.count_ring0.then_some(0u64);
        loop {
            if state != RunState::Running || paused {
                let Ok(command) = rx.recv() else {
                    return park_forever();
                };
                match command {
                    VcpuCommand::Start if state == RunState::NotStarted => {
                        if ring0.is_some() && !self.set_single_step(true) {
                            ring0 = None;
                        }
                        state = RunState::Running;
                    }
                    VcpuCommand::Pause => {
                        paused = true;
                        self.events.send(self.index, VcpuEvent::Paused);
                    }
                    VcpuCommand::Resume => {
                        paused = false;
                        self.events.send(self.index, VcpuEvent::Resumed);
                    }
                    VcpuCommand::Continue if state == RunState::Parked => state = RunState::Running,
                    VcpuCommand::Continue if state == RunState::Running => early_continues += 1,
                    VcpuCommand::Save { msrs, reply } => {
                        let _ = reply.send(self.save_state(&msrs, state).map(Box::new));
                    }
                    VcpuCommand::Restore {
                        state: saved,
                        reply,
                    } => {
                        let result = if state == RunState::NotStarted {
                            self.restore_state(&saved)
                        } else {
                            Err("a vCPU that has run cannot be restored onto".into())
                        };
                        if result.is_ok() {
                            ring0 = None;
                            paused = true;
                            state = match (saved.started, saved.parked) {
                                (false, _) => RunState::NotStarted,
                                (true, true) => RunState::Parked,
                                (true, false) => RunState::Running,
                            };
                        }
                        let _ = reply.send(result);
                    }
                    VcpuCommand::TestForbiddenSyscall => {
                        let _ = crate::vmm::forbidden_syscall();
                    }
                    other => log::warn!("vCPU {} ignored {other:?} while {state:?}", self.index),
                }
                continue;
            }

            match rx.try_recv() {
                Ok(VcpuCommand::Pause) => {
                    paused = true;
                    self.events.send(self.index, VcpuEvent::Paused);
                    continue;
                }
                Ok(VcpuCommand::Continue) => early_continues += 1,
                Ok(VcpuCommand::Save { reply, .. }) => {
                    let _ = reply.send(Err("the vCPU is running: pause it first".into()));
                }
                Ok(VcpuCommand::Restore { reply, .. }) => {
                    let _ = reply.send(Err("a running vCPU cannot be restored onto".into()));
                }
                Ok(VcpuCommand::TestForbiddenSyscall) => {
                    let _ = crate::vmm::forbidden_syscall();
                }
                Ok(other) => log::warn!("vCPU {} ignored {other:?} while running", self.index),
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => return park_forever(),
            }

            state = self.run_once(&mut ring0);
            if state == RunState::Parked && early_continues > 0 {
                early_continues -= 1;
                state = RunState::Running;
            }
            if state == RunState::Stopped {
                // Stay alive (answering pause/resume) until the process exits.
                paused = false;
            }
        }
    }

    /// Runs the guest until one exit is handled; returns the next state.
    fn run_once(&mut self, ring0: &mut Option<u64>) -> RunState {
        let outcome = self.run_to_exit(ring0.is_some());
        if let Some(count) = *ring0 {
            match outcome {
                Outcome::Stepped => self.count_step(ring0, count + 1),
                Outcome::Interrupted => {}
                // Another exit: the instruction behind it ran too. Under KVM
                // the `iretq` to ring 3 reloads RFLAGS and so clears the trap
                // flag: the count ends with the first exit from ring 3.
                _ => {
                    *ring0 = None;
                    let in_ring3 = self.cpl() == Some(3);
                    self.finish_count(count + 1, in_ring3);
                }
            }
        }
        match outcome {
            Outcome::Continue | Outcome::Stepped | Outcome::Interrupted => RunState::Running,
            Outcome::Doorbell => {
                self.events.send(self.index, VcpuEvent::Doorbell);
                RunState::Parked
            }
            Outcome::Stop(reason) => {
                self.events.send(self.index, VcpuEvent::Stopped(reason));
                RunState::Stopped
            }
        }
    }

    /// One KVM_RUN and the handling of its exit.
    fn run_to_exit(&mut self, counting: bool) -> Outcome {
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => match self.devices.write(port, data) {
                PioAction::Continue => Outcome::Continue,
                PioAction::Doorbell => Outcome::Doorbell,
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                self.devices.read(port, data);
                Outcome::Continue
            }
            Ok(VcpuExit::MmioRead(_, data)) => {
                // No MMIO devices: reads float high, writes vanish.
                data.fill(0xff);
                Outcome::Continue
            }
            Ok(VcpuExit::MmioWrite(..)) | Ok(VcpuExit::Intr) => Outcome::Continue,
            Ok(VcpuExit::Debug(_)) if counting => Outcome::Stepped,
            Ok(VcpuExit::Shutdown) => Outcome::Stop(VcpuStop::TripleFault),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                Outcome::Stop(VcpuStop::SystemEvent(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => "reset",
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => "shutdown",
                    kvm_bindings::KVM_SYSTEM_EVENT_CRASH => "crash",
                    _ => "event",
                }))
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: KVM_EXIT_INTERNAL_ERROR fills the `internal` member.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Outcome::Stop(VcpuStop::InternalError(suberror))
            }
            Ok(VcpuExit::FailEntry(reason, _cpu)) => Outcome::Stop(VcpuStop::FailEntry(reason)),
            Ok(other) => Outcome::Stop(VcpuStop::Unexpected(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Outcome::Interrupted
            }
            Err(e) => Outcome::Stop(VcpuStop::RunFailed(e.to_string())),
        }
    }

    /// Completes an `out` or `in` KVM has not finished (KVM moves RIP past
    /// it, or stores an `in`'s result, only on the next KVM_RUN): one
    /// KVM_RUN under `immediate_exit` does that and returns at once, as
    /// KVM's documentation asks before the state is saved.
    fn complete_pending_io(&mut self) -> Result<(), String> {
        self.fd.set_kvm_immediate_exit(1);
        let outcome = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(format!("KVM_RUN to complete pending I/O: {e}")),
            Ok(exit) => Err(format!(
                "the vCPU exited ({exit:?}) while completing its pending I/O"
            )),
        };
        self.fd.set_kvm_immediate_exit(0);
        outcome
    }

    /// The vCPU's state; it is paused (or never ran).
    fn save_state(&mut self, msr_list: &[u32], state: RunState) -> Result<VcpuState, String> {
        let started = state != RunState::NotStarted;
        if started {
            self.complete_pending_io()?;
        }
        let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
        let fd = &self.fd;
        let mp_state = fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(e("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?;
        let debug_regs = fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
        let tsc_khz = fd.get_tsc_khz().ok();
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(e("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let msrs = self.get_msrs(msr_list)?;
        let vcpu_events = self
            .fd
            .get_vcpu_events()
            .map_err(e("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            cpuid,
            tsc_khz,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
            started,
            parked: state == RunState::Parked,
        })
    }

    /// Reads the MSRs of `list` that KVM can read: KVM_GET_MSRS stops at
    /// the first it cannot, which is skipped.
    fn get_msrs(&self, list: &[u32]) -> Result<Vec<kvm_msr_entry>, String> {
        let mut saved = Vec::with_capacity(list.len());
        let mut next = 0;
        while next < list.len() {
            let chunk = &list[next..(next + MSR_CHUNK).min(list.len())];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(|e| format!("KVM_GET_MSRS: {e}"))?;
            saved.extend_from_slice(&msrs.as_slice()[..read]);
            next += read;
            if read < chunk.len() {
                log::debug!(
                    "vCPU {}: MSR {:#x} cannot be read; not saved",
                    self.index,
                    list[next]
                );
                next += 1;
            }
        }
        Ok(saved)
    }

    /// Sets the state of a vCPU that never ran.
    fn restore_state(&mut self, state: &VcpuState) -> Result<(), String> {
        let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
        let fd = &self.fd;
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|err| format!("CPUID: {err:?}"))?;
        fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
        if let Some(khz) = state.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                fd.set_tsc_khz(khz).map_err(e("KVM_SET_TSC_KHZ"))?;
            }
        }
        fd.set_mp_state(state.mp_state)
            .map_err(e("KVM_SET_MP_STATE"))?;
        fd.set_regs(&state.regs).map_err(e("KVM_SET_REGS"))?;
        fd.set_sregs(&state.sregs).map_err(e("KVM_SET_SREGS"))?;
        // SAFETY: a legacy 4 KiB kvm_xsave, the size KVM_GET_XSAVE wrote;
        // ember-vmm never enables the dynamic XSAVE features that need more.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&state.xcrs).map_err(e("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&state.debug_regs)
            .map_err(e("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&state.lapic).map_err(e("KVM_SET_LAPIC"))?;
        for chunk in state.msrs.chunks(MSR_CHUNK) {
            let msrs = Msrs::from_entries(chunk).map_err(|err| format!("MSR list: {err:?}"))?;
            let set = fd.set_msrs(&msrs).map_err(e("KVM_SET_MSRS"))?;
            if set < chunk.len() {
                return Err(format!(
                    "KVM_SET_MSRS: this host refused MSR {:#x}",
                    chunk[set].index
                ));
            }
        }
        fd.set_vcpu_events(&state.vcpu_events)
            .map_err(e("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// One single-step exit while counting ring-0 instructions.
    fn count_step(&mut self, ring0: &mut Option<u64>, count: u64) {
        if self.cpl() == Some(0) {
            *ring0 = Some(count);
        } else {
            // The step that just completed (iretq) was the last in ring 0.
            *ring0 = None;
            self.finish_count(count, true);
        }
    }

    /// The current privilege level, from CS.
    fn cpl(&self) -> Option<u16> {
        match self.fd.get_sregs() {
            Ok(sregs) => Some(sregs.cs.selector & 3),
            Err(e) => {
                log::warn!("cannot read sregs while counting ring-0 instructions: {e}");
                None
            }
        }
    }

    fn finish_count(&mut self, count: u64, complete: bool) {
        self.set_single_step(false);
        self.events
            .send(self.index, VcpuEvent::Ring0Instructions { count, complete });
    }

    fn set_single_step(&self, on: bool) -> bool {
        let debug = kvm_guest_debug {
            control: if on {
                KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP
            } else {
                0
            },
            ..Default::default()
        };
        match self.fd.set_guest_debug(&debug) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("cannot set single-step on vCPU {}: {e}", self.index);
                false
            }
        }
    }
}
