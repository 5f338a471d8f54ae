//! The wasmtime `Engine`: allocator choice, fuel, and the one epoch ticker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch ticker advances the engine's epoch. Deadlines are
/// checked at this granularity, and a busy guest yields to other tasks this often.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Idle ticks (1 s) after which the epoch ticker parks until the next invocation.
const TICKER_LINGER_TICKS: u32 = 200;

/// Which instance allocator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AllocatorChoice {
    /// Pooling if the address space allows it, else on-demand.
    #[default]
    Auto,
    /// Pooling, or fail.
    Pooling,
    /// On-demand (mmap per instance).
    OnDemand,
}

/// The allocator an engine ended up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocator {
    /// Pre-reserved slots, reused between instances (fast, needs address space).
    Pooling,
    /// Memory mapped per instance.
    OnDemand,
}

/// Engine settings.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Allocator choice.
    pub allocator: AllocatorChoice,
    /// Count fuel (the CPU limit). Only benchmarks turn it off.
    pub fuel: bool,
    /// Instance slots in the pooling allocator: the most instances alive at once.
    pub max_instances: u32,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            allocator: AllocatorChoice::Auto,
            fuel: true,
            max_instances: 1000,
        }
    }
}

/// A wasmtime engine with its epoch ticker. Dropping it stops the ticker.
#[derive(Debug)]
pub struct HostEngine {
    engine: Engine,
    allocator: Allocator,
    fuel: bool,
    ticker: EpochTicker,
}

/// The engine's one epoch ticker. It ticks while invocations run
/// ([`EpochTicker::busy`]) and for a second after the last one, then parks,
/// so an idle host costs no CPU and a busy one never waits for it to wake.
#[derive(Debug, Clone)]
pub struct EpochTicker {
    inner: Arc<TickerInner>,
}

#[derive(Debug)]
struct TickerInner {
    active: AtomicUsize,
    stop: AtomicBool,
    thread: std::thread::Thread,
}

/// Keeps the epoch ticker running while it lives.
#[derive(Debug)]
pub struct TickerGuard {
    inner: Arc<TickerInner>,
}

impl EpochTicker {
    /// Marks an invocation as running until the guard is dropped.
    pub fn busy(&self) -> TickerGuard {
        if self.inner.active.fetch_add(1, Ordering::AcqRel) == 0 {
            self.inner.thread.unpark();
        }
        TickerGuard {
            inner: self.inner.clone(),
        }
    }
}

impl Drop for TickerGuard {
    fn drop(&mut self) {
        self.inner.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HostEngine {
    /// Builds the engine. With [`AllocatorChoice::Auto`] it first tries the
    /// pooling allocator, whose engine creation reserves the pool's address
    /// space up front; where that fails (e.g. 39-bit virtual addresses on a
    /// Raspberry Pi) it falls back to on-demand allocation and says so in the log.
    pub fn new(options: EngineOptions) -> anyhow::Result<Self> {
        let (engine, allocator) = match options.allocator {
            AllocatorChoice::OnDemand => {
                (Engine::new(&config(options, None))?, Allocator::OnDemand)
            }
            AllocatorChoice::Pooling => (
                Engine::new(&config(options, Some(pooling(options))))?,
                Allocator::Pooling,
            ),
            AllocatorChoice::Auto => match Engine::new(&config(options, Some(pooling(options)))) {
                Ok(engine) => (engine, Allocator::Pooling),
                Err(e) => {
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        "pooling allocator unavailable (address space too small?); using on-demand allocation"
                    );
                    (Engine::new(&config(options, None))?, Allocator::OnDemand)
                }
            },
        };
        tracing::info!(allocator = ?allocator, fuel = options.fuel, "engine ready");
        let ticker = spawn_epoch_ticker(engine.clone())?;
        Ok(Self {
            engine,
            allocator,
            fuel: options.fuel,
            ticker,
        })
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The allocator in use.
    pub fn allocator(&self) -> Allocator {
        self.allocator
    }

    /// Whether fuel is counted.
    pub fn fuel(&self) -> bool {
        self.fuel
    }

    /// The epoch ticker.
    pub fn ticker(&self) -> &EpochTicker {
        &self.ticker
    }
}

impl Drop for HostEngine {
    fn drop(&mut self) {
        self.ticker.inner.stop.store(true, Ordering::Release);
        self.ticker.inner.thread.unpark();
    }
}

fn config(options: EngineOptions, pool: Option<PoolingAllocationConfig>) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.consume_fuel(options.fuel);
    config.epoch_interruption(true);
    if let Some(pool) = pool {
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

fn pooling(options: EngineOptions) -> PoolingAllocationConfig {
    let n = options.max_instances;
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(n)
        // A Rust wasip2 component has a few core instances (the program and
        // small shim modules), each may have a memory and a table.
        .total_core_instances(n * 4)
        .total_memories(n)
        .total_tables(n * 4)
        .total_stacks(n)
        .max_memory_size(4 << 30)
        // Keep the first pages of each slot resident instead of returning them
        // to the kernel between instances: resetting memory was a third of
        // `wasmtime serve`'s CPU on this machine kind.
        .linear_memory_keep_resident(2 << 20)
        .table_keep_resident(64 << 10)
        .async_stack_keep_resident(2 << 20)
        .pagemap_scan(wasmtime::Enabled::Auto);
    pool
}

/// One thread per engine advances the epoch; never one per request (a ticker
/// per request cut `wasmtime serve` throughput by orders of magnitude). It
/// parks while no invocation runs.
fn spawn_epoch_ticker(engine: Engine) -> anyhow::Result<EpochTicker> {
    let (tx, rx) = std::sync::mpsc::channel::<Arc<TickerInner>>();
    let thread = std::thread::Builder::new()
        .name("wasmgate-epoch".into())
        .spawn(move || {
            let Ok(inner) = rx.recv() else { return };
            let mut idle_ticks = 0u32;
            while !inner.stop.load(Ordering::Acquire) {
                if inner.active.load(Ordering::Acquire) == 0 {
                    idle_ticks += 1;
                    // Keep ticking for a while after the last invocation, so a
                    // busy host never pays for waking this thread.
                    if idle_ticks >= TICKER_LINGER_TICKS {
                        std::thread::park();
                        idle_ticks = 0;
                        continue;
                    }
                } else {
                    idle_ticks = 0;
                }
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })?;
    let inner = Arc::new(TickerInner {
        active: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        thread: thread.thread().clone(),
    });
    let _ = tx.send(inner.clone());
    Ok(EpochTicker { inner })
}
