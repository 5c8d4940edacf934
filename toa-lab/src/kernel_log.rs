//! The kernel log from a point on: what a test checks for warnings its traffic may have caused.

use std::{
    fs,
    io::{Read as _, Seek as _, SeekFrom},
    os::unix::fs::OpenOptionsExt as _,
};

/// `/dev/kmsg`, read from the moment it was opened.
pub struct KernelLog {
    kmsg: fs::File,
}

impl KernelLog {
    /// Starts reading at the end of the log.
    pub fn from_now() -> Self {
        let mut kmsg =
            fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg").expect("open /dev/kmsg");
        kmsg.seek(SeekFrom::End(0)).expect("seek /dev/kmsg");
        KernelLog { kmsg }
    }

    /// The records since then that say something went wrong in the kernel.
    pub fn warnings(&mut self) -> Vec<String> {
        let mut found = Vec::new();
        let mut record = vec![0u8; 8192];
        loop {
            // One record per read; EAGAIN at the end, EPIPE when records were overwritten.
            match self.kmsg.read(&mut record) {
                Ok(0) => break,
                Ok(n) => {
                    let text = String::from_utf8_lossy(&record[..n]).into_owned();
                    if ["WARNING", "BUG", "Call Trace", "general protection"].iter().any(|w| text.contains(w)) {
                        found.push(text);
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        found
    }
}
