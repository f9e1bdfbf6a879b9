//! The VM: memory slots, the in-kernel irqchip, vCPU creation.
//!
//! Order matters on our KVM: registering a memory slot *after*
//! KVM_CREATE_IRQCHIP waits 5–8 ms, registering slots first and creating
//! the irqchip after costs ~0.4 ms for the whole setup (docs/platform.md;
//! `./scripts/probes irqchip_order` measures it).
//! [`Vm::new`] therefore takes the memory and registers it before the
//! irqchip exists.

use crate::vstate::memory::GuestMemoryMmap;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
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
    /// Cannot {what}: {source}
    State {
        /// Which step.
        what: &'static str,
        /// What KVM reported.
        source: kvm_ioctls::Error,
    },
}

/// The VM-wide state KVM keeps: the in-kernel interrupt controllers and the
/// KVM clock. (ember-vmm creates no PIT: the Ember guest uses no timer.)
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The I/O APIC.
    pub ioapic: kvm_irqchip,
    /// The KVM clock.
    pub clock: kvm_clock_data,
}

/// A KVM VM with its memory registered and its irqchip created.
pub struct Vm {
    fd: VmFd,
    /// The memory slots as registered (slot i is region i).
    slots: Vec<kvm_userspace_memory_region>,
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
        let mut slots = Vec::new();
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
            slots.push(region_desc);
        }
        fd.create_irq_chip().map_err(VmError::Irqchip)?;
        Ok(Vm { fd, slots })
    }

    /// Turns KVM's dirty-page log on or off for every slot (a flags-only
    /// change of a registered slot).
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), VmError> {
        for desc in &mut self.slots {
            let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
            if desc.flags == flags {
                continue;
            }
            desc.flags = flags;
            // SAFETY: the same live region as registered in `new`; only the
            // flags change.
            unsafe { self.fd.set_user_memory_region(*desc) }.map_err(|source| {
                VmError::MemorySlot {
                    slot: desc.slot,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Whether KVM logs dirty pages.
    pub fn dirty_logging(&self) -> bool {
        self.slots
            .iter()
            .all(|d| d.flags & KVM_MEM_LOG_DIRTY_PAGES != 0)
    }

    /// The pages the guest wrote since the last call (or since logging
    /// began), one bit per page, for slot 0; empty when logging is off.
    pub fn take_dirty_log(&self) -> Result<Vec<u64>, VmError> {
        let Some(desc) = self.slots.first() else {
            return Ok(Vec::new());
        };
        if desc.flags & KVM_MEM_LOG_DIRTY_PAGES == 0 {
            return Ok(Vec::new());
        }
        self.fd
            .get_dirty_log(desc.slot, desc.memory_size as usize)
            .map_err(|source| VmError::State {
                what: "read the dirty-page log (KVM_GET_DIRTY_LOG)",
                source,
            })
    }

    /// The interrupt controllers and the clock.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |chip_id, what| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map(|()| chip)
                .map_err(|source| VmError::State { what, source })
        };
        Ok(VmState {
            pic_master: chip(
                KVM_IRQCHIP_PIC_MASTER,
                "read the master PIC (KVM_GET_IRQCHIP)",
            )?,
            pic_slave: chip(
                KVM_IRQCHIP_PIC_SLAVE,
                "read the slave PIC (KVM_GET_IRQCHIP)",
            )?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC, "read the I/O APIC (KVM_GET_IRQCHIP)")?,
            clock: self.fd.get_clock().map_err(|source| VmError::State {
                what: "read the KVM clock (KVM_GET_CLOCK)",
                source,
            })?,
        })
    }

    /// Sets the interrupt controllers and the clock from a snapshot.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let set = |chip: &kvm_irqchip, what| {
            self.fd
                .set_irqchip(chip)
                .map_err(|source| VmError::State { what, source })
        };
        set(&state.pic_master, "set the master PIC (KVM_SET_IRQCHIP)")?;
        set(&state.pic_slave, "set the slave PIC (KVM_SET_IRQCHIP)")?;
        set(&state.ioapic, "set the I/O APIC (KVM_SET_IRQCHIP)")?;
        // Only the clock value: the flags describe the saving host's clock.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(|source| VmError::State {
            what: "set the KVM clock (KVM_SET_CLOCK)",
            source,
        })
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
