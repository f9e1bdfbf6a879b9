/*
 * probe.h: what the KVM probes share. Each probe is one .c file that
 * includes this header and is built alone:
 *
 *     gcc -O2 -Wall -Wextra -Werror -o ring3_loop ring3_loop.c
 *
 * The guests are a few hand-assembled instructions in one 64-bit vCPU:
 * long mode, the first GiB identity-mapped with 2 MiB pages, a flat GDT with
 * ring-0 and ring-3 segments and, where a probe needs exceptions, a TSS and
 * an IDT. Ring-3 guests start with a short ring-0 stub that drops to ring 3
 * with IOPL=3 (so `out` works from ring 3) and report through `out` to an
 * I/O port.
 *
 * Every system call is checked: a failure prints which call failed and why,
 * and the probe exits with status 1. Bad arguments print the usage and exit
 * with status 2.
 */
#ifndef EMBER_PROBE_H
#define EMBER_PROBE_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* ---- Guest physical layout (identity-mapped: also the virtual addresses) */

#define GUEST_PML4 0x1000ULL        /* page-map level 4 */
#define GUEST_PDPT 0x2000ULL        /* page-directory-pointer table */
#define GUEST_PD 0x3000ULL          /* page directory: 512 x 2 MiB = 1 GiB */
#define GUEST_GDT 0x5000ULL
#define GUEST_TSS 0x6000ULL
#define GUEST_IDT 0x7000ULL
#define GUEST_RING0_CODE 0x10000ULL /* where the vCPU starts */
#define GUEST_RING3_CODE 0x11000ULL /* where the ring-0 stub drops to ring 3 */
#define GUEST_HANDLER 0x12000ULL    /* ring-0 exception handler */
#define GUEST_CODE_MAX 0x1000       /* room for each of the three pieces of code */
#define GUEST_RING0_STACK 0x200000ULL /* initial RSP (grows down) */
#define GUEST_RING3_STACK 0x300000ULL /* RSP after the drop to ring 3 */
#define GUEST_RSP0 0x400000ULL        /* TSS.RSP0: the stack an exception from ring 3 lands on */
#define GUEST_DATA 0x400000ULL        /* first page the page-touch probes touch */

#define PAGE_SIZE_4K 0x1000ULL
#define PAGE_SIZE_2M 0x200000ULL
#define MIB (1024ULL * 1024)

/* ---- I/O ports the guests write to */

#define PORT_GUEST 0x10   /* the guest reached a point of its program */
#define PORT_HANDLER 0x11 /* the ring-0 exception handler ran */

/* ---- GDT selectors (index * 8; ring-3 selectors carry RPL 3) */

#define SEL_KERNEL_CODE 0x08
#define SEL_KERNEL_DATA 0x10
#define SEL_USER_DATA (0x18 | 3)
#define SEL_USER_CODE (0x20 | 3)
#define SEL_TSS 0x28 /* a 16-byte system descriptor: two GDT slots */
#define GDT_ENTRIES 7

/* ---- Architectural bits */

#define PTE_PRESENT (1ULL << 0)
#define PTE_WRITABLE (1ULL << 1)
#define PTE_USER (1ULL << 2)
#define PTE_LARGE (1ULL << 7) /* in a PD entry: a 2 MiB page */

#define CR0_PE (1ULL << 0)  /* protected mode */
#define CR0_MP (1ULL << 1)  /* monitor coprocessor (SSE) */
#define CR0_ET (1ULL << 4)
#define CR0_PG (1ULL << 31) /* paging */
#define CR4_PAE (1ULL << 5)
#define CR4_OSFXSR (1ULL << 9)      /* SSE enabled */
#define CR4_OSXMMEXCPT (1ULL << 10) /* SSE exceptions enabled */
#define EFER_LME (1ULL << 8)
#define EFER_LMA (1ULL << 10)
#define RFLAGS_RESERVED (1ULL << 1) /* always 1 */
#define RFLAGS_IOPL3 (3ULL << 12)   /* I/O privilege level 3: ring 3 may use in/out */

#define VECTOR_UD 6     /* invalid opcode (#UD) */
#define IDT_VECTORS 256 /* the IDT's limit covers all of them */
#define TSS_SIZE 104    /* a 64-bit TSS without an I/O bitmap */

/* ---- Errors */

/* A system call failed: prints "probe: <what>: <strerror(errno)>", exits 1. */
__attribute__((noreturn, format(printf, 1, 2))) static inline void die(const char *fmt, ...) {
    int err = errno;
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "%s: ", program_invocation_short_name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, ": %s\n", strerror(err));
    exit(1);
}

/* A wrong result (unexpected exit, bad value): prints it, exits 1. */
__attribute__((noreturn, format(printf, 1, 2))) static inline void fail(const char *fmt, ...) {
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "%s: ", program_invocation_short_name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/* ioctl() that dies naming the request: xioctl(vm, KVM_CREATE_VCPU, 0). */
#define xioctl(fd, request, arg) probe_ioctl((fd), (request), #request, (unsigned long)(arg))

static inline int probe_ioctl(int fd, unsigned long request, const char *name, unsigned long arg) {
    int ret = ioctl(fd, request, arg);
    if (ret < 0) die("%s", name);
    return ret;
}

/* ---- Arguments */

/* Handles -h/--help and too many arguments; `usage` ends with a newline. */
static inline void args_check(int argc, char **argv, int max_args, const char *usage) {
    if (argc > 1 && (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0)) {
        fputs(usage, stdout);
        exit(0);
    }
    if (argc - 1 > max_args) {
        fprintf(stderr, "%s: too many arguments\n%s", program_invocation_short_name, usage);
        exit(2);
    }
}

/* argv[index] as an integer in [min, max], or `fallback` when absent. */
static inline long arg_long(int argc, char **argv, int index, long fallback, long min, long max,
                            const char *usage) {
    if (index >= argc) return fallback;
    char *end;
    errno = 0;
    long value = strtol(argv[index], &end, 10);
    if (errno != 0 || end == argv[index] || *end != '\0' || value < min || value > max) {
        fprintf(stderr, "%s: bad argument '%s' (expected an integer from %ld to %ld)\n%s",
                program_invocation_short_name, argv[index], min, max, usage);
        exit(2);
    }
    return value;
}

/* ---- Clocks */

static inline uint64_t now_ns(void) {
    struct timespec t;
    if (clock_gettime(CLOCK_MONOTONIC, &t) != 0) die("clock_gettime(CLOCK_MONOTONIC)");
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

static inline double ns_to_us(uint64_t ns) { return (double)ns / 1e3; }
static inline double ns_to_ms(uint64_t ns) { return (double)ns / 1e6; }

/* The guests' loop (dec rcx; jnz) run n times on the host: nanoseconds. */
static inline uint64_t host_loop_ns(uint64_t n) {
    uint64_t count = n;
    uint64_t start = now_ns();
    __asm__ volatile("1: dec %0\n\tjnz 1b" : "+r"(count));
    return now_ns() - start;
}

/* ---- Host memory behind guest memory */

/* Anonymous memory, MAP_PRIVATE | MAP_NORESERVE | extra_flags (e.g. MAP_POPULATE). */
static inline uint8_t *mem_anon(size_t size, int extra_flags) {
    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | extra_flags, -1, 0);
    if (mem == MAP_FAILED) die("mmap of %zu bytes of anonymous memory", size);
    return mem;
}

/* `fd` mapped MAP_PRIVATE: anywhere, or MAP_FIXED over `at` when not NULL. */
static inline uint8_t *mem_file(int fd, size_t size, void *at) {
    void *mem = mmap(at, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | (at ? MAP_FIXED : 0), fd, 0);
    if (mem == MAP_FAILED) die("mmap of %zu bytes of a file MAP_PRIVATE%s", size, at ? "|MAP_FIXED" : "");
    if (at && mem != at) fail("mmap MAP_FIXED returned %p, not %p", mem, at);
    return mem;
}

/*
 * Temporary files, under $TMPDIR (or /tmp), one at a time: temp_path names
 * the current one until it is removed, which exit() (so die() and fail())
 * does too.
 */
static char temp_path[4096];

/* At exit: best effort, and never exit() again. */
static inline void temp_file_remove_at_exit(void) {
    if (temp_path[0]) unlink(temp_path);
}

static inline void temp_file_remove(void) {
    char path[sizeof temp_path];
    memcpy(path, temp_path, sizeof path);
    temp_path[0] = '\0';
    if (path[0] && unlink(path) != 0) die("unlink %s", path);
}

/* A new file of `size` bytes holding `contents` (sparse when NULL), open read-write. */
static inline int temp_file_create(size_t size, const void *contents) {
    static int remove_at_exit;
    const char *dir = getenv("TMPDIR");
    if (!dir || !*dir) dir = "/tmp";
    if (snprintf(temp_path, sizeof temp_path, "%s/ember-probe-XXXXXX", dir) >= (int)sizeof temp_path)
        fail("TMPDIR is too long: %s", dir);
    int fd = mkstemp(temp_path);
    if (fd < 0) {
        int err = errno;
        char template[sizeof temp_path];
        memcpy(template, temp_path, sizeof template);
        temp_path[0] = '\0';
        errno = err;
        die("mkstemp %s", template);
    }
    if (!remove_at_exit++ && atexit(temp_file_remove_at_exit) != 0) {
        temp_file_remove();
        fail("atexit failed");
    }
    if (ftruncate(fd, (off_t)size) != 0) die("ftruncate %s to %zu bytes", temp_path, size);
    for (size_t done = 0; contents && done < size;) {
        ssize_t n = pwrite(fd, (const uint8_t *)contents + done, size - done, (off_t)done);
        if (n <= 0) die("write %s", temp_path);
        done += (size_t)n;
    }
    return fd;
}

/* A new temporary file (see temp_file_create), already removed: it lives as long as its descriptor. */
static inline int temp_file(size_t size, const void *contents) {
    int fd = temp_file_create(size, contents);
    temp_file_remove();
    return fd;
}

/* A new temporary file (see temp_file_create), closed: its path, until temp_file_remove(). */
static inline const char *temp_file_named(size_t size, const void *contents) {
    int fd = temp_file_create(size, contents);
    if (close(fd) != 0) die("close %s", temp_path);
    return temp_path;
}

/* ---- The VM */

struct vm {
    int kvm;              /* /dev/kvm */
    int fd;               /* the VM */
    int vcpu;             /* its one vCPU */
    struct kvm_run *run;  /* the vCPU's shared run structure */
    uint8_t *mem;         /* host mapping of slot 0 (guest physical 0) */
    size_t mem_size;
};

static inline int kvm_open(void) {
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("open /dev/kvm");
    int version = xioctl(kvm, KVM_GET_API_VERSION, 0);
    if (version != KVM_API_VERSION) fail("KVM API version %d, expected %d", version, KVM_API_VERSION);
    return kvm;
}

static inline void vm_set_slot(const struct vm *vm, uint32_t slot, uint32_t flags) {
    struct kvm_userspace_memory_region region = {
        .slot = slot,
        .flags = flags,
        .guest_phys_addr = 0,
        .memory_size = vm->mem_size,
        .userspace_addr = (uint64_t)(uintptr_t)vm->mem,
    };
    xioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &region);
}

/* The vCPU, its run structure, and the CPUID KVM supports. */
static inline void vm_create_vcpu(struct vm *vm) {
    vm->vcpu = xioctl(vm->fd, KVM_CREATE_VCPU, 0);
    int run_size = xioctl(vm->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    vm->run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu, 0);
    if (vm->run == MAP_FAILED) die("mmap of the vCPU's kvm_run");

    enum { MAX_CPUID_ENTRIES = 256 };
    struct kvm_cpuid2 *cpuid =
        calloc(1, sizeof *cpuid + MAX_CPUID_ENTRIES * sizeof(struct kvm_cpuid_entry2));
    if (!cpuid) die("calloc");
    cpuid->nent = MAX_CPUID_ENTRIES;
    xioctl(vm->kvm, KVM_GET_SUPPORTED_CPUID, cpuid);
    xioctl(vm->vcpu, KVM_SET_CPUID2, cpuid);
    free(cpuid);
}

/* /dev/kvm and a VM whose slot 0 will be `mem` (not registered yet), no vCPU yet. */
static inline struct vm vm_create(uint8_t *mem, size_t mem_size) {
    struct vm vm = {.mem = mem, .mem_size = mem_size, .vcpu = -1};
    vm.kvm = kvm_open();
    vm.fd = xioctl(vm.kvm, KVM_CREATE_VM, 0);
    return vm;
}

/*
 * /dev/kvm, a VM, slot 0 of mem_size bytes at guest physical 0 backed by
 * `mem` (slot_flags: 0 or KVM_MEM_LOG_DIRTY_PAGES), and a vCPU.
 */
static inline struct vm vm_new(uint8_t *mem, size_t mem_size, uint32_t slot_flags) {
    struct vm vm = vm_create(mem, mem_size);
    vm_set_slot(&vm, 0, slot_flags);
    vm_create_vcpu(&vm);
    return vm;
}

/* ---- Guest tables, written into guest memory `mem` */

/* Identity-maps the first GiB with 2 MiB pages; `user`: ring 3 may use them. */
static inline void guest_page_tables(uint8_t *mem, int user) {
    uint64_t flags = PTE_PRESENT | PTE_WRITABLE | (user ? PTE_USER : 0);
    uint64_t *pml4 = (uint64_t *)(mem + GUEST_PML4);
    uint64_t *pdpt = (uint64_t *)(mem + GUEST_PDPT);
    uint64_t *pd = (uint64_t *)(mem + GUEST_PD);
    pml4[0] = GUEST_PDPT | flags;
    pdpt[0] = GUEST_PD | flags;
    for (uint64_t i = 0; i < 512; i++) pd[i] = (i * PAGE_SIZE_2M) | flags | PTE_LARGE;
}

/* Which TSS a guest has. */
enum tss {
    TSS_NONE,
    TSS_PAGE_GRANULAR, /* G=1, limit 0xfffff: Firecracker's layout; works under kvm_pvm */
    TSS_BYTE_GRANULAR, /* G=0, limit 103: the exact size; kvm_pvm triple-faults at the first ring-3 out */
};

/*
 * A segment descriptor from its fields (the layout Firecracker's gdt_entry
 * uses): `flags` holds access byte (bits 0-7) and G/D/L/AVL (bits 12-15).
 */
static inline uint64_t gdt_entry(uint16_t flags, uint32_t base, uint32_t limit) {
    return ((uint64_t)(base & 0xff000000) << 32) | ((uint64_t)(base & 0x00ffffff) << 16) |
           (uint64_t)(limit & 0x0000ffff) | ((uint64_t)(limit & 0x000f0000) << 32) |
           ((uint64_t)flags << 40);
}

/* Access bytes: P=1, DPL, S=1 (code/data), type; G=1 (0x8000), L=1 (0x2000), D/B=1 (0x4000). */
#define GDT_KERNEL_CODE 0xa09b /* 64-bit code, DPL 0, execute/read, accessed */
#define GDT_KERNEL_DATA 0xc093 /* data, DPL 0, read/write, accessed */
#define GDT_USER_DATA 0xc0f3   /* data, DPL 3 */
#define GDT_USER_CODE 0xa0fb   /* 64-bit code, DPL 3 */
#define GDT_TSS_PAGE 0x808b    /* P=1, busy 64-bit TSS (type 0xb), G=1 */
#define GDT_TSS_BYTE 0x008b    /* the same, G=0 */

/* The GDT and, unless TSS_NONE, the TSS (RSP0 = GUEST_RSP0, no I/O bitmap). */
static inline void guest_gdt(uint8_t *mem, enum tss tss) {
    uint64_t *gdt = (uint64_t *)(mem + GUEST_GDT);
    memset(gdt, 0, GDT_ENTRIES * sizeof *gdt);
    gdt[SEL_KERNEL_CODE >> 3] = gdt_entry(GDT_KERNEL_CODE, 0, 0xfffff);
    gdt[SEL_KERNEL_DATA >> 3] = gdt_entry(GDT_KERNEL_DATA, 0, 0xfffff);
    gdt[SEL_USER_DATA >> 3] = gdt_entry(GDT_USER_DATA, 0, 0xfffff);
    gdt[SEL_USER_CODE >> 3] = gdt_entry(GDT_USER_CODE, 0, 0xfffff);
    if (tss == TSS_NONE) return;

    uint8_t *t = mem + GUEST_TSS;
    memset(t, 0, TSS_SIZE);
    uint64_t rsp0 = GUEST_RSP0;
    memcpy(t + 4, &rsp0, sizeof rsp0);       /* RSP0 at offset 4 */
    uint16_t iomap = TSS_SIZE;               /* I/O bitmap base past the end: none */
    memcpy(t + 102, &iomap, sizeof iomap);
    if (tss == TSS_PAGE_GRANULAR)
        gdt[SEL_TSS >> 3] = gdt_entry(GDT_TSS_PAGE, (uint32_t)GUEST_TSS, 0xfffff);
    else
        gdt[SEL_TSS >> 3] = gdt_entry(GDT_TSS_BYTE, (uint32_t)GUEST_TSS, TSS_SIZE - 1);
    gdt[(SEL_TSS >> 3) + 1] = GUEST_TSS >> 32; /* base bits 32-63 */
}

/* IDT entry `vector`: a DPL-0 64-bit interrupt gate to `handler` in kernel code. */
static inline void guest_idt_gate(uint8_t *mem, unsigned vector, uint64_t handler) {
    uint64_t *gate = (uint64_t *)(mem + GUEST_IDT) + 2 * vector;
    gate[0] = (handler & 0xffff) | ((uint64_t)SEL_KERNEL_CODE << 16) |
              (0x8eULL << 40) /* P=1, DPL 0, type 0xe: interrupt gate */ |
              (((handler >> 16) & 0xffff) << 48);
    gate[1] = handler >> 32;
}

/* ---- Hand-assembled guest code */

/* Guest code being written at guest address `addr`. */
struct code {
    uint8_t *at;   /* host address of the first byte */
    uint64_t addr; /* its guest address */
    size_t len;
};

static inline struct code code_at(uint8_t *mem, uint64_t addr) {
    return (struct code){.at = mem + addr, .addr = addr, .len = 0};
}

/* The guest address of the next instruction. */
static inline uint64_t code_here(const struct code *c) { return c->addr + c->len; }

static inline void emit_bytes(struct code *c, const void *bytes, size_t n) {
    if (c->len + n > GUEST_CODE_MAX) fail("guest code at 0x%llx overflows", (unsigned long long)c->addr);
    memcpy(c->at + c->len, bytes, n);
    c->len += n;
}

/* EMIT(&code, 0x0f, 0x0b): bytes of one instruction (comment it with its assembly). */
#define EMIT(c, ...)                                                   \
    do {                                                               \
        const uint8_t emit_bytes_[] = {__VA_ARGS__};                   \
        emit_bytes((c), emit_bytes_, sizeof emit_bytes_);              \
    } while (0)

static inline void emit_u32(struct code *c, uint32_t v) { emit_bytes(c, &v, sizeof v); }
static inline void emit_u64(struct code *c, uint64_t v) { emit_bytes(c, &v, sizeof v); }

/* A short jump back to `target`: opcode 0x75 (jnz) or 0xeb (jmp), rel8. */
static inline void emit_jump_back(struct code *c, uint8_t opcode, uint64_t target) {
    int64_t rel = (int64_t)target - (int64_t)(code_here(c) + 2);
    if (rel < -128 || rel > 127) fail("jump to 0x%llx is not short", (unsigned long long)target);
    EMIT(c, opcode, (uint8_t)rel);
}

/* Ring 0 at GUEST_RING0_CODE: an iretq frame that enters GUEST_RING3_CODE in ring 3. */
static inline void guest_enter_ring3(uint8_t *mem) {
    struct code c = code_at(mem, GUEST_RING0_CODE);
    EMIT(&c, 0x6a, SEL_USER_DATA);                               /* push SEL_USER_DATA    ; SS */
    EMIT(&c, 0x68); emit_u32(&c, GUEST_RING3_STACK);             /* push GUEST_RING3_STACK; RSP */
    EMIT(&c, 0x68); emit_u32(&c, RFLAGS_IOPL3 | RFLAGS_RESERVED); /* push 0x3002          ; RFLAGS */
    EMIT(&c, 0x6a, SEL_USER_CODE);                               /* push SEL_USER_CODE    ; CS */
    EMIT(&c, 0x68); emit_u32(&c, GUEST_RING3_CODE);              /* push GUEST_RING3_CODE ; RIP */
    EMIT(&c, 0x48, 0xcf);                                        /* iretq */
}

/*
 * The tables every ring-3 guest needs (user page tables, GDT, `tss`) and the
 * ring-0 stub to ring 3; the probe writes its code at GUEST_RING3_CODE.
 */
static inline void guest_ring3(uint8_t *mem, enum tss tss) {
    guest_page_tables(mem, 1);
    guest_gdt(mem, tss);
    guest_enter_ring3(mem);
}

/* ---- vCPU state */

/*
 * Special registers for 64-bit mode with our GDT (and TSS, IDT when the
 * guest has them), starting from the vCPU's current ones. SSE is enabled.
 */
static inline struct kvm_sregs long_mode_sregs(const struct vm *vm, enum tss tss) {
    struct kvm_sregs s;
    xioctl(vm->vcpu, KVM_GET_SREGS, &s);
    struct kvm_segment code = {
        .base = 0, .limit = 0xffffffff, .selector = SEL_KERNEL_CODE,
        .type = 11 /* execute/read, accessed */, .present = 1, .dpl = 0, .s = 1, .l = 1, .g = 1,
    };
    struct kvm_segment data = {
        .base = 0, .limit = 0xffffffff, .selector = SEL_KERNEL_DATA,
        .type = 3 /* read/write, accessed */, .present = 1, .dpl = 0, .s = 1, .db = 1, .g = 1,
    };
    s.cs = code;
    s.ds = s.es = s.fs = s.gs = s.ss = data;
    s.gdt.base = GUEST_GDT;
    s.gdt.limit = (tss == TSS_NONE ? SEL_TSS : GDT_ENTRIES * 8) - 1;
    if (tss != TSS_NONE) {
        /*
         * TR as Firecracker sets it: the descriptor's raw 20-bit limit and
         * its G bit (the other segments above carry their limit in bytes).
         */
        struct kvm_segment tr = {
            .base = GUEST_TSS, .selector = SEL_TSS, .type = 11 /* busy 64-bit TSS */,
            .present = 1, .dpl = 0, .s = 0,
            .limit = tss == TSS_PAGE_GRANULAR ? 0xfffff : TSS_SIZE - 1,
            .g = tss == TSS_PAGE_GRANULAR,
        };
        s.tr = tr;
        s.idt.base = GUEST_IDT;
        s.idt.limit = IDT_VECTORS * 16 - 1;
    }
    s.cr3 = GUEST_PML4;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_PG;
    s.efer = EFER_LME | EFER_LMA;
    return s;
}

/* General registers at the guest's entry: RIP GUEST_RING0_CODE, ring-0 stack. */
static inline struct kvm_regs entry_regs(void) {
    return (struct kvm_regs){.rip = GUEST_RING0_CODE, .rsp = GUEST_RING0_STACK, .rflags = RFLAGS_RESERVED};
}

/* Puts the vCPU at the guest's entry in 64-bit ring 0. */
static inline void vcpu_enter_long_mode(const struct vm *vm, enum tss tss) {
    struct kvm_sregs sregs = long_mode_sregs(vm, tss);
    struct kvm_regs regs = entry_regs();
    xioctl(vm->vcpu, KVM_SET_SREGS, &sregs);
    xioctl(vm->vcpu, KVM_SET_REGS, &regs);
}

static inline struct kvm_regs vcpu_regs(const struct vm *vm) {
    struct kvm_regs regs;
    xioctl(vm->vcpu, KVM_GET_REGS, &regs);
    return regs;
}

/* ---- Running */

static inline const char *internal_error_name(uint32_t suberror) {
    switch (suberror) {
    case KVM_INTERNAL_ERROR_EMULATION: return "emulation failure";
    case KVM_INTERNAL_ERROR_SIMUL_EX: return "exception while delivering an exception";
    case KVM_INTERNAL_ERROR_DELIVERY_EV: return "event delivery failed";
#ifdef KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON
    case KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: return "unexpected exit reason";
#endif
    default: return "unknown suberror";
    }
}

/* What the last exit was, with the vCPU's RIP and ring, for messages. */
static inline const char *exit_describe(const struct vm *vm, char *buf, size_t len) {
    const struct kvm_run *run = vm->run;
    int n;
    switch (run->exit_reason) {
    case KVM_EXIT_IO:
        n = snprintf(buf, len, "%s port 0x%x (%u bytes)",
                     run->io.direction == KVM_EXIT_IO_OUT ? "out to" : "in from", run->io.port,
                     run->io.size);
        break;
    case KVM_EXIT_HLT: n = snprintf(buf, len, "KVM_EXIT_HLT"); break;
    case KVM_EXIT_SHUTDOWN: n = snprintf(buf, len, "KVM_EXIT_SHUTDOWN (triple fault)"); break;
    case KVM_EXIT_MMIO:
        n = snprintf(buf, len, "KVM_EXIT_MMIO (%s at 0x%llx: outside guest memory)",
                     run->mmio.is_write ? "write" : "read", (unsigned long long)run->mmio.phys_addr);
        break;
    case KVM_EXIT_FAIL_ENTRY:
        n = snprintf(buf, len, "KVM_EXIT_FAIL_ENTRY (hardware entry failure reason 0x%llx)",
                     (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
        break;
    case KVM_EXIT_INTERNAL_ERROR:
        n = snprintf(buf, len, "KVM_EXIT_INTERNAL_ERROR, suberror %u (%s)", run->internal.suberror,
                     internal_error_name(run->internal.suberror));
        for (uint32_t i = 0; i < run->internal.ndata && i < 16 && n > 0 && (size_t)n < len; i++)
            n += snprintf(buf + n, len - (size_t)n, "%s0x%llx", i ? " " : ", data ",
                          (unsigned long long)run->internal.data[i]);
        break;
    default: n = snprintf(buf, len, "exit reason %u", run->exit_reason); break;
    }
    /* Best effort: the state is only for the message. */
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    if (n > 0 && (size_t)n < len && ioctl(vm->vcpu, KVM_GET_REGS, &regs) == 0 &&
        ioctl(vm->vcpu, KVM_GET_SREGS, &sregs) == 0)
        snprintf(buf + n, len - (size_t)n, " at RIP 0x%llx in ring %u", (unsigned long long)regs.rip,
                 sregs.cs.selector & 3u);
    return buf;
}

/* Runs the vCPU to its next exit; returns the exit reason. */
static inline uint32_t vcpu_run(const struct vm *vm) {
    while (ioctl(vm->vcpu, KVM_RUN, 0) != 0)
        if (errno != EINTR) die("KVM_RUN");
    return vm->run->exit_reason;
}

/* Fails unless the last exit was an `out` to `port`. */
static inline void expect_out(const struct vm *vm, uint16_t port) {
    const struct kvm_run *run = vm->run;
    if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT && run->io.port == port)
        return;
    char what[512];
    fail("expected the guest's out to port 0x%x, got %s", port, exit_describe(vm, what, sizeof what));
}

/* Runs the vCPU; fails unless it exits with an `out` to `port`. */
static inline void vcpu_run_to_out(const struct vm *vm, uint16_t port) {
    vcpu_run(vm);
    expect_out(vm, port);
}

/* Fails unless the vCPU is in ring 3. */
static inline void expect_ring3(const struct vm *vm) {
    struct kvm_sregs sregs;
    xioctl(vm->vcpu, KVM_GET_SREGS, &sregs);
    if ((sregs.cs.selector & 3) != 3)
        fail("expected the guest in ring 3, but CS is 0x%x", sregs.cs.selector);
}

/* ---- Page-touch guests (ring3_page_touch, ring3_dirty_log) */

#define TOUCH_MEM_SIZE (128 * MIB)
#define TOUCH_MAX_PAGES ((TOUCH_MEM_SIZE - GUEST_DATA) / PAGE_SIZE_4K)
#define TOUCH_BYTE 0xa5 /* what a writing guest stores in each page */

/* What backs the guest memory of a page-touch probe (its MODE argument). */
enum touch_mode {
    TOUCH_ANON = 0,     /* anonymous memory, not yet allocated */
    TOUCH_POPULATE = 1, /* anonymous memory with MAP_POPULATE: host pages present */
    TOUCH_FILE = 2,     /* a fresh sparse file under $TMPDIR (or /tmp), MAP_PRIVATE */
    TOUCH_THP = 3,      /* anonymous, 2 MiB-aligned, MADV_HUGEPAGE, populated: 2 MiB host pages */
    TOUCH_FILE_CACHED = 4, /* a file with contents, in the page cache, 2 MiB-aligned MAP_PRIVATE,
                            * MADV_HUGEPAGE: as a snapshot's memory file after a first restore */
};

static inline const char *touch_mode_name(enum touch_mode mode) {
    switch (mode) {
    case TOUCH_ANON: return "anonymous";
    case TOUCH_POPULATE: return "anonymous, MAP_POPULATE";
    case TOUCH_FILE: return "file MAP_PRIVATE";
    case TOUCH_THP: return "anonymous, transparent huge pages, populated";
    case TOUCH_FILE_CACHED: return "file with contents, in the page cache, MAP_PRIVATE";
    }
    return "?";
}

static inline uint8_t *touch_mem(enum touch_mode mode) {
    switch (mode) {
    case TOUCH_ANON: return mem_anon(TOUCH_MEM_SIZE, 0);
    case TOUCH_POPULATE: return mem_anon(TOUCH_MEM_SIZE, MAP_POPULATE);
    case TOUCH_FILE: {
        int fd = temp_file(TOUCH_MEM_SIZE, NULL);
        uint8_t *mem = mem_file(fd, TOUCH_MEM_SIZE, NULL);
        close(fd); /* the mapping keeps the file */
        return mem;
    }
    case TOUCH_THP: {
        /* 2 MiB-aligned, so that every 2 MiB of guest memory can be one
         * host page; a write into each 2 MiB populates it with a huge page
         * (if the host has one to give: smaps says). */
        uint8_t *raw = mem_anon(TOUCH_MEM_SIZE + 2 * MIB, 0);
        uint8_t *mem = (uint8_t *)(((uintptr_t)raw + 2 * MIB - 1) & ~(uintptr_t)(2 * MIB - 1));
        if (madvise(mem, TOUCH_MEM_SIZE, MADV_HUGEPAGE) != 0) die("madvise(MADV_HUGEPAGE)");
        for (size_t at = 0; at < TOUCH_MEM_SIZE; at += 2 * MIB) mem[at] = 0;
        return mem;
    }
    case TOUCH_FILE_CACHED: {
        uint8_t *contents = mem_anon(TOUCH_MEM_SIZE, MAP_POPULATE);
        memset(contents, 0x5a, TOUCH_MEM_SIZE);
        int fd = temp_file(TOUCH_MEM_SIZE, contents);
        munmap(contents, TOUCH_MEM_SIZE);
        uint8_t *raw = mem_anon(TOUCH_MEM_SIZE + 2 * MIB, 0);
        uint8_t *at = (uint8_t *)(((uintptr_t)raw + 2 * MIB - 1) & ~(uintptr_t)(2 * MIB - 1));
        uint8_t *mem = mem_file(fd, TOUCH_MEM_SIZE, at);
        close(fd);
        if (madvise(mem, TOUCH_MEM_SIZE, MADV_HUGEPAGE) != 0) die("madvise(MADV_HUGEPAGE)");
        /* The host mapping populated for reading, as the prefetcher does. */
        if (madvise(mem, TOUCH_MEM_SIZE, 22 /* MADV_POPULATE_READ */) != 0) die("madvise(MADV_POPULATE_READ)");
        return mem;
    }
    }
    fail("unknown memory mode %d", (int)mode);
}

/*
 * Ring-3 code that touches `pages` pages from GUEST_DATA on, one byte each
 * (writes TOUCH_BYTE, or reads), then does `out PORT_GUEST`.
 */
static inline void guest_touch_pages(uint8_t *mem, uint64_t pages, int reads) {
    struct code c = code_at(mem, GUEST_RING3_CODE);
    EMIT(&c, 0xb0, TOUCH_BYTE);                          /*     mov al, TOUCH_BYTE */
    EMIT(&c, 0x48, 0xbf); emit_u64(&c, GUEST_DATA);      /*     mov rdi, GUEST_DATA */
    EMIT(&c, 0x48, 0xb9); emit_u64(&c, pages);           /*     mov rcx, pages */
    uint64_t loop = code_here(&c);
    if (reads)
        EMIT(&c, 0x8a, 0x07);                            /* 1:  mov al, [rdi] */
    else
        EMIT(&c, 0x88, 0x07);                            /* 1:  mov [rdi], al */
    EMIT(&c, 0x48, 0x81, 0xc7); emit_u32(&c, PAGE_SIZE_4K); /*  add rdi, 4096 */
    EMIT(&c, 0x48, 0xff, 0xc9);                          /*     dec rcx */
    emit_jump_back(&c, 0x75, loop);                      /*     jnz 1b */
    EMIT(&c, 0xe6, PORT_GUEST);                          /*     out PORT_GUEST, al */
    emit_jump_back(&c, 0xeb, code_here(&c));             /*     jmp $ */
}

/* Fails unless the guest touched all `pages` (and, if it wrote, wrote them). */
static inline void expect_pages_touched(const struct vm *vm, uint64_t pages, int reads) {
    struct kvm_regs regs = vcpu_regs(vm);
    if (regs.rcx != 0 || regs.rdi != GUEST_DATA + pages * PAGE_SIZE_4K)
        fail("the guest stopped early: rcx %llu, rdi 0x%llx", (unsigned long long)regs.rcx,
             (unsigned long long)regs.rdi);
    for (uint64_t i = 0; !reads && i < pages; i++)
        if (vm->mem[GUEST_DATA + i * PAGE_SIZE_4K] != TOUCH_BYTE)
            fail("the guest's write to 0x%llx is not in guest memory",
                 (unsigned long long)(GUEST_DATA + i * PAGE_SIZE_4K));
}

/* ---- The exception guest (ring3_exception, remap_after_register, restore_floor) */

#define EXCEPTION_IMAGE_SIZE (8 * MIB)
#define EXCEPTION_FIRST_OUT (GUEST_RING3_CODE + 2) /* the out after RDTSC */
/* The handler's RSP: RSP0 less the frame a #UD pushes (SS, RSP, RFLAGS, CS, RIP; no error code). */
#define HANDLER_RSP (GUEST_RSP0 - 5 * 8)

/*
 * In ring 3: RDTSC, out; SSE, out; ud2. The #UD goes through the IDT to a
 * ring-0 handler on the TSS's RSP0 stack, which reports the faulting CS (in
 * rax) and RIP (in rdx) with an out to PORT_HANDLER. Writes the whole guest
 * (tables with a `tss` TSS and an IDT) into `mem`; returns the ud2's address.
 */
static inline uint64_t guest_exception(uint8_t *mem, enum tss tss) {
    guest_ring3(mem, tss);
    guest_idt_gate(mem, VECTOR_UD, GUEST_HANDLER);

    struct code c = code_at(mem, GUEST_RING3_CODE);
    EMIT(&c, 0x0f, 0x31);       /* rdtsc */
    EMIT(&c, 0xe6, PORT_GUEST); /* out PORT_GUEST, al (at EXCEPTION_FIRST_OUT) */
    EMIT(&c, 0x0f, 0x57, 0xc0); /* xorps xmm0, xmm0 */
    EMIT(&c, 0x0f, 0x58, 0xc0); /* addps xmm0, xmm0 */
    EMIT(&c, 0xe6, PORT_GUEST); /* out PORT_GUEST, al */
    uint64_t ud2_at = code_here(&c);
    EMIT(&c, 0x0f, 0x0b);       /* ud2 */

    struct code h = code_at(mem, GUEST_HANDLER);
    EMIT(&h, 0x48, 0x8b, 0x44, 0x24, 0x08); /* mov rax, [rsp + 8] ; the faulting CS */
    EMIT(&h, 0x48, 0x8b, 0x14, 0x24);       /* mov rdx, [rsp]     ; the faulting RIP */
    EMIT(&h, 0xe6, PORT_HANDLER);           /* out PORT_HANDLER, al */
    EMIT(&h, 0xf4);                         /* hlt */
    return ud2_at;
}

/* After the exception guest's first exit: fails unless it is the out after RDTSC, in ring 3. */
static inline void expect_rdtsc_out(const struct vm *vm) {
    expect_out(vm, PORT_GUEST);
    expect_ring3(vm);
    struct kvm_regs regs = vcpu_regs(vm);
    if (regs.rax == 0 && regs.rdx == 0) fail("RDTSC in ring 3 returned 0");
}

/*
 * Runs the exception guest on from its first exit: fails unless SSE works
 * and the #UD at `ud2_at` reaches the handler on the RSP0 stack.
 */
static inline void run_to_exception_handler(const struct vm *vm, uint64_t ud2_at) {
    vcpu_run_to_out(vm, PORT_GUEST);
    expect_ring3(vm);
    vcpu_run_to_out(vm, PORT_HANDLER);
    struct kvm_regs regs = vcpu_regs(vm);
    if (regs.rax != SEL_USER_CODE || regs.rdx != ud2_at || regs.rsp != HANDLER_RSP)
        fail("the handler ran with CS 0x%llx, RIP 0x%llx, RSP 0x%llx in its frame; expected "
             "CS 0x%x, RIP 0x%llx (the ud2), RSP 0x%llx (on RSP0)",
             (unsigned long long)regs.rax, (unsigned long long)regs.rdx, (unsigned long long)regs.rsp,
             SEL_USER_CODE, (unsigned long long)ud2_at, (unsigned long long)HANDLER_RSP);
}

#endif /* EMBER_PROBE_H */
