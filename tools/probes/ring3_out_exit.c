/*
 * ring3_out_exit: the round trip of an out from guest ring 3 to the VMM and back.
 *
 * The guest loops on `out PORT_GUEST, al` in ring 3 (IOPL=3). The first exit
 * (after the ring-0 stub) is not timed; the next N round trips are.
 */
#include "probe.h"

static const char usage[] =
    "usage: ring3_out_exit [N]\n"
    "  N  timed out exits (default 10000)\n";

int main(int argc, char **argv) {
    args_check(argc, argv, 1, usage);
    long n = arg_long(argc, argv, 1, 10000, 1, 1000000000, usage);

    size_t size = 4 * MIB;
    struct vm vm = vm_new(mem_anon(size, 0), size, 0);
    guest_ring3(vm.mem, TSS_NONE);

    struct code c = code_at(vm.mem, GUEST_RING3_CODE);
    uint64_t loop = code_here(&c);
    EMIT(&c, 0xe6, PORT_GUEST);     /* 1: out PORT_GUEST, al */
    emit_jump_back(&c, 0xeb, loop); /*    jmp 1b */
    vcpu_enter_long_mode(&vm, TSS_NONE);

    vcpu_run_to_out(&vm, PORT_GUEST);
    expect_ring3(&vm);
    uint64_t start = now_ns();
    for (long i = 0; i < n; i++) vcpu_run_to_out(&vm, PORT_GUEST);
    uint64_t elapsed = now_ns() - start;

    printf("ring3_out_exit: %.2f us/exit (n=%ld in %.3f s)\n", ns_to_us(elapsed) / (double)n, n,
           (double)elapsed / 1e9);
    return 0;
}
