//! For `pcft demo`'s "one copy at a time" check: when were a process's vCPU
//! threads stopped (SIGSTOP, the `freeze` failure kind)? A vCPU thread stopped
//! while in the guest leaves `KVM_RUN` at once, but it stops on its way back to
//! the agent, before it can read the clock, so its run interval ends only when
//! it is continued. This watcher samples the state of each vCPU thread of the
//! process (`/proc/PID/task/*/{comm,stat}`, threads named `vcpuN`) and keeps
//! the windows in which it was seen stopped, so that such an interval can be
//! cut where the stop began (see [`cut_at_stops`]); and the windows in which
//! the process's main thread was (the process stood still). It assumes one
//! stop and one continue per run (the demo's), so a thread seen stopped at
//! two samples was stopped in between. A vCPU blocked in userfaultfd never
//! stops (under emulation it spins in the kernel): its interval is cut at the
//! process's stop if the agent says it left `KVM_RUN` still blocked on a
//! page nothing installed (`RunInterval::ended_blocked`), or if its thread
//! was never seen stopped while the process stood still (it was in the
//! kernel, not the guest, all along) and no page was installed after.

use pcft_agent::clock::BootTime;
use pcft_agent::vmm::run_log::RunInterval;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the threads' states are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(2);

/// A stretch in which a thread was seen stopped, from the first sample that
/// saw it to the last (µs on `CLOCK_BOOTTIME`): vCPU `vcpu`'s, or (None) the
/// process's main thread, which stands for the whole process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoppedWindow {
    pub vcpu: Option<u8>,
    pub from_us: u64,
    pub until_us: u64,
}

pub struct StopWatch {
    done: Arc<AtomicBool>,
    windows: Arc<Mutex<Vec<StoppedWindow>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// For the main thread (None) and each vCPU thread (named `vcpuN`) of `pid`,
/// whether it is stopped now (None: the process is gone).
fn threads_stopped(pid: u32) -> Option<Vec<(Option<u8>, bool)>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut seen = Vec::new();
    for task in tasks.flatten() {
        let main = task.file_name().to_str() == Some(pid.to_string().as_str());
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else { continue };
        let vcpu = comm.trim().strip_prefix("vcpu").and_then(|n| n.parse::<u8>().ok());
        if vcpu.is_none() && !main {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        // The state is the first field after the parenthesized command name.
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
        seen.push((vcpu, matches!(state, Some('T' | 't'))));
    }
    Some(seen)
}

impl StopWatch {
    pub fn start(pid: u32) -> StopWatch {
        let done = Arc::new(AtomicBool::new(false));
        let windows: Arc<Mutex<Vec<StoppedWindow>>> = Arc::default();
        let thread = std::thread::Builder::new()
            .name("stopwatch".into())
            .spawn({
                let (done, windows) = (Arc::clone(&done), Arc::clone(&windows));
                move || {
                    let mut open: Vec<StoppedWindow> = Vec::new();
                    while !done.load(Ordering::SeqCst) {
                        let now = BootTime::now().as_micros();
                        let Some(states) = threads_stopped(pid) else { break };
                        for (vcpu, stopped) in states {
                            let at = open.iter().position(|w| w.vcpu == vcpu);
                            match (stopped, at) {
                                (true, Some(i)) => open[i].until_us = now,
                                (true, None) => open.push(StoppedWindow { vcpu, from_us: now, until_us: now }),
                                (false, Some(i)) => windows.lock().expect("stop windows").push(open.remove(i)),
                                (false, None) => {}
                            }
                        }
                        std::thread::sleep(SAMPLE_EVERY);
                    }
                    windows.lock().expect("stop windows").extend(open);
                }
            })
            .ok();
        StopWatch { done, windows, thread }
    }

    /// Stops watching; the windows seen.
    pub fn finish(mut self) -> Vec<StoppedWindow> {
        self.done.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        std::mem::take(&mut *self.windows.lock().expect("stop windows"))
    }
}

impl Drop for StopWatch {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

/// Cuts each interval that spans a whole stopped window at the window's start:
///
/// - a window of its own vCPU's thread: the thread was stopped through it, on
///   its way out of `KVM_RUN` (a stopped thread is never in the guest), and
///   after it only returned to the agent;
/// - a window of the process, if the vCPU left `KVM_RUN` still blocked on a
///   page nothing installed (`ended_blocked`): while the process stood still
///   no thread ran guest code, so the vCPU did not newly block then; it was
///   blocked since before the window, and stayed so until it left;
/// - a window of the process in which the vCPU's thread was never seen
///   stopped, if no page was installed after the window (`last_install_us`,
///   from the agent): a thread in the guest stops when its process does, so
///   it was in the kernel all along, blocked on a page; and with no page
///   installed after, it stayed blocked until it left.
///
/// So the guest did not run in it after the window began. Intervals that do
/// not span a window are left as they are.
pub fn cut_at_stops(intervals: &[RunInterval], windows: &[StoppedWindow], last_install_us: u64) -> Vec<RunInterval> {
    let vcpu_stopped_in = |vcpu: u8, process: &StoppedWindow| {
        windows.iter().any(|w| w.vcpu == Some(vcpu) && w.from_us <= process.until_us && w.until_us >= process.from_us)
    };
    intervals
        .iter()
        .map(|interval| {
            let spanned = windows.iter().filter(|w| {
                let applies = match w.vcpu {
                    Some(vcpu) => vcpu == interval.vcpu,
                    None => {
                        interval.ended_blocked || (!vcpu_stopped_in(interval.vcpu, w) && last_install_us < w.until_us)
                    }
                };
                applies && interval.start_us < w.from_us && interval.end_us > w.until_us
            });
            match spanned.map(|w| w.from_us).min() {
                Some(cut) => RunInterval { end_us: cut, ..*interval },
                None => *interval,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(vcpu: u8, start_us: u64, end_us: u64) -> RunInterval {
        RunInterval { vcpu, start_us, end_us, ended_blocked: false }
    }

    #[test]
    fn a_blocked_vcpu_is_cut_at_the_process_stop_and_a_running_one_is_not() {
        let windows = [StoppedWindow { vcpu: None, from_us: 100, until_us: 500 }];
        let blocked = RunInterval { ended_blocked: true, ..span(1, 10, 600) };
        // vCPU 0 was seen stopped (its own window decides), vCPU 1 was not.
        let vcpu0 = StoppedWindow { vcpu: Some(0), from_us: 300, until_us: 500 };
        let cut = cut_at_stops(&[blocked, span(0, 10, 600)], &[windows[0], vcpu0], 50);
        assert_eq!(cut, [RunInterval { end_us: 100, ..blocked }, span(0, 10, 300)]);
        // In the kernel through the process's stop, and no page came after it: cut too.
        let in_kernel = span(1, 10, 600);
        assert_eq!(cut_at_stops(&[in_kernel], &windows, 450), [span(1, 10, 100)]);
        // ... but a page installed after the stop may have woken it: not cut.
        assert_eq!(cut_at_stops(&[in_kernel], &windows, 550), [in_kernel]);
    }

    #[test]
    fn only_an_interval_spanning_a_whole_stop_of_its_vcpu_is_cut_at_its_start() {
        let windows = [StoppedWindow { vcpu: Some(0), from_us: 100, until_us: 500 }];
        let runs = [
            span(0, 10, 600),
            span(0, 10, 90),
            span(0, 550, 700),
            span(0, 200, 600),
            span(0, 50, 400),
            span(1, 10, 600),
        ];
        let cut = [
            span(0, 10, 100),
            span(0, 10, 90),
            span(0, 550, 700),
            span(0, 200, 600),
            span(0, 50, 400),
            span(1, 10, 600),
        ];
        assert_eq!(cut_at_stops(&runs, &windows, 0), cut);
    }

    #[test]
    fn a_stopped_vcpu_thread_is_seen_stopped() {
        // A process whose thread is named like a vCPU thread.
        let mut child = std::process::Command::new("bash")
            .args(["-c", "echo -n vcpu3 > /proc/self/comm; sleep 5; true"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let pid = child.id();
        let watch = StopWatch::start(pid);
        std::thread::sleep(Duration::from_millis(20));
        let signal = |name: &str| {
            let sent = std::process::Command::new("kill").args([name, &pid.to_string()]).status().unwrap();
            assert!(sent.success());
        };
        signal("-STOP");
        std::thread::sleep(Duration::from_millis(50));
        signal("-CONT");
        std::thread::sleep(Duration::from_millis(20));
        let windows = watch.finish();
        child.kill().unwrap();
        let _ = child.wait();
        let windows: Vec<_> = windows.into_iter().filter(|w| w.vcpu.is_some()).collect();
        assert_eq!(windows.len(), 1, "{windows:?}");
        assert_eq!(windows[0].vcpu, Some(3));
        let stopped_ms = (windows[0].until_us - windows[0].from_us) / 1000;
        assert!((30..=60).contains(&stopped_ms), "{windows:?}");
    }
}
