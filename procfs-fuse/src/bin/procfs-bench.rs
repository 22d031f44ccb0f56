//! Open+read+close loop over one file with N threads for S seconds; prints reads/s.
//! Usage: procfs-bench FILE THREADS SECONDS

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(file), Some(threads), Some(secs)) = (args.get(1), args.get(2), args.get(3)) else {
        return Err("usage: procfs-bench FILE THREADS SECONDS".into());
    };
    let threads: usize = threads.parse()?;
    let secs: f64 = secs.parse()?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (file, stop, count, errors) =
                (file.clone(), stop.clone(), count.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut buf = Vec::with_capacity(16384);
                while !stop.load(Ordering::Relaxed) {
                    buf.clear();
                    match std::fs::File::open(&file).and_then(|mut f| f.read_to_end(&mut buf)) {
                        Ok(_) => count.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let el = start.elapsed().as_secs_f64();
    println!(
        "{:.0} {}",
        count.load(Ordering::Relaxed) as f64 / el,
        errors.load(Ordering::Relaxed)
    );
    Ok(())
}
