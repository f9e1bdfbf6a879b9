//! The VM: memory slots, the in-kernel irqchip, vCPU creation.
//!
//! Order matters on our KVM: registering a memory slot *after*
//! KVM_CREATE_IRQCHIP waits 5–8 ms, registering slots first and creating
//! the irqchip after costs ~0.4 ms for the whole setup (shared/PLATFORM.md).
//! [`Vm::new`] therefore takes the memory and registers it before the
//! irqchip exists.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum VmError {
    /// Cannot register guest memory slot {slot}: {source}
    MemorySlot {
        /// The slot.
        slot: u32,
        /// What KVM reported.
        source: kvm_ioctls::Error,
    },
    /// Cannot create the in-kernel irqchip: {0}
    Irqchip(kvm_ioctls::Error),
    /// Cannot create vCPU {index}: {source}
    CreateVcpu {
        /// The vCPU.
        index: u8,
        /// What KVM reported.
        source: kvm_ioctls::Error,
    },
    /// Cannot register an irqfd for GSI {gsi}: {source}
    Irqfd {
        /// The interrupt line.
        gsi: u32,
        /// What KVM reported.
        source: kvm_ioctls::Error,
    },
}

/// A KVM VM with its memory registered and its irqchip created.
pub struct Vm {
    fd: VmFd,
}

impl Vm {
    /// Takes the freshly created VM `fd`, registers every region of `mem`
    /// (before the irqchip: see the module docs), then creates the in-kernel
    /// irqchip.
    pub fn new(fd: VmFd, mem: &GuestMemoryMmap, track_dirty_pages: bool) -> Result<Vm, VmError> {
        let flags = if track_dirty_pages {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let region_desc = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // caller keeps alive as long as the VM (both live in the Microvm).
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(|source| VmError::MemorySlot { slot, source })?;
        }
        fd.create_irq_chip().map_err(VmError::Irqchip)?;
        Ok(Vm { fd })
    }

    /// Creates vCPU `index` (its APIC ID).
    pub fn create_vcpu(&self, index: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(u64::from(index))
            .map_err(|source| VmError::CreateVcpu { index, source })
    }

    /// Routes `evt` to interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}
