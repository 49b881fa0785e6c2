use std::process::ExitCode;

use clap::Parser as _;
use imds_agent::{
    cli::{Cli, Command, Generated, LogFormat, PolicyCommand},
    loader,
    policy::{PolicySet, Unmatched},
    run::{self, format_policy_errors},
};
use tracing_subscriber::EnvFilter;

/// sysexits(3) EX_USAGE: bad configuration or arguments.
const EXIT_CONFIG: u8 = 64;
const EXIT_RUNTIME: u8 = 1;

/// An error and its causes on one line: "a: b: c".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("IMDS_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    imds_agent::audit::write_json_lines(format == LogFormat::Json);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    imds_agent::audit::otel_names(cli.audit_names == imds_agent::cli::AuditNames::Otel);
    if let Err(error) = imds_agent::audit::set_sink(&cli.audit_log) {
        eprintln!("imds-agent: --audit-log {}: {error}", cli.audit_log);
        return ExitCode::from(EXIT_CONFIG);
    }
    match cli.command {
        Command::Run(args) => {
            // The background work's runtime (watches, metrics, the handover); client
            // connections are served by threads with runtimes of their own (`proxy::serve`).
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .on_thread_park(imds_agent::audit::worker_idle)
                .on_thread_stop(imds_agent::audit::thread_stopped)
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("imds-agent: cannot start the runtime: {error}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            // Dropping the runtime stops its workers, each writing its audit batch as it ends.
            match runtime.block_on(run::run(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("imds-agent: {}", chain(&error));
                    ExitCode::from(if error.is_config() {
                        EXIT_CONFIG
                    } else {
                        EXIT_RUNTIME
                    })
                }
            }
        }
        Command::Policy(PolicyCommand::Check { paths }) => {
            match PolicySet::load(&paths, Unmatched::Deny) {
                Ok(set) => {
                    for policy in set.policies() {
                        println!(
                            "{}: ok: policy '{}', {} rules",
                            policy.source().display(),
                            policy.name(),
                            policy.rule_count()
                        );
                        for rule in policy.credentials_by_executable_alone() {
                            eprintln!(
                                "{}: warning: policy '{}' rule '{rule}' grants credentials by \
                                 executable alone: any process that runs that program (or, in a \
                                 container, any program at that path) gets them; add a cgroup, \
                                 unit, uid or pod selector beside it",
                                policy.source().display(),
                                policy.name(),
                            );
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    eprintln!("{}", format_policy_errors(&errors));
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Policy(PolicyCommand::Test { files, policy }) => {
            match imds_agent::cases::run(&files, &policy) {
                Ok(outcome) => {
                    print!("{}", outcome.report);
                    if outcome.failed == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(EXIT_RUNTIME)
                    }
                }
                Err(errors) => {
                    eprintln!("{}", format_policy_errors(&errors));
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Policy(PolicyCommand::Explain(args)) => {
            match imds_agent::explain::explain(&args) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("imds-agent: {error}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Report {
            state_dir,
            json,
            suggest_policy,
            kubernetes,
            since,
        } => {
            let Some(state) = imds_agent::status::read_state(&state_dir) else {
                eprintln!(
                    "imds-agent: no running agent (no state in {})",
                    state_dir.display()
                );
                return ExitCode::from(EXIT_RUNTIME);
            };
            if suggest_policy {
                use imds_agent::inventory::suggest;
                let suggestions = suggest::suggest(&state.inventory, since.as_deref());
                if suggestions.is_empty() {
                    eprintln!("imds-agent: no allowed requests seen: nothing to suggest");
                    return ExitCode::from(EXIT_RUNTIME);
                }
                for suggestion in &suggestions {
                    let left_out = kubernetes && !suggestion.is_pod();
                    eprintln!(
                        "{} {}: {} requests of {}",
                        if left_out {
                            "left out (not a pod)"
                        } else {
                            "suggested"
                        },
                        suggestion.name,
                        suggestion.requests,
                        suggestion.workloads.join(", ")
                    );
                }
                if kubernetes {
                    print!("{}", suggest::render_kubernetes(suggestions));
                } else {
                    print!("{}", suggest::render_files(&suggestions));
                }
            } else if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&state.inventory).unwrap_or_default()
                );
            } else {
                print!("{}", imds_agent::inventory::render(&state.inventory));
            }
            ExitCode::SUCCESS
        }
        Command::Generate { what } => {
            let mut command = <imds_agent::cli::Cli as clap::CommandFactory>::command();
            let mut out = std::io::stdout();
            let written = match what {
                Generated::Man => clap_mangen::Man::new(command).render(&mut out),
                shell => {
                    let shell = match shell {
                        Generated::Bash => clap_complete::Shell::Bash,
                        Generated::Zsh => clap_complete::Shell::Zsh,
                        _ => clap_complete::Shell::Fish,
                    };
                    clap_complete::generate(shell, &mut command, "imds-agent", &mut out);
                    Ok(())
                }
            };
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("imds-agent: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Crds => {
            print!("{}", imds_agent::kube::crd::crds_yaml());
            ExitCode::SUCCESS
        }
        Command::Detach { pin_dir } => match loader::detach(&pin_dir) {
            Ok(true) => {
                println!("detached: removed {}", pin_dir.display());
                ExitCode::SUCCESS
            }
            Ok(false) => {
                println!("nothing attached at {}", pin_dir.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("imds-agent: {}", chain(&error));
                ExitCode::from(EXIT_RUNTIME)
            }
        },
        Command::Status {
            pin_dir,
            state_dir,
            json,
        } => {
            let attached = loader::is_attached(&pin_dir);
            let counters = loader::pinned_counters(&pin_dir).unwrap_or_default();
            let state = imds_agent::status::read_state(&state_dir);
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "pin_dir": pin_dir,
                        "attached": attached,
                        "counters": counters,
                        "agent": state,
                    })
                );
            } else {
                print!(
                    "{}",
                    imds_agent::status::render(&pin_dir, attached, counters, state.as_ref())
                );
            }
            ExitCode::SUCCESS
        }
    }
}
