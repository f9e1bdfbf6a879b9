//! `PUT /ember/function`: the WebAssembly module to load, its files,
//! arguments, environment and limits — host paths, read by ember-vmm,
//! which compiles the module for the guest (ember-compile) before sending it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use ember_compile::{CompileError, Compiler, CpuFeatures, Source};

use ember_abi::function::LoadSpec;
use ember_abi::mailbox::{Layout, DEFAULT_SIZE};
use serde::Deserialize;

/// Default time limit per invocation (Lambda's default).
pub const DEFAULT_TIMEOUT_MS: u64 = 3_000;
/// Longest time limit (Lambda's).
pub const MAX_TIMEOUT_MS: u64 = 900_000;

/// A file shipped beside the module, as `/var/task/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Its name in `/var/task`.
    pub name: String,
    /// Where it is on the host.
    pub host_path: PathBuf,
}

/// The body of `PUT /ember/function`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// The module (a `.wasm` for wasm32-wasip1) on the host.
    pub module_path: PathBuf,
    /// Files for `/var/task`.
    #[serde(default)]
    pub files: Vec<FileConfig>,
    /// Arguments after `argv[0]`.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The most linear memory the module may use, MiB (default: as much as
    /// the VM's memory leaves, like Lambda's function memory).
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Time limit per invocation, ms.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_MS
}

/// Why a function was refused before it reached the guest.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum FunctionConfigError {
    /// Cannot read module_path {path}: {source}
    ReadModule {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Cannot read file {name:?} from {path}: {source}
    ReadFile {
        /// Its name in /var/task.
        name: String,
        /// The host path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// file name {0:?} is not a plain name (no '/', not '.' or '..', not empty)
    BadFileName(String),
    /// file name {0:?} appears twice
    DuplicateFileName(String),
    /// memory_mib must be at least 1 (got 0)
    NoMemory,
    /// timeout_ms must be between 1 and {max} (got {got})
    Timeout {
        /// What was asked.
        got: u64,
        /// The limit.
        max: u64,
    },
    /// environment variable name {0:?} is empty or contains '=' or NUL
    BadEnvName(String),
    /// {0}
    Compile(#[from] CompileError),
    /// the function's module (compiled) and files take {size} bytes, above the {max} bytes one load can carry
    TooLarge {
        /// Encoded size.
        size: usize,
        /// The request area.
        max: u64,
    },
}

/// A function read from the host, ready to be sent to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionBundle {
    /// The module compiled for the guest.
    pub module: Vec<u8>,
    /// The module as given (kept to compile again if the guest refuses a
    /// cached compilation).
    pub wasm: Vec<u8>,
    /// How the compiled module was obtained.
    pub compiled: CompileInfo,
    /// `/var/task` files: (name, contents).
    pub files: Vec<(String, Vec<u8>)>,
    /// Arguments after `argv[0]`.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    /// Memory limit, bytes (0: as much as the guest can give).
    pub memory_limit: u64,
    /// Time limit per invocation, ms.
    pub timeout_ms: u64,
    /// Entropy for the guest's generator.
    pub seed: [u8; 32],
}

/// How a bundle's compiled module was obtained.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompileInfo {
    /// Its cache key.
    pub key: String,
    /// Read from the compiled-module cache (else compiled now).
    pub from_cache: bool,
    /// Time to compile or read it, µs.
    pub micros: u64,
}

/// Where compiled modules are cached (`--compile-cache`), set once at start.
static CACHE_DIR: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Sets the compiled-module cache directory, creating it: call at start,
/// before the seccomp filters (which do not allow creating directories).
pub fn set_compile_cache(dir: Option<PathBuf>) -> std::io::Result<()> {
    if let Some(dir) = &dir {
        std::fs::create_dir_all(dir)?;
    }
    let _ = CACHE_DIR.set(dir);
    Ok(())
}

impl FunctionConfig {
    /// Checks the configuration and reads the module and files (ember-vmm
    /// compiles the module when it knows the guest's CPU: [`FunctionBundle::compile`]).
    pub fn read(&self, seed: [u8; 32]) -> Result<FunctionBundle, FunctionConfigError> {
        if self.memory_mib == Some(0) {
            return Err(FunctionConfigError::NoMemory);
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(FunctionConfigError::Timeout {
                got: self.timeout_ms,
                max: MAX_TIMEOUT_MS,
            });
        }
        let mut names = std::collections::BTreeSet::new();
        for file in &self.files {
            let name = &file.name;
            if name.is_empty()
                || name == "."
                || name == ".."
                || name.contains('/')
                || name.contains('\0')
            {
                return Err(FunctionConfigError::BadFileName(name.clone()));
            }
            if !names.insert(name.as_str()) {
                return Err(FunctionConfigError::DuplicateFileName(name.clone()));
            }
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(FunctionConfigError::BadEnvName(key.clone()));
            }
        }
        let module =
            read_bounded(&self.module_path).map_err(|source| FunctionConfigError::ReadModule {
                path: self.module_path.clone(),
                source,
            })?;
        let files = self
            .files
            .iter()
            .map(|file| {
                read_bounded(&file.host_path)
                    .map(|contents| (file.name.clone(), contents))
                    .map_err(|source| FunctionConfigError::ReadFile {
                        name: file.name.clone(),
                        path: file.host_path.clone(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bundle = FunctionBundle {
            module: Vec::new(),
            wasm: module,
            compiled: CompileInfo::default(),
            files,
            args: self.args.clone(),
            env: self.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            memory_limit: self.memory_mib.map_or(0, |mib| u64::from(mib) << 20),
            timeout_ms: self.timeout_ms,
            seed,
        };
        // The module will be larger compiled; what is known now is refused now.
        bundle.check_size()?;
        Ok(bundle)
    }
}

/// Reads a regular file of at most [`max_load_bytes`]. It runs on the VMM
/// thread, so it must not block: the file is opened non-blocking (a FIFO
/// would otherwise wait for a writer) and checked before it is read.
fn read_bounded(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;

    let (file, meta) = crate::files::open_nonblocking(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let max = max_load_bytes();
    if meta.len() > max {
        return Err(std::io::Error::other(format!(
            "{} bytes, above the {max} bytes one load can carry",
            meta.len()
        )));
    }
    let mut contents = Vec::with_capacity(meta.len() as usize);
    // A file that grows while it is read is cut at the limit, and then
    // refused by the size check of the whole load.
    file.take(max + 1).read_to_end(&mut contents)?;
    Ok(contents)
}

/// The most a `load` request can carry: the mailbox's request area.
pub fn max_load_bytes() -> u64 {
    Layout::new(DEFAULT_SIZE).map_or(0, |l| l.area_size)
}

impl FunctionBundle {
    /// Refuses a bundle that does not fit one load request.
    fn check_size(&self) -> Result<(), FunctionConfigError> {
        // The module goes to the guest's code area, the rest in the request:
        // each must fit the request area's size (the code area is as large).
        let size = self.spec(0).encoded_len() + self.module.len();
        let max = max_load_bytes();
        if size as u64 > max {
            return Err(FunctionConfigError::TooLarge { size, max });
        }
        Ok(())
    }

    /// Compiles the module for a guest with `features` (from the cache
    /// unless `fresh`), and checks the result fits one load.
    pub fn compile(
        &mut self,
        features: CpuFeatures,
        fresh: bool,
    ) -> Result<(), FunctionConfigError> {
        let cache = CACHE_DIR.get().cloned().flatten();
        let compiler = Compiler::new(features, cache)?;
        let compiled = if fresh {
            compiler.compile_fresh(&self.wasm)?
        } else {
            compiler.compile(&self.wasm)?
        };
        self.module = compiled.bytes;
        self.compiled = CompileInfo {
            key: compiled.key,
            from_cache: compiled.source == Source::Cache,
            micros: compiled.elapsed.as_micros() as u64,
        };
        self.check_size()
    }

    /// Drops this bundle's compiled module from the cache (the guest
    /// refused it).
    pub fn forget_compiled(&self) {
        if let Some(dir) = CACHE_DIR.get().cloned().flatten() {
            let _ = std::fs::remove_file(dir.join(format!("{}.cwasm", self.compiled.key)));
        }
    }

    /// The `load` payload, with the guest's TSC frequency.
    pub fn encode(&self, tsc_khz: u64) -> Vec<u8> {
        self.spec(tsc_khz).encode()
    }

    /// The bundle as the guest ABI describes a load.
    fn spec(&self, tsc_khz: u64) -> LoadSpec<'_> {
        LoadSpec {
            module_len: self.module.len() as u64,
            files: self
                .files
                .iter()
                .map(|(name, contents)| (name.as_bytes(), contents.as_slice()))
                .collect(),
            args: self.args.iter().map(|a| a.as_bytes()).collect(),
            env: self.env.iter().map(|e| e.as_bytes()).collect(),
            name: b"function",
            memory_limit: self.memory_limit,
            seed: self.seed,
            tsc_khz,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ember-function-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn config(module: PathBuf) -> FunctionConfig {
        FunctionConfig {
            module_path: module,
            files: Vec::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
            memory_mib: Some(64),
            timeout_ms: 1000,
        }
    }

    #[test]
    fn reads_module_and_files() {
        let dir = dir();
        std::fs::write(dir.join("m.wasm"), b"\0asm\x01\0\0\0").unwrap();
        std::fs::write(dir.join("data"), b"hello").unwrap();
        let mut c = config(dir.join("m.wasm"));
        c.files.push(FileConfig {
            name: "data.txt".into(),
            host_path: dir.join("data"),
        });
        c.env.insert("A".into(), "1".into());
        let mut bundle = c.read([1; 32]).unwrap();
        assert_eq!(bundle.wasm, b"\0asm\x01\0\0\0");
        bundle
            .compile(ember_compile::CpuFeatures::host(), false)
            .unwrap();
        // What goes to the guest is the compiled module (an ELF image).
        assert_eq!(&bundle.module[..4], b"\x7fELF");
        assert_eq!(
            bundle.files,
            vec![("data.txt".to_string(), b"hello".to_vec())]
        );
        assert_eq!(bundle.env, vec!["A=1".to_string()]);
        let encoded = bundle.encode(2_000_000);
        let spec = LoadSpec::decode(&encoded).unwrap();
        assert_eq!(spec.tsc_khz, 2_000_000);
        assert_eq!(spec.memory_limit, 64 << 20);
        assert_eq!(spec.module_len, bundle.module.len() as u64);
    }

    #[test]
    fn refuses_bad_configs_by_name() {
        let dir = dir();
        std::fs::write(dir.join("m2.wasm"), b"x").unwrap();
        let err = config(dir.join("missing.wasm"))
            .read([0; 32])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Cannot read module_path") && err.contains("missing.wasm"),
            "{err}"
        );
        let mut c = config(dir.join("m2.wasm"));
        c.files.push(FileConfig {
            name: "../etc".into(),
            host_path: dir.join("m2.wasm"),
        });
        assert!(matches!(
            c.read([0; 32]),
            Err(FunctionConfigError::BadFileName(_))
        ));
        let mut c = config(dir.join("m2.wasm"));
        c.timeout_ms = 0;
        assert!(matches!(
            c.read([0; 32]),
            Err(FunctionConfigError::Timeout { .. })
        ));
        let mut c = config(dir.join("m2.wasm"));
        c.memory_mib = Some(0);
        assert!(matches!(
            c.read([0; 32]),
            Err(FunctionConfigError::NoMemory)
        ));
        let mut c = config(dir.join("m2.wasm"));
        c.env.insert("A=B".into(), "x".into());
        assert!(matches!(
            c.read([0; 32]),
            Err(FunctionConfigError::BadEnvName(_))
        ));
        // Not WebAssembly: refused by the compiler, naming the problem.
        let mut bundle = config(dir.join("m2.wasm")).read([0; 32]).unwrap();
        let err = bundle
            .compile(ember_compile::CpuFeatures::host(), false)
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the module is not valid WebAssembly"),
            "{err}"
        );
        let parsed: Result<FunctionConfig, _> =
            serde_json::from_str(r#"{"module_path": "/m.wasm", "memory": 1}"#);
        assert!(parsed.is_err());
        // Not a regular file: refused without blocking (a FIFO would wait
        // for a writer) or reading without end.
        for path in ["/dev/zero", "/tmp"] {
            let err = config(path.into()).read([0; 32]).unwrap_err().to_string();
            assert!(err.contains("not a regular file"), "{err}");
        }
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let err = config(fifo).read([0; 32]).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        // Too large: refused from its size, before it is read.
        let big = dir.join("big.wasm");
        let file = std::fs::File::create(&big).unwrap();
        file.set_len(max_load_bytes() + 1).unwrap();
        let err = config(big).read([0; 32]).unwrap_err().to_string();
        assert!(err.contains("above the"), "{err}");
    }
}
