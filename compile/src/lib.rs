//! Ahead-of-time compilation of functions for the Ember guest.
//!
//! The guest runs Wasmtime without a compiler: every module is compiled
//! here, on the host, with Cranelift, for the guest's target
//! (`x86_64-unknown-none`), the engine settings its runtime uses (no
//! virtual memory, no signal handlers: explicit bounds checks) and the CPU
//! features it may use. The guest's Wasmtime checks all three when it
//! loads the result and refuses a mismatch. A precompiled module is never
//! taken from a caller: ember-vmm compiles the `.wasm` it is given, so the
//! machine code in a guest is always Cranelift's output for a validated
//! module.
//!
//! Compiled modules are cached on disk under a key made of the module's
//! SHA-256, the Wasmtime version, the engine settings and the CPU
//! features, so a deploy of a module seen before skips the compiler
//! (docs/functions.md, "Compiled code").

use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The Wasmtime both sides are built with (the guest pins the same).
pub const WASMTIME_VERSION: &str = "48.0.11";

/// The CPU features compiled code may use in the guest, as Cranelift flags.
/// Those encoded with VEX for vector registers (AVX, AVX2, FMA, AVX-512)
/// need XSAVE state the Ember kernel does not enable, so they are left
/// out; the guest reports them absent (guest/src/platform.rs).
pub const GUEST_FEATURES: [&str; 8] = [
    "has_sse3",
    "has_ssse3",
    "has_sse41",
    "has_sse42",
    "has_popcnt",
    "has_bmi1",
    "has_bmi2",
    "has_lzcnt",
];

/// Magic at the start of a cache file (version 2 of its layout).
const CACHE_MAGIC: &[u8; 8] = b"EMBERCW2";

/// Why a module could not be compiled.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum CompileError {
    /// the module is not valid WebAssembly: {0}
    Invalid(String),
    /// this host's CPU lacks SSE4.1, which compiled functions need (Cranelift would otherwise call float helpers whose ABI the guest does not share)
    NoSse41,
    /// unknown CPU feature {0:?} (known: the has_* flags of Cranelift's x86-64 backend)
    UnknownFeature(String),
    /// cannot configure the compiler: {0}
    Config(String),
}

/// The CPU features a module is compiled for: Cranelift flag names, sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuFeatures(Vec<String>);

impl CpuFeatures {
    /// What a CPU has, of [`GUEST_FEATURES`], from its CPUID words: leaf 1
    /// ECX, leaf 7 (subleaf 0) EBX and leaf 0x8000_0001 ECX. ember-vmm
    /// passes the words it gives the guest, which may lack features the
    /// host has.
    pub fn from_cpuid(leaf1_ecx: u32, leaf7_ebx: u32, ext1_ecx: u32) -> CpuFeatures {
        let bits = [
            ("has_sse3", leaf1_ecx, 0),
            ("has_ssse3", leaf1_ecx, 9),
            ("has_sse41", leaf1_ecx, 19),
            ("has_sse42", leaf1_ecx, 20),
            ("has_popcnt", leaf1_ecx, 23),
            ("has_bmi1", leaf7_ebx, 3),
            ("has_bmi2", leaf7_ebx, 8),
            ("has_lzcnt", ext1_ecx, 5),
        ];
        CpuFeatures::from_names(
            bits.iter()
                .filter(|(_, word, bit)| word & (1 << bit) != 0)
                .map(|(name, _, _)| *name),
        )
    }

    /// What this host's CPU has, of [`GUEST_FEATURES`].
    pub fn host() -> CpuFeatures {
        let leaf1 = std::arch::x86_64::__cpuid(1);
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let ext1 = std::arch::x86_64::__cpuid(0x8000_0001);
        CpuFeatures::from_cpuid(leaf1.ecx, leaf7.ebx, ext1.ecx)
    }

    /// Exactly `names` (Cranelift flag names, e.g. `has_avx`): for tests
    /// and for compiling for another machine.
    pub fn from_names<I, S>(names: I) -> CpuFeatures
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut names: Vec<String> = names.into_iter().map(Into::into).collect();
        names.sort();
        names.dedup();
        CpuFeatures(names)
    }

    /// The flag names.
    pub fn names(&self) -> &[String] {
        &self.0
    }

    /// One line: the names joined by commas.
    pub fn to_line(&self) -> String {
        self.0.join(",")
    }
}

/// Where a compiled module came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Read from the cache.
    Cache,
    /// Compiled now.
    Compiler,
}

/// A compiled module.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The image the guest's Wasmtime loads (`Module::deserialize`).
    pub bytes: Vec<u8>,
    /// From the cache or compiled now.
    pub source: Source,
    /// Its cache key (hex).
    pub key: String,
    /// Time to compile or read it.
    pub elapsed: Duration,
}

/// The compiler, configured for the guest, with an optional cache.
pub struct Compiler {
    engine: wasmtime::Engine,
    features: CpuFeatures,
    /// SHA-256 of everything a compiled module depends on but its bytes.
    config_hash: [u8; 32],
    cache: Option<PathBuf>,
}

impl std::fmt::Debug for Compiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiler")
            .field("features", &self.features)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// Feeds a `Hash` into SHA-256, so the engine's compatibility hash is
/// stable across processes (std's hashers are randomly keyed).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        0
    }
}

/// The engine settings of the guest's runtime, for compiling. They must
/// agree with guest/src/platform.rs (Wasmtime compares them at load).
fn engine_config(features: &CpuFeatures) -> Result<wasmtime::Config, CompileError> {
    let mut config = wasmtime::Config::new();
    config
        .target("x86_64-unknown-none")
        .map_err(|e| CompileError::Config(format!("{e:#}")))?;
    config
        .signals_based_traps(false)
        .memory_reservation(0)
        .memory_guard_size(0)
        .memory_init_cow(false)
        // Neither is used in the guest (a trap is reported by its code, not
        // by the wasm offset it came from; nothing unwinds native frames),
        // and they are a third of a compiled module's size: every byte of
        // it is copied into the guest and into its template snapshot.
        .generate_address_map(false)
        .native_unwind_info(false);
    // SAFETY: SSE4.1 is required below, so the compiled code never calls
    // the float helpers whose ABI differs on the guest's soft-float target.
    unsafe { config.x86_float_abi_ok(true) };
    for flag in features.names() {
        if !flag.starts_with("has_") {
            return Err(CompileError::UnknownFeature(flag.clone()));
        }
        // SAFETY: the flag names a CPU feature; the guest's Wasmtime checks
        // the CPU has it before it runs the code.
        unsafe { config.cranelift_flag_enable(flag) };
    }
    Ok(config)
}

impl Compiler {
    /// A compiler for `features`, caching in `cache` (a directory that must
    /// exist) when given, on the calling thread alone.
    pub fn new(features: CpuFeatures, cache: Option<PathBuf>) -> Result<Compiler, CompileError> {
        Compiler::with_threads(features, cache, false)
    }

    /// As [`Compiler::new`]; with `parallel`, functions are compiled on a
    /// thread per CPU (not in ember-vmm, whose seccomp filters allow no new
    /// threads after start: there it is off).
    pub fn with_threads(
        features: CpuFeatures,
        cache: Option<PathBuf>,
        parallel: bool,
    ) -> Result<Compiler, CompileError> {
        if !features.names().iter().any(|f| f == "has_sse41") {
            return Err(CompileError::NoSse41);
        }
        let mut config = engine_config(&features)?;
        config.parallel_compilation(parallel);
        let engine =
            wasmtime::Engine::new(&config).map_err(|e| CompileError::Config(format!("{e:#}")))?;
        let mut hasher = ShaHasher(Sha256::new());
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
        let mut sha = hasher.0;
        sha.update(WASMTIME_VERSION.as_bytes());
        sha.update(features.to_line().as_bytes());
        Ok(Compiler {
            engine,
            features,
            config_hash: sha.finalize().into(),
            cache,
        })
    }

    /// A compiler for this host's CPU.
    pub fn for_host(cache: Option<PathBuf>) -> Result<Compiler, CompileError> {
        Compiler::new(CpuFeatures::host(), cache)
    }

    /// The features it compiles for.
    pub fn features(&self) -> &CpuFeatures {
        &self.features
    }

    /// A compiler for the features `line` names (as `GET /ember/status`
    /// reports them: comma-separated Cranelift flags).
    pub fn for_line(
        line: &str,
        cache: Option<PathBuf>,
        parallel: bool,
    ) -> Result<Compiler, CompileError> {
        let features = CpuFeatures::from_names(line.split(',').filter(|f| !f.is_empty()));
        Compiler::with_threads(features, cache, parallel)
    }

    /// The cache key of `wasm`: hex SHA-256 over the module's SHA-256 and
    /// the configuration hash.
    pub fn key(&self, wasm: &[u8]) -> String {
        let module: [u8; 32] = Sha256::digest(wasm).into();
        let mut sha = Sha256::new();
        sha.update(module);
        sha.update(self.config_hash);
        hex(&sha.finalize())
    }

    /// Where `key`'s compiled module is cached, if there is a cache.
    pub fn cache_path(&self, key: &str) -> Option<PathBuf> {
        self.cache
            .as_ref()
            .map(|dir| dir.join(format!("{key}.cwasm")))
    }

    /// The compiled module for `wasm`: from the cache when it holds a sound
    /// entry for exactly this configuration, else compiled (and cached).
    pub fn compile(&self, wasm: &[u8]) -> Result<Compiled, CompileError> {
        let started = Instant::now();
        let key = self.key(wasm);
        if let Some(path) = self.cache_path(&key) {
            match read_cache(&path, &self.features) {
                Ok(Some(bytes)) => {
                    return Ok(Compiled {
                        bytes,
                        source: Source::Cache,
                        key,
                        elapsed: started.elapsed(),
                    })
                }
                Ok(None) => {}
                Err(why) => log::warn!(
                    "compiled-module cache entry {} is unusable ({why}); compiling again",
                    path.display()
                ),
            }
        }
        self.compile_fresh(wasm)
    }

    /// Whether the cache holds an entry for `wasm` made for these
    /// features (its header only is read).
    pub fn is_cached(&self, wasm: &[u8]) -> bool {
        use std::io::Read;
        let Some(path) = self.cache_path(&self.key(wasm)) else {
            return false;
        };
        let mut head = vec![0u8; 512];
        let n = std::fs::File::open(path)
            .and_then(|mut f| f.read(&mut head))
            .unwrap_or(0);
        cache_features(&head[..n]).as_ref() == Some(&self.features)
    }

    /// Compiles `wasm` without looking in the cache, and caches the result
    /// (replacing any entry under its key).
    pub fn compile_fresh(&self, wasm: &[u8]) -> Result<Compiled, CompileError> {
        let started = Instant::now();
        let key = self.key(wasm);
        let bytes = self
            .engine
            .precompile_module(wasm)
            .map_err(|e| CompileError::Invalid(format!("{e:#}")))?;
        let elapsed = started.elapsed();
        if let Some(path) = self.cache_path(&key) {
            if let Err(e) = write_cache(&path, &self.features, &bytes) {
                log::warn!(
                    "cannot cache the compiled module at {}: {e}",
                    path.display()
                );
            }
        }
        Ok(Compiled {
            bytes,
            source: Source::Compiler,
            key,
            elapsed,
        })
    }

    /// Drops `key`'s cache entry (one the guest refused).
    pub fn forget(&self, key: &str) {
        if let Some(path) = self.cache_path(key) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Lower-case hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A cache file: [`CACHE_MAGIC`], the features line (u32 LE length, then
/// the text), the artifact's CRC-32 (u32 LE: the cache directory is
/// trusted, the checksum catches damage, and at gigabytes a second it
/// costs a deploy nothing), the artifact. Public for tools and tests that
/// plant entries.
pub fn encode_cache(features: &CpuFeatures, artifact: &[u8]) -> Vec<u8> {
    let line = features.to_line();
    let mut out = Vec::with_capacity(8 + 4 + line.len() + 4 + artifact.len());
    out.extend_from_slice(CACHE_MAGIC);
    out.extend_from_slice(&(line.len() as u32).to_le_bytes());
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(&crc32fast::hash(artifact).to_le_bytes());
    out.extend_from_slice(artifact);
    out
}

/// The features line of cache file `bytes`, if it has one.
pub fn cache_features(bytes: &[u8]) -> Option<CpuFeatures> {
    let rest = bytes.strip_prefix(CACHE_MAGIC)?;
    let (len, rest) = rest.split_at_checked(4)?;
    let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
    let line = std::str::from_utf8(rest.get(..len)?).ok()?;
    Some(CpuFeatures::from_names(
        line.split(',').filter(|name| !name.is_empty()),
    ))
}

/// The artifact in cache file `bytes`, if it is whole and compiled for
/// `features`.
fn decode_cache(mut bytes: Vec<u8>, features: &CpuFeatures) -> Result<Vec<u8>, String> {
    let rest = bytes
        .strip_prefix(CACHE_MAGIC)
        .ok_or("not an Ember compiled-module file")?;
    let (len, rest) = rest.split_at_checked(4).ok_or("truncated header")?;
    let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
    let (line, rest) = rest.split_at_checked(len).ok_or("truncated header")?;
    if line != features.to_line().as_bytes() {
        return Err(format!(
            "compiled for CPU features {:?}, this host has {:?}",
            String::from_utf8_lossy(line),
            features.to_line()
        ));
    }
    let (sum, artifact) = rest.split_at_checked(4).ok_or("truncated header")?;
    if crc32fast::hash(artifact).to_le_bytes() != sum {
        return Err("its checksum does not match (corrupt)".into());
    }
    // Moved down in place rather than copied: a copy's fresh pages cost
    // ember-vmm (a new process for every VM) a fault each, ~2 ms for 4 MB.
    let header = bytes.len() - artifact.len();
    bytes.drain(..header);
    Ok(bytes)
}

/// Reads a cache entry: `Ok(None)` if there is none.
fn read_cache(path: &Path, features: &CpuFeatures) -> Result<Option<Vec<u8>>, String> {
    match std::fs::read(path) {
        Ok(bytes) => decode_cache(bytes, features).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Writes a cache entry whole or not at all: a temporary file beside it,
/// flushed, then renamed into place. The directory must exist: it is not
/// created here (ember-vmm's seccomp filters do not allow it; the owner of
/// the cache creates it).
fn write_cache(path: &Path, features: &CpuFeatures, artifact: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&encode_cache(features, artifact))?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module() -> Vec<u8> {
        wat::parse_str(r#"(module (func (export "_start")))"#).unwrap()
    }

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ember-compile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn features() -> CpuFeatures {
        CpuFeatures::from_names(["has_sse3", "has_ssse3", "has_sse41"])
    }

    #[test]
    fn keys_are_stable_and_depend_on_module_and_features() {
        let a = Compiler::new(features(), None).unwrap();
        let b = Compiler::new(features(), None).unwrap();
        assert_eq!(a.key(&module()), b.key(&module()));
        let other = wat::parse_str(r#"(module (func (export "ember_handle")))"#).unwrap();
        assert_ne!(a.key(&module()), a.key(&other));
        let more = CpuFeatures::from_names(["has_sse3", "has_ssse3", "has_sse41", "has_popcnt"]);
        let c = Compiler::new(more, None).unwrap();
        assert_ne!(a.key(&module()), c.key(&module()));
    }

    #[test]
    fn parallel_and_serial_compilers_share_keys_and_output() {
        let serial = Compiler::new(features(), None).unwrap();
        let parallel = Compiler::for_line(&features().to_line(), None, true).unwrap();
        assert_eq!(serial.key(&module()), parallel.key(&module()));
        assert_eq!(
            serial.compile(&module()).unwrap().bytes,
            parallel.compile(&module()).unwrap().bytes
        );
    }

    #[test]
    fn second_compile_comes_from_the_cache() {
        let cache = dir("cache");
        let compiler = Compiler::new(features(), Some(cache.clone())).unwrap();
        let first = compiler.compile(&module()).unwrap();
        assert_eq!(first.source, Source::Compiler);
        assert!(compiler.is_cached(&module()));
        let second = compiler.compile(&module()).unwrap();
        assert_eq!(second.source, Source::Cache);
        assert_eq!(first.bytes, second.bytes);
        assert_eq!(
            wasmtime::Engine::detect_precompiled(&second.bytes),
            Some(wasmtime::Precompiled::Module)
        );
        std::fs::remove_dir_all(cache).unwrap();
    }

    #[test]
    fn a_corrupt_or_foreign_cache_entry_is_recompiled() {
        let cache = dir("corrupt");
        let compiler = Compiler::new(features(), Some(cache.clone())).unwrap();
        let first = compiler.compile(&module()).unwrap();
        let path = compiler.cache_path(&first.key).unwrap();
        // One byte of the artifact changed: the checksum catches it.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let again = compiler.compile(&module()).unwrap();
        assert_eq!(again.source, Source::Compiler);
        assert_eq!(again.bytes, first.bytes);
        // An entry written for other CPU features under this key.
        let other = CpuFeatures::from_names(["has_sse41", "has_avx"]);
        std::fs::write(&path, encode_cache(&other, &first.bytes)).unwrap();
        assert_eq!(cache_features(&std::fs::read(&path).unwrap()), Some(other));
        assert_eq!(
            compiler.compile(&module()).unwrap().source,
            Source::Compiler
        );
        // The cache was repaired.
        assert_eq!(compiler.compile(&module()).unwrap().source, Source::Cache);
        std::fs::remove_dir_all(cache).unwrap();
    }

    #[test]
    fn invalid_modules_and_missing_sse41_are_refused() {
        let compiler = Compiler::new(features(), None).unwrap();
        let err = compiler.compile(b"\0asm\x01\0\0\0\x05").unwrap_err();
        assert!(err
            .to_string()
            .starts_with("the module is not valid WebAssembly"));
        let err = Compiler::new(CpuFeatures::from_names(["has_sse3"]), None).unwrap_err();
        assert!(matches!(err, CompileError::NoSse41));
        let err = Compiler::new(CpuFeatures::from_names(["has_sse41", "sse2"]), None).unwrap_err();
        assert!(matches!(err, CompileError::UnknownFeature(_)));
    }

    #[test]
    fn features_from_cpuid_words() {
        let none = CpuFeatures::from_cpuid(0, 0, 0);
        assert!(none.names().is_empty());
        let f = CpuFeatures::from_cpuid((1 << 0) | (1 << 19), 1 << 8, 1 << 5);
        assert_eq!(f.to_line(), "has_bmi2,has_lzcnt,has_sse3,has_sse41");
    }

    #[test]
    fn host_features_are_a_subset_of_the_guest_list() {
        let host = CpuFeatures::host();
        for name in host.names() {
            assert!(GUEST_FEATURES.contains(&name.as_str()), "{name}");
        }
    }
}
