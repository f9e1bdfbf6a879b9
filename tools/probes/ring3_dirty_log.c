/*
 * ring3_dirty_log: which of N pages touched from ring 3 KVM's dirty log reports (written ones, not read ones).
 *
 * The same guest as ring3_page_touch, on a slot registered with
 * KVM_MEM_LOG_DIRTY_PAGES; after the guest's `out`, KVM_GET_DIRTY_LOG. The
 * result counts the dirty pages among the touched ones, and lists the other
 * dirty pages (the guest's page tables and stack, written by the CPU).
 */
#include "probe.h"

static const char usage[] =
    "usage: ring3_dirty_log [N [MODE [RD]]]\n"
    "  N     pages to touch (default 4096, at most 31744)\n"
    "  MODE  guest memory: 0 anonymous (default), 1 anonymous with MAP_POPULATE,\n"
    "        2 a fresh sparse file under $TMPDIR (or /tmp) mapped MAP_PRIVATE\n"
    "  RD    0 the guest writes each page (default), 1 it reads it\n";

#define LISTED_MAX 8 /* other dirty pages listed by address */

int main(int argc, char **argv) {
    args_check(argc, argv, 3, usage);
    long pages = arg_long(argc, argv, 1, 4096, 1, (long)TOUCH_MAX_PAGES, usage);
    enum touch_mode mode = (enum touch_mode)arg_long(argc, argv, 2, TOUCH_ANON, 0, 2, usage);
    int reads = (int)arg_long(argc, argv, 3, 0, 0, 1, usage);

    struct vm vm = vm_new(touch_mem(mode), TOUCH_MEM_SIZE, KVM_MEM_LOG_DIRTY_PAGES);
    guest_ring3(vm.mem, TSS_NONE);
    guest_touch_pages(vm.mem, (uint64_t)pages, reads);
    vcpu_enter_long_mode(&vm, TSS_NONE);

    vcpu_run_to_out(&vm, PORT_GUEST);
    expect_ring3(&vm);
    expect_pages_touched(&vm, (uint64_t)pages, reads);

    static uint64_t bitmap[TOUCH_MEM_SIZE / PAGE_SIZE_4K / 64];
    struct kvm_dirty_log log = {.slot = 0, .dirty_bitmap = bitmap};
    xioctl(vm.fd, KVM_GET_DIRTY_LOG, &log);

    uint64_t first = GUEST_DATA / PAGE_SIZE_4K, end = first + (uint64_t)pages;
    long touched_dirty = 0, other_dirty = 0;
    char listed[LISTED_MAX * 20 + 8] = "";
    size_t len = 0;
    for (uint64_t page = 0; page < TOUCH_MEM_SIZE / PAGE_SIZE_4K; page++) {
        if (!(bitmap[page / 64] >> (page % 64) & 1)) continue;
        if (page >= first && page < end) {
            touched_dirty++;
        } else if (other_dirty++ < LISTED_MAX) {
            len += (size_t)snprintf(listed + len, sizeof listed - len, " 0x%llx",
                                    (unsigned long long)(page * PAGE_SIZE_4K));
        } else if (other_dirty == LISTED_MAX + 1) {
            snprintf(listed + len, sizeof listed - len, " ...");
        }
    }

    printf("ring3_dirty_log: %ld dirty pages of %ld %s (mode %d %s); other dirty pages: %ld%s%s\n",
           touched_dirty, pages, reads ? "read" : "written", (int)mode, touch_mode_name(mode),
           other_dirty, other_dirty ? " at" : "", listed);
    return 0;
}
