//! `hostile`: a processor that misbehaves when a record's value asks it to. Not an example to
//! follow: the plugin host's tests use it to check that each limit stops the call and that
//! the next call runs on a fresh instance.
//!
//! | value     | behaviour                                              |
//! |-----------|--------------------------------------------------------|
//! | `loop`    | spins forever (CPU limit)                              |
//! | `spin:N`  | spins N rounds, then passes the record through         |
//! | `alloc`   | allocates 1 MiB blocks until refused (memory limit)    |
//! | `recurse` | unbounded recursion (stack limit)                      |
//! | `big:N`   | returns N copies of a 64 KiB record (output limit)     |
//! | `panic`   | panics (trap)                                          |
//! | `print`   | writes to stdout through WASI (a trap stub)            |
//! | `remember`| stores a secret in memory                              |
//! | `recall`  | returns what `remember` stored, or `nothing`           |
//! | other     | passes the record through                              |

use std::hint::black_box;
use std::sync::Mutex;

use quiver_plugin_sdk::{processor, Output, Record};

static SECRET: Mutex<Option<Vec<u8>>> = Mutex::new(None);

#[processor]
fn process(mut record: Record) -> Output {
    match record.value.as_slice() {
        b"loop" => {
            let mut i = 0u64;
            loop {
                i = black_box(i.wrapping_add(1));
            }
        }
        b"alloc" => {
            let mut blocks = Vec::new();
            loop {
                blocks.push(black_box(vec![7u8; 1 << 20]));
            }
        }
        b"recurse" => {
            record.value = recurse(black_box(1)).to_le_bytes().to_vec();
            record.into()
        }
        b"panic" => panic!("asked to panic"),
        b"print" => {
            println!("hello from a plugin");
            record.into()
        }
        b"remember" => {
            *SECRET.lock().unwrap_or_else(|p| p.into_inner()) = Some(b"s3cr3t".to_vec());
            record.into()
        }
        b"recall" => {
            record.value = SECRET
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(|| b"nothing".to_vec());
            record.into()
        }
        v if v.starts_with(b"spin:") => {
            let rounds: u64 = std::str::from_utf8(&v[5..])
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let mut x = 0u64;
            for i in 0..rounds {
                x = black_box(x.wrapping_add(i));
            }
            black_box(x);
            record.into()
        }
        v if v.starts_with(b"big:") => {
            let n: usize = std::str::from_utf8(&v[4..])
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let big = Record {
                value: vec![b'x'; 64 * 1024],
                ..record
            };
            Output::Many(vec![big; n])
        }
        _ => record.into(),
    }
}

#[inline(never)]
fn recurse(n: u64) -> u64 {
    if black_box(n) == 0 {
        return 1;
    }
    recurse(n.wrapping_add(1)).wrapping_mul(3).wrapping_add(n)
}
