//! The `strata` binary: parse configuration, start logging, serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use strata::config::{Config, RawArgs};

/// Exit status for unusable configuration (as clap uses for usage errors).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let raw = RawArgs::parse();
    let log_filter = raw.rust_log.clone();
    let config = match Config::from_raw(raw) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("strata: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    strata::telemetry::init(config.log_format, &log_filter);
    let runtime = match runtime_for(config.worker_threads).enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("strata: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(config));
    drop(runtime);
    // Log lines are written in batches: the last ones go out before the process does.
    strata::telemetry::flush();
    code
}

/// The runtime for `WORKER_THREADS` (`None`: one thread per CPU this process may use).
///
/// One thread gets tokio's current-thread scheduler: the accept loop, connections, origin and Redis
/// clients then wake each other on one thread's queue, with no cross-thread handoff or atomic
/// scheduling (passed-through requests ran 0–17%, median 8%, faster on one core than on a one-worker
/// multi-thread runtime, whose accept loop also runs on a second thread). Blocking work (codec of
/// large values) still goes to the blocking pool either way.
fn runtime_for(worker_threads: Option<usize>) -> tokio::runtime::Builder {
    let threads = worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    if threads <= 1 {
        return tokio::runtime::Builder::new_current_thread();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(threads);
    builder
}

async fn run(config: Config) -> ExitCode {
    // First, so that a SIGTERM from here on stops Strata rather than kills it.
    let signals = strata::server::stop_signals();
    let listener = match tokio::net::TcpListener::bind(config.listen_addr).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(addr = %config.listen_addr, %error, "cannot bind LISTEN_ADDR");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let admin = match tokio::net::TcpListener::bind(config.admin_addr).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(addr = %config.admin_addr, %error, "cannot bind ADMIN_ADDR");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let proxy = match strata::Proxy::new(config) {
        Ok(proxy) => proxy,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    // A second SIGTERM/SIGINT while draining (an impatient operator, Ctrl-C twice) ends the drain:
    // the remaining connections close at once, as they would at SHUTDOWN_TIMEOUT.
    let shutdown = strata::server::signalled(signals.clone(), 1);
    let second_signal = strata::server::signalled(signals, 2);
    tokio::select! {
        served = strata::server::serve(proxy, listener, admin, shutdown) => match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(%error, "server failed");
                ExitCode::FAILURE
            }
        },
        () = second_signal => {
            tracing::warn!("second stop signal: closing the remaining connections now");
            ExitCode::SUCCESS
        }
    }
}
