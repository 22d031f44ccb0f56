//! Cheap per-container load averages: every interval, count the container's threads in
//! state R or D (as the kernel does) and fold the count into three exponential averages.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::registry::{Entry, Registry};

/// Count (running-or-uninterruptible, running, total) threads of the entry's cgroup.
fn count(reg: &Registry, e: &Entry) -> Option<(u32, u32, u32)> {
    let tids = reg.hierarchy().backend().threads(&e.record.cgroup).ok()?;
    let (mut active, mut running, mut total) = (0u32, 0u32, 0u32);
    for t in tids {
        let Ok(s) = std::fs::read_to_string(format!("/proc/{t}/stat")) else {
            continue;
        };
        let state = s
            .rfind(')')
            .and_then(|i| s.get(i.saturating_add(1)..))
            .and_then(|r| r.split_whitespace().next());
        total = total.saturating_add(1);
        match state {
            Some("R") => {
                running = running.saturating_add(1);
                active = active.saturating_add(1);
            }
            Some("D") => active = active.saturating_add(1),
            _ => {}
        }
    }
    Some((active, running, total))
}

/// One sampling step for every registered container.
pub fn sample_all(reg: &Registry, interval: Duration) {
    let secs = interval.as_secs_f64().max(0.001);
    let decay = [
        (-secs / 60.0).exp(),
        (-secs / 300.0).exp(),
        (-secs / 900.0).exp(),
    ];
    for e in reg.entries() {
        let Some((active, running, total)) = count(reg, &e) else {
            continue;
        };
        let Ok(mut l) = e.load.lock() else { continue };
        let mut cur = l.unwrap_or_default();
        for (a, d) in cur.avg.iter_mut().zip(decay) {
            *a = *a * d + f64::from(active) * (1.0 - d);
        }
        cur.running = running;
        cur.total = total;
        *l = Some(cur);
    }
}

/// Run the sampler in a thread until `stop` is set.
pub fn spawn(
    reg: Arc<Registry>,
    interval: Duration,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("loadavg".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                sample_all(&reg, interval);
                std::thread::park_timeout(interval);
            }
        })
}
