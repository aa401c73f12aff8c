//! A TCP relay from inside a network namespace to a loopback address of the root namespace, so
//! that an agent running in a lab namespace reaches a manager listening on the host's
//! `127.0.0.1` (which no lab namespace can reach: each has its own loopback). The listening
//! socket is created on a thread that entered the namespace (a socket belongs to the namespace
//! it was created in, see [`crate::probe`]); the upstream sockets are created by this process's
//! other threads, in the root namespace. Both ends are loopback: no route, no forwarding.
//!
//! Dropping the relay stops accepting and cuts every relayed connection, which is how a test
//! makes the manager unreachable without stopping it; [`Relay::start`] again brings it back on
//! the same port.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::probe::in_netns;

/// A running relay.
pub struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on `127.0.0.1:port` inside namespace `ns` (port 0: any free one) and relays
    /// every connection to `upstream`.
    pub fn start(ns: &str, port: u16, upstream: SocketAddr) -> Result<Self> {
        let listener = in_netns(ns, || TcpListener::bind((Ipv4Addr::LOCALHOST, port)))?
            .with_context(|| format!("listening on 127.0.0.1:{port} in {ns}"))?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (s, c) = (Arc::clone(&stop), Arc::clone(&conns));
        let accept = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((down, _)) => {
                        if relay(down, upstream, &c).is_err() {
                            continue;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            conns,
            accept: Some(accept),
        })
    }

    /// The address to connect to, inside the namespace.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Connects `down` to `upstream` with a copying thread per direction.
fn relay(down: TcpStream, upstream: SocketAddr, conns: &Mutex<Vec<TcpStream>>) -> io::Result<()> {
    down.set_nonblocking(false)?;
    let up = match TcpStream::connect_timeout(&upstream, Duration::from_secs(2)) {
        Ok(up) => up,
        Err(e) => {
            // Upstream down: the client sees its connection closed, as with a dead server.
            let _ = down.shutdown(Shutdown::Both);
            return Err(e);
        }
    };
    down.set_nodelay(true)?;
    up.set_nodelay(true)?;
    if let Ok(mut list) = conns.lock() {
        list.push(down.try_clone()?);
        list.push(up.try_clone()?);
    }
    for (mut from, mut to) in [(down.try_clone()?, up.try_clone()?), (up, down)] {
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        });
    }
    Ok(())
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        if let Ok(list) = self.conns.lock() {
            for c in list.iter() {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }
}
