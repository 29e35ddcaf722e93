//! A userspace UDP proxy for fault tests (QUIC is UDP): one listening socket in front of a
//! broker, and one upstream socket per source address so QUIC never sees a migration.
//! Per source port it can blackhole traffic (both directions), drop a share of datagrams
//! (seeded), or delay them. Sources are told apart by port: cluster brokers reach their
//! peers from their own endpoint, so a broker's listen port names it. Its sockets ask for
//! the same large buffers as the endpoints (`quiver_client::udp::bind_socket`), so the proxy
//! itself drops nothing but what a fault says.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What happens to traffic of one source port (both directions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkFault {
    /// Drop everything.
    pub blackhole: bool,
    /// Drop this share of datagrams, in percent.
    pub drop_pct: u8,
    /// Hold each datagram this long.
    pub delay: Duration,
}

#[derive(Default)]
struct Rules {
    faults: HashMap<u16, LinkFault>,
}

/// A running proxy; stops when dropped.
pub struct UdpProxy {
    addr: SocketAddr,
    rules: Arc<Mutex<Rules>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// A tiny deterministic generator (xorshift), so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn percent(&mut self) -> u8 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % 100) as u8
    }
}

/// A datagram held back: when to send it, its bytes, and to whom (`None`: the connected
/// upstream).
type Delayed = (Instant, Vec<u8>, Option<SocketAddr>);

/// Sends datagrams after their delay, in order.
fn delayed_sender(
    socket: Arc<UdpSocket>,
    stop: Arc<AtomicBool>,
) -> (mpsc::Sender<Delayed>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<Delayed>();
    let h = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((at, data, to)) = rx.recv_timeout(Duration::from_millis(50)) else {
                continue;
            };
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            let _ = match to {
                Some(to) => socket.send_to(&data, to),
                None => socket.send(&data),
            };
        }
    });
    (tx, h)
}

impl UdpProxy {
    /// Listens on a free 127.0.0.1 port and forwards to `target`.
    pub fn start(target: SocketAddr, seed: u64) -> UdpProxy {
        let front = Arc::new(
            quiver_client::udp::bind_socket("127.0.0.1:0".parse().unwrap()).expect("proxy socket"),
        );
        front
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = front.local_addr().unwrap();
        let rules: Arc<Mutex<Rules>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (front_delayed, h) = delayed_sender(front.clone(), stop.clone());
        threads.push(h);
        let (r, s) = (rules.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut upstreams: HashMap<SocketAddr, (Arc<UdpSocket>, mpsc::Sender<Delayed>)> =
                HashMap::new();
            let mut rng = Rng(seed | 1);
            let mut buf = vec![0u8; 65536];
            let mut reply_threads = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = front.recv_from(&mut buf) else {
                    continue;
                };
                let fault = r
                    .lock()
                    .unwrap()
                    .faults
                    .get(&from.port())
                    .copied()
                    .unwrap_or_default();
                if fault.blackhole || (fault.drop_pct > 0 && rng.percent() < fault.drop_pct) {
                    continue;
                }
                let (up, up_delayed) = upstreams.entry(from).or_insert_with(|| {
                    let up = Arc::new(
                        quiver_client::udp::bind_socket("127.0.0.1:0".parse().unwrap())
                            .expect("upstream socket"),
                    );
                    up.connect(target).unwrap();
                    up.set_read_timeout(Some(Duration::from_millis(50)))
                        .unwrap();
                    let (delayed, h) = delayed_sender(up.clone(), s.clone());
                    reply_threads.push(h);
                    // Replies from the broker go back to `from`, under the same rules.
                    let (up2, front2, r2, s2, fd) = (
                        up.clone(),
                        front.clone(),
                        r.clone(),
                        s.clone(),
                        front_delayed.clone(),
                    );
                    reply_threads.push(std::thread::spawn(move || {
                        let mut rng = Rng(seed.rotate_left(17) | 1);
                        let mut buf = vec![0u8; 65536];
                        while !s2.load(Ordering::Relaxed) {
                            let Ok(n) = up2.recv(&mut buf) else { continue };
                            let fault = r2
                                .lock()
                                .unwrap()
                                .faults
                                .get(&from.port())
                                .copied()
                                .unwrap_or_default();
                            if fault.blackhole
                                || (fault.drop_pct > 0 && rng.percent() < fault.drop_pct)
                            {
                                continue;
                            }
                            if fault.delay.is_zero() {
                                let _ = front2.send_to(&buf[..n], from);
                            } else {
                                let _ = fd.send((
                                    Instant::now() + fault.delay,
                                    buf[..n].to_vec(),
                                    Some(from),
                                ));
                            }
                        }
                    }));
                    (up, delayed)
                });
                if fault.delay.is_zero() {
                    let _ = up.send(&buf[..n]);
                } else {
                    let _ =
                        up_delayed.send((Instant::now() + fault.delay, buf[..n].to_vec(), None));
                }
            }
            for h in reply_threads {
                let _ = h.join();
            }
        }));
        UdpProxy {
            addr,
            rules,
            stop,
            threads,
        }
    }

    /// Where clients and peers reach the broker behind it.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Applies `fault` to traffic from (and back to) these source ports.
    pub fn set(&self, ports: &HashSet<u16>, fault: LinkFault) {
        let mut r = self.rules.lock().unwrap();
        for p in ports {
            if fault == LinkFault::default() {
                r.faults.remove(p);
            } else {
                r.faults.insert(*p, fault);
            }
        }
    }

    /// Removes every fault.
    pub fn heal(&self) {
        self.rules.lock().unwrap().faults.clear();
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

#[test]
fn the_proxy_forwards_and_blackholes_by_source_port() {
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    server
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let proxy = UdpProxy::start(server.local_addr().unwrap(), 7);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let echo = |server: &UdpSocket| {
        let mut b = [0u8; 16];
        let (n, from) = server
            .recv_from(&mut b)
            .expect("datagram through the proxy");
        server.send_to(&b[..n], from).unwrap();
    };
    client.send_to(b"ping", proxy.addr()).unwrap();
    echo(&server);
    let mut b = [0u8; 16];
    let (n, _) = client.recv_from(&mut b).expect("reply through the proxy");
    assert_eq!(&b[..n], b"ping");
    let me = HashSet::from([client.local_addr().unwrap().port()]);
    proxy.set(
        &me,
        LinkFault {
            blackhole: true,
            ..LinkFault::default()
        },
    );
    client.send_to(b"lost", proxy.addr()).unwrap();
    let mut b = [0u8; 16];
    assert!(
        server.recv_from(&mut b).is_err(),
        "a blackholed source reaches nobody"
    );
    proxy.heal();
    client.send_to(b"back", proxy.addr()).unwrap();
    echo(&server);
    assert!(client.recv_from(&mut b).is_ok());
}
