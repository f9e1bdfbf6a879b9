//! Building a microVM for boot: the one place that orders setup.
//!
//! ```text
//! (at process start: /dev/kvm → VM, the supported CPUID on a helper thread)
//! guest memory → image (linux-loader ELF, on the `ember_load` thread, meanwhile:)
//!   slot 0 registered → irqchip                  (slots before irqchip: 5–8 ms saved)
//!   → vCPUs → devices (serial + irqfd, i8042) → mailbox header → command line
//!   → zero page (e820) → boot GDT + page tables → (the image loaded)
//!   → per-vCPU CPUID, BSP regs/sregs
//!   → vCPU threads (each installs its seccomp filter and waits)
//! ```
//!
//! The caller then installs the VMM thread's filter and starts the vCPUs,
//! so no guest instruction runs before every filter is in place.
//!
//! A restore shares the first half ([`build_microvm_for_restore`], also
//! what `--prepare` runs ahead of the request): placeholder memory → slot 0
//! registered → irqchip → vCPUs → devices → vCPU threads, waiting. The
//! snapshot's state goes in later ([`crate::vmm`]'s snapshot load): its
//! memory, then the vCPUs' state with the devices', then the VM's
//! (docs/vmm.md).

use std::fs::File;
use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemoryMmap;
use ember_abi::mailbox::{DEFAULT_DOORBELL_PORT, DEFAULT_SIZE};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::arch::x86_64::{boot_params, cpuid, regs};
use crate::devices::legacy::i8042;
use crate::devices::legacy::serial::{ConsoleOutput, SerialDevice};
use crate::devices::mailbox::{Mailbox, MailboxError};
use crate::devices::{EventFdTrigger, PioDevices};
use crate::resources::VmResources;
use crate::snapshot::memory::{Backing, HostMemory, MemoryLayer};
use crate::vstate::kvm::{KvmContext, KvmError};
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuEventSender, VcpuHandle};
use crate::vstate::vm::{Vm, VmError};

/// The interrupt line of COM1.
const SERIAL_GSI: u32 = 4;

/// Why a microVM could not be built.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum StartMicrovmError {
    /// no boot source: PUT /boot-source first
    MissingBootSource,
    /// {0}
    Kvm(#[from] KvmError),
    /// {0}
    Memory(#[from] MemoryError),
    /// {0}
    Vm(#[from] VmError),
    /// cannot start the thread that loads the guest image: {0}
    LoaderThread(std::io::Error),
    /// the thread that loads the guest image panicked
    LoaderPanicked,
    /// cannot load the guest image {path}: {source}
    LoadKernel {
        /// The image.
        path: String,
        /// What linux-loader reported.
        source: linux_loader::loader::Error,
    },
    /// the guest image ends at {end:#x}, past the end of usable RAM at {limit:#x}: raise mem_size_mib
    KernelTooBig {
        /// End of the loaded image.
        end: u64,
        /// End of RAM below the mailbox.
        limit: u64,
    },
    /// cannot build the kernel command line: {0}
    Cmdline(linux_loader::cmdline::Error),
    /// cannot write the command line into guest memory: {0}
    LoadCmdline(linux_loader::loader::Error),
    /// cannot write boot structures into guest memory: {0}
    BootMemory(#[from] vm_memory::GuestMemoryError),
    /// {0}
    Mailbox(#[from] MailboxError),
    /// cannot create an eventfd: {0}
    EventFd(std::io::Error),
    /// cannot set up vCPU {index}: {what}: {source}
    VcpuSetup {
        /// The vCPU.
        index: u8,
        /// Which step.
        what: &'static str,
        /// What KVM reported.
        source: kvm_ioctls::Error,
    },
    /// cannot start a vCPU thread: {0}
    VcpuThread(std::io::Error),
}

/// How to build the microVM beyond its resources.
pub struct BuildOptions {
    /// Announce a mailbox to the guest (false with `--no-mailbox`).
    pub mailbox: bool,
    /// Install the seccomp filters.
    pub seccomp: bool,
    /// Count the boot path's ring-0 instructions on vCPU 0.
    pub count_ring0: bool,
}

/// A built microVM: its vCPU threads wait for `Start`.
pub struct Microvm {
    /// `/dev/kvm`.
    pub kvm: kvm_ioctls::Kvm,
    /// The VM.
    pub vm: Vm,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The vCPU threads.
    pub vcpus: Vec<VcpuHandle>,
    /// The port-I/O devices.
    pub devices: PioDevices,
    /// The mailbox, unless `--no-mailbox`.
    pub mailbox: Option<Mailbox>,
    /// The guest's TSC frequency (KVM_GET_TSC_KHZ), 0 if KVM does not say.
    pub tsc_khz: u64,
    /// KVM's supported CPUID (a restore checks a snapshot against it).
    pub supported_cpuid: kvm_bindings::CpuId,
    /// The MSRs a snapshot saves, TSC deadline after TSC.
    pub msr_list: Arc<Vec<u32>>,
    /// COM1's interrupt line (a restored UART gets a handle on it).
    pub serial_irq: EventFd,
    /// Whether guest memory is anonymous or mapped from snapshot files.
    pub backing: Backing,
    /// The memory files the guest's memory equals as of the last snapshot
    /// taken or restored (oldest first; empty before the first): the parent
    /// of a Diff snapshot.
    pub layers: Vec<MemoryLayer>,
}

impl Microvm {
    /// The pages the VMM itself wrote into guest memory since the bitmap
    /// was last reset (KVM's dirty log misses them).
    pub fn vmm_writes(&self) -> &vm_memory::bitmap::AtomicBitmap {
        use vm_memory::GuestMemoryBackend;
        let region = self.mem.iter().next().expect("guest memory has one region");
        vm_memory::mmap::MmapRegion::bitmap(region)
    }

    /// Guest memory as the host maps it.
    pub fn host_memory(&self) -> HostMemory {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let region = self.mem.iter().next().expect("guest memory has one region");
        HostMemory {
            addr: region.as_ptr() as usize,
            len: region.len(),
        }
    }
}

/// The parts of the microVM a restore needs before any state goes in.
struct Skeleton {
    vm: Vm,
    vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
    devices: PioDevices,
    serial_irq: EventFd,
    msr_list: Arc<Vec<u32>>,
    tsc_khz: u64,
}

/// MSR_IA32_TSC and MSR_IA32_TSC_DEADLINE.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// The MSRs KVM lists as saveable, the TSC deadline moved after the TSC
/// (restoring the deadline before the TSC would fire it at once).
fn msr_list(kvm: &kvm_ioctls::Kvm) -> Vec<u32> {
    let mut list = match kvm.get_msr_index_list() {
        Ok(list) => list.as_slice().to_vec(),
        Err(e) => {
            log::warn!("KVM does not list its MSRs ({e}); snapshots save none");
            Vec::new()
        }
    };
    if let Some(at) = list.iter().position(|&m| m == MSR_IA32_TSC_DEADLINE) {
        list.remove(at);
        let after_tsc = list
            .iter()
            .position(|&m| m == MSR_IA32_TSC)
            .map_or(list.len(), |i| i + 1);
        list.insert(after_tsc, MSR_IA32_TSC_DEADLINE);
    }
    list
}

/// What a skeleton is built to, besides its memory.
struct Shape {
    vcpu_count: u8,
    track_dirty_pages: bool,
    mailbox_port: Option<u16>,
}

impl Shape {
    fn new(vcpu_count: u8, track_dirty_pages: bool, options: &BuildOptions) -> Shape {
        Shape {
            vcpu_count,
            track_dirty_pages,
            mailbox_port: options.mailbox.then_some(DEFAULT_DOORBELL_PORT),
        }
    }
}

/// VM (memory registered before the irqchip), vCPU fds, devices.
fn build_skeleton(
    kvm: &kvm_ioctls::Kvm,
    vm_fd: kvm_ioctls::VmFd,
    mem: &GuestMemoryMmap,
    shape: Shape,
    console: ConsoleOutput,
    reset_evt: &EventFd,
) -> Result<Skeleton, StartMicrovmError> {
    let Shape {
        vcpu_count,
        track_dirty_pages,
        mailbox_port,
    } = shape;
    let vm = Vm::new(vm_fd, mem, track_dirty_pages)?;
    let vcpu_fds = (0..vcpu_count)
        .map(|index| vm.create_vcpu(index))
        .collect::<Result<Vec<_>, _>>()?;
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(StartMicrovmError::EventFd)?;
    vm.register_irqfd(&serial_irq, SERIAL_GSI)?;
    let reset = reset_evt.try_clone().map_err(StartMicrovmError::EventFd)?;
    let devices = PioDevices {
        serial: Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger(serial_irq.try_clone().map_err(StartMicrovmError::EventFd)?),
            console,
        ))),
        i8042: Arc::new(Mutex::new(i8042::new(reset))),
        doorbell_port: mailbox_port,
    };
    let tsc_khz = vcpu_fds.first().map_or(0, |fd| match fd.get_tsc_khz() {
        Ok(khz) => u64::from(khz),
        Err(e) => {
            log::warn!("KVM does not tell the TSC frequency ({e}); guest clocks will read 0");
            0
        }
    });
    Ok(Skeleton {
        vm,
        vcpu_fds,
        devices,
        serial_irq,
        msr_list: Arc::new(msr_list(kvm)),
        tsc_khz,
    })
}

/// Builds a microVM of `vcpu_count` vCPUs and `mem_size_mib` of
/// placeholder memory for a snapshot to be restored into: its vCPU threads
/// run (under their filters) and wait for their state.
#[allow(clippy::too_many_arguments)]
pub fn build_microvm_for_restore(
    vcpu_count: u8,
    mem_size_mib: usize,
    track_dirty_pages: bool,
    options: &BuildOptions,
    kvm: KvmContext,
    console: ConsoleOutput,
    reset_evt: &EventFd,
    vcpu_events: &VcpuEventSender,
) -> Result<Microvm, StartMicrovmError> {
    let mem_size = (mem_size_mib as u64) << 20;
    let mem = create_guest_memory(mem_size as usize)?;
    let (kvm, vm_fd, supported_cpuid) = kvm.into_parts()?;
    let shape = Shape::new(vcpu_count, track_dirty_pages, options);
    let skeleton = build_skeleton(&kvm, vm_fd, &mem, shape, console, reset_evt)?;
    let mailbox = options
        .mailbox
        .then(|| default_mailbox(&mem, mem_size))
        .transpose()?;
    let vcpus = skeleton
        .vcpu_fds
        .into_iter()
        .enumerate()
        .map(|(index, fd)| {
            Vcpu::new(
                index as u8,
                fd,
                skeleton.devices.clone(),
                vcpu_events.clone(),
                false,
            )
            .start_thread(options.seccomp)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(StartMicrovmError::VcpuThread)?;
    Ok(Microvm {
        kvm,
        vm: skeleton.vm,
        mem,
        vcpus,
        devices: skeleton.devices,
        mailbox,
        tsc_khz: skeleton.tsc_khz,
        supported_cpuid,
        msr_list: skeleton.msr_list,
        serial_irq: skeleton.serial_irq,
        backing: Backing::Files,
        layers: Vec::new(),
    })
}

/// Builds the microVM `resources` describe. `reset_evt` is signalled by the
/// i8042 when the guest resets; vCPU threads report on `vcpu_events`.
pub fn build_microvm_for_boot(
    resources: &mut VmResources,
    options: &BuildOptions,
    kvm: KvmContext,
    console: ConsoleOutput,
    reset_evt: &EventFd,
    vcpu_events: &VcpuEventSender,
) -> Result<Microvm, StartMicrovmError> {
    let boot_source = resources
        .boot_source
        .as_mut()
        .ok_or(StartMicrovmError::MissingBootSource)?;
    let machine = &resources.machine_config;
    let mem_size = (machine.mem_size_mib as u64) << 20;

    let mem = create_guest_memory(mem_size as usize)?;
    // The mailbox, if any, takes the top of guest memory; RAM ends below it.
    let ram_end = if options.mailbox {
        mem_size - DEFAULT_SIZE
    } else {
        mem_size
    };
    let kernel_file = &mut boot_source.kernel_file;
    let boot_config = &boot_source.config;
    // Copying the image into fresh guest memory costs 0.6–1 ms here (each
    // new page must be backed by the outer hypervisor): a helper thread
    // does it while this one sets up the rest, which writes elsewhere in
    // guest memory. The scope joins the helper on every path out.
    let loader_mem = mem.clone();
    std::thread::scope(|scope| {
        let image = std::thread::Builder::new()
            .name("ember_load".into())
            .spawn_scoped(scope, move || {
                load_kernel(
                    &loader_mem,
                    kernel_file,
                    &boot_config.kernel_image_path,
                    ram_end,
                )
            })
            .map_err(StartMicrovmError::LoaderThread)?;
        let (kvm, vm_fd, supported_cpuid) = kvm.into_parts()?;
        let shape = Shape::new(machine.vcpu_count, machine.track_dirty_pages, options);
        let skeleton = build_skeleton(&kvm, vm_fd, &mem, shape, console, reset_evt)?;
        let Skeleton {
            vm,
            vcpu_fds,
            devices,
            serial_irq,
            msr_list,
            tsc_khz,
        } = skeleton;

        let mailbox = if options.mailbox {
            let mailbox = default_mailbox(&mem, mem_size)?;
            mailbox.init_header()?;
            Some(mailbox)
        } else {
            None
        };
        let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(StartMicrovmError::Cmdline)?;
        if let Some(args) = boot_config
            .boot_args
            .as_deref()
            .filter(|a| !a.trim().is_empty())
        {
            cmdline
                .insert_str(args)
                .map_err(StartMicrovmError::Cmdline)?;
        }
        if let Some(mailbox) = &mailbox {
            cmdline
                .insert_str(mailbox.cmdline_param())
                .map_err(StartMicrovmError::Cmdline)?;
        }
        load_cmdline(&mem, GuestAddress(CMDLINE_START), &cmdline)
            .map_err(StartMicrovmError::LoadCmdline)?;
        let cmdline_size = cmdline
            .as_cstring()
            .map_err(StartMicrovmError::Cmdline)?
            .as_bytes_with_nul()
            .len();

        let e820 = boot_params::e820_map(mem_size, mailbox.as_ref().map(Mailbox::gpa));
        boot_params::write_boot_params(&mem, &e820, cmdline_size)?;
        regs::write_boot_tables(&mem)?;

        let entry = image
            .join()
            .map_err(|_| StartMicrovmError::LoaderPanicked)??;
        let mut vcpus = Vec::with_capacity(vcpu_fds.len());
        for (index, fd) in vcpu_fds.into_iter().enumerate() {
            let index = index as u8;
            let setup = |what, source| StartMicrovmError::VcpuSetup {
                index,
                what,
                source,
            };
            let mut cpuid = supported_cpuid.clone();
            cpuid::normalize(&mut cpuid, index, machine.vcpu_count);
            fd.set_cpuid2(&cpuid)
                .map_err(|e| setup("KVM_SET_CPUID2", e))?;
            if index == 0 {
                let mut sregs = fd.get_sregs().map_err(|e| setup("KVM_GET_SREGS", e))?;
                regs::setup_long_mode_sregs(&mut sregs);
                fd.set_sregs(&sregs)
                    .map_err(|e| setup("KVM_SET_SREGS", e))?;
                fd.set_regs(&regs::boot_regs(entry))
                    .map_err(|e| setup("KVM_SET_REGS", e))?;
            }
            let count_ring0 = options.count_ring0 && index == 0;
            vcpus.push(Vcpu::new(
                index,
                fd,
                devices.clone(),
                vcpu_events.clone(),
                count_ring0,
            ));
        }
        let vcpus = vcpus
            .into_iter()
            .map(|vcpu| vcpu.start_thread(options.seccomp))
            .collect::<Result<Vec<_>, _>>()
            .map_err(StartMicrovmError::VcpuThread)?;
        Ok(Microvm {
            kvm,
            vm,
            mem,
            vcpus,
            devices,
            mailbox,
            tsc_khz,
            supported_cpuid,
            msr_list,
            serial_irq,
            backing: Backing::Anonymous,
            layers: Vec::new(),
        })
    })
}

/// The mailbox ember-vmm gives a guest: [`DEFAULT_SIZE`] at the top of its
/// `mem_size` bytes of memory, doorbell on [`DEFAULT_DOORBELL_PORT`].
fn default_mailbox(mem: &GuestMemoryMmap, mem_size: u64) -> Result<Mailbox, MailboxError> {
    Mailbox::new(
        mem.clone(),
        mem_size - DEFAULT_SIZE,
        DEFAULT_SIZE,
        DEFAULT_DOORBELL_PORT,
    )
}

/// Loads the ELF image at its physical addresses; returns its entry point.
fn load_kernel(
    mem: &GuestMemoryMmap,
    file: &mut File,
    path: &str,
    ram_end: u64,
) -> Result<u64, StartMicrovmError> {
    let started = std::time::Instant::now();
    let loaded = Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(|source| {
        StartMicrovmError::LoadKernel {
            path: path.to_string(),
            source,
        }
    })?;
    log::debug!(
        "guest image loaded: {} KiB in {} us",
        (loaded.kernel_end - loaded.kernel_load.0) >> 10,
        started.elapsed().as_micros()
    );
    if loaded.kernel_end > ram_end {
        return Err(StartMicrovmError::KernelTooBig {
            end: loaded.kernel_end,
            limit: ram_end,
        });
    }
    Ok(loaded.kernel_load.0)
}
