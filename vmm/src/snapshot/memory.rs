//! Guest memory files: Full files, Diff layers, mapping them back, and the
//! working set recorded after a restore.
//!
//! A **Full** memory file is guest RAM byte for byte from offset 0, sparse:
//! pages the guest never wrote (all zero) are holes. A **Diff** layer holds
//! only the pages written since the parent snapshot, packed, with a table
//! of runs (guest page, file page, count) in the state file. Runs closer
//! than [`RUN_MERGE_GAP_PAGES`] are merged (the pages between are stored
//! too) because every run costs one `mmap` (~5 µs here) at each restore.
//! Both end in a one-page trailer (magic, snapshot id, lengths), so a state
//! file is never paired with another snapshot's memory by mistake.
//!
//! Restoring maps the Full file `MAP_PRIVATE | MAP_FIXED` over the guest
//! memory slot, then each layer's runs over it, oldest first: copies of one
//! snapshot share the page cache, a page becomes private to a VM only when
//! that VM writes it, and no merge step is needed.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ember_abi::mailbox::TouchRange;
use serde::{Deserialize, Serialize};

use super::PendingFile;

/// Guest page size.
pub const PAGE: u64 = 4096;

/// Dirty runs this close together (in pages) are stored as one run.
pub const RUN_MERGE_GAP_PAGES: u64 = 64;

/// Pages in a 2 MiB region: the unit of a whole run.
pub const REGION_PAGES: u64 = 512;

/// Magic of a memory file's trailer.
pub const TRAILER_MAGIC: [u8; 8] = *b"EMBRMEM1";

/// Identifies a snapshot (random, 128 bits).
pub type SnapshotId = [u8; 16];

/// One contiguous run of a layer: `pages` pages from guest page
/// `guest_page`, stored at file page `file_page`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// First guest page.
    pub guest_page: u64,
    /// First page in the layer file.
    pub file_page: u64,
    /// Pages.
    pub pages: u64,
}

/// One memory file a snapshot's guest memory is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayer {
    /// In a state file: the file's name, in the state file's own
    /// directory (never a path out of it; the newest layer may be named
    /// anew at load, by `mem_backend.backend_path`). In a live VM: the
    /// file's absolute path, resolved at load or create.
    pub path: PathBuf,
    /// The id of the snapshot that wrote it (also in its trailer).
    pub id: SnapshotId,
    /// The file's length, trailer included.
    pub file_len: u64,
    /// `None` for a Full file (all of guest memory); the runs for a Diff.
    pub runs: Option<Vec<Run>>,
}

/// Whether `path` is a layer's name as a state file records it: one plain
/// file name, no directory, no `.` or `..`.
pub fn is_layer_name(path: &Path) -> bool {
    let mut parts = path.components();
    matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    )
}

impl MemoryLayer {
    /// Mapped runs this layer costs at restore.
    pub fn run_count(&self) -> usize {
        self.runs.as_ref().map_or(1, Vec::len)
    }
}

/// What writing a memory file did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WriteStats {
    /// Guest pages written into the file.
    pub pages: u64,
    /// Runs (Diff) or extents (Full) written.
    pub runs: u64,
    /// The file's length, trailer included.
    pub file_len: u64,
}

/// Errors writing, checking or mapping memory files.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MemoryFileError {
    /// cannot write memory file {path}: {source}
    Write {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// cannot open memory file {path}: {source}
    Open {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// memory file {path} is {actual} bytes, the snapshot expects {expected} (wrong or truncated memory file)
    Size {
        /// The file.
        path: PathBuf,
        /// Its length.
        actual: u64,
        /// The length the state records.
        expected: u64,
    },
    /// memory file {path} belongs to another snapshot (its trailer names a different snapshot id)
    Foreign {
        /// The file.
        path: PathBuf,
    },
    /// memory file {path} has no Ember trailer (not a memory file, or corrupt)
    NoTrailer {
        /// The file.
        path: PathBuf,
    },
    /// a Diff layer's run (guest page {guest_page}, {pages} pages) lies outside guest memory or its file
    BadRun {
        /// First guest page.
        guest_page: u64,
        /// Pages.
        pages: u64,
    },
    /// memory file {path} has overlapping runs (at guest page {guest_page} or file page {file_page}): corrupt or hostile state
    Overlap {
        /// The file.
        path: PathBuf,
        /// Where guest ranges overlap (or the run's own start).
        guest_page: u64,
        /// Where file ranges overlap (or the run's own start).
        file_page: u64,
    },
    /// cannot map memory file {path} into guest memory: {source}
    Map {
        /// The file.
        path: PathBuf,
        /// What mmap reported.
        source: std::io::Error,
    },
    /// cannot read /proc/self/pagemap: {0}
    Pagemap(std::io::Error),
}

/// Guest memory as the host sees it: `len` bytes at `addr`.
#[derive(Debug, Clone, Copy)]
pub struct HostMemory {
    /// Host address of guest-physical 0.
    pub addr: usize,
    /// Bytes.
    pub len: u64,
}

impl HostMemory {
    fn pages(&self) -> u64 {
        self.len / PAGE
    }

    /// Page `page` of guest memory.
    ///
    /// # Safety
    /// The caller keeps the guest from writing memory meanwhile (the vCPUs
    /// are paused) and `page` is below `self.pages()`.
    unsafe fn page(&self, page: u64) -> &[u8] {
        // SAFETY: per the contract, the page lies inside the live mapping.
        unsafe {
            std::slice::from_raw_parts((self.addr as u64 + page * PAGE) as *const u8, PAGE as usize)
        }
    }
}

/// The trailer page: magic, snapshot id, data length, guest memory length.
fn trailer(id: &SnapshotId, data_len: u64, mem_len: u64) -> Vec<u8> {
    let mut page = vec![0u8; PAGE as usize];
    page[..8].copy_from_slice(&TRAILER_MAGIC);
    page[8..24].copy_from_slice(id);
    page[24..32].copy_from_slice(&data_len.to_le_bytes());
    page[32..40].copy_from_slice(&mem_len.to_le_bytes());
    page
}

/// Page-presence bits from /proc/self/pagemap for the pages of `mem`.
pub struct Pagemap(Vec<u64>);

/// Pagemap: page present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// Pagemap: page swapped out.
const PM_SWAPPED: u64 = 1 << 62;
/// Pagemap: page is file-backed (or shared anonymous): not a private copy.
const PM_FILE: u64 = 1 << 61;

/// /proc/self/pagemap opened before the jail hid /proc ([`Pagemap::preopen`]).
static PAGEMAP: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

impl Pagemap {
    /// Opens this process's pagemap for every later [`Pagemap::read`]
    /// (call before /proc goes out of reach).
    pub fn preopen() -> std::io::Result<()> {
        let file = std::fs::File::open("/proc/self/pagemap")?;
        let _ = PAGEMAP.set(file);
        Ok(())
    }

    /// Reads the pagemap entries for all of `mem`.
    pub fn read(mem: HostMemory) -> Result<Pagemap, MemoryFileError> {
        let opened;
        let file = match PAGEMAP.get() {
            Some(file) => file,
            None => {
                opened =
                    std::fs::File::open("/proc/self/pagemap").map_err(MemoryFileError::Pagemap)?;
                &opened
            }
        };
        let mut raw = vec![0u8; mem.pages() as usize * 8];
        file.read_exact_at(&mut raw, (mem.addr as u64 / PAGE) * 8)
            .map_err(MemoryFileError::Pagemap)?;
        Ok(Pagemap(
            raw.chunks_exact(8)
                .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
                .collect(),
        ))
    }

    /// Whether page `page` may hold data (in RAM or swapped out).
    fn maybe_data(&self, page: u64) -> bool {
        self.0[page as usize] & (PM_PRESENT | PM_SWAPPED) != 0
    }

    /// Pages mapped and still shared with the file (read, not written).
    fn read_only(&self, page: u64) -> bool {
        let e = self.0[page as usize];
        e & PM_PRESENT != 0 && e & PM_FILE != 0
    }

    /// Pages this process holds a private copy of (written).
    fn private(&self, page: u64) -> bool {
        let e = self.0[page as usize];
        (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAPPED != 0
    }
}

/// Whether guest memory may hold data in pages never mapped in: true when
/// it is mapped from a snapshot file (a restored VM), false when it is
/// anonymous (a booted VM, whose untouched pages are zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous memory.
    Anonymous,
    /// Mapped from memory files.
    Files,
}

/// Writes a Full memory file of `mem` to `path`, sparse: only pages that
/// may hold data and are not all zero are written.
pub fn write_full(
    mem: HostMemory,
    backing: Backing,
    path: &Path,
    id: &SnapshotId,
    sync: bool,
) -> Result<(WriteStats, PendingFile), MemoryFileError> {
    let write_err = write_error(path);
    let pagemap = match backing {
        Backing::Anonymous => Some(Pagemap::read(mem)?),
        Backing::Files => None,
    };
    let (file, pending) = PendingFile::create(path).map_err(write_err)?;
    file.set_len(mem.len).map_err(write_err)?;
    let mut stats = WriteStats::default();
    let mut run_start: Option<u64> = None;
    let flush = |start: u64, end: u64, stats: &mut WriteStats| -> std::io::Result<()> {
        // SAFETY: [start, end) lies inside guest memory; the vCPUs are paused.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (mem.addr as u64 + start * PAGE) as *const u8,
                ((end - start) * PAGE) as usize,
            )
        };
        file.write_all_at(bytes, start * PAGE)?;
        stats.pages += end - start;
        stats.runs += 1;
        Ok(())
    };
    for page in 0..mem.pages() {
        let data = pagemap.as_ref().is_none_or(|p| p.maybe_data(page))
            // SAFETY: page < pages; the vCPUs are paused (snapshots are taken paused).
            && !is_zero(unsafe { mem.page(page) });
        match (data, run_start) {
            (true, None) => run_start = Some(page),
            (false, Some(start)) => {
                flush(start, page, &mut stats).map_err(write_err)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        flush(start, mem.pages(), &mut stats).map_err(write_err)?;
    }
    file.write_all_at(&trailer(id, mem.len, mem.len), mem.len)
        .map_err(write_err)?;
    finish(file, sync).map_err(write_err)?;
    stats.file_len = mem.len + PAGE;
    Ok((stats, pending))
}

/// Wraps an I/O error writing the memory file `path`.
fn write_error(path: &Path) -> impl Fn(std::io::Error) -> MemoryFileError + Copy + '_ {
    move |source| MemoryFileError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Syncs the memory file if asked; it is renamed into place later, with
/// the state file (memory files are never rewritten in place: VMs restored
/// from the file at the name map it, and truncating it would change or
/// zero their memory under them).
fn finish(file: std::fs::File, sync: bool) -> std::io::Result<()> {
    if sync {
        file.sync_all()?;
    }
    Ok(())
}

/// The runs to store for a dirty bitmap (one bit per page, 64 per word):
/// dirty pages grouped, runs less than [`RUN_MERGE_GAP_PAGES`] apart merged.
pub fn dirty_runs(dirty: &[u64], pages: u64) -> Vec<Run> {
    runs_with_gap(dirty, pages, RUN_MERGE_GAP_PAGES)
}

/// As [`dirty_runs`], but at most `budget` runs: the merge gap doubles
/// until they fit (storing more pages, never fewer). `None` only for a
/// budget of 0 with pages to store.
pub fn dirty_runs_within(dirty: &[u64], pages: u64, budget: usize) -> Option<Vec<Run>> {
    let mut gap = RUN_MERGE_GAP_PAGES;
    loop {
        let runs = runs_with_gap(dirty, pages, gap);
        if runs.len() <= budget {
            return Some(runs);
        }
        if budget == 0 || gap >= pages {
            return None;
        }
        gap = gap.saturating_mul(2);
    }
}

fn runs_with_gap(dirty: &[u64], pages: u64, gap: u64) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    let mut file_page = 0;
    for (word_index, &word) in dirty.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let bit = bits.trailing_zeros() as u64;
            bits &= bits - 1;
            let page = word_index as u64 * 64 + bit;
            if page >= pages {
                break;
            }
            match runs.last_mut() {
                Some(run) if page < run.guest_page + run.pages + gap => {
                    let grow = page + 1 - (run.guest_page + run.pages);
                    run.pages += grow;
                    file_page += grow;
                }
                _ => {
                    runs.push(Run {
                        guest_page: page,
                        file_page,
                        pages: 1,
                    });
                    file_page += 1;
                }
            }
        }
    }
    runs
}

/// The runs of a Diff layer: the 2 MiB regions starting at the guest pages
/// in `whole` (multiples of [`REGION_PAGES`]) that hold any dirty page are
/// stored whole, first in the file, each at a file page equal to its guest
/// page modulo [`REGION_PAGES`] (so that it can be written, cached and
/// mapped as one 2 MiB page); the other dirty pages follow as
/// [`dirty_runs_within`] groups them, none overlapping a whole region. At
/// most `budget` runs in all; `None` if they do not fit.
pub fn diff_runs(dirty: &[u64], pages: u64, budget: usize, whole: &[u64]) -> Option<Vec<Run>> {
    let is_dirty = |page: u64| {
        dirty
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    };
    let mut regions: Vec<u64> = whole
        .iter()
        .copied()
        .filter(|&start| {
            start.is_multiple_of(REGION_PAGES)
                && start
                    .checked_add(REGION_PAGES)
                    .is_some_and(|end| end <= pages)
                && (start..start + REGION_PAGES).any(is_dirty)
        })
        .collect();
    regions.sort_unstable();
    regions.dedup();
    // Adjacent regions become one run (still whole regions).
    let mut runs: Vec<Run> = Vec::new();
    for start in regions {
        match runs.last_mut() {
            Some(run) if run.guest_page + run.pages == start => run.pages += REGION_PAGES,
            _ => runs.push(Run {
                guest_page: start,
                file_page: 0,
                pages: REGION_PAGES,
            }),
        }
    }
    let mut file_page = 0;
    for run in &mut runs {
        run.file_page = file_page;
        file_page += run.pages;
    }
    let mut rest = dirty.to_vec();
    for run in &runs {
        for page in run.guest_page..run.guest_page + run.pages {
            rest[(page / 64) as usize] &= !(1 << (page % 64));
        }
    }
    // Runs the merge gap stretched across a whole region are split around
    // it: fewer runs may be needed to leave room for the pieces.
    let mut rest_budget = budget.checked_sub(runs.len())?;
    loop {
        let mut split: Vec<Run> = Vec::new();
        for run in dirty_runs_within(&rest, pages, rest_budget)? {
            let mut start = run.guest_page;
            let end = run.guest_page + run.pages;
            for whole in &runs {
                let (w_start, w_end) = (whole.guest_page, whole.guest_page + whole.pages);
                if w_start < end && start < w_end {
                    if start < w_start {
                        split.push(Run {
                            guest_page: start,
                            file_page: 0,
                            pages: w_start - start,
                        });
                    }
                    start = start.max(w_end);
                }
            }
            if start < end {
                split.push(Run {
                    guest_page: start,
                    file_page: 0,
                    pages: end - start,
                });
            }
        }
        if split.len() <= rest_budget {
            for mut run in split {
                run.file_page = file_page;
                file_page += run.pages;
                runs.push(run);
            }
            return Some(runs);
        }
        rest_budget = rest_budget.checked_sub(1)?;
    }
}

/// The 2 MiB regions (as first guest pages) that the first `used` bytes of
/// an area of guest memory at `gpa`, `bytes` long, fill at least half of,
/// among those lying wholly inside the area (a region the area shares with
/// other data is left to ordinary runs). A region mostly empty is not
/// worth its 2 MiB in every template file and its write at every deploy:
/// its few pages of code go into ordinary runs.
pub fn whole_regions(gpa: u64, bytes: u64, used: u64) -> Vec<u64> {
    let region = REGION_PAGES * PAGE;
    let (Some(area_end), Some(used_end)) =
        (gpa.checked_add(bytes), gpa.checked_add(used.min(bytes)))
    else {
        return Vec::new();
    };
    let mut start = gpa.next_multiple_of(region);
    let mut out = Vec::new();
    while start + region <= area_end && used_end.saturating_sub(start) >= region / 2 {
        out.push(start / PAGE);
        start += region;
    }
    out
}

/// Whether `run` is stored and mapped as whole 2 MiB regions.
pub fn is_whole(run: &Run) -> bool {
    run.guest_page.is_multiple_of(REGION_PAGES)
        && run.file_page.is_multiple_of(REGION_PAGES)
        && run.pages.is_multiple_of(REGION_PAGES)
}

/// Writes a Diff layer holding `runs` of `mem` to `path`.
pub fn write_diff(
    mem: HostMemory,
    runs: &[Run],
    path: &Path,
    id: &SnapshotId,
    sync: bool,
) -> Result<(WriteStats, PendingFile), MemoryFileError> {
    let write_err = write_error(path);
    let (file, pending) = PendingFile::create(path).map_err(write_err)?;
    let mut stats = WriteStats::default();
    for run in runs {
        if run.guest_page + run.pages > mem.pages() {
            return Err(MemoryFileError::BadRun {
                guest_page: run.guest_page,
                pages: run.pages,
            });
        }
        // SAFETY: the run lies inside guest memory (checked above); the
        // vCPUs are paused.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (mem.addr as u64 + run.guest_page * PAGE) as *const u8,
                (run.pages * PAGE) as usize,
            )
        };
        // One write per run. A whole run goes straight to the disk
        // (O_DIRECT): through the page cache its 2 MiB folios made the
        // write stall 10 ms at times; read back with MADV_HUGEPAGE at the
        // first restore they come back as 2 MiB folios all the same.
        let direct = is_whole(run) && set_direct(&file, true);
        let written = file.write_all_at(bytes, run.file_page * PAGE);
        if direct {
            set_direct(&file, false);
        }
        written.map_err(write_err)?;
        stats.pages += run.pages;
        stats.runs += 1;
    }
    let data_len = runs
        .iter()
        .map(|run| run.file_page + run.pages)
        .max()
        .unwrap_or(0)
        * PAGE;
    file.write_all_at(&trailer(id, data_len, mem.len), data_len)
        .map_err(write_err)?;
    finish(file, sync).map_err(write_err)?;
    stats.file_len = data_len + PAGE;
    Ok((stats, pending))
}

/// Turns O_DIRECT on or off for `file`; `false` if the file system
/// refuses it (the write then goes through the page cache).
fn set_direct(file: &std::fs::File, on: bool) -> bool {
    use std::os::fd::AsRawFd;
    let flags = if on { libc::O_DIRECT } else { 0 };
    // SAFETY: F_SETFL only changes the descriptor's status flags.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags) == 0 }
}

/// A memory file opened and checked against the state: its length and its
/// trailer's snapshot id.
pub struct CheckedLayer {
    file: std::fs::File,
    path: PathBuf,
    runs: Option<Vec<Run>>,
}

/// Opens and checks every layer, each at its resolved path
/// ([`resolve_layers`]). Nothing is mapped yet.
pub fn check_layers(
    layers: &[MemoryLayer],
    mem_len: u64,
) -> Result<Vec<CheckedLayer>, MemoryFileError> {
    layers
        .iter()
        .map(|layer| {
            let path = layer.path.clone();
            let file = open_regular(&path).map_err(|source| MemoryFileError::Open {
                path: path.clone(),
                source,
            })?;
            let actual = file
                .metadata()
                .map_err(|source| MemoryFileError::Open {
                    path: path.clone(),
                    source,
                })?
                .len();
            if actual != layer.file_len || actual < PAGE || !actual.is_multiple_of(PAGE) {
                return Err(MemoryFileError::Size {
                    path,
                    actual,
                    expected: layer.file_len,
                });
            }
            let mut tail = [0u8; 40];
            file.read_exact_at(&mut tail, layer.file_len - PAGE)
                .map_err(|source| MemoryFileError::Open {
                    path: path.clone(),
                    source,
                })?;
            if tail[..8] != TRAILER_MAGIC {
                return Err(MemoryFileError::NoTrailer { path });
            }
            if tail[8..24] != layer.id {
                return Err(MemoryFileError::Foreign { path });
            }
            let data_pages = (layer.file_len - PAGE) / PAGE;
            match &layer.runs {
                None if layer.file_len != mem_len + PAGE => {
                    return Err(MemoryFileError::Size {
                        path,
                        actual,
                        expected: mem_len + PAGE,
                    })
                }
                Some(runs) => {
                    for run in runs {
                        let inside = run.pages > 0
                            && run
                                .guest_page
                                .checked_add(run.pages)
                                .is_some_and(|end| end <= mem_len / PAGE)
                            && run
                                .file_page
                                .checked_add(run.pages)
                                .is_some_and(|end| end <= data_pages);
                        if !inside {
                            return Err(MemoryFileError::BadRun {
                                guest_page: run.guest_page,
                                pages: run.pages,
                            });
                        }
                    }
                    if let Some((guest_page, file_page)) = overlap(runs) {
                        return Err(MemoryFileError::Overlap {
                            path,
                            guest_page,
                            file_page,
                        });
                    }
                }
                None => {}
            }
            Ok(CheckedLayer {
                file,
                path,
                runs: layer.runs.clone(),
            })
        })
        .collect()
}

/// A state file's layers with their paths resolved: each name in
/// `state_dir`, the newest at `top` when the load request names it.
pub fn resolve_layers(
    layers: &[MemoryLayer],
    state_dir: &Path,
    top: Option<&Path>,
) -> Vec<MemoryLayer> {
    let last = layers.len().saturating_sub(1);
    layers
        .iter()
        .enumerate()
        .map(|(i, layer)| MemoryLayer {
            path: match top {
                Some(top) if i == last => top.to_path_buf(),
                _ => state_dir.join(&layer.path),
            },
            ..layer.clone()
        })
        .collect()
}

/// Where two of `runs` (each already inside its bounds) overlap in guest
/// memory or in the file: the later run's guest and file page.
fn overlap(runs: &[Run]) -> Option<(u64, u64)> {
    let mut by_guest: Vec<&Run> = runs.iter().collect();
    by_guest.sort_unstable_by_key(|r| r.guest_page);
    let mut by_file = by_guest.clone();
    by_file.sort_unstable_by_key(|r| r.file_page);
    let guest = by_guest
        .windows(2)
        .find(|w| w[0].guest_page + w[0].pages > w[1].guest_page);
    let file = by_file
        .windows(2)
        .find(|w| w[0].file_page + w[0].pages > w[1].file_page);
    guest.or(file).map(|w| (w[1].guest_page, w[1].file_page))
}

/// Opens `path` for reading without blocking, if it is a regular file.
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    let (file, meta) = crate::files::open_nonblocking(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// What mapping a snapshot's layers did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mapped {
    /// Mappings made.
    pub runs: usize,
    /// Pages mapped as whole 2 MiB regions (`MADV_HUGEPAGE`).
    pub whole_pages: u64,
}

/// Maps checked layers over guest memory, oldest first, copy-on-write.
pub fn map_layers(mem: HostMemory, layers: &[CheckedLayer]) -> Result<Mapped, MemoryFileError> {
    let mut mapped = Mapped::default();
    for layer in layers {
        let whole = [Run {
            guest_page: 0,
            file_page: 0,
            pages: mem.pages(),
        }];
        let runs = layer.runs.as_deref().unwrap_or(&whole);
        for run in runs {
            let addr = mem.addr + (run.guest_page * PAGE) as usize;
            let len = (run.pages * PAGE) as usize;
            map_fixed(addr, len, &layer.file, run.file_page * PAGE).map_err(|source| {
                MemoryFileError::Map {
                    path: layer.path.clone(),
                    source,
                }
            })?;
            if layer.runs.is_some()
                && is_whole(run)
                && addr.is_multiple_of(REGION_BYTES)
                && map_huge(addr, len)
            {
                mapped.whole_pages += run.pages;
            }
            mapped.runs += 1;
        }
    }
    Ok(mapped)
}

/// Bytes in a 2 MiB region.
const REGION_BYTES: usize = (REGION_PAGES * PAGE) as usize;

/// Asks for a whole run's mapping in 2 MiB pages. Each region is one 2 MiB
/// folio in the page cache (written so) at a 2 MiB-aligned offset and
/// address, so the host's first fault on it maps the whole folio with one
/// page-table entry, and KVM then maps it to the guest (which maps its RAM
/// in 2 MiB pages too) with one fault instead of 512. That needs no advice
/// while the folio is cached; `MADV_HUGEPAGE` keeps it so when the file is
/// read back from disk (readahead then reads whole 2 MiB folios). Nothing
/// is populated here: a restore does no I/O for pages the guest may not
/// touch. A failure only costs speed (`false`).
fn map_huge(addr: usize, len: usize) -> bool {
    // SAFETY: [addr, addr+len) is a run just mapped inside guest memory;
    // the advice changes how it is faulted in, not its contents.
    let ret = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    if ret != 0 {
        log::warn!(
            "madvise(MADV_HUGEPAGE) of a whole run at {addr:#x}: {}",
            std::io::Error::last_os_error()
        );
        return false;
    }
    true
}

/// Maps `len` bytes of `file` from `offset` at `addr`, private, replacing
/// what was there.
fn map_fixed(addr: usize, len: usize, file: &std::fs::File, offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: [addr, addr+len) lies inside the guest memory mapping this
    // process owns (the caller checked the run); MAP_FIXED replaces those
    // pages only. The VM's vCPUs are not running; KVM follows the change
    // through its MMU notifier.
    let ret = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if ret == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn is_zero(page: &[u8]) -> bool {
    let (prefix, words, suffix) =
        // SAFETY: any bit pattern is a valid u64.
        unsafe { page.align_to::<u64>() };
    prefix.iter().all(|&b| b == 0)
        && suffix.iter().all(|&b| b == 0)
        && words.iter().fold(0u64, |acc, &w| acc | w) == 0
}

/// A range of guest pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRange {
    /// First page.
    pub start: u64,
    /// Pages.
    pub pages: u64,
}

/// The pages a restored VM touched up to the end of its first invocation:
/// read (still shared with the snapshot file) and written (private copies).
/// Stored beside the snapshot; later restores populate the read set for
/// reading and the write set for writing before the vCPU resumes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingSet {
    /// The snapshot this was recorded from.
    pub snapshot_id: SnapshotId,
    /// Pages only read.
    pub read: Vec<PageRange>,
    /// Pages written.
    pub written: Vec<PageRange>,
}

impl WorkingSet {
    /// Records the working set of `mem` (mapped from files) now. Pages only
    /// read inside `whole` runs are left out: the guest's first touch of
    /// such a region maps all of it at once, populating it page by page
    /// would only cost time.
    pub fn record(
        mem: HostMemory,
        snapshot_id: SnapshotId,
        whole: &[Run],
    ) -> Result<WorkingSet, MemoryFileError> {
        let pagemap = Pagemap::read(mem)?;
        let in_whole = |page: u64| {
            whole
                .iter()
                .any(|r| (r.guest_page..r.guest_page + r.pages).contains(&page))
        };
        let ranges = |pred: &dyn Fn(u64) -> bool| {
            let mut out: Vec<PageRange> = Vec::new();
            for page in 0..mem.pages() {
                if !pred(page) {
                    continue;
                }
                match out.last_mut() {
                    Some(r) if r.start + r.pages == page => r.pages += 1,
                    _ => out.push(PageRange {
                        start: page,
                        pages: 1,
                    }),
                }
            }
            out
        };
        Ok(WorkingSet {
            snapshot_id,
            read: ranges(&|p| pagemap.read_only(p) && !in_whole(p)),
            written: ranges(&|p| pagemap.private(p)),
        })
    }

    /// Reads a working-set file's bytes (`path` names it in errors): the
    /// container, then every range inside guest memory of `mem_pages`
    /// pages, and no more ranges than pages. The file sits beside a
    /// snapshot and is read at every restore: a range past memory, or
    /// billions of them, would have the restore touch what is not guest
    /// memory or spin.
    pub fn decode(path: &Path, bytes: &[u8], mem_pages: u64) -> Result<WorkingSet, String> {
        let set: WorkingSet = crate::snapshot::decode(
            crate::snapshot::WORKING_SET_MAGIC,
            "working-set file",
            path,
            bytes,
        )
        .map_err(|e| e.to_string())?;
        let ranges = set.read.len() + set.written.len();
        if ranges as u64 > mem_pages {
            return Err(format!(
                "{}: {ranges} ranges for {mem_pages} pages of memory",
                path.display()
            ));
        }
        for r in set.read.iter().chain(&set.written) {
            if r.pages == 0
                || r.start
                    .checked_add(r.pages)
                    .is_none_or(|end| end > mem_pages)
            {
                return Err(format!(
                    "{}: a range of {} pages at page {:#x} lies outside {mem_pages} pages of memory",
                    path.display(),
                    r.pages,
                    r.start
                ));
            }
        }
        Ok(set)
    }

    /// Pages in each set.
    pub fn counts(&self) -> (u64, u64) {
        let sum = |v: &[PageRange]| v.iter().fold(0u64, |n, r| n.saturating_add(r.pages));
        (sum(&self.read), sum(&self.written))
    }

    /// What the guest touches after a restore ([`ember_abi::mailbox::TouchList`]):
    /// the write set (for writing if `write`, else for reading), the read
    /// set, and one page of each 2 MiB region of the `whole` runs (the
    /// first fault in such a region maps all of it).
    pub fn touch_ranges(&self, whole: &[Run], write: bool) -> Vec<TouchRange> {
        let mut out = Vec::new();
        let mut push = |first: u64, pages: u64, write: bool| {
            let mut first = first;
            let mut left = pages;
            while left > 0 {
                let n = left.min(u64::from(u32::MAX));
                out.push(TouchRange {
                    first_page: first,
                    pages: n as u32,
                    write,
                });
                first += n;
                left -= n;
            }
        };
        for r in &self.written {
            push(r.start, r.pages, write);
        }
        for r in &self.read {
            push(r.start, r.pages, false);
        }
        for run in whole {
            for region in (0..run.pages).step_by(REGION_PAGES as usize) {
                push(run.guest_page + region, 1, false);
            }
        }
        out
    }

    /// Populates the host mapping: the write set for writing (private
    /// copies made now rather than in the guest's page faults: the dear
    /// part, 7–10 µs a page here), then the read set for reading (it stays
    /// shared with the file). Ranges outside `mem` are skipped. Returns the
    /// pages populated (read, written).
    pub fn prefetch(&self, mem: HostMemory) -> (u64, u64) {
        let populate = |ranges: &[PageRange], advice| {
            let mut done = 0;
            for r in ranges {
                if r.start
                    .checked_add(r.pages)
                    .is_none_or(|end| end > mem.pages())
                {
                    continue;
                }
                // SAFETY: the range lies inside guest memory (checked);
                // populating only faults pages in, as the guest would.
                let ret = unsafe {
                    libc::madvise(
                        (mem.addr as u64 + r.start * PAGE) as *mut libc::c_void,
                        (r.pages * PAGE) as usize,
                        advice,
                    )
                };
                if ret == 0 {
                    done += r.pages;
                }
            }
            done
        };
        let written = populate(&self.written, libc::MADV_POPULATE_WRITE);
        (populate(&self.read, libc::MADV_POPULATE_READ), written)
    }

    /// The 2 MiB regions of guest memory (indices) whose recorded first
    /// invocation touches at least `min_pages` pages, read or written, and
    /// that are neither in a `whole` run (already mapped 2 MiB at a time
    /// from the file) nor past the last whole region of memory; at most
    /// `max` of them, the most touched first (in region order).
    pub fn hot_regions(
        &self,
        mem: HostMemory,
        whole: &[Run],
        min_pages: u64,
        max: usize,
    ) -> Vec<u64> {
        let regions = mem.pages() / REGION_PAGES;
        let mut touched = std::collections::BTreeMap::<u64, u64>::new();
        for r in self.read.iter().chain(&self.written) {
            let end = r.start.saturating_add(r.pages).min(regions * REGION_PAGES);
            let mut page = r.start;
            while page < end {
                let region = page / REGION_PAGES;
                let upto = ((region + 1) * REGION_PAGES).min(end);
                *touched.entry(region).or_default() += upto - page;
                page = upto;
            }
        }
        let in_whole = |region: u64| {
            let first = region * REGION_PAGES;
            whole
                .iter()
                .any(|r| r.guest_page <= first && first < r.guest_page + r.pages)
        };
        let mut hot: Vec<(u64, u64)> = touched
            .into_iter()
            .filter(|&(region, pages)| pages >= min_pages && !in_whole(region))
            .collect();
        hot.sort_by_key(|&(region, pages)| (std::cmp::Reverse(pages), region));
        hot.truncate(max);
        let mut hot: Vec<u64> = hot.into_iter().map(|(region, _)| region).collect();
        hot.sort_unstable();
        hot
    }
}

/// A new anonymous region: 2 MiB, 2 MiB-aligned, advised for a huge page
/// and populated for writing.
fn new_region() -> std::io::Result<usize> {
    let len = REGION_BYTES;
    let addr = crate::vstate::memory::map_aligned(len)?;
    for advice in [libc::MADV_HUGEPAGE, libc::MADV_POPULATE_WRITE] {
        // SAFETY: [addr, addr+len) is this function's own mapping; the
        // advice asks for a huge page, then faults it in.
        if unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) } != 0 {
            let e = std::io::Error::last_os_error();
            unmap_region(addr);
            return Err(e);
        }
    }
    Ok(addr)
}

/// Unmaps a region made by [`new_region`].
fn unmap_region(addr: usize) {
    // SAFETY: [addr, addr+2 MiB) is a mapping [`new_region`] made and
    // nothing else refers to.
    unsafe { libc::munmap(addr as *mut libc::c_void, REGION_BYTES) };
}

/// Replaces 2 MiB region `region` of guest memory, just mapped from
/// `layers`, by an anonymous copy of itself: the same bytes, read from the layers' files
/// (oldest first, each run over the last; what no layer holds stays zero,
/// as in the mapping), in one transparent huge page private to this VM. On
/// this KVM a guest that maps the region with a 2 MiB page then takes one
/// shadow fault for all of it, read or written, instead of one per 4 KiB
/// page (docs/platform.md). Read with `pread`, not through the mapping: no
/// page faults, and nothing mapped in the region for `mremap` to tear
/// down. The vCPUs must not be running. On an error guest memory is
/// unchanged.
pub fn make_anonymous(
    mem: HostMemory,
    layers: &[CheckedLayer],
    region: u64,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let len = REGION_BYTES;
    let first = region
        .checked_mul(REGION_PAGES)
        .filter(|&p| p + REGION_PAGES <= mem.pages())
        .ok_or_else(|| std::io::Error::other(format!("region {region} is outside guest memory")))?;
    let dst = mem.addr + (first * PAGE) as usize;
    if !dst.is_multiple_of(REGION_BYTES) {
        return Err(std::io::Error::other("guest memory is not 2 MiB-aligned"));
    }
    let buf = new_region()?;
    // SAFETY: [buf, buf+len) is a region this function just made, mapped
    // and zero; nothing else refers to it.
    let bytes = unsafe { std::slice::from_raw_parts_mut(buf as *mut u8, len) };
    let whole = [Run {
        guest_page: 0,
        file_page: 0,
        pages: mem.pages(),
    }];
    let end = first + REGION_PAGES;
    for layer in layers {
        for run in layer.runs.as_deref().unwrap_or(&whole) {
            let from = run.guest_page.max(first);
            let to = (run.guest_page + run.pages).min(end);
            if from >= to {
                continue;
            }
            let at = ((from - first) * PAGE) as usize;
            let n = ((to - from) * PAGE) as usize;
            let offset = (run.file_page + (from - run.guest_page)) * PAGE;
            if let Err(e) = layer.file.read_exact_at(&mut bytes[at..at + n], offset) {
                unmap_region(buf);
                return Err(std::io::Error::other(format!(
                    "reading {}: {e}",
                    layer.path.display()
                )));
            }
        }
    }
    // SAFETY: moves this function's mapping over the region (MREMAP_FIXED
    // replaces the region's mappings at once); KVM follows the change
    // through its MMU notifier.
    let moved = unsafe {
        libc::mremap(
            buf as *mut libc::c_void,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dst as *mut libc::c_void,
        )
    };
    if moved == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        unmap_region(buf);
        return Err(e);
    }
    Ok(())
}

/// A thread that populates working sets while the VMM thread answers the
/// load and the guest starts: populating is a page fault per page either
/// way, but on another CPU it leaves the restore's path. Started before
/// the VMM thread's seccomp filter, under its own.
pub struct Prefetcher {
    tx: std::sync::mpsc::Sender<Option<(HostMemory, WorkingSet)>>,
}

impl Prefetcher {
    /// Starts the thread (it installs the `prefetch` filter unless
    /// `seccomp` is false).
    pub fn start(seccomp: bool) -> std::io::Result<Prefetcher> {
        // `None`: `--test-commands`' forbidden system call.
        let (tx, rx) = std::sync::mpsc::channel::<Option<(HostMemory, WorkingSet)>>();
        std::thread::Builder::new()
            .name("ember_prefetch".into())
            .spawn(move || {
                if let Err(e) =
                    crate::seccomp::apply(crate::seccomp::ThreadKind::Prefetch, "prefetch", seccomp)
                {
                    log::error!("the prefetch thread runs without work: {e}");
                    return;
                }
                while let Ok(job) = rx.recv() {
                    let Some((mem, set)) = job else {
                        let _ = crate::vmm::forbidden_syscall();
                        continue;
                    };
                    let started = std::time::Instant::now();
                    let (read, written) = set.prefetch(mem);
                    log::info!(
                        "working set populated: {read} pages for reading, {written} for writing, in {} us",
                        started.elapsed().as_micros()
                    );
                }
                // The VMM side is gone (the process is ending): a thread's
                // exit path makes calls its filter does not allow.
                loop {
                    std::thread::park();
                }
            })?;
        Ok(Prefetcher { tx })
    }

    /// Populates `set` in `mem` on the thread. `mem` must stay mapped for
    /// the life of the process (guest memory does).
    pub fn submit(&self, mem: HostMemory, set: WorkingSet) -> bool {
        self.tx.send(Some((mem, set))).is_ok()
    }

    /// `--test-commands`: has the thread make a system call its filter
    /// forbids. Whether it was asked.
    pub fn test_forbidden_syscall(&self) -> bool {
        self.tx.send(None).is_ok()
    }
}

/// Where the working set of the snapshot whose state file is `state_path`
/// is kept: `<state file>.ws`.
pub fn working_set_path(state_path: &Path) -> PathBuf {
    let mut path = state_path.as_os_str().to_owned();
    path.push(".ws");
    PathBuf::from(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh anonymous private mapping of `len` bytes (never unmapped).
    fn anon(len: u64) -> HostMemory {
        // SAFETY: a new mapping that nothing else refers to.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        HostMemory {
            addr: addr as usize,
            len,
        }
    }

    fn bitmap(pages: &[u64]) -> Vec<u64> {
        let mut words = vec![0u64; 8];
        for &p in pages {
            words[(p / 64) as usize] |= 1 << (p % 64);
        }
        words
    }

    #[test]
    fn dirty_runs_merge_close_pages_and_pack_the_file() {
        let runs = dirty_runs(&bitmap(&[3, 4, 5, 40, 300, 301]), 512);
        assert_eq!(
            runs,
            vec![
                // 3..=40: 38 pages, the gap stored too.
                Run {
                    guest_page: 3,
                    file_page: 0,
                    pages: 38
                },
                Run {
                    guest_page: 300,
                    file_page: 38,
                    pages: 2
                },
            ]
        );
        assert!(dirty_runs(&bitmap(&[]), 512).is_empty());
        // Bits past the memory's end are ignored.
        assert!(dirty_runs(&bitmap(&[500]), 100).is_empty());
    }

    #[test]
    fn runs_are_merged_further_to_fit_a_budget() {
        // Pages 0, 100, 200, ..., 500: six runs at the usual gap.
        let pages: Vec<u64> = (0..6).map(|i| i * 100).collect();
        let dirty = bitmap(&pages);
        assert_eq!(dirty_runs(&dirty, 512).len(), 6);
        let two = dirty_runs_within(&dirty, 512, 2).unwrap();
        assert!(two.len() <= 2, "{two:?}");
        // Every dirty page is still stored.
        for page in pages {
            assert!(two
                .iter()
                .any(|r| (r.guest_page..r.guest_page + r.pages).contains(&page)));
        }
        assert_eq!(dirty_runs_within(&dirty, 512, 6).unwrap().len(), 6);
        assert!(dirty_runs_within(&dirty, 512, 0).is_none());
        assert_eq!(dirty_runs_within(&bitmap(&[]), 512, 0), Some(vec![]));
    }

    #[test]
    fn whole_regions_are_those_inside_the_area_mostly_used() {
        const MIB: u64 = 1 << 20;
        // An aligned area of 16 MiB with 4.2 MB used: two full regions; the
        // third holds 6 KB of it.
        assert_eq!(
            whole_regions(32 * MIB, 16 * MIB, 4_200_000),
            vec![8192, 8704]
        );
        // Exactly one region used; half a region; less; nothing.
        assert_eq!(whole_regions(32 * MIB, 16 * MIB, 2 * MIB), vec![8192]);
        assert_eq!(
            whole_regions(32 * MIB, 16 * MIB, 5 * MIB),
            vec![8192, 8704, 9216]
        );
        assert!(whole_regions(32 * MIB, 16 * MIB, MIB - 1).is_empty());
        assert!(whole_regions(32 * MIB, 16 * MIB, 0).is_empty());
        // An unaligned area: the regions it shares with other data are not
        // whole ones (here the first and the one past its end).
        assert_eq!(
            whole_regions(33 * MIB, 8 * MIB, 8 * MIB),
            vec![8704, 9216, 9728]
        );
        assert!(whole_regions(33 * MIB, 2 * MIB, 2 * MIB).is_empty());
        // Used past the area counts only the area; no wrap.
        assert_eq!(whole_regions(0, 2 * MIB, 64 * MIB), vec![0]);
        assert!(whole_regions(u64::MAX - 4095, 8192, 8192).is_empty());
    }

    #[test]
    fn diff_runs_store_whole_regions_first_aligned_in_the_file() {
        let pages = 4 * REGION_PAGES;
        let mut dirty = vec![0u64; (pages / 64) as usize];
        let mut mark = |p: u64| dirty[(p / 64) as usize] |= 1 << (p % 64);
        for p in [3, 4, 600, 1024 + 7, 1536 + 511, 1700] {
            mark(p);
        }
        // Regions 1 (pages 512..1024) and 2 and 3 whole; region 0 is not
        // asked for, region 1 has a dirty page, regions 2 and 3 too.
        let runs = diff_runs(&dirty, pages, 64, &[512, 1024, 1536, 7]).unwrap();
        assert_eq!(
            runs,
            vec![
                Run {
                    guest_page: 512,
                    file_page: 0,
                    pages: 3 * REGION_PAGES,
                },
                Run {
                    guest_page: 3,
                    file_page: 3 * REGION_PAGES,
                    pages: 2,
                },
            ]
        );
        assert!(runs.iter().take(1).all(is_whole));
        assert!(!is_whole(&runs[1]));
        // A region with nothing dirty is not stored.
        let runs = diff_runs(&dirty, pages, 64, &[0, 1024]).unwrap();
        assert_eq!(runs[0].guest_page, 0);
        assert!(runs
            .iter()
            .all(|r| r.guest_page != 512 || r.pages < REGION_PAGES));
        // Runs the merge gap would stretch across a whole region are split
        // around it, and the budget still holds.
        let mut dirty = vec![0u64; (pages / 64) as usize];
        for p in [100, 700, 1200] {
            dirty[(p / 64) as usize] |= 1 << (p % 64);
        }
        for budget in 3..6 {
            let runs = diff_runs(&dirty, pages, budget, &[512]).unwrap();
            assert!(runs.len() <= budget, "{runs:?} over {budget}");
            assert_eq!(
                runs[0],
                Run {
                    guest_page: 512,
                    file_page: 0,
                    pages: REGION_PAGES
                }
            );
            for run in &runs[1..] {
                let end = run.guest_page + run.pages;
                assert!(
                    end <= 512 || run.guest_page >= 1024,
                    "{run:?} overlaps the whole region"
                );
            }
            let stored: Vec<u64> = [100, 1200]
                .into_iter()
                .filter(|p| {
                    runs.iter()
                        .any(|r| (r.guest_page..r.guest_page + r.pages).contains(p))
                })
                .collect();
            assert_eq!(stored, vec![100, 1200], "budget {budget}: {runs:?}");
        }
        // Pages on both sides of it need three runs at least.
        assert!(diff_runs(&dirty, pages, 2, &[512]).is_none());
    }

    #[test]
    fn the_touch_list_writes_the_write_set_reads_the_rest_and_one_page_a_region() {
        let set = WorkingSet {
            snapshot_id: SnapshotId::default(),
            read: vec![PageRange {
                start: 10,
                pages: 3,
            }],
            written: vec![
                PageRange {
                    start: 40,
                    pages: 2,
                },
                PageRange {
                    start: 50,
                    pages: 1,
                },
            ],
        };
        let whole = [Run {
            guest_page: 1024,
            file_page: 0,
            pages: 1024,
        }];
        let t = |first_page, pages, write| TouchRange {
            first_page,
            pages,
            write,
        };
        assert_eq!(
            set.touch_ranges(&whole, true),
            vec![
                t(40, 2, true),
                t(50, 1, true),
                t(10, 3, false),
                t(1024, 1, false),
                t(1536, 1, false)
            ]
        );
        // A VM logging dirty pages only reads: its next Diff stays as small.
        assert!(set.touch_ranges(&whole, false).iter().all(|r| !r.write));
        // A range too long for the wire's u32 is split, not cut.
        let huge = WorkingSet {
            written: vec![PageRange {
                start: 0,
                pages: u64::from(u32::MAX) + 5,
            }],
            ..WorkingSet::default()
        };
        assert_eq!(
            huge.touch_ranges(&[], true),
            vec![t(0, u32::MAX, true), t(u64::from(u32::MAX), 5, true)]
        );
    }

    #[test]
    fn hot_regions_are_the_most_touched_outside_whole_runs() {
        let r = |start, pages| PageRange { start, pages };
        let set = WorkingSet {
            snapshot_id: SnapshotId::default(),
            // Region 0: 100 read + 50 written; region 1: 10 read, plus
            // the 140 pages of a range that crosses into region 2 (2 of
            // them in 1); region 2: 138 of that range, 300 written, but
            // a whole run; region 3: 200 written; region 4: 500 written,
            // but past the last whole region of memory.
            read: vec![r(0, 100), r(600, 10), r(1022, 140)],
            written: vec![r(100, 50), r(1100, 300), r(1536, 200), r(2048, 500)],
        };
        let mem = HostMemory {
            addr: 0,
            len: (4 * REGION_PAGES + 10) * PAGE,
        };
        let whole = [Run {
            guest_page: 1024,
            file_page: 0,
            pages: REGION_PAGES,
        }];
        assert_eq!(set.hot_regions(mem, &whole, 128, 8), vec![0, 3]);
        assert_eq!(set.hot_regions(mem, &whole, 12, 8), vec![0, 1, 3]);
        // The most touched when capped, still in region order.
        assert_eq!(set.hot_regions(mem, &whole, 12, 2), vec![0, 3]);
        assert_eq!(set.hot_regions(mem, &[], 128, 8), vec![0, 2, 3]);
        assert!(set.hot_regions(mem, &whole, 1000, 8).is_empty());
    }

    #[test]
    fn zero_pages_are_recognised() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
    }

    /// A Diff with a whole region maps back byte for byte, the region at a
    /// 2 MiB-aligned file offset and the file no longer than its runs.
    #[test]
    fn a_diff_with_whole_regions_maps_back_byte_identical() {
        let dir = std::env::temp_dir().join(format!("ember-memtest-whole-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let len = 2 * REGION_PAGES * PAGE;
        let mem = anon(len);
        // SAFETY: the mapping is `len` bytes and ours.
        let bytes = unsafe { std::slice::from_raw_parts_mut(mem.addr as *mut u8, len as usize) };
        bytes[3 * 4096] = 1;
        bytes[600 * 4096 + 5] = 2;
        let full = dir.join("full.mem");
        let (_, pending) = write_full(mem, Backing::Files, &full, &[1; 16], false).unwrap();
        pending.commit().unwrap();
        // The module's region: one page written, the rest as it was.
        bytes[700 * 4096 + 1] = 3;
        bytes[10 * 4096] = 4;
        let mut dirty = vec![0u64; (2 * REGION_PAGES / 64) as usize];
        for p in [700u64, 10] {
            dirty[(p / 64) as usize] |= 1 << (p % 64);
        }
        let runs = diff_runs(&dirty, 2 * REGION_PAGES, 8, &[512]).unwrap();
        assert_eq!(runs.len(), 2);
        assert!(is_whole(&runs[0]));
        let diff = dir.join("diff.mem");
        let (stats, pending) = write_diff(mem, &runs, &diff, &[2; 16], false).unwrap();
        pending.commit().unwrap();
        assert_eq!(stats.pages, REGION_PAGES + 1);
        assert_eq!(stats.file_len, (REGION_PAGES + 2) * PAGE);
        let layers = vec![
            MemoryLayer {
                path: full,
                id: [1; 16],
                file_len: len + PAGE,
                runs: None,
            },
            MemoryLayer {
                path: diff,
                id: [2; 16],
                file_len: stats.file_len,
                runs: Some(runs),
            },
        ];
        // The target 2 MiB-aligned, as guest memory is.
        let guest = crate::vstate::memory::create_guest_memory(len as usize).unwrap();
        let target = HostMemory {
            addr: {
                use vm_memory::GuestMemoryBackend;
                guest.iter().next().unwrap().as_ptr() as usize
            },
            len,
        };
        let checked = check_layers(&layers, len).unwrap();
        let mapped = map_layers(target, &checked).unwrap();
        assert_eq!(mapped.runs, 3);
        if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            assert_eq!(
                mapped.whole_pages, REGION_PAGES,
                "the whole region mapped as such"
            );
        }
        // SAFETY: the mapping is `len` bytes and ours.
        let restored =
            unsafe { std::slice::from_raw_parts(target.addr as *const u8, len as usize) };
        assert!(restored == &*bytes, "restored memory differs");
        // Region 0 copied into anonymous memory: the same bytes, now
        // private to this process (no longer the file's pages).
        make_anonymous(target, &checked, 0).unwrap();
        // SAFETY: as above.
        let restored =
            unsafe { std::slice::from_raw_parts(target.addr as *const u8, len as usize) };
        assert!(restored == &*bytes, "memory differs after the copy");
        let pagemap = Pagemap::read(target).unwrap();
        assert!((0..REGION_PAGES).all(|p| pagemap.private(p)));
        assert!((REGION_PAGES..2 * REGION_PAGES).all(|p| !pagemap.private(p)));
        assert!(
            make_anonymous(target, &checked, 2).is_err(),
            "a region past the end"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Writes a Full file and a Diff layer of a small memory, maps them over
    /// fresh memory, and compares.
    #[test]
    fn full_and_diff_map_back_byte_identical() {
        let dir = std::env::temp_dir().join(format!("ember-memtest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let len = 64 * PAGE;
        let mut src = vec![0u8; len as usize + PAGE as usize];
        let off = src.as_ptr().align_offset(PAGE as usize);
        let base = &mut src[off..off + len as usize];
        base[5 * 4096] = 7;
        base[20 * 4096 + 9] = 9;
        let mem = HostMemory {
            addr: base.as_ptr() as usize,
            len,
        };
        let full = dir.join("full.mem");
        let (_, pending) = write_full(mem, Backing::Files, &full, &[1; 16], true).unwrap();
        assert!(!full.exists(), "nothing under the final name before commit");
        pending.commit().unwrap();
        assert_eq!(std::fs::metadata(&full).unwrap().len(), len + PAGE);
        base[40 * 4096] = 3;
        let runs = dirty_runs(&bitmap(&[40]), 64);
        let diff = dir.join("diff.mem");
        let (stats, pending) = write_diff(mem, &runs, &diff, &[2; 16], false).unwrap();
        pending.commit().unwrap();
        let layers = vec![
            MemoryLayer {
                path: full.clone(),
                id: [1; 16],
                file_len: len + PAGE,
                runs: None,
            },
            MemoryLayer {
                path: diff.clone(),
                id: [2; 16],
                file_len: stats.file_len,
                runs: Some(runs),
            },
        ];
        let target_mem = anon(len);
        let checked = check_layers(&layers, len).unwrap();
        assert_eq!(map_layers(target_mem, &checked).unwrap().runs, 2);
        // SAFETY: the mapping is `len` bytes and ours.
        let restored =
            unsafe { std::slice::from_raw_parts(target_mem.addr as *const u8, len as usize) };
        assert_eq!(restored, &*base);

        // The wrong file in a layer's place is refused by size or id.
        let mut swapped = layers.clone();
        swapped[1].path = full.clone();
        assert!(matches!(
            check_layers(&swapped, len).err().unwrap(),
            MemoryFileError::Size { .. }
        ));
        let mut foreign = layers.clone();
        foreign[0].id = [9; 16];
        assert!(matches!(
            check_layers(&foreign, len).err().unwrap(),
            MemoryFileError::Foreign { .. }
        ));
        // A file of the right length without a trailer.
        let plain = dir.join("plain.mem");
        std::fs::write(&plain, vec![0u8; (stats.file_len) as usize]).unwrap();
        let mut no_trailer = layers.clone();
        no_trailer[1].path = plain.clone();
        assert!(matches!(
            check_layers(&no_trailer, len).err().unwrap(),
            MemoryFileError::NoTrailer { .. }
        ));
        // Runs of no pages, or past memory or the file, are refused.
        for bad_run in [
            Run {
                guest_page: 1,
                file_page: 0,
                pages: 0,
            },
            Run {
                guest_page: 63,
                file_page: 0,
                pages: 2,
            },
            Run {
                guest_page: 0,
                file_page: 1,
                pages: 1,
            },
            Run {
                guest_page: u64::MAX,
                file_page: 0,
                pages: 2,
            },
        ] {
            let mut bad = layers.clone();
            bad[1].runs = Some(vec![bad_run]);
            assert!(
                matches!(
                    check_layers(&bad, len).err(),
                    Some(MemoryFileError::BadRun { .. })
                ),
                "{bad_run:?}"
            );
        }
        // Two runs over the same guest page (each inside its bounds): a
        // hostile state, refused before anything is mapped.
        let mut twice = layers.clone();
        let one = layers[1].runs.as_ref().unwrap()[0];
        twice[1].runs = Some(vec![one, one]);
        assert!(matches!(
            check_layers(&twice, len).err().unwrap(),
            MemoryFileError::Overlap { .. }
        ));
        // A length below one page (no room for a trailer) is refused, not
        // an underflow.
        let tiny = dir.join("tiny.mem");
        std::fs::write(&tiny, b"x").unwrap();
        let mut short = layers.clone();
        short[1].path = tiny;
        short[1].file_len = 1;
        assert!(matches!(
            check_layers(&short, len).err().unwrap(),
            MemoryFileError::Size { .. }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn overlapping_runs_are_found_in_guest_memory_and_in_the_file() {
        let run = |guest_page, file_page, pages| Run {
            guest_page,
            file_page,
            pages,
        };
        // Apart in both, in any order.
        assert_eq!(
            overlap(&[run(10, 0, 2), run(0, 2, 10), run(12, 12, 1)]),
            None
        );
        assert_eq!(overlap(&[]), None);
        // Guest ranges overlap (listed out of order).
        assert_eq!(overlap(&[run(20, 0, 5), run(16, 5, 5)]), Some((20, 0)));
        // File ranges overlap, guest ranges apart.
        assert_eq!(overlap(&[run(0, 0, 4), run(100, 3, 1)]), Some((100, 3)));
        // Whole regions first in the file, guest order otherwise: fine.
        assert_eq!(overlap(&[run(512, 0, 512), run(3, 512, 1)]), None);
    }

    #[test]
    fn layer_names_are_plain_file_names() {
        assert!(is_layer_name(Path::new("base.mem")));
        assert!(is_layer_name(Path::new("template.mem")));
        for bad in ["", ".", "..", "/base.mem", "../base.mem", "a/base.mem", "/"] {
            assert!(!is_layer_name(Path::new(bad)), "{bad:?}");
        }
    }

    #[test]
    fn layers_resolve_in_the_state_directory_and_the_top_where_the_request_says() {
        let layer = |name: &str| MemoryLayer {
            path: PathBuf::from(name),
            id: [0; 16],
            file_len: PAGE,
            runs: None,
        };
        let layers = [layer("base.mem"), layer("template.mem")];
        let dir = Path::new("/jail/snap");
        let resolved = resolve_layers(&layers, dir, None);
        assert_eq!(resolved[0].path, Path::new("/jail/snap/base.mem"));
        assert_eq!(resolved[1].path, Path::new("/jail/snap/template.mem"));
        let moved = resolve_layers(&layers, dir, Some(Path::new("/elsewhere/t.mem")));
        assert_eq!(moved[0].path, Path::new("/jail/snap/base.mem"));
        assert_eq!(moved[1].path, Path::new("/elsewhere/t.mem"));
    }

    #[test]
    fn a_working_set_outside_memory_or_of_too_many_ranges_is_refused() {
        let path = Path::new("/snapshots/t.ws");
        let r = |start, pages| PageRange { start, pages };
        let file = |read: Vec<PageRange>, written: Vec<PageRange>| {
            let set = WorkingSet {
                snapshot_id: [7; 16],
                read,
                written,
            };
            crate::snapshot::encode(crate::snapshot::WORKING_SET_MAGIC, &set).unwrap()
        };
        let good = file(vec![r(0, 2), r(10, 6)], vec![r(15, 1)]);
        let set = WorkingSet::decode(path, &good, 16).unwrap();
        assert_eq!(set.counts(), (8, 1));
        for (bytes, mem_pages, why) in [
            (good.clone(), 15, "lies outside 15 pages"),
            (file(vec![r(u64::MAX, 2)], vec![]), 16, "lies outside"),
            (file(vec![], vec![r(3, u64::MAX)]), 16, "lies outside"),
            (file(vec![r(3, 0)], vec![]), 16, "lies outside"),
            (
                file(vec![r(0, 1); 17], vec![]),
                16,
                "17 ranges for 16 pages",
            ),
            (good[..good.len() - 1].to_vec(), 16, "truncated"),
        ] {
            let e = WorkingSet::decode(path, &bytes, mem_pages).unwrap_err();
            assert!(e.contains(why), "{e} (expected {why:?})");
        }
    }
}
