/*
 * ring0_loop: a dec/jnz loop of N iterations in guest ring 0, against the same loop on the host.
 *
 * Under kvm_pvm (shadow paging, the guest deprivileged) guest ring-0 code
 * runs through KVM's instruction emulator: compare with ring3_loop.
 */
#include "probe.h"

static const char usage[] =
    "usage: ring0_loop [N]\n"
    "  N  loop iterations in guest ring 0 (default 200000)\n";

int main(int argc, char **argv) {
    args_check(argc, argv, 1, usage);
    long n = arg_long(argc, argv, 1, 200000, 1, 10000000000L, usage);

    size_t size = 4 * MIB;
    struct vm vm = vm_new(mem_anon(size, 0), size, 0);
    guest_page_tables(vm.mem, 0);
    guest_gdt(vm.mem, TSS_NONE);

    struct code c = code_at(vm.mem, GUEST_RING0_CODE);
    EMIT(&c, 0x48, 0xb9); emit_u64(&c, (uint64_t)n); /*     mov rcx, n */
    uint64_t loop = code_here(&c);
    EMIT(&c, 0x48, 0xff, 0xc9);                       /* 1:  dec rcx */
    emit_jump_back(&c, 0x75, loop);                   /*     jnz 1b */
    EMIT(&c, 0xe6, PORT_GUEST);                       /*     out PORT_GUEST, al */
    EMIT(&c, 0xf4);                                   /*     hlt */
    vcpu_enter_long_mode(&vm, TSS_NONE);

    uint64_t start = now_ns();
    vcpu_run_to_out(&vm, PORT_GUEST);
    uint64_t guest = now_ns() - start;
    if (vcpu_regs(&vm).rcx != 0) fail("the guest left its loop early");
    uint64_t host = host_loop_ns((uint64_t)n);

    double guest_ns = (double)guest / (double)n, host_ns = (double)host / (double)n;
    printf("ring0_loop: %.2f ns/iter (n=%ld in %.3f s; host loop %.2f ns/iter, guest ring 0 %.0fx slower)\n",
           guest_ns, n, (double)guest / 1e9, host_ns, guest_ns / host_ns);
    return 0;
}
