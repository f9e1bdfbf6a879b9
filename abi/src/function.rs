//! Functions: what `load` carries, what `invoke` carries, and what an
//! invocation answers. Layouts are in docs/guest-abi.md.

use alloc::vec::Vec;

use crate::wire::{Reader, WireError, Writer};

/// The largest event an invocation takes (Lambda's synchronous limit).
pub const MAX_EVENT_BYTES: usize = 6 << 20;

/// The largest result (stdout) an invocation returns.
pub const MAX_RESULT_BYTES: usize = 6 << 20;

/// How much of the end of a function's stderr comes back with its outcome.
pub const LOG_TAIL_BYTES: usize = 4096;

/// How long a reactor's `_initialize` may run (at load, and when the
/// instance is rebuilt after a failure).
pub const INITIALIZE_TIMEOUT_MS: u64 = 10_000;

/// How a `load_failed` message begins when the guest's Wasmtime refused the
/// compiled module itself (compiled by another Wasmtime, with other
/// settings, for CPU features this CPU lacks, or damaged): ember-vmm then
/// compiles the module anew rather than trust its cache.
pub const LOAD_REFUSED_PREFIX: &str = "cannot load the compiled module: ";

/// The preopened, read-only directory holding the files shipped beside the module.
pub const TASK_DIR: &str = "/var/task";

/// How a failed invocation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorKind {
    /// The function ended with a non-zero exit status (or wrote more than
    /// [`MAX_RESULT_BYTES`]).
    HandlerError = 1,
    /// The function trapped (unreachable, division by zero, out of bounds, …).
    Trap = 2,
    /// The function ran past its time limit.
    Timeout = 3,
    /// The function needed more memory than its limit.
    OutOfMemory = 4,
    /// The guest itself crashed (reported by the host, never by the guest).
    Crash = 5,
}

impl ErrorKind {
    /// The kind with wire code `code`, if any.
    pub const fn from_u32(code: u32) -> Option<ErrorKind> {
        Some(match code {
            1 => ErrorKind::HandlerError,
            2 => ErrorKind::Trap,
            3 => ErrorKind::Timeout,
            4 => ErrorKind::OutOfMemory,
            5 => ErrorKind::Crash,
            _ => return None,
        })
    }

    /// The name in APIs (`X-Ember-Function-Error`).
    pub const fn name(self) -> &'static str {
        match self {
            ErrorKind::HandlerError => "handler_error",
            ErrorKind::Trap => "trap",
            ErrorKind::Timeout => "timeout",
            ErrorKind::OutOfMemory => "out_of_memory",
            ErrorKind::Crash => "crash",
        }
    }
}

/// The payload of a `load` request: a function and everything it runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadSpec<'a> {
    /// Bytes of the compiled module, which the host wrote at the start of
    /// the guest's code area ([`crate::mailbox::GuestInfo::code_area`])
    /// before it sent the request.
    pub module_len: u64,
    /// Files for `/var/task`: (name, contents).
    pub files: Vec<(&'a [u8], &'a [u8])>,
    /// Arguments (`argv[1..]`; `argv[0]` is the function's name).
    pub args: Vec<&'a [u8]>,
    /// Environment entries, `KEY=VALUE`.
    pub env: Vec<&'a [u8]>,
    /// The function's name (`argv[0]`).
    pub name: &'a [u8],
    /// The largest the module's linear memory may grow, in bytes; 0 for
    /// as much as the guest's heap can give.
    pub memory_limit: u64,
    /// Entropy for the guest's random generator.
    pub seed: [u8; 32],
    /// The guest's TSC frequency in kHz (for its clocks).
    pub tsc_khz: u64,
}

impl<'a> LoadSpec<'a> {
    /// The length of [`LoadSpec::encode`]'s output, without encoding.
    pub fn encoded_len(&self) -> usize {
        let strings = |list: &[&[u8]]| 4 + list.iter().map(|s| 4 + s.len()).sum::<usize>();
        let files: usize = self.files.iter().map(|(n, c)| 8 + n.len() + c.len()).sum();
        8 + 8 + 32 + 4 + self.name.len() + strings(&self.args) + strings(&self.env) + 4 + files + 8
    }

    /// Encodes the spec.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(self.encoded_len());
        w.u64(self.memory_limit)
            .u64(self.tsc_khz)
            .raw(&self.seed)
            .bytes(self.name);
        w.u32(self.args.len() as u32);
        for arg in &self.args {
            w.bytes(arg);
        }
        w.u32(self.env.len() as u32);
        for entry in &self.env {
            w.bytes(entry);
        }
        w.u32(self.files.len() as u32);
        for (name, contents) in &self.files {
            w.bytes(name).bytes(contents);
        }
        w.u64(self.module_len);
        w.finish()
    }

    /// Decodes a spec, borrowing from `payload`.
    pub fn decode(payload: &'a [u8]) -> Result<LoadSpec<'a>, WireError> {
        let mut r = Reader::new(payload);
        let memory_limit = r.u64("memory limit")?;
        let tsc_khz = r.u64("TSC frequency")?;
        let seed = r.array::<32>("seed")?;
        let name = r.bytes("name")?;
        let argc = r.count("argument count", 4)?;
        let args = (0..argc)
            .map(|_| r.bytes("argument"))
            .collect::<Result<_, _>>()?;
        let envc = r.count("environment count", 4)?;
        let env = (0..envc)
            .map(|_| r.bytes("environment entry"))
            .collect::<Result<_, _>>()?;
        let filec = r.count("file count", 8)?;
        let files = (0..filec)
            .map(|_| Ok((r.bytes("file name")?, r.bytes("file contents")?)))
            .collect::<Result<_, WireError>>()?;
        let module_len = r.u64("module length")?;
        r.end("load spec")?;
        Ok(LoadSpec {
            module_len,
            files,
            args,
            env,
            name,
            memory_limit,
            seed,
            tsc_khz,
        })
    }
}

/// What precedes the event in an `invoke` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InvokeParams {
    /// The invocation's time limit.
    pub timeout_ms: u64,
    /// The host's wall-clock time (ns since the Unix epoch) when it sent the request.
    pub realtime_ns: u64,
}

impl InvokeParams {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Encodes the parameters.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[..8].copy_from_slice(&self.timeout_ms.to_le_bytes());
        out[8..].copy_from_slice(&self.realtime_ns.to_le_bytes());
        out
    }

    /// Splits an `invoke` payload into its parameters and the event.
    pub fn split(payload: &[u8]) -> Result<(InvokeParams, &[u8]), WireError> {
        let mut r = Reader::new(payload);
        let timeout_ms = r.u64("timeout")?;
        let realtime_ns = r.u64("wall-clock time")?;
        Ok((
            InvokeParams {
                timeout_ms,
                realtime_ns,
            },
            &payload[Self::SIZE..],
        ))
    }
}

/// The fixed part of an invocation's outcome; the body (the result, or the
/// error message) and the log tail follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutcomeHeader {
    /// 0 for success, else an [`ErrorKind`] code.
    pub status: u32,
    /// The function's exit status (0 unless it called `proc_exit`).
    pub exit_code: i32,
    /// Bytes of body.
    pub body_len: u32,
    /// Bytes of log tail.
    pub log_len: u32,
    /// Bytes of log dropped before the tail.
    pub log_dropped: u64,
    /// Time in the function, nanoseconds.
    pub duration_ns: u64,
    /// Fuel the function used.
    pub fuel: u64,
}

impl OutcomeHeader {
    /// Encoded size.
    pub const SIZE: usize = 40;

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[0..4].copy_from_slice(&self.status.to_le_bytes());
        out[4..8].copy_from_slice(&self.exit_code.to_le_bytes());
        out[8..12].copy_from_slice(&self.body_len.to_le_bytes());
        out[12..16].copy_from_slice(&self.log_len.to_le_bytes());
        out[16..24].copy_from_slice(&self.log_dropped.to_le_bytes());
        out[24..32].copy_from_slice(&self.duration_ns.to_le_bytes());
        out[32..40].copy_from_slice(&self.fuel.to_le_bytes());
        out
    }
}

/// An invocation's outcome, decoded (borrowing from the payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome<'a> {
    /// The fixed part.
    pub header: OutcomeHeader,
    /// `Ok(result)` or `Err((kind, message))`.
    pub result: Result<&'a [u8], (ErrorKind, &'a [u8])>,
    /// The tail of the function's stderr.
    pub log: &'a [u8],
}

impl<'a> Outcome<'a> {
    /// Decodes an outcome, checking every length against the payload.
    pub fn decode(payload: &'a [u8]) -> Result<Outcome<'a>, WireError> {
        let mut r = Reader::new(payload);
        let header = OutcomeHeader {
            status: r.u32("status")?,
            exit_code: r.u32("exit code")? as i32,
            body_len: r.u32("body length")?,
            log_len: r.u32("log length")?,
            log_dropped: r.u64("dropped log length")?,
            duration_ns: r.u64("duration")?,
            fuel: r.u64("fuel")?,
        };
        let body = r.slice(header.body_len as usize, "body")?;
        let log = r.slice(header.log_len as usize, "log")?;
        r.end("outcome")?;
        let result = match header.status {
            0 => Ok(body),
            code => Err((
                ErrorKind::from_u32(code).ok_or(WireError {
                    field: "status",
                    offset: 0,
                })?,
                body,
            )),
        };
        Ok(Outcome {
            header,
            result,
            log,
        })
    }
}

/// Writes an outcome into `area`; returns its length, or `None` when it
/// does not fit.
pub fn write_outcome(
    area: &mut [u8],
    mut header: OutcomeHeader,
    body: &[u8],
    log: &[u8],
) -> Option<usize> {
    header.body_len = u32::try_from(body.len()).ok()?;
    header.log_len = u32::try_from(log.len()).ok()?;
    let total = OutcomeHeader::SIZE + body.len() + log.len();
    let out = area.get_mut(..total)?;
    out[..OutcomeHeader::SIZE].copy_from_slice(&header.encode());
    out[OutcomeHeader::SIZE..OutcomeHeader::SIZE + body.len()].copy_from_slice(body);
    out[OutcomeHeader::SIZE + body.len()..].copy_from_slice(log);
    Some(total)
}

/// How a loaded module is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Model {
    /// Exports `_initialize` (run once at load) and `ember_handle` (run per
    /// invocation, in the same instance: state persists).
    Reactor = 1,
    /// Exports `_start`: every invocation runs a fresh instance.
    Command = 2,
}

impl Model {
    /// The model with wire code `code`, if any.
    pub const fn from_u32(code: u32) -> Option<Model> {
        match code {
            1 => Some(Model::Reactor),
            2 => Some(Model::Command),
            _ => None,
        }
    }
}

/// The payload of `loaded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInfo {
    /// How the module runs.
    pub model: Model,
    /// Bytes of linear memory the first instance has.
    pub memory_bytes: u64,
    /// The most its linear memory may grow to, bytes.
    pub memory_limit: u64,
    /// Time to load (check the compiled module), instantiate and
    /// initialise, nanoseconds.
    pub load_ns: u64,
    /// … of which checking the compiled module and its imports and
    /// exports, before the first instance, nanoseconds.
    pub module_ns: u64,
}

impl LoadedInfo {
    /// Encoded size.
    pub const SIZE: usize = 40;

    /// Encodes the info.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        out[0..4].copy_from_slice(&(self.model as u32).to_le_bytes());
        out[8..16].copy_from_slice(&self.memory_bytes.to_le_bytes());
        out[16..24].copy_from_slice(&self.memory_limit.to_le_bytes());
        out[24..32].copy_from_slice(&self.load_ns.to_le_bytes());
        out[32..40].copy_from_slice(&self.module_ns.to_le_bytes());
        out
    }

    /// Decodes the info.
    pub fn decode(payload: &[u8]) -> Result<LoadedInfo, WireError> {
        let mut r = Reader::new(payload);
        let model = Model::from_u32(r.u32("model")?).ok_or(WireError {
            field: "model",
            offset: 0,
        })?;
        let _reserved = r.u32("reserved")?;
        let memory_bytes = r.u64("memory")?;
        let memory_limit = r.u64("memory limit")?;
        let load_ns = r.u64("load time")?;
        let module_ns = r.u64("module check time")?;
        r.end("loaded info")?;
        Ok(LoadedInfo {
            model,
            memory_bytes,
            memory_limit,
            load_ns,
            module_ns,
        })
    }
}

/// The payload of `stats`: counters since boot, as `u64`s in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestStats {
    /// Invocations served.
    pub invocations: u64,
    /// … of which failed, by [`ErrorKind`] code 1–4.
    pub errors: [u64; 4],
    /// Heap bytes in use.
    pub heap_used: u64,
    /// Heap bytes in all.
    pub heap_total: u64,
    /// Fresh instances prepared ahead of an invocation (command model).
    pub instances_prepared: u64,
    /// Time spent preparing them, in all, ns.
    pub prepare_ns: u64,
}

impl GuestStats {
    /// Encoded size.
    pub const SIZE: usize = 9 * 8;

    /// Encodes the stats.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let words = [
            self.invocations,
            self.errors[0],
            self.errors[1],
            self.errors[2],
            self.errors[3],
            self.heap_used,
            self.heap_total,
            self.instances_prepared,
            self.prepare_ns,
        ];
        let mut out = [0u8; Self::SIZE];
        for (i, word) in words.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
        }
        out
    }

    /// Decodes the stats.
    pub fn decode(payload: &[u8]) -> Result<GuestStats, WireError> {
        let mut r = Reader::new(payload);
        let mut words = [0u64; 9];
        for word in words.iter_mut() {
            *word = r.u64("stats")?;
        }
        r.end("stats")?;
        Ok(GuestStats {
            invocations: words[0],
            errors: [words[1], words[2], words[3], words[4]],
            heap_used: words[5],
            heap_total: words[6],
            instances_prepared: words[7],
            prepare_ns: words[8],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LoadSpec<'static> {
        LoadSpec {
            module_len: 4 << 20,
            files: alloc::vec![(&b"data.txt"[..], &b"hello"[..]), (&b"empty"[..], &b""[..])],
            args: alloc::vec![&b"--flag"[..]],
            env: alloc::vec![&b"A=1"[..], &b"B="[..]],
            name: b"counter",
            memory_limit: 64 << 20,
            seed: [7; 32],
            tsc_khz: 2_600_000,
        }
    }

    #[test]
    fn load_spec_round_trips() {
        let spec = spec();
        let bytes = spec.encode();
        assert_eq!(bytes.len(), spec.encoded_len());
        assert_eq!(LoadSpec::decode(&bytes), Ok(spec));
    }

    #[test]
    fn load_spec_refuses_truncation_anywhere() {
        let bytes = spec().encode();
        for cut in 0..bytes.len() {
            assert!(
                LoadSpec::decode(&bytes[..cut]).is_err(),
                "decoded a spec cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(LoadSpec::decode(&longer).is_err());
    }

    #[test]
    fn outcome_round_trips() {
        let mut area = [0u8; 256];
        let header = OutcomeHeader {
            status: 0,
            duration_ns: 1234,
            fuel: 99,
            ..OutcomeHeader::default()
        };
        let len = write_outcome(&mut area, header, b"result", b"log line\n").unwrap();
        let outcome = Outcome::decode(&area[..len]).unwrap();
        assert_eq!(outcome.result, Ok(&b"result"[..]));
        assert_eq!(outcome.log, b"log line\n");
        assert_eq!(outcome.header.duration_ns, 1234);

        let header = OutcomeHeader {
            status: ErrorKind::Trap as u32,
            ..OutcomeHeader::default()
        };
        let len = write_outcome(&mut area, header, b"unreachable", b"").unwrap();
        let outcome = Outcome::decode(&area[..len]).unwrap();
        assert_eq!(outcome.result, Err((ErrorKind::Trap, &b"unreachable"[..])));
        assert!(write_outcome(&mut area[..10], header, b"", b"").is_none());
    }

    #[test]
    fn hostile_outcomes_are_refused() {
        let mut area = [0u8; 128];
        let len = write_outcome(&mut area, OutcomeHeader::default(), b"abc", b"de").unwrap();
        // Lengths past the payload.
        let mut lie = area;
        lie[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Outcome::decode(&lie[..len]).is_err());
        let mut lie = area;
        lie[12..16].copy_from_slice(&100u32.to_le_bytes());
        assert!(Outcome::decode(&lie[..len]).is_err());
        // An unknown status.
        let mut lie = area;
        lie[0..4].copy_from_slice(&77u32.to_le_bytes());
        assert!(Outcome::decode(&lie[..len]).is_err());
        // Trailing bytes.
        assert!(Outcome::decode(&area[..len + 1]).is_err());
        for cut in 0..len {
            assert!(Outcome::decode(&area[..cut]).is_err());
        }
    }

    #[test]
    fn small_payloads_round_trip() {
        let info = LoadedInfo {
            model: Model::Command,
            memory_bytes: 1 << 20,
            memory_limit: 64 << 20,
            load_ns: 5,
            module_ns: 3,
        };
        assert_eq!(LoadedInfo::decode(&info.encode()), Ok(info));
        assert!(LoadedInfo::decode(&[0; LoadedInfo::SIZE]).is_err());
        let stats = GuestStats {
            invocations: 3,
            errors: [1, 2, 3, 4],
            heap_used: 5,
            heap_total: 6,
            instances_prepared: 7,
            prepare_ns: 8,
        };
        assert_eq!(GuestStats::decode(&stats.encode()), Ok(stats));
        let params = InvokeParams {
            timeout_ms: 1000,
            realtime_ns: 42,
        };
        let mut payload = params.encode().to_vec();
        payload.extend_from_slice(b"event");
        assert_eq!(InvokeParams::split(&payload), Ok((params, &b"event"[..])));
        assert!(InvokeParams::split(&payload[..15]).is_err());
        assert_eq!(ErrorKind::from_u32(3).map(ErrorKind::name), Some("timeout"));
    }
}
