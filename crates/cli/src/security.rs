//! The TLS flags every networked command shares, and `rask dev-certs`, which makes a certificate
//! set to try them with.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rask_protocol::tls::{Tls, TlsFiles, set_process_tls};

/// `--tls-cert/--tls-key/--tls-ca`: all three turn on mutual TLS for every connection the process
/// makes or accepts; none leaves it to the `RASK_TLS_*` environment variables.
#[derive(clap::Args, Clone, Debug, Default)]
pub(crate) struct TlsArgs {
    /// This process's certificate (PEM), signed by the cluster CA [env: RASK_TLS_CERT].
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM) [env: RASK_TLS_KEY].
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): peers must present a certificate it signed [env: RASK_TLS_CA].
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// Whether any of the flags was given.
    pub(crate) fn given(&self) -> bool {
        self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_ca.is_some()
    }

    /// Loads the flags' files (else the environment's) and makes them this process's TLS
    /// configuration, failing fast on a bad file rather than at the first connection. Returns
    /// the files, as absolute paths, for child processes.
    ///
    /// # Errors
    /// Prints why (naming the flag or file) and returns the exit status for bad usage.
    pub(crate) fn apply(&self, who: &str) -> Result<Option<TlsFiles>, ExitCode> {
        let files = if self.given() {
            TlsFiles::from_parts(
                self.tls_cert.clone(),
                self.tls_key.clone(),
                self.tls_ca.clone(),
                &["--tls-cert", "--tls-key", "--tls-ca"],
            )
        } else {
            TlsFiles::from_env()
        };
        let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        let loaded = files.and_then(|f| {
            f.map(|f| TlsFiles { cert: absolute(f.cert), key: absolute(f.key), ca: absolute(f.ca) })
                .map(Tls::load)
                .transpose()
        });
        match loaded {
            Ok(tls) => {
                let files = tls.as_ref().map(|t| t.files().clone());
                set_process_tls(tls);
                Ok(files)
            }
            Err(e) => {
                eprintln!("{who}: {e}");
                Err(ExitCode::from(2))
            }
        }
    }
}

/// Arguments of `rask dev-certs`.
#[derive(clap::Args)]
pub(crate) struct DevCertsArgs {
    /// Directory to write `ca.pem`, `ca-key.pem`, `node.pem` and `node-key.pem` to (created if
    /// missing; existing files are not overwritten).
    dir: PathBuf,
    /// Extra host names or IP addresses for the node certificate (besides localhost,
    /// 127.0.0.1 and ::1). rask checks the CA, not names, but other TLS tools may check them.
    #[arg(long = "host", value_name = "NAME")]
    hosts: Vec<String>,
    /// Days the certificates stay valid.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
    days: u32,
}

/// The files `rask dev-certs` writes, with whether each is secret.
const DEV_FILES: [(&str, bool); 4] =
    [("ca.pem", false), ("ca-key.pem", true), ("node.pem", false), ("node-key.pem", true)];

/// `rask dev-certs`: a CA and one node certificate it signs, good for every process of a test
/// cluster (the same certificate serves as server and client certificate).
pub(crate) fn dev_certs(args: &DevCertsArgs) -> ExitCode {
    match write_dev_certs(args) {
        Ok(()) => {
            let d = args.dir.display();
            println!("wrote a development certificate set to {d} (valid {} days; not for production)", args.days);
            println!("start the scheduler, workers and clients with:");
            println!("  --tls-ca {d}/ca.pem --tls-cert {d}/node.pem --tls-key {d}/node-key.pem");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rask dev-certs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_dev_certs(args: &DevCertsArgs) -> Result<(), String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
    for (name, _) in DEV_FILES {
        let p = args.dir.join(name);
        if p.exists() {
            return Err(format!("{} already exists; remove it or choose another directory", p.display()));
        }
    }
    let now = time::OffsetDateTime::now_utc();
    // A day of slack for clocks that disagree a little.
    let not_before = now - time::Duration::days(1);
    let not_after = now + time::Duration::days(i64::from(args.days));
    fn err(what: &'static str) -> impl Fn(rcgen::Error) -> String {
        move |e| format!("cannot make the {what}: {e}")
    }

    let ca_key = KeyPair::generate().map_err(err("CA key"))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err("CA certificate"))?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // A distinct name per set, so a peer of another set is reported as signed by an unknown CA.
    let id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    ca.distinguished_name
        .push(DnType::CommonName, format!("rask development CA {:x}", id ^ u128::from(std::process::id())));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca.self_signed(&ca_key).map_err(err("CA certificate"))?;

    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    names.extend(args.hosts.iter().cloned());
    let node_key = KeyPair::generate().map_err(err("node key"))?;
    let mut node = CertificateParams::new(names).map_err(err("node certificate"))?;
    node.distinguished_name.push(DnType::CommonName, "rask node");
    node.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    node.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    node.use_authority_key_identifier_extension = true;
    node.not_before = not_before;
    node.not_after = not_after;
    let node_cert = node.signed_by(&node_key, &ca_cert, &ca_key).map_err(err("node certificate"))?;

    create_private_dir(&args.dir)?;
    let contents = [ca_cert.pem(), ca_key.serialize_pem(), node_cert.pem(), node_key.serialize_pem()];
    for ((name, secret), text) in DEV_FILES.iter().zip(contents) {
        write_new(&args.dir.join(name), text.as_bytes(), *secret)?;
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// Writes a file that must not exist yet; keys are readable by their owner only.
fn write_new(path: &Path, bytes: &[u8], secret: bool) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}
