//! A UDP flooder that runs inside a lab namespace: pktgen is not built into this kernel, so
//! small datagrams are pushed with `sendmmsg(2)` batches from threads that entered the
//! attacker's namespace.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Barrier,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};

use crate::netns::enter_netns;

/// Datagrams per `sendmmsg` call.
const BATCH: usize = 64;
/// Datagrams per call in a paced flood, for an even rate.
const PACED_BATCH: usize = 8;

/// UDP payload bytes: with 14 + 20 + 8 bytes of headers the frame is 60 bytes, the Ethernet
/// minimum (64 with the FCS), as in the usual packets-per-second benchmarks.
pub const PAYLOAD: usize = 18;

/// What a flood did.
#[derive(Debug, Clone, Copy)]
pub struct FloodReport {
    /// Datagrams the kernel accepted from the flooder.
    pub sent: u64,
    /// `sendmmsg` calls that failed (e.g. `ENOBUFS`); the flood goes on after them.
    pub errors: u64,
    /// How long the threads were sending (the longest of them).
    pub elapsed: Duration,
}

impl FloodReport {
    /// Datagrams per second offered.
    pub fn offered_per_second(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A UDP flood from the attacker's namespace.
#[derive(Debug, Clone, Copy)]
pub struct Flood<'a> {
    /// The namespace to send from (a name under /run/netns).
    pub ns: &'a str,
    /// The source address (the port is chosen by the kernel, one per thread).
    pub src: Ipv4Addr,
    /// Where to send.
    pub dst: SocketAddrV4,
    /// Sending threads.
    pub threads: usize,
    /// Packets per second over all threads, or `None` for as fast as possible.
    pub rate: Option<f64>,
}

impl Flood<'_> {
    /// Floods for `duration`, or until `stop` is set. Blocks until done.
    pub fn run(&self, duration: Duration, stop: &AtomicBool) -> Result<FloodReport> {
        let barrier = Barrier::new(self.threads);
        let reports: Vec<Result<FloodReport>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..self.threads)
                .map(|_| s.spawn(|| self.sender(duration, stop, &barrier)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow!("flooder thread panicked"))?)
                .collect()
        });
        let mut total = FloodReport {
            sent: 0,
            errors: 0,
            elapsed: Duration::ZERO,
        };
        for r in reports {
            let r = r?;
            total.sent += r.sent;
            total.errors += r.errors;
            total.elapsed = total.elapsed.max(r.elapsed);
        }
        Ok(total)
    }

    fn sender(
        &self,
        duration: Duration,
        stop: &AtomicBool,
        barrier: &Barrier,
    ) -> Result<FloodReport> {
        let (ns, src, dst) = (self.ns, self.src, self.dst);
        // Set up before the barrier so that every thread starts sending at the same moment; a
        // failing thread still waits there, or the others would wait for it forever.
        let socket = enter_netns(ns).and_then(|()| {
            let socket = UdpSocket::bind((src, 0)).with_context(|| format!("binding {src}:0"))?;
            // Connected: the kernel caches the route and the batch needs no addresses.
            socket
                .connect(dst)
                .with_context(|| format!("connecting to {dst}"))?;
            Ok(socket)
        });
        barrier.wait();
        let socket = socket?;

        let mut payload = [0u8; PAYLOAD];
        // SAFETY: `iovec` and `mmsghdr` are plain C structs for which all-zero is a valid value.
        let mut iov: libc::iovec = unsafe { std::mem::zeroed() };
        iov.iov_base = payload.as_mut_ptr().cast();
        iov.iov_len = payload.len();
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for m in &mut msgs {
            // Every message points at the same iovec: the kernel only reads it.
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
        }

        // Paced floods send small batches on a schedule; the others send full batches back to
        // back.
        let per_thread = self.rate.map(|r| r / self.threads as f64);
        let batch = if per_thread.is_some() {
            PACED_BATCH
        } else {
            BATCH
        };
        let fd = socket.as_raw_fd();
        let start = Instant::now();
        let mut report = FloodReport {
            sent: 0,
            errors: 0,
            elapsed: Duration::ZERO,
        };
        while start.elapsed() < duration && !stop.load(Ordering::Relaxed) {
            if let Some(rate) = per_thread {
                let due = start + Duration::from_secs_f64(report.sent as f64 / rate);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                    continue;
                }
            }
            // SAFETY: `fd` is an open socket owned by `socket`, which outlives the call; `msgs`
            // holds BATCH (>= `batch`) initialised headers whose iovec and buffer outlive the call.
            let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), batch as libc::c_uint, 0) };
            if n > 0 {
                report.sent += n as u64;
            } else {
                report.errors += 1;
            }
        }
        report.elapsed = start.elapsed();
        Ok(report)
    }
}
