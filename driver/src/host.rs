//! Host settings that fat containers need in numbers: every systemd inside takes several
//! inotify instances, and the kernel default (128 per user, and all containers are root)
//! stops boots at about 20 instances with "Too many open files".

use std::path::Path;

const SETTINGS: [(&str, u64); 2] = [
    ("/proc/sys/fs/inotify/max_user_instances", 8192),
    ("/proc/sys/fs/inotify/max_user_watches", 1_048_576),
];

/// Raises the limits that are lower than what fatbox needs (never lowers one).
pub fn tune() {
    for (path, want) in SETTINGS {
        let p = Path::new(path);
        let cur = std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        match cur {
            Some(c) if c >= want => {}
            _ => match std::fs::write(p, want.to_string()) {
                Ok(()) => tracing::info!(path, from = ?cur, to = want, "raised host limit"),
                Err(e) => tracing::warn!(path, error = %e, "cannot raise host limit"),
            },
        }
    }
}
