//! The `thinghub` command line: `serve` runs the server; `audit` prints a Thing's history;
//! `check` verifies a data directory; `certs init` writes certificates to try TLS with.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use thinghub::config::{Config, LogFormat, ServeArgs};

/// mimalloc: glibc malloc's arena contention was a third of CPU under load (perf), and it
/// holds freed memory back from the OS.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "thinghub",
    version,
    about = "A single-binary IoT device-fleet server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (admin key from THINGHUB_ADMIN_KEY=key:secret, else generated once).
    Serve(Box<ServeArgs>),
    /// Print a Thing's full history from the data directory (server stopped).
    Audit {
        /// The Thing's name.
        thing: String,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// TOML configuration file (for its data_dir).
        #[arg(long, env = "THINGHUB_CONFIG")]
        config: Option<PathBuf>,
        /// Database directory [default: ./data].
        #[arg(long, env = "THINGHUB_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Verify a data directory (server stopped): decode every record and replay every Thing
    /// against its snapshot and indexes. Exit status 0: no problems; 1: problems (printed);
    /// 2: the check could not run.
    Check {
        /// TOML configuration file (for its data_dir).
        #[arg(long, env = "THINGHUB_CONFIG")]
        config: Option<PathBuf>,
        /// Database directory [default: ./data].
        #[arg(long, env = "THINGHUB_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Where to copy the database before opening it [default: the system temp dir]. It
        /// needs as much free space as the database takes.
        #[arg(long)]
        scratch_dir: Option<PathBuf>,
        /// Open the data directory itself, without a copy (sled then replays and rewrites its
        /// files as a server start would).
        #[arg(long)]
        in_place: bool,
    },
    /// Certificates for TLS.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Write a local CA, a server certificate for --hosts and one device certificate (its CN
    /// is --device), to try TLS and client certificates in a minute. Not for production: the
    /// CA key sits beside the certificates.
    Init {
        /// Directory to write ca.pem/.key, server.pem/.key and device.pem/.key into (never
        /// overwritten).
        #[arg(long, default_value = "./certs")]
        dir: PathBuf,
        /// Host names and IP addresses the server certificate is for, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        hosts: Vec<String>,
        /// The Thing the device certificate is for (its subject CN and DNS SAN).
        #[arg(long, default_value = "device-1")]
        device: String,
    },
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The configuration of a command that works on a stopped server's data directory.
fn offline_config(config: Option<PathBuf>, data_dir: Option<PathBuf>) -> Result<Config, ExitCode> {
    let args = ServeArgs {
        config,
        data_dir,
        ..ServeArgs::default()
    };
    Config::load(&args).map_err(|e| {
        eprintln!("thinghub: {e}");
        ExitCode::from(2)
    })
}

/// What `certs init` wrote, and how to use it.
fn write_init_report(
    out: &mut impl std::io::Write,
    dir: &std::path::Path,
    device: &str,
    report: &thinghub::tls::InitReport,
) -> std::io::Result<()> {
    for file in &report.files {
        writeln!(out, "wrote {}", file.display())?;
    }
    let d = dir.display();
    writeln!(out)?;
    writeln!(
        out,
        "Serve MQTT over TLS and HTTPS with device certificates:"
    )?;
    writeln!(
        out,
        "  thinghub serve --mqtt-tls-listen 0.0.0.0:8883 --http-tls-listen 0.0.0.0:8443 \\\n    \
         --tls-cert-file {d}/server.pem --tls-key-file {d}/server.key \\\n    \
         --tls-client-ca-file {d}/ca.pem --tls-client-auth optional"
    )?;
    writeln!(
        out,
        "Register the device certificate for its Thing '{device}':"
    )?;
    writeln!(
        out,
        "  curl -X POST https://localhost:8443/api/v1/things/{device}/certificates --cacert {d}/ca.pem \\\n    \
         -u <key>:<secret> -H 'content-type: application/json' \\\n    \
         -d '{{\"fingerprint\": \"{}\"}}'",
        report.device_fingerprint
    )?;
    writeln!(
        out,
        "Connect as the device (-i: the Thing's mqttClientId, its name unless set otherwise):"
    )?;
    writeln!(
        out,
        "  mosquitto_pub -h localhost -p 8883 --cafile {d}/ca.pem --cert {d}/device.pem --key {d}/device.key \\\n    \
         -i {device} -t '$emqx/things/{device}/shadow/update' -m '{{\"state\":{{\"reported\":{{\"on\":true}}}}}}'"
    )
}

fn main() -> ExitCode {
    // ring for any TLS client or server that asks rustls for its default (the listeners name
    // it themselves); two providers are linked, so rustls would choose neither.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = match Config::load(&args) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("thinghub: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(&config);
            let admin_key = std::env::var("THINGHUB_ADMIN_KEY").ok();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("thinghub: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(thinghub::server::serve(
                config,
                admin_key,
                thinghub::server::shutdown_signal(),
            ));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "server failed");
                    eprintln!("thinghub: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Audit {
            thing,
            json,
            config,
            data_dir,
        } => {
            let config = match offline_config(config, data_dir) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            match thinghub::audit::run(&config.data_dir, &thing, json, &mut out) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("thinghub audit: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Certs(CertsCommand::Init { dir, hosts, device }) => {
            if let Err(e) = thinghub_actors::thing::validate_thing_name(&device) {
                eprintln!("thinghub certs init: --device: {}", e.message);
                return ExitCode::from(2);
            }
            match thinghub::tls::init_certificates(&dir, &hosts, &device) {
                Ok(report) => {
                    let mut out = std::io::stdout().lock();
                    let _ = write_init_report(&mut out, &dir, &device, &report);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("thinghub certs init: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check {
            config,
            data_dir,
            scratch_dir,
            in_place,
        } => {
            let config = match offline_config(config, data_dir) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let options = thinghub::check::CheckOptions {
                data_dir: config.data_dir,
                scratch_dir: scratch_dir.unwrap_or_else(thinghub::check::default_scratch_dir),
                in_place,
            };
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            match thinghub::check::run(&options, &mut out) {
                Ok(report) if report.problems.is_empty() => ExitCode::SUCCESS,
                Ok(_) => ExitCode::from(1),
                Err(
                    e @ thinghub::check::CheckError::Storage(
                        thinghub_storage::StorageError::Damaged { .. },
                    ),
                ) => {
                    eprintln!("thinghub check: {e}");
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("thinghub check: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
