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
/// scheduling (passed-through requests ran 4–10% faster on one core than on a one-worker
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
    match strata::server::serve(proxy, listener, admin, strata::server::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "server failed");
            ExitCode::FAILURE
        }
    }
}
