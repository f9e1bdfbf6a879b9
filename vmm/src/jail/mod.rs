//! The jail: what an ember-vmm process gives up before it reads a guest
//! byte (docs/security.md).
//!
//! [`enter`] runs first in `main`, as root, before any thread exists:
//!
//! 1. opens `/dev/kvm` (the jailed process never sees `/dev`);
//! 2. creates the VM's cgroup leaf with its limits ([`cgroup`]);
//! 3. unshares the PID namespace and forks. The parent stays behind as a
//!    small *keeper*, in the host's mount namespace: it waits for the VMM,
//!    turns its end into ember-vmm's exit code (a kill at the memory limit
//!    becomes [`ExitCode::MemoryLimit`]) and exits with it; a SIGTERM to
//!    the keeper kills the VMM first. The keeper drops its privileges as
//!    the VMM does (step 5): no ember-vmm process stays root. Whoever
//!    started ember-vmm removes the cgroup leaf after the keeper exits
//!    ([`cgroup::remove_leaf`]);
//! 4. the child, PID 1 of the new PID namespace (which the keeper moves
//!    into the cgroup leaf meanwhile, and says so on a pipe the child
//!    waits on last), unshares the mount, IPC, UTS and network
//!    namespaces, and makes a
//!    tmpfs its root (pivot_root) holding only the paths bound into it,
//!    read-only or read-write, each at its host path (so every path the
//!    API names means the same inside); the old root is detached and the
//!    new one made read-only;
//! 5. rlimits (core 0, open files, file size), every capability dropped
//!    from the bounding set, the unprivileged uid and gid with no
//!    supplementary groups, `no_new_privs`, not dumpable.
//!
//! The kernel's own checks stand behind each step: the last one verifies
//! that no capability remains.

pub mod cgroup;

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::ExitCode;

/// What a jail is made of.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    /// An existing empty directory: the new root's tmpfs is mounted on it
    /// (in the VM's own mount namespace, so every VM may use the same one).
    pub root: PathBuf,
    /// The uid the VMM runs as (never 0).
    pub uid: u32,
    /// The gid the VMM runs as (never 0).
    pub gid: u32,
    /// Host paths (files or directories) visible read-only in the jail.
    pub read_only: Vec<PathBuf>,
    /// Host directories visible read-write in the jail.
    pub read_write: Vec<PathBuf>,
    /// The cgroup leaf and its limits, if any.
    pub cgroup: Option<cgroup::LeafSpec>,
    /// RLIMIT_FSIZE: the largest file the VMM may write, bytes.
    pub max_file_bytes: Option<u64>,
    /// RLIMIT_NOFILE.
    pub max_open_files: u64,
}

/// Open files a jailed VMM may hold: KVM, the VM, vCPUs and their
/// eventfds, memory files, the API socket and its clients.
pub const DEFAULT_MAX_OPEN_FILES: u64 = 1024;

/// What the jailed process keeps from before the switch.
#[derive(Debug)]
pub struct Jailed {
    /// `/dev/kvm`, opened as root.
    pub kvm: OwnedFd,
}

/// Errors building the jail. Each names the step and the path.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A step failed.
    #[error("jail: {step}: {source}")]
    Step {
        /// What was being done.
        step: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The specification is unusable.
    #[error("jail: {0}")]
    Spec(String),
    /// The cgroup leaf could not be made.
    #[error("jail: {0}")]
    Cgroup(#[from] cgroup::CgroupError),
}

fn step(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let step = what.into();
    move |source| JailError::Step { step, source }
}

/// `Err(errno)` when a libc call returned -1.
fn check(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cstr(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| JailError::Spec(format!("{} holds a NUL byte", path.display())))
}

impl Spec {
    /// Checks what can be checked before anything changes.
    pub fn validate(&self) -> Result<(), JailError> {
        if self.uid == 0 || self.gid == 0 {
            return Err(JailError::Spec(
                "the jail's uid and gid must not be 0 (root)".into(),
            ));
        }
        if !self.root.is_absolute() {
            return Err(JailError::Spec(format!(
                "--jail-root {} must be an absolute path",
                self.root.display()
            )));
        }
        for path in self.read_only.iter().chain(&self.read_write) {
            if !path.is_absolute() || path.components().any(|c| c.as_os_str() == "..") {
                return Err(JailError::Spec(format!(
                    "{} must be an absolute path without '..'",
                    path.display()
                )));
            }
            if path.parent().is_none() {
                return Err(JailError::Spec("the host's root cannot be bound".into()));
            }
        }
        Ok(())
    }
}

/// Builds the jail around the calling process (see the module docs). Call
/// as root, first thing, before any thread starts: it forks. Returns in the
/// jailed child only; the keeper never returns.
pub fn enter(spec: &Spec) -> Result<Jailed, JailError> {
    spec.validate()?;
    // SAFETY: getuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::Spec(
            "jailing needs root (run ember-vmm as root, or pass --no-jail)".into(),
        ));
    }
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(step("open /dev/kvm"))?;
    let leaf = match &spec.cgroup {
        Some(leaf) => Some(cgroup::Leaf::create(leaf)?),
        None => None,
    };
    let result = unshare_and_fork(spec, leaf.as_ref());
    match result {
        Ok(()) => Ok(Jailed { kvm: kvm.into() }),
        Err(e) => {
            if let Some(leaf) = leaf {
                leaf.remove();
            }
            Err(e)
        }
    }
}

fn unshare_and_fork(spec: &Spec, leaf: Option<&cgroup::Leaf>) -> Result<(), JailError> {
    // The PID namespace is the children's: unshared before the fork. The
    // others in the child alone: the keeper stays in the host's mount
    // namespace (a pivot_root moves every process of a namespace).
    // SAFETY: unshare(2) only changes this process's namespaces.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) })
        .map_err(step("unshare the PID namespace"))?;
    // The keeper writes one byte once the child is in its cgroup; the
    // child sees the pipe closed if the keeper died or failed first.
    let mut ends = [0; 2];
    // SAFETY: pipe2(2) fills the array it is given.
    check(unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) })
        .map_err(step("make the keeper's pipe"))?;
    // SAFETY: both descriptors were just created and are owned here.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
    // SAFETY: getppid(2) has no preconditions.
    let starter = unsafe { libc::getppid() };
    // SAFETY: no other thread exists (documented precondition of `enter`),
    // so the child is a consistent copy.
    let pid = check(unsafe { libc::fork() }).map_err(step("fork into the PID namespace"))?;
    if pid != 0 {
        drop(read_end);
        // The keeper moves the VMM into its cgroup leaf while the VMM
        // builds its root (a move into a cgroup waits for an RCU grace
        // period: 0.3–5 ms here); one byte on the pipe says it is done.
        // The keeper itself stays out of the leaf.
        let joined = match leaf {
            Some(leaf) => leaf.add_process(pid as u32).map_err(JailError::from),
            None => Ok(()),
        };
        let joined = joined.and_then(|()| {
            // SAFETY: write(2) of one byte from a local.
            check(unsafe { libc::write(write_end.as_raw_fd(), b"j".as_ptr().cast(), 1) } as i32)
                .map(drop)
                .map_err(step("tell the VMM it is in its cgroup"))
        });
        if let Err(e) = joined {
            log::error!("{e}; killing the VMM");
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // The keeper needs no privilege either: it runs as the VMM's uid
        // (so no ember-vmm process stays root); whoever made the jail
        // removes the cgroup leaf once the keeper has exited.
        // Dumpable: emberd reads its /proc/PID/exe to know it after a
        // crash; nothing of the keeper's is secret.
        let dropped = drop_privileges(spec, true).and_then(|()| {
            // A credential change clears the parent-death signal the
            // starter (emberd) may have set: set again, then check that
            // the starter is still there.
            die_with_parent()?;
            // SAFETY: getppid(2) has no preconditions.
            if unsafe { libc::getppid() } != starter {
                return Err(JailError::Spec(
                    "the process that started ember-vmm is gone".into(),
                ));
            }
            Ok(())
        });
        if let Err(e) = dropped {
            log::error!("{e}; killing the VMM");
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        keep(pid, leaf, write_end);
    }
    drop(write_end);
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET;
    // SAFETY: as above.
    check(unsafe { libc::unshare(flags) })
        .map_err(step("unshare the mount, IPC, UTS and network namespaces"))?;
    // The pagemap of this process, for Diff snapshots and working sets:
    // /proc is not in the jail.
    crate::snapshot::memory::Pagemap::preopen().map_err(step("open /proc/self/pagemap"))?;
    build_root(spec)?;
    // What the VMM writes (snapshots, the console) is readable by emberd
    // whatever emberd's own umask.
    // SAFETY: umask(2) has no preconditions.
    unsafe { libc::umask(0o022) };
    limit_and_drop(spec)?;
    // After the credential change (which clears it): the VMM dies with its
    // keeper. The keeper's byte says the VMM is in its cgroup; none (the
    // pipe closed) that the keeper died or failed.
    die_with_parent()?;
    let mut byte = [0u8; 1];
    let read = loop {
        // SAFETY: read(2) of one byte into a local.
        let n = unsafe { libc::read(read_end.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        if n >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break n;
        }
    };
    if read != 1 {
        return Err(JailError::Spec(
            "the keeper did not put the VMM in its cgroup (it died or failed: its log says why)"
                .into(),
        ));
    }
    // The byte may have come before the keeper died, and before the
    // parent-death signal was armed: a keeper alive holds the pipe open.
    let mut poll = libc::pollfd {
        fd: read_end.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, no wait.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    if ready != 0 {
        return Err(JailError::Spec("the keeper died during the start".into()));
    }
    Ok(())
}

/// PR_SET_PDEATHSIG: SIGKILL when the parent dies.
fn die_with_parent() -> Result<(), JailError> {
    // SAFETY: prctl(2) on this process.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) })
        .map(drop)
        .map_err(step("die with the parent (PR_SET_PDEATHSIG)"))
}

/// The keeper: waits for the VMM, exits with its code.
fn keep(child: libc::pid_t, leaf: Option<&cgroup::Leaf>, _write_end: OwnedFd) -> ! {
    static CHILD: AtomicI32 = AtomicI32::new(0);
    extern "C" fn kill_child(_: libc::c_int) {
        let pid = CHILD.load(Ordering::Relaxed);
        if pid > 0 {
            // SAFETY: kill(2) is async-signal-safe.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    CHILD.store(child, Ordering::Relaxed);
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only calls kill(2).
        unsafe { libc::signal(signal, kill_child as *const () as libc::sighandler_t) };
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child.
        let ret = unsafe { libc::waitpid(child, &mut status, 0) };
        if ret == child {
            break;
        }
        if ret == -1 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: _exit ends the process.
            unsafe { libc::_exit(ExitCode::GenericError.code()) };
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        if leaf.is_some_and(|l| l.oom_killed()) {
            log::error!(
                "the VMM was killed at its cgroup's memory limit ({} bytes)",
                leaf.and_then(|l| l.spec.memory_max).unwrap_or(0)
            );
            ExitCode::MemoryLimit.code()
        } else {
            128 + signal
        }
    } else {
        ExitCode::GenericError.code()
    };
    // SAFETY: _exit ends the process (the child's resources are its own).
    unsafe { libc::_exit(code) }
}

/// mount(2): `source` on `target` (NUL-terminated strings the caller
/// owns for the call).
fn mount(
    source: Option<&std::ffi::CStr>,
    target: &std::ffi::CStr,
    fstype: Option<&std::ffi::CStr>,
    flags: libc::c_ulong,
    data: Option<&std::ffi::CStr>,
) -> std::io::Result<()> {
    let ptr = |s: Option<&std::ffi::CStr>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string alive for
    // the call; mount(2) changes only this process's mount namespace
    // (the jail's, private from its first call).
    check(unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data) as *const libc::c_void,
        )
    })
    .map(drop)
}

/// Mounts the tmpfs root, binds the paths, pivots into it.
fn build_root(spec: &Spec) -> Result<(), JailError> {
    let root = &spec.root;
    let c_root = cstr(root)?;
    mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)
        .map_err(step("make the mounts private"))?;
    mount(
        Some(c"ember-jail"),
        &c_root,
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(c"size=256k,nr_inodes=1024,mode=0755"),
    )
    .map_err(step(format!("mount a tmpfs on {}", root.display())))?;
    let mut binds: Vec<(&PathBuf, bool)> = spec
        .read_only
        .iter()
        .map(|p| (p, false))
        .chain(spec.read_write.iter().map(|p| (p, true)))
        .collect();
    // A directory before what lies in it.
    binds.sort_by_key(|(p, _)| p.components().count());
    for (path, writable) in binds {
        bind(root, path, writable)?;
    }
    let old = root.join(".old");
    std::fs::create_dir(&old).map_err(step("make the old root's mount point"))?;
    let c_old = cstr(&old)?;
    // SAFETY: pivot_root(2) with two NUL-terminated paths alive for the
    // call, in this process's private mount namespace.
    let pivoted =
        unsafe { libc::syscall(libc::SYS_pivot_root, c_root.as_ptr(), c_old.as_ptr()) } as i32;
    check(pivoted).map_err(step(format!("pivot_root into {}", root.display())))?;
    std::env::set_current_dir("/").map_err(step("chdir to the new root"))?;
    // SAFETY: umount2(2) of a NUL-terminated path, in this namespace.
    check(unsafe { libc::umount2(c"/.old".as_ptr(), libc::MNT_DETACH) })
        .map_err(step("detach the old root"))?;
    std::fs::remove_dir("/.old").map_err(step("remove the old root's mount point"))?;
    let read_only = libc::MS_REMOUNT
        | libc::MS_BIND
        | libc::MS_RDONLY
        | libc::MS_NOSUID
        | libc::MS_NODEV
        | libc::MS_NOEXEC;
    mount(None, c"/", None, read_only, None).map_err(step("make the new root read-only"))?;
    Ok(())
}

/// Binds host `path` at the same path under `root`.
fn bind(root: &Path, path: &Path, writable: bool) -> Result<(), JailError> {
    let meta = std::fs::metadata(path).map_err(step(format!("bind {}", path.display())))?;
    let target = root.join(path.strip_prefix("/").unwrap_or(path));
    if meta.is_dir() {
        std::fs::create_dir_all(&target)
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(step(format!("bind {}", path.display())))?;
        }
        std::fs::File::create(&target).map(drop)
    }
    .map_err(step(format!("make the mount point of {}", path.display())))?;
    let (c_path, c_target) = (cstr(path)?, cstr(&target)?);
    mount(
        Some(&c_path),
        &c_target,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )
    .map_err(step(format!("bind {}", path.display())))?;
    let mut flags =
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if !writable {
        flags |= libc::MS_RDONLY;
    }
    mount(None, &c_target, None, flags, None).map_err(step(format!(
        "make {} {}",
        path.display(),
        if writable { "nosuid" } else { "read-only" }
    )))?;
    Ok(())
}

/// rlimits, then the privileges.
fn limit_and_drop(spec: &Spec) -> Result<(), JailError> {
    let limit = |resource, value: u64, what: &str| {
        let rlimit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit(2) with a valid struct.
        check(unsafe { libc::setrlimit(resource, &rlimit) })
            .map(drop)
            .map_err(step(format!("set {what} to {value}")))
    };
    limit(libc::RLIMIT_NOFILE, spec.max_open_files, "RLIMIT_NOFILE")?;
    if let Some(bytes) = spec.max_file_bytes {
        limit(libc::RLIMIT_FSIZE, bytes, "RLIMIT_FSIZE")?;
    }
    drop_privileges(spec, false)
}

/// Every capability out of the bounding set, the jail's gid and uid with
/// no supplementary groups, no_new_privs, no core, not dumpable unless
/// `dumpable`; then checks that no capability is left.
fn drop_privileges(spec: &Spec, dumpable: bool) -> Result<(), JailError> {
    let core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit(2) with a valid struct.
    check(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &core) })
        .map_err(step("set RLIMIT_CORE to 0"))?;
    // Every capability out of the bounding set (needs CAP_SETPCAP: before
    // the uid changes). EINVAL past the last capability this kernel knows.
    for cap in 0..64 {
        // SAFETY: prctl(2) on this process.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(step(format!("drop capability {cap} from the bounding set"))(e));
        }
    }
    // SAFETY: id changes on this process; setgroups with an empty list.
    unsafe {
        check(libc::setgroups(0, std::ptr::null())).map_err(step("drop supplementary groups"))?;
        check(libc::setresgid(spec.gid, spec.gid, spec.gid))
            .map_err(step(format!("set gid {}", spec.gid)))?;
        // From uid 0 to another: the permitted, effective and ambient
        // capabilities are cleared (no SECBIT_KEEP_CAPS).
        check(libc::setresuid(spec.uid, spec.uid, spec.uid))
            .map_err(step(format!("set uid {}", spec.uid)))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
            .map_err(step("set no_new_privs"))?;
        // (A uid change has just reset it to fs.suid_dumpable.)
        check(libc::prctl(
            libc::PR_SET_DUMPABLE,
            libc::c_ulong::from(dumpable),
            0,
            0,
            0,
        ))
        .map_err(step("set whether it is dumpable"))?;
    }
    let left = capabilities().map_err(step("read the capabilities left"))?;
    if left != [0; 3] {
        return Err(JailError::Spec(format!(
            "capabilities remain after dropping them all: {left:x?}"
        )));
    }
    Ok(())
}

/// The effective, permitted and inheritable capability sets (the low 32
/// bits OR'd with the high, enough to say "none").
fn capabilities() -> std::io::Result<[u32; 3]> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget(2) with a version-3 header and two data structs.
    check(unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) as i32 })?;
    Ok([
        data[0].effective | data[1].effective,
        data[0].permitted | data[1].permitted,
        data[0].inheritable | data[1].inheritable,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            root: PathBuf::from("/run/ember/.jail-root"),
            uid: 3_000_000,
            gid: 3_000_000,
            read_only: vec![PathBuf::from("/var/lib/ember/compiled")],
            read_write: vec![PathBuf::from("/var/lib/ember/vms/p1")],
            max_open_files: DEFAULT_MAX_OPEN_FILES,
            ..Spec::default()
        }
    }

    #[test]
    fn a_usable_spec_passes() {
        spec().validate().unwrap();
    }

    #[test]
    fn root_ids_relative_paths_and_dot_dot_are_refused() {
        let refused = |s: Spec, what: &str| {
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        };
        refused(Spec { uid: 0, ..spec() }, "must not be 0");
        refused(Spec { gid: 0, ..spec() }, "must not be 0");
        refused(
            Spec {
                root: PathBuf::from("jail"),
                ..spec()
            },
            "absolute",
        );
        refused(
            Spec {
                read_only: vec![PathBuf::from("/var/lib/ember/../../etc")],
                ..spec()
            },
            "without '..'",
        );
        refused(
            Spec {
                read_write: vec![PathBuf::from("vms")],
                ..spec()
            },
            "absolute",
        );
        refused(
            Spec {
                read_only: vec![PathBuf::from("/")],
                ..spec()
            },
            "root cannot be bound",
        );
    }

    #[test]
    fn this_process_capabilities_are_read() {
        // Whatever they are, capget answers for this process.
        capabilities().unwrap();
    }
}
