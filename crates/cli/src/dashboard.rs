//! `rask dashboard --replay FILE`: the dashboard of a finished run, from its journal.

use std::path::PathBuf;
use std::process::ExitCode;

/// The dashboard's default port (Dask's).
pub(crate) const DASHBOARD_PORT: u16 = 8787;

/// The address of `host:port` (a name or an IP literal), for the HTTP listeners.
///
/// # Errors
/// Naming the host, when it does not resolve.
pub(crate) fn resolve(host: &str, port: u16) -> Result<std::net::SocketAddr, String> {
    match std::net::ToSocketAddrs::to_socket_addrs(&(host, port)) {
        Ok(mut a) => a.next().ok_or_else(|| format!("cannot resolve {host}: no address")),
        Err(e) => Err(format!("cannot resolve {host}: {e}")),
    }
}

/// Starts a dashboard (serving on `listen`, if given) and/or a journal, fed by the returned
/// sender. `any_port_if_busy`: the port was not chosen by the user, so when it is taken (another
/// scheduler on this machine) any free port will do.
pub(crate) fn observe(
    listen: Option<std::net::SocketAddr>,
    any_port_if_busy: bool,
    journal: Option<PathBuf>,
) -> Result<(rask_dashboard::Dashboard, rask_runtime::feed::FeedSender), String> {
    let attempt = |listen: Option<std::net::SocketAddr>| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cfg = rask_dashboard::DashboardConfig { listen, journal: journal.clone() };
        rask_dashboard::start(&cfg, rx).map(|d| (d, tx))
    };
    match attempt(listen) {
        Ok(d) => Ok(d),
        Err(rask_dashboard::DashboardError::Bind(..)) if any_port_if_busy => {
            let any = listen.map(|a| std::net::SocketAddr::new(a.ip(), 0));
            attempt(any).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Arguments of `rask dashboard`.
#[derive(clap::Args)]
pub(crate) struct DashboardArgs {
    /// A journal written by `rask scheduler --journal FILE`.
    #[arg(long, value_name = "FILE")]
    replay: PathBuf,
    /// Interface to serve on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to serve on (0: any free port).
    #[arg(long, default_value_t = 8787)]
    port: u16,
    /// Instead of serving, write the run's standalone HTML report to this file and exit.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

pub(crate) fn dashboard(args: &DashboardArgs) -> ExitCode {
    if let Some(out) = &args.report {
        let mut model = match rask_dashboard::load_journal(&args.replay) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("rask dashboard: {e}");
                return ExitCode::from(2);
            }
        };
        return match std::fs::write(out, rask_dashboard::report(&mut model)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rask dashboard: cannot write {}: {e}", out.display());
                ExitCode::FAILURE
            }
        };
    }
    let addr = match resolve(&args.host, args.port) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("rask dashboard: {e}");
            return ExitCode::from(2);
        }
    };
    let d = match rask_dashboard::replay(&args.replay, addr) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("rask dashboard: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(a) = d.address {
        // On standard output, like the scheduler's address, for scripts.
        println!("http://{a}/");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    eprintln!("rask dashboard: replaying {}; Ctrl-C to stop", args.replay.display());
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rask dashboard: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(crate::cluster::signalled());
    ExitCode::SUCCESS
}
