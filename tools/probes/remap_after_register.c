/*
 * remap_after_register: an image file mapped MAP_PRIVATE|MAP_FIXED over a registered slot: its cost; the guest runs from it.
 *
 * The slot is registered backed by placeholder anonymous memory (zeros: a
 * guest running from it would triple-fault); then the image file (the
 * exception guest of ring3_exception, written to a fresh file under $TMPDIR
 * or /tmp) is opened by name and mapped over the same range; the time of
 * that open and mmap is the result. KVM follows the new mapping: the guest
 * runs from the file to its exception handler.
 */
#include "probe.h"

static const char usage[] = "usage: remap_after_register\n";

int main(int argc, char **argv) {
    args_check(argc, argv, 0, usage);

    size_t size = EXCEPTION_IMAGE_SIZE;
    uint8_t *image = mem_anon(size, 0);
    uint64_t ud2_at = guest_exception(image, TSS_PAGE_GRANULAR);
    const char *path = temp_file_named(size, image);
    if (munmap(image, size) != 0) die("munmap");

    struct vm vm = vm_create(mem_anon(size, 0), size);
    uint64_t start = now_ns();
    vm_set_slot(&vm, 0, 0);
    uint64_t registered = now_ns();
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("open %s", path);
    mem_file(fd, size, vm.mem);
    uint64_t remapped = now_ns();
    temp_file_remove();

    vm_create_vcpu(&vm);
    vcpu_enter_long_mode(&vm, TSS_PAGE_GRANULAR);
    vcpu_run(&vm);
    expect_rdtsc_out(&vm);
    run_to_exception_handler(&vm, ud2_at);

    printf("remap_after_register: %.3f ms to open the image file and map it MAP_PRIVATE|MAP_FIXED over "
           "the registered slot (registering it: %.3f ms); the guest then ran from the file\n",
           ns_to_ms(remapped - registered), ns_to_ms(registered - start));
    return 0;
}
