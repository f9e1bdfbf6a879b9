//! Crash reports to the host.

use ember_abi::mailbox::{CrashReport, MessageKind};

use crate::mailbox::crash_mailbox;

/// Posts `report` through the registered mailbox, if any (the host stops the
/// VM on it); returns whether it did. Runs in ring 0 from the exception handler.
pub(crate) fn post_report(report: &CrashReport) -> bool {
    let Some(mut mailbox) = crash_mailbox() else {
        return false;
    };
    let encoded = report.encode();
    let area = mailbox.response_area();
    if area.len() < encoded.len() {
        return false;
    }
    area[..encoded.len()].copy_from_slice(&encoded);
    let seq = mailbox.request().seq;
    mailbox.post(MessageKind::Crash, seq, encoded.len() as u32);
    true
}
