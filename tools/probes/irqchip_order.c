/*
 * irqchip_order: VM setup time by the order of KVM_CREATE_IRQCHIP and the first memory slot.
 *
 * The time runs from opening /dev/kvm to the vCPU's creation; the slot is
 * 128 MiB of anonymous memory (MAP_NORESERVE). No guest runs.
 */
#include "probe.h"

static const char usage[] =
    "usage: irqchip_order [ORDER]\n"
    "  ORDER  0: KVM_CREATE_IRQCHIP, then the first slot (default)\n"
    "         1: the first slot, then KVM_CREATE_IRQCHIP\n"
    "         2: the first slot, no irqchip\n";

int main(int argc, char **argv) {
    args_check(argc, argv, 1, usage);
    int order = (int)arg_long(argc, argv, 1, 0, 0, 2, usage);
    size_t size = 128 * MIB;
    uint8_t *mem = mem_anon(size, 0);

    uint64_t t0 = now_ns();
    struct vm vm = vm_create(mem, size);
    uint64_t t1 = now_ns();
    if (order == 0) xioctl(vm.fd, KVM_CREATE_IRQCHIP, 0);
    else vm_set_slot(&vm, 0, 0);
    uint64_t t2 = now_ns();
    if (order == 0) vm_set_slot(&vm, 0, 0);
    else if (order == 1) xioctl(vm.fd, KVM_CREATE_IRQCHIP, 0);
    uint64_t t3 = now_ns();
    vm.vcpu = xioctl(vm.fd, KVM_CREATE_VCPU, 0);
    uint64_t t4 = now_ns();

    static const char *const steps[][2] = {
        {"KVM_CREATE_IRQCHIP", "then the slot"},
        {"the slot", "then KVM_CREATE_IRQCHIP"},
        {"the slot", "no irqchip"},
    };
    char second[64] = "";
    if (order != 2) snprintf(second, sizeof second, " %.2f", ns_to_ms(t3 - t2));
    printf("irqchip_order: %.2f ms in all (order %d: open and KVM_CREATE_VM %.2f, %s %.2f, %s%s, "
           "KVM_CREATE_VCPU %.2f ms)\n",
           ns_to_ms(t4 - t0), order, ns_to_ms(t1 - t0), steps[order][0], ns_to_ms(t2 - t1),
           steps[order][1], second, ns_to_ms(t4 - t3));
    return 0;
}
