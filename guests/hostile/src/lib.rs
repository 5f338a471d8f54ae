//! `hostile`: misbehaves on request, to prove the host's limits hold.
//!
//! The topic names the behaviour; the payload is its argument:
//!
//! | topic            | does                                                        |
//! |------------------|-------------------------------------------------------------|
//! | `ok`             | returns `ok`                                                |
//! | `loop`           | spins forever (fuel or the deadline must stop it)           |
//! | `spin`           | a deterministic compute loop of `payload` rounds, then `ok` |
//! | `sort`           | sorts `payload` pseudo-random numbers (branchy compute), then `ok` |
//! | `memory-bomb`    | allocates 1 MiB blocks until refused                        |
//! | `stack-overflow` | unbounded recursion                                         |
//! | `trap`           | executes `unreachable`                                      |
//! | `panic`          | panics with a message                                       |
//! | `log-flood`      | writes `payload` MiB (default 16) to stdout and stderr      |
//! | `read-file`      | reads the host file named by the payload                    |
//! | `open-socket`    | opens a TCP connection to the address in the payload        |
//! | `sleep`          | sleeps `payload` milliseconds in a host call                |
//! | `publish-flood`  | publishes `payload` (default 200) messages of 1,000,000 bytes to `flood/N`, ignoring refusals, and prints how many went through |
//! | `reply-retained` | replies on the response topic with the retain flag set      |
//! | `retry`/`reject` | returns that handler error with the payload as message      |

wasmgate_guest::bindings!("mqtt-app");

use exports::wasmgate::edge::mqtt_handler::Guest;
use std::hint::black_box;
use std::io::Write;
use wasmgate::edge::mqtt_types::Message;
use wasmgate::edge::types::{HandlerError, Invocation};

struct Hostile;

fn arg(msg: &Message) -> String {
    String::from_utf8_lossy(&msg.payload).into_owned()
}

#[allow(unconditional_recursion)] // the point of this behaviour
fn recurse(depth: u64, pad: [u8; 64]) -> u64 {
    let mut local = pad;
    local[(depth % 64) as usize] = depth as u8;
    black_box(&mut local);
    recurse(depth + 1, local) + local[0] as u64
}

impl Guest for Hostile {
    fn handle_message(_ctx: Invocation, msg: Message) -> Result<(), HandlerError> {
        match msg.topic.as_str() {
            "ok" => Ok(()),
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = black_box(x.wrapping_add(1));
                }
            }
            "spin" => {
                let rounds: u64 = arg(&msg).trim().parse().unwrap_or(1_000_000);
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for i in 0..rounds {
                    h ^= i;
                    h = h.wrapping_mul(0x0100_0000_01b3);
                }
                println!("spin rounds={rounds} hash={h:016x}");
                Ok(())
            }
            "sort" => {
                let n: usize = arg(&msg).trim().parse().unwrap_or(100_000);
                let mut x: u32 = 2_463_534_242;
                let mut v: Vec<u32> = (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x
                    })
                    .collect();
                v.sort_unstable();
                println!("sort n={n} min={} max={}", v[0], v[n - 1]);
                Ok(())
            }
            "memory-bomb" => {
                let mut blocks: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut block = vec![0u8; 1 << 20];
                    block[0] = blocks.len() as u8;
                    blocks.push(black_box(block));
                }
            }
            "stack-overflow" => {
                let n = recurse(0, [1; 64]);
                println!("unreachable: {n}");
                Ok(())
            }
            "trap" => {
                #[cfg(target_family = "wasm")]
                core::arch::wasm32::unreachable();
                #[cfg(not(target_family = "wasm"))]
                std::process::abort();
            }
            "panic" => panic!("hostile guest panics on purpose"),
            "log-flood" => {
                let mib: usize = arg(&msg).trim().parse().unwrap_or(16);
                let line = [b'x'; 1023];
                let mut out = std::io::stdout().lock();
                let mut err = std::io::stderr().lock();
                for _ in 0..mib * 1024 {
                    let _ = out.write_all(&line);
                    let _ = out.write_all(b"\n");
                    let _ = err.write_all(&line);
                    let _ = err.write_all(b"\n");
                }
                Ok(())
            }
            "read-file" => match std::fs::read(arg(&msg)) {
                Ok(bytes) => {
                    println!("read {} bytes", bytes.len());
                    Ok(())
                }
                Err(e) => Err(HandlerError::Reject(format!("read-file denied: {e}"))),
            },
            "open-socket" => match std::net::TcpStream::connect(arg(&msg)) {
                Ok(_) => {
                    println!("connected");
                    Ok(())
                }
                Err(e) => Err(HandlerError::Reject(format!("open-socket denied: {e}"))),
            },
            "sleep" => {
                let ms: u64 = arg(&msg).trim().parse().unwrap_or(60_000);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(())
            }
            "publish-flood" => {
                let n: u32 = arg(&msg).trim().parse().unwrap_or(200);
                let payload = vec![b'x'; 1_000_000];
                let (mut ok, mut refused, mut last) = (0, 0, String::new());
                for i in 0..n {
                    let out = Message {
                        topic: format!("flood/{i}"),
                        payload: payload.clone(),
                        qos: msg.qos,
                        retain: false,
                        content_type: None,
                        response_topic: None,
                        correlation_data: None,
                        user_properties: Vec::new(),
                    };
                    match wasmgate::edge::mqtt_publisher::publish(&out) {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            refused += 1;
                            last = format!("{e:?}");
                        }
                    }
                }
                println!("publish-flood ok={ok} refused={refused} last={last}");
                Ok(())
            }
            "reply-retained" => {
                let reply = Message {
                    topic: msg.response_topic.clone().unwrap_or_default(),
                    retain: true,
                    response_topic: None,
                    ..msg
                };
                wasmgate::edge::mqtt_publisher::publish(&reply)
                    .map_err(|e| HandlerError::Reject(format!("{e:?}")))
            }
            "retry" => Err(HandlerError::Retry(arg(&msg))),
            "reject" => Err(HandlerError::Reject(arg(&msg))),
            other => Err(HandlerError::Reject(format!("unknown behaviour {other:?}"))),
        }
    }
}

export!(Hostile);
