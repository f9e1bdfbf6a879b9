/*
 * ring3_page_touch: the first touch of N guest pages from ring 3, by what backs guest memory.
 *
 * Guest memory is 128 MiB; the guest touches one byte in each of N
 * consecutive 4 KiB pages from GUEST_DATA on. The time runs from KVM_RUN to
 * the guest's `out` after the last page, and includes the ring-0 stub.
 */
#include "probe.h"

static const char usage[] =
    "usage: ring3_page_touch [N [MODE [RD]]]\n"
    "  N     pages to touch (default 4096, at most 31744)\n"
    "  MODE  guest memory: 0 anonymous (default), 1 anonymous with MAP_POPULATE,\n"
    "        2 a fresh sparse file under $TMPDIR (or /tmp) mapped MAP_PRIVATE,\n"
    "        3 anonymous, 2 MiB-aligned, MADV_HUGEPAGE, populated (transparent\n"
    "        huge pages: does the KVM map the guest's 2 MiB pages in one fault?),\n"
    "        4 a file with contents, in the page cache, MAP_PRIVATE, MADV_HUGEPAGE,\n"
    "        populated for reading (as a snapshot's memory, prefetched)\n"
    "  RD    0 the guest writes each page (default), 1 it reads it\n";

int main(int argc, char **argv) {
    args_check(argc, argv, 3, usage);
    long pages = arg_long(argc, argv, 1, 4096, 1, (long)TOUCH_MAX_PAGES, usage);
    enum touch_mode mode = (enum touch_mode)arg_long(argc, argv, 2, TOUCH_ANON, 0, 4, usage);
    int reads = (int)arg_long(argc, argv, 3, 0, 0, 1, usage);

    struct vm vm = vm_new(touch_mem(mode), TOUCH_MEM_SIZE, 0);
    guest_ring3(vm.mem, TSS_NONE);
    guest_touch_pages(vm.mem, (uint64_t)pages, reads);
    vcpu_enter_long_mode(&vm, TSS_NONE);

    uint64_t start = now_ns();
    vcpu_run_to_out(&vm, PORT_GUEST);
    uint64_t elapsed = now_ns() - start;
    expect_ring3(&vm);
    expect_pages_touched(&vm, (uint64_t)pages, reads);

    /* How much of this process's anonymous memory the host backs with huge pages. */
    long huge_kb = -1;
    FILE *smaps = fopen("/proc/self/smaps_rollup", "r");
    if (smaps) {
        char line[256];
        while (fgets(line, sizeof line, smaps))
            if (sscanf(line, "AnonHugePages: %ld kB", &huge_kb) == 1 && mode != TOUCH_FILE_CACHED) break;
            else if (mode == TOUCH_FILE_CACHED && sscanf(line, "FilePmdMapped: %ld kB", &huge_kb) == 1) break;
        fclose(smaps);
    }
    printf("ring3_page_touch: %.2f us/page (%ld pages %s, mode %d %s, in %.3f ms; "
           "host huge pages %ld kB)\n",
           ns_to_us(elapsed) / (double)pages, pages, reads ? "read" : "written", (int)mode,
           touch_mode_name(mode), ns_to_ms(elapsed), huge_kb);
    return 0;
}
