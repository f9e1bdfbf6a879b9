/*
 * ring3_exception: RDTSC and SSE in ring 3, then a #UD to a ring-0 IDT handler on the TSS's RSP0 stack.
 *
 * A check, not a timing: it prints what happened. The TSS descriptor is
 * page-granular (G=1, limit 0xfffff, Firecracker's layout) unless TSS is
 * "byte": then it is byte-granular (G=0, limit 103), and under kvm_pvm the
 * vCPU triple-faults at the guest's first out from ring 3. With "page",
 * anything but delivery is a failure (exit 1); with "byte", the probe
 * reports either outcome.
 */
#include "probe.h"

static const char usage[] =
    "usage: ring3_exception [TSS]\n"
    "  TSS  page: page-granular TSS descriptor, G=1 limit 0xfffff (default)\n"
    "       byte: byte-granular TSS descriptor, G=0 limit 103\n";

int main(int argc, char **argv) {
    args_check(argc, argv, 1, usage);
    enum tss tss = TSS_PAGE_GRANULAR;
    if (argc > 1 && strcmp(argv[1], "byte") == 0) {
        tss = TSS_BYTE_GRANULAR;
    } else if (argc > 1 && strcmp(argv[1], "page") != 0) {
        fprintf(stderr, "ring3_exception: bad argument '%s'\n%s", argv[1], usage);
        return 2;
    }
    const char *kind = tss == TSS_PAGE_GRANULAR ? "page-granular TSS (G=1, limit 0xfffff)"
                                                : "byte-granular TSS (G=0, limit 103)";

    size_t size = EXCEPTION_IMAGE_SIZE;
    struct vm vm = vm_new(mem_anon(size, 0), size, 0);
    uint64_t ud2_at = guest_exception(vm.mem, tss);
    vcpu_enter_long_mode(&vm, tss);

    if (vcpu_run(&vm) == KVM_EXIT_SHUTDOWN && tss == TSS_BYTE_GRANULAR) {
        char what[512];
        uint64_t rip = vcpu_regs(&vm).rip;
        printf("ring3_exception: %s: the vCPU stopped before the guest's first exit: %s%s\n", kind,
               exit_describe(&vm, what, sizeof what),
               rip == EXCEPTION_FIRST_OUT ? " (the ring-3 out after RDTSC)" : "");
        return 0;
    }
    expect_rdtsc_out(&vm);
    run_to_exception_handler(&vm, ud2_at);

    printf("ring3_exception: ok with a %s: RDTSC and SSE ran in ring 3, the #UD at 0x%llx (CS 0x%x) "
           "reached the ring-0 handler on the RSP0 stack\n",
           kind, (unsigned long long)ud2_at, SEL_USER_CODE);
    return 0;
}
