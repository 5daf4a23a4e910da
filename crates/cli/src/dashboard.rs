//! `rask dashboard --replay FILE`: the dashboard of a finished run, from its journal.

use std::path::PathBuf;
use std::process::ExitCode;

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
    let addr = match std::net::ToSocketAddrs::to_socket_addrs(&(args.host.as_str(), args.port)) {
        Ok(mut a) => match a.next() {
            Some(a) => a,
            None => {
                eprintln!("rask dashboard: cannot resolve {}", args.host);
                return ExitCode::from(2);
            }
        },
        Err(e) => {
            eprintln!("rask dashboard: cannot resolve {}: {e}", args.host);
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
