/*
 * restore_floor: the floor of a prepared restore: map the image over the slot, set sregs and regs, run to the first out.
 *
 * Prepared before the clock starts, as a VMM process waiting for a restore
 * request would be: the VM, its slot (placeholder anonymous memory), the
 * vCPU with its CPUID and registers set once, and the image file (the
 * exception guest of ring3_exception, in a fresh file under $TMPDIR or
 * /tmp, so in the page cache) open. The clock starts at the "request":
 * mmap MAP_PRIVATE|MAP_FIXED of the image over the slot, KVM_SET_SREGS,
 * KVM_SET_REGS, KVM_RUN; it stops when KVM_RUN returns with the guest's
 * first out (after RDTSC, in ring 3). The guest then runs on to its
 * exception handler, to check it ran from the image.
 */
#include "probe.h"

static const char usage[] = "usage: restore_floor\n";

int main(int argc, char **argv) {
    args_check(argc, argv, 0, usage);

    size_t size = EXCEPTION_IMAGE_SIZE;
    uint8_t *image = mem_anon(size, 0);
    uint64_t ud2_at = guest_exception(image, TSS_PAGE_GRANULAR);
    int fd = temp_file(size, image);
    if (munmap(image, size) != 0) die("munmap");

    struct vm vm = vm_new(mem_anon(size, 0), size, 0);
    struct kvm_sregs sregs = long_mode_sregs(&vm, TSS_PAGE_GRANULAR);
    struct kvm_regs regs = entry_regs();
    xioctl(vm.vcpu, KVM_SET_SREGS, &sregs);
    xioctl(vm.vcpu, KVM_SET_REGS, &regs);

    uint64_t request = now_ns();
    mem_file(fd, size, vm.mem);
    uint64_t mapped = now_ns();
    xioctl(vm.vcpu, KVM_SET_SREGS, &sregs);
    xioctl(vm.vcpu, KVM_SET_REGS, &regs);
    vcpu_run(&vm);
    uint64_t first_exit = now_ns();

    expect_rdtsc_out(&vm);
    run_to_exception_handler(&vm, ud2_at);

    printf("restore_floor: %.3f ms from the request to the guest's first out from ring 3 "
           "(the mmap over the slot: %.3f ms)\n",
           ns_to_ms(first_exit - request), ns_to_ms(mapped - request));
    return 0;
}
