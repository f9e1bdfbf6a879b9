#![no_std]
#![no_main]
extern crate alloc;
use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicUsize, Ordering};

struct Bump;
static mut HEAP: [u8; 1 << 24] = [0; 1 << 24];
static NEXT: AtomicUsize = AtomicUsize::new(0);
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let mut cur = NEXT.load(Ordering::Relaxed);
        loop {
            let start = (cur + l.align() - 1) & !(l.align() - 1);
            let end = start + l.size();
            if end > 1 << 24 {
                return core::ptr::null_mut();
            }
            match NEXT.compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return unsafe { (&raw mut HEAP as *mut u8).add(start) },
                Err(c) => cur = c,
            }
        }
    }
    unsafe fn dealloc(&self, _: *mut u8, _: Layout) {}
}
#[global_allocator]
static A: Bump = Bump;

fn exit(code: i32) -> ! {
    unsafe { core::arch::asm!("syscall", in("rax") 60, in("rdi") code, options(noreturn)) }
}
fn mprotect(ptr: *const u8, len: usize, exec: bool) -> bool {
    let start = ptr as usize & !4095;
    let len = ((ptr as usize + len + 4095) & !4095) - start;
    let ptr = start as *const u8;
    let prot: usize = if exec { 1 | 4 } else { 1 | 2 };
    let ret: isize;
    unsafe {
        core::arch::asm!("syscall", inlateout("rax") 10isize => ret, in("rdi") ptr, in("rsi") len, in("rdx") prot, lateout("rcx") _, lateout("r11") _)
    };
    ret == 0
}

fn say(msg: &str) {
    unsafe {
        core::arch::asm!("syscall", inlateout("rax") 1isize => _, in("rdi") 2, in("rsi") msg.as_ptr(), in("rdx") msg.len(), lateout("rcx") _, lateout("r11") _)
    };
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say(&alloc::format!("panic: {info}\n"));
    exit(101)
}

static CWASM: &[u8] = include_bytes!("../../../host/run.cwasm");

core::arch::global_asm!(
    ".globl _start",
    "_start:",
    "and rsp, -16",
    "call probe_main",
    "ud2",
);

#[unsafe(no_mangle)]
pub extern "C" fn probe_main() -> ! {
    for name in ["run", "oob", "div0", "unreachable", "recurse"] {
        match wt_spike::run_export(CWASM, mprotect, name) {
            Ok(v) => say(&alloc::format!("{name}: Ok({v})\n")),
            Err(e) => say(&alloc::format!(
                "{name}: Err: {:?}\n",
                e.downcast_ref::<wasmtime::Trap>()
            )),
        }
    }
    match wt_spike::run(CWASM, mprotect) {
        Ok(v) => exit(v),
        Err(e) => {
            let msg = alloc::format!("{e:?}\n");
            unsafe {
                core::arch::asm!("syscall", inlateout("rax") 1isize => _, in("rdi") 2, in("rsi") msg.as_ptr(), in("rdx") msg.len(), lateout("rcx") _, lateout("r11") _)
            };
            exit(200)
        }
    }
}
