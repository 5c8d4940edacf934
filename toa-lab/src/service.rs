//! `toa run` as a child process, its stderr collected line by line.

use super::*;

/// A `toa run` started by a test; `Drop` ends it (by its PID) if the test did not. Its stderr
/// (the log) is collected as it comes, so that a test can wait for a line.
pub struct Service {
    child: Option<Child>,
    log: std::sync::Arc<(std::sync::Mutex<String>, std::sync::Condvar)>,
    collector: Option<std::thread::JoinHandle<()>>,
}

impl Service {
    pub(crate) fn new(mut child: Child) -> Self {
        let stderr = child.stderr.take().expect("piped stderr");
        let log = std::sync::Arc::new((std::sync::Mutex::new(String::new()), std::sync::Condvar::new()));
        let shared = log.clone();
        let collector = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (text, changed) = &*shared;
                let mut text = text.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
                changed.notify_all();
            }
        });
        Service { child: Some(child), log, collector: Some(collector) }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the PID of a child we started and have not reaped.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Waits until the log has `n` lines containing `text` (bounded by `DEADLINE`).
    pub fn wait_for_log(&self, text: &str, n: usize) {
        let (log, changed) = &*self.log;
        let (log, timeout) =
            changed.wait_timeout_while(log.lock().unwrap(), DEADLINE, |log| log.matches(text).count() < n).unwrap();
        assert!(!timeout.timed_out(), "toa run did not log {text:?} {n} time(s):\n{log}");
    }

    /// SIGTERM, then waits for the exit; returns (success, stderr).
    pub fn stop(&mut self) -> (bool, String) {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("running");
        let status = child.wait().expect("wait for toa run");
        (status.success(), self.collected())
    }

    /// Everything it logged, once it has exited.
    fn collected(&mut self) -> String {
        if let Some(collector) = self.collector.take() {
            let _ = collector.join();
        }
        self.log.0.lock().unwrap().clone()
    }

    pub(crate) fn stderr(&mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.collected()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            report_cleanup(format!("reap toa run {}", child.id()), child.wait());
        }
    }
}
