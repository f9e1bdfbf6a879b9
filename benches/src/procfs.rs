//! What /proc says about a process.

/// Resident and proportional memory of a process, guest memory excluded.
#[derive(Debug, Clone, Copy)]
pub struct Footprint {
    /// Resident set, KiB.
    pub rss_kib: u64,
    /// Proportional set size (shared pages divided among their sharers), KiB.
    pub pss_kib: u64,
    /// Resident guest memory that was left out, KiB.
    pub guest_rss_kib: u64,
}

/// Reads /proc/PID/smaps and sums Rss and Pss over every mapping except
/// guest memory: the mapping named `[anon:ember-guest-ram]`, or, where the
/// kernel cannot name mappings, the anonymous mapping of exactly
/// `guest_bytes`.
pub fn footprint(pid: u32, guest_bytes: u64) -> std::io::Result<Footprint> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut total = Footprint {
        rss_kib: 0,
        pss_kib: 0,
        guest_rss_kib: 0,
    };
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            // A mapping header: "start-end perms offset dev inode [path]".
            let size = u64::from_str_radix(end, 16).unwrap_or(0)
                - u64::from_str_radix(start, 16).unwrap_or(0);
            let rest: Vec<&str> = fields.collect();
            let path = rest.get(4).copied().unwrap_or("");
            let inode = rest.get(3).copied().unwrap_or("0");
            in_guest = path == "[anon:ember-guest-ram]"
                || (path.is_empty() && inode == "0" && size == guest_bytes);
            continue;
        }
        let value: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        match first {
            "Rss:" if in_guest => total.guest_rss_kib += value,
            "Rss:" => total.rss_kib += value,
            "Pss:" if !in_guest => total.pss_kib += value,
            _ => {}
        }
    }
    Ok(total)
}

/// `FilePmdMapped` of /proc/PID/smaps_rollup: file pages the process maps
/// with 2 MiB page-table entries, KiB.
pub fn file_pmd_mapped_kib(pid: u32) -> std::io::Result<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    Ok(rollup
        .lines()
        .find_map(|line| line.strip_prefix("FilePmdMapped:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0))
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_footprint_is_plausible() {
        let own = footprint(std::process::id(), 1 << 40).unwrap();
        assert!(own.rss_kib > 100, "{own:?}");
        assert!(own.pss_kib > 0 && own.pss_kib <= own.rss_kib + 4, "{own:?}");
        assert_eq!(own.guest_rss_kib, 0);
    }
}
