use wasmtime::{Config, Engine};
fn main() -> Result<(), wasmtime::Error> {
    let mut c = Config::new();
    c.target("x86_64-unknown-none")?;
    c.signals_based_traps(false);
    c.memory_reservation(0);
    c.memory_guard_size(0);
    c.memory_reservation_for_growth(1 << 20);
    c.memory_init_cow(false);
    unsafe {
        c.x86_float_abi_ok(true);
        for f in ["has_sse3", "has_ssse3", "has_sse41", "has_sse42"] {
            c.cranelift_flag_enable(f);
        }
    }
    let engine = Engine::new(&c)?;
    let wat = r#"(module (memory 1)
      (func (export "run") (result i32) (i32.add (i32.const 40) (i32.const 2)))
      (func (export "oob") (result i32) (i32.load (i32.const 0x20000)))
      (func (export "div0") (result i32) (i32.div_s (i32.const 1) (i32.const 0)))
      (func (export "unreachable") (result i32) unreachable)
      (func $r (export "recurse") (result i32) (i32.add (call $r) (i32.const 1)))
      (func (export "loop") (result i32) (loop $l (br $l)) (i32.const 0)))"#;
    let t = std::time::Instant::now();
    let bytes = engine.precompile_module(wat.as_bytes())?;
    println!(
        "precompiled for x86_64-unknown-none: {} bytes in {:?}",
        bytes.len(),
        t.elapsed()
    );
    std::fs::write("run.cwasm", &bytes)?;
    Ok(())
}
