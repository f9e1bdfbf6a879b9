//! A loaded function: its compiled module and how it runs.
//!
//! Two handler models, chosen by what the module exports:
//! - **reactor** (`ember_handle`, and `_initialize` run once at load): one
//!   instance serves every invocation, so globals and memory persist, as
//!   Lambda's warm globals do. After a failure (trap, timeout, exhausted
//!   memory, `proc_exit`) its state is suspect: it is rebuilt (and
//!   `_initialize` run again) after the outcome is posted.
//! - **command** (`_start`): every invocation runs a fresh instance of the
//!   compiled module. Preparing one (allocating and zeroing its memory,
//!   writing its data segments) costs real time here, so it is done after
//!   the outcome is posted, off the latency path; a snapshot taken while
//!   the guest waits holds one ready.
//!
//! The module arrives compiled: the host precompiled it with Cranelift for
//! this guest's engine settings and CPU features, and loading it here only
//! checks and copies the image (docs/functions.md). Compiled code carries
//! no fuel or epoch checks: a host function that waits checks the deadline
//! itself, and code that computes past it meets ember-vmm's backstop, which
//! ends the VM (docs/functions.md, "Time limits").

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use ember_abi::function::{
    write_outcome, ErrorKind, GuestStats, InvokeParams, LoadSpec, LoadedInfo, Model, OutcomeHeader,
    INITIALIZE_TIMEOUT_MS,
};
use wasmtime::{Engine, ExternType, Func, Linker, Module, Store, Val, ValType};

use crate::heap::CodeArea;
use crate::wasi::fs::TaskFile;
use crate::wasi::{self, Buffers, Config, Wasi};
use crate::{clock, heap, platform, rng};

/// Heap kept free beyond a function's memory limit, for the runtime
/// itself: an event (up to 6 MiB) and a result (up to 6 MiB, in a buffer
/// that may have doubled to 8) with room to spare.
const HEAP_RESERVE: u64 = 16 << 20;

/// The longest a load's failure message gets once the module is checked
/// (an `_initialize` trap's message and backtrace fit).
const FAILURE_MESSAGE_BYTES: usize = 4096;

/// `text` cut to at most `max` bytes, at a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A running instance and its entry point.
struct Instance {
    store: Store<Wasi>,
    entry: Func,
}

/// How an invocation ended, before it is written out.
enum Ending {
    Ok,
    Failed(ErrorKind, String),
}

/// The loaded function.
pub struct Function {
    module: Module,
    linker: Linker<Wasi>,
    config: Arc<Config>,
    memory_limit: usize,
    model: Model,
    /// The reactor's instance, or the command's next fresh one.
    instance: Option<Instance>,
    /// The stdout buffer, kept from one invocation to the next.
    buffers: Buffers,
    stats: GuestStats,
}

impl Function {
    /// Loads the precompiled module the host wrote into `code` (as long as
    /// `spec` says), checks and instantiates it (running `_initialize` for
    /// a reactor). On success the module keeps the code area's pages it
    /// lies in and the rest go back to the heap.
    pub fn load(
        spec: &LoadSpec<'_>,
        code: &mut CodeArea,
    ) -> Result<(Function, LoadedInfo), String> {
        let started = clock::rdtsc();
        clock::set_frequency(spec.tsc_khz);
        rng::seed(spec.seed);

        let Some(module_bytes) = code.module(spec.module_len) else {
            return Err(format!(
                "the compiled module ({} bytes) is larger than the code area ({} bytes)",
                spec.module_len,
                code.size()
            ));
        };
        // What the code area gives back once the module is in counts as free.
        let available = heap::available() + code.spare(spec.module_len);
        // No limit given: as much as the heap can give, in whole MiB.
        let limit = match spec.memory_limit {
            0 => available.saturating_sub(HEAP_RESERVE) & !((1 << 20) - 1),
            limit => limit,
        };
        if limit.saturating_add(HEAP_RESERVE) > available {
            return Err(format!(
                "a memory limit of {} MiB does not fit in this VM ({} MiB of guest heap free, {} MiB of it kept for the runtime)",
                limit >> 20,
                available >> 20,
                HEAP_RESERVE >> 20
            ));
        }
        let memory_limit = usize::try_from(limit).map_err(|_| "memory limit too large")?;

        // The whole limit is reserved when an instance is made, so the
        // memory never moves as it grows.
        let engine = Engine::new(&platform::engine_config(limit))
            .map_err(|e| format!("cannot configure the engine: {e}"))?;
        // SAFETY: the bytes are what ember-vmm's compiler produced (it
        // never passes on a precompiled module it did not make itself);
        // Wasmtime checks the version, settings and CPU features they were
        // compiled for and refuses a mismatch. They stay where they are,
        // unchanged, as long as the module lives: ember-vmm writes the code
        // area only just before a `load` and sends none once a function is
        // loaded, and the pages the module lies in never go back to the
        // heap. (In place because copying 4 MB of code out of the request
        // area cost two first touches a page, ~10-20 µs each on this KVM.)
        let module = unsafe { Module::deserialize_raw(&engine, module_bytes) }.map_err(|e| {
            format!(
                "{}{e:#} (this guest's CPU: {})",
                ember_abi::function::LOAD_REFUSED_PREFIX,
                platform::cpu_summary()
            )
        })?;
        check_imports(&module)?;
        let model = model_of(&module)?;
        let initial = initial_memory(&module);
        if initial > limit {
            return Err(format!(
                "the module starts with {} MiB of linear memory, above its limit of {} MiB",
                initial.div_ceil(1 << 20),
                limit >> 20
            ));
        }

        let module_ns = clock::ticks_to_ns(clock::rdtsc() - started);
        // Room for a failure's message, taken before the area shrinks (so
        // it does not lie where the area must grow back).
        let mut failure = String::with_capacity(FAILURE_MESSAGE_BYTES);
        // The spare pages go back to the heap before anything else is
        // made, so the runtime's reserve is whole while the instance is.
        code.keep(spec.module_len);
        let (function, memory_bytes) =
            match Function::instantiate_loaded(module, model, memory_limit, spec) {
                Ok(loaded) => loaded,
                Err(message) => {
                    // Everything made since the area shrank is freed now
                    // (the module, its instance, the engine, the message)
                    // but the words kept for the answer, so the area can
                    // be whole again for the next load, which ember-vmm
                    // writes over all of it.
                    failure.push_str(truncate(&message, FAILURE_MESSAGE_BYTES));
                    drop(message);
                    drop(engine);
                    if !code.regrow() {
                        panic!("the code area cannot be made whole again after a failed load");
                    }
                    return Err(failure);
                }
            };
        let info = LoadedInfo {
            model,
            memory_bytes,
            memory_limit: limit,
            load_ns: clock::ticks_to_ns(clock::rdtsc() - started),
            module_ns,
        };
        Ok((function, info))
    }

    /// The rest of a load, once the module is checked: the function and
    /// its first instance (and that instance's linear memory, in bytes).
    fn instantiate_loaded(
        module: Module,
        model: Model,
        memory_limit: usize,
        spec: &LoadSpec<'_>,
    ) -> Result<(Function, u64), String> {
        let mut linker = Linker::new(module.engine());
        wasi::define(&mut linker).map_err(|e| format!("cannot define WASI: {e}"))?;
        let mut args = Vec::with_capacity(spec.args.len() + 1);
        args.push(spec.name.to_vec());
        args.extend(spec.args.iter().map(|a| a.to_vec()));
        let config = Arc::new(Config {
            args,
            env: spec.env.iter().map(|e| e.to_vec()).collect(),
            files: spec
                .files
                .iter()
                .map(|(name, contents)| TaskFile {
                    name: name.to_vec(),
                    contents: contents.to_vec(),
                })
                .collect(),
        });
        let mut function = Function {
            module,
            linker,
            config,
            memory_limit,
            model,
            instance: None,
            buffers: Buffers::default(),
            stats: GuestStats::default(),
        };
        let instance = function.instantiate()?;
        let memory_bytes = instance
            .store
            .data()
            .memory
            .map_or(0, |m| m.data_size(&instance.store) as u64);
        function.instance = Some(instance);
        if model == Model::Command {
            function.stats.instances_prepared += 1;
        }
        Ok((function, memory_bytes))
    }

    /// A fresh instance: for a reactor with `_initialize` already run.
    fn instantiate(&self) -> Result<Instance, String> {
        let mut store = Store::new(
            self.module.engine(),
            Wasi::new(self.config.clone(), self.memory_limit),
        );
        store.limiter(|wasi| &mut wasi.limits);
        let instance = self
            .linker
            .instantiate(&mut store, &self.module)
            .map_err(|e| format!("cannot instantiate the module: {e:#}"))?;
        let (entry_name, init) = match self.model {
            Model::Reactor => ("ember_handle", instance.get_func(&mut store, "_initialize")),
            Model::Command => ("_start", None),
        };
        let entry = instance
            .get_func(&mut store, entry_name)
            .ok_or_else(|| format!("the module does not export {entry_name} as a function"))?;
        store.data_mut().memory = instance.get_memory(&mut store, "memory");
        let mut instance = Instance { store, entry };
        if let Some(init) = init {
            let deadline = clock::deadline_after_ms(clock::rdtsc(), INITIALIZE_TIMEOUT_MS);
            let wasi = instance.store.data_mut();
            // SAFETY: an empty static event.
            unsafe { wasi.begin(&[], deadline, Buffers::default()) };
            if let Err(e) = run(&mut instance.store, init, &mut []) {
                let (_, message) = classify_error(instance.store.data(), e, INITIALIZE_TIMEOUT_MS);
                return Err(format!("_initialize failed: {message}"));
            }
            // What _initialize printed goes nowhere.
            drop(instance.store.data_mut().take_buffers());
        }
        Ok(instance)
    }

    /// Runs one invocation of `event`, writes its outcome into `area` and
    /// returns its length. Unless [`Function::ready`] says so afterwards,
    /// [`Function::finish`] prepares the next instance.
    ///
    /// # Safety
    /// As for [`Wasi::begin`]: `event` (read in place) stays valid and
    /// unchanged until this returns.
    pub unsafe fn invoke(&mut self, params: InvokeParams, event: &[u8], area: &mut [u8]) -> usize {
        clock::set_wall_clock(params.realtime_ns);
        let started = clock::rdtsc();
        let deadline = clock::deadline_after_ms(started, params.timeout_ms);
        self.stats.invocations += 1;

        let instance = match self.instance.take() {
            Some(instance) => Ok(instance),
            None => self.instantiate(),
        };
        let mut instance = match instance {
            Ok(instance) => instance,
            Err(message) => {
                let failed = Ending::Failed(ErrorKind::Trap, message);
                return self.write(area, failed, 0, &[], &[], 0);
            }
        };
        let buffers = core::mem::take(&mut self.buffers);
        // SAFETY: per this function's contract; `take_buffers` below, on
        // every path, forgets the event before this returns.
        unsafe { instance.store.data_mut().begin(event, deadline, buffers) };
        let mut handle_result = [Val::I32(0)];
        let results: &mut [Val] = match self.model {
            Model::Reactor if returns_i32(&instance) => &mut handle_result,
            _ => &mut [],
        };
        let ran = run(&mut instance.store, instance.entry, results);
        let duration_ns = clock::ticks_to_ns(clock::rdtsc() - started);
        let wasi = instance.store.data();
        // The call came back normally (even with a non-zero status): a
        // reactor's instance is intact. A trap, a timeout or proc_exit
        // leaves it mid-call, so it is rebuilt.
        let returned = ran.is_ok();
        let ending = match ran {
            Ok(()) => match results.first() {
                Some(Val::I32(status)) if *status != 0 => Ending::Failed(
                    ErrorKind::HandlerError,
                    format!("ember_handle returned {status}"),
                ),
                _ => Ending::Ok,
            },
            Err(e) if exit_status(&e) == Some(0) => Ending::Ok,
            Err(e) => {
                let (kind, message) = classify_error(wasi, e, params.timeout_ms);
                Ending::Failed(kind, message)
            }
        };
        let ending = match ending {
            Ending::Ok if wasi.stdout_overflow => Ending::Failed(
                ErrorKind::HandlerError,
                format!(
                    "the function wrote more than {} bytes to stdout",
                    ember_abi::function::MAX_RESULT_BYTES
                ),
            ),
            ending => ending,
        };
        let (log, log_dropped) = (wasi.stderr.bytes(), wasi.stderr.dropped);
        let len = self.write(area, ending, duration_ns, &wasi.stdout, log, log_dropped);
        self.buffers = instance.store.data_mut().take_buffers();
        // A reactor keeps its instance if the call returned; a command's is
        // spent.
        if self.model == Model::Reactor && returned {
            self.instance = Some(instance);
        }
        len
    }

    /// Whether an instance is ready for the next invocation.
    pub fn ready(&self) -> bool {
        self.instance.is_some()
    }

    /// Work after an outcome: a fresh instance for the next invocation.
    pub fn finish(&mut self) {
        if self.instance.is_none() {
            let started = clock::rdtsc();
            if let Ok(instance) = self.instantiate() {
                self.instance = Some(instance);
                self.stats.instances_prepared += 1;
            }
            self.stats.prepare_ns += clock::ticks_to_ns(clock::rdtsc() - started);
        }
    }

    /// Counters since load (heap figures are the caller's to add).
    pub fn stats(&self) -> GuestStats {
        self.stats
    }

    /// Writes the outcome into `area`; counts failures.
    fn write(
        &mut self,
        area: &mut [u8],
        ending: Ending,
        duration_ns: u64,
        stdout: &[u8],
        log: &[u8],
        log_dropped: u64,
    ) -> usize {
        let mut header = OutcomeHeader {
            duration_ns,
            log_dropped,
            ..OutcomeHeader::default()
        };
        let body: &[u8] = match &ending {
            Ending::Ok => stdout,
            Ending::Failed(kind, text) => {
                header.status = *kind as u32;
                if let Some(count) = self.stats.errors.get_mut(*kind as usize - 1) {
                    *count += 1;
                }
                text.as_bytes()
            }
        };
        write_outcome(area, header, body, log).unwrap_or_else(|| {
            // Cannot happen with the area sizes ember-vmm uses (8 MiB for
            // 6 MiB of result and 4 KiB of log); say so rather than lie.
            let header = OutcomeHeader {
                status: ErrorKind::HandlerError as u32,
                ..header
            };
            write_outcome(area, header, b"the outcome does not fit the mailbox", &[]).unwrap_or(0)
        })
    }
}

/// Runs `func` to its end; a host function that finds the deadline passed
/// stops it.
fn run(store: &mut Store<Wasi>, func: Func, results: &mut [Val]) -> wasmtime::Result<()> {
    func.call(store, &[], results)
}

/// The status of a `proc_exit`, if that is how the call ended.
fn exit_status(error: &wasmtime::Error) -> Option<i32> {
    error.downcast_ref::<wasi::Exit>().map(|exit| exit.0)
}

/// Sorts an error from a call into an [`ErrorKind`] and a message.
fn classify_error(wasi: &Wasi, error: wasmtime::Error, timeout_ms: u64) -> (ErrorKind, String) {
    if wasi.timed_out {
        return (
            ErrorKind::Timeout,
            format!("the function ran longer than its limit of {timeout_ms} ms"),
        );
    }
    if wasi.limits.refused {
        return (
            ErrorKind::OutOfMemory,
            format!(
                "the function needed more than its memory limit of {} MiB",
                wasi.limits.memory >> 20
            ),
        );
    }
    if let Some(status) = exit_status(&error) {
        return (
            ErrorKind::HandlerError,
            format!("the function exited with status {status}"),
        );
    }
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => (ErrorKind::Trap, format!("wasm trap: {}", trap_text(*trap))),
        None => (ErrorKind::Trap, format!("{error:#}")),
    }
}

/// A trap, in the words docs/functions.md uses (and wasmi used before).
fn trap_text(trap: wasmtime::Trap) -> &'static str {
    use wasmtime::Trap;
    match trap {
        Trap::StackOverflow => "call stack exhausted",
        Trap::MemoryOutOfBounds => "out of bounds memory access",
        Trap::HeapMisaligned => "misaligned memory access",
        Trap::TableOutOfBounds => "undefined element: out of bounds table access",
        Trap::IndirectCallToNull => "uninitialized element",
        Trap::BadSignature => "indirect call type mismatch",
        Trap::IntegerOverflow => "integer overflow",
        Trap::IntegerDivisionByZero => "integer divide by zero",
        Trap::BadConversionToInteger => "invalid conversion to integer",
        Trap::UnreachableCodeReached => "unreachable",
        Trap::NullReference => "null reference",
        _ => "trap",
    }
}

/// Every import must be a WASI preview 1 function the runtime defines.
fn check_imports(module: &Module) -> Result<(), String> {
    for import in module.imports() {
        let known = import.module() == wasi::MODULE
            && matches!(import.ty(), ExternType::Func(_))
            && wasi::NAMES.contains(&import.name());
        if !known {
            return Err(format!(
                "the module imports {}.{}, which the Ember runtime does not provide (it provides WASI preview 1 functions)",
                import.module(),
                import.name()
            ));
        }
    }
    Ok(())
}

/// The handler model the module's exports choose.
fn model_of(module: &Module) -> Result<Model, String> {
    let exports_func = |name: &str| matches!(module.get_export(name), Some(ExternType::Func(_)));
    if exports_func("ember_handle") {
        Ok(Model::Reactor)
    } else if exports_func("_start") {
        Ok(Model::Command)
    } else {
        Err(String::from(
            "the module exports neither _start (a command) nor ember_handle (a reactor)",
        ))
    }
}

/// Bytes of linear memory the module starts with.
fn initial_memory(module: &Module) -> u64 {
    module
        .exports()
        .filter_map(|export| match export.ty() {
            ExternType::Memory(ty) => Some(ty.minimum().saturating_mul(ty.page_size())),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// Whether a reactor's `ember_handle` returns an `i32` status.
fn returns_i32(instance: &Instance) -> bool {
    let ty = instance.entry.ty(&instance.store);
    let mut results = ty.results();
    matches!((results.next(), results.next()), (Some(ValType::I32), None))
}
