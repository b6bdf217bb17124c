//! The command line: argument definitions and one `run` that dispatches to the pipeline's
//! stages. Owns printing and exit codes; holds no reconcile logic of its own.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::diagnostic::Diagnostic;
use crate::manifest::{self, Limits, LoadOptions, Loaded};
use crate::render::{self, RenderOptions};
use crate::source;

/// Exit codes, as kubectl diff's: 0 nothing to do, 1 changes, 2 invalid input, 3 cluster
/// unreachable or refused, 4 any other failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Changes = 1,
    Invalid = 2,
    Cluster = 3,
    Failure = 4,
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e as u8)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("writing output")]
    Output(#[source] std::io::Error),
    #[error("encoding objects as {format}: {message}")]
    Encode {
        format: &'static str,
        message: String,
    },
    #[error("{count} invalid input file(s); nothing was rendered")]
    Invalid { count: usize },
}

impl CliError {
    pub fn exit_code(&self) -> Exit {
        match self {
            CliError::Invalid { .. } => Exit::Invalid,
            CliError::Output(_) | CliError::Encode { .. } => Exit::Failure,
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "envctl",
    version,
    about = "GitOps controller for Materialize-style cloud environments"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check manifests and report every problem as FILE:LINE:COL: error: MESSAGE.
    Validate(ManifestArgs),
    /// Print the desired Kubernetes objects of every environment, in apply order.
    Render {
        #[command(flatten)]
        manifests: ManifestArgs,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = RenderFormat::Yaml)]
        output: RenderFormat,
    },
    /// Print the manifest's JSON Schema (the committed schemas/environment.schema.json).
    Schema,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RenderFormat {
    Yaml,
    Json,
}

/// Where manifests come from and the platform settings that judge them.
#[derive(Debug, Args)]
pub struct ManifestArgs {
    /// Manifest files or directories (searched recursively for *.yaml and *.yml).
    #[arg(default_value = ".")]
    pub paths: Vec<PathBuf>,
    /// Highest `scale` a service may ask for.
    #[arg(long, env = "ENVCTL_MAX_SCALE", default_value_t = 64)]
    pub max_scale: u32,
    /// Largest manifest file read, in bytes.
    #[arg(long, env = "ENVCTL_MAX_FILE_SIZE", default_value_t = source::DEFAULT_MAX_FILE_SIZE)]
    pub max_file_size: u64,
    /// A label KEY=VALUE for every pod and Service (repeatable), as environmentd's
    /// --orchestrator-service-label.
    #[arg(long = "orchestrator-service-label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub orchestrator_service_labels: Vec<(String, String)>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    if let Some(m) =
        manifest::check::label_key_problem(k).or_else(|| manifest::check::label_value_problem(k, v))
    {
        return Err(m);
    }
    if manifest::check::is_reserved_label_key(k) {
        return Err(format!("label key {k:?} is reserved for envctl"));
    }
    Ok((k.to_string(), v.to_string()))
}

impl ManifestArgs {
    pub fn platform_labels(&self) -> BTreeMap<String, String> {
        self.orchestrator_service_labels.iter().cloned().collect()
    }

    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            limits: Limits {
                max_scale: self.max_scale,
                platform_labels: self.platform_labels(),
            },
        }
    }

    pub fn render_options(&self) -> RenderOptions {
        RenderOptions {
            orchestrator_service_labels: self.platform_labels(),
        }
    }

    /// Reads and validates every manifest; reading problems become diagnostics too.
    pub fn load(&self) -> Loaded {
        let (files, problems) = source::read_paths(&self.paths, self.max_file_size);
        let mut loaded = manifest::load(&files, &self.load_options());
        if !problems.is_empty() {
            let unread: std::collections::BTreeSet<String> =
                problems.iter().map(|d| d.file.clone()).collect();
            loaded.files += unread.len();
            loaded.unattributed_files.extend(unread);
            loaded.diagnostics.extend(problems);
            loaded.diagnostics.sort();
        }
        loaded
    }
}

fn print_diagnostics(out: &mut impl Write, diagnostics: &[Diagnostic]) -> Result<(), CliError> {
    for d in diagnostics {
        writeln!(out, "{d}").map_err(CliError::Output)?;
    }
    Ok(())
}

fn summary(loaded: &Loaded) -> String {
    let bad_files: std::collections::BTreeSet<&str> =
        loaded.diagnostics.iter().map(|d| d.file.as_str()).collect();
    if loaded.files == 0 {
        return "no manifest files found (*.yaml, *.yml)".to_string();
    }
    if loaded.diagnostics.is_empty() {
        return format!(
            "ok: {} environment(s) in {} file(s)",
            loaded.environments.len(),
            loaded.files
        );
    }
    format!(
        "{} error(s) in {} of {} file(s); {} valid environment(s)",
        loaded.diagnostics.len(),
        bad_files.len(),
        loaded.files,
        loaded.environments.len()
    )
}

/// Runs one command.
pub fn run(cli: Cli) -> Result<Exit, CliError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match cli.command {
        Command::Validate(args) => {
            let loaded = args.load();
            print_diagnostics(&mut out, &loaded.diagnostics)?;
            writeln!(out, "{}", summary(&loaded)).map_err(CliError::Output)?;
            Ok(if loaded.is_valid() && loaded.files > 0 {
                Exit::Ok
            } else {
                Exit::Invalid
            })
        }
        Command::Render { manifests, output } => {
            let loaded = manifests.load();
            if !loaded.is_valid() {
                let mut err = std::io::stderr().lock();
                print_diagnostics(&mut err, &loaded.diagnostics)?;
                return Err(CliError::Invalid {
                    count: loaded
                        .diagnostics
                        .iter()
                        .map(|d| &d.file)
                        .collect::<std::collections::BTreeSet<_>>()
                        .len(),
                });
            }
            let envs: Vec<&manifest::Environment> =
                loaded.environments.iter().map(|e| &e.environment).collect();
            let objects = render::render(&envs, &manifests.render_options());
            let text = encode_objects(&objects, output)?;
            out.write_all(text.as_bytes()).map_err(CliError::Output)?;
            Ok(Exit::Ok)
        }
        Command::Schema => {
            let text = serde_json::to_string_pretty(&manifest::json_schema()).map_err(|e| {
                CliError::Encode {
                    format: "json",
                    message: e.to_string(),
                }
            })?;
            writeln!(out, "{text}").map_err(CliError::Output)?;
            Ok(Exit::Ok)
        }
    }
}

/// Objects as a YAML stream (`---` between documents) or a JSON `v1 List`.
pub fn encode_objects(
    objects: &[render::DesiredObject],
    format: RenderFormat,
) -> Result<String, CliError> {
    match format {
        RenderFormat::Yaml => {
            let mut text = String::new();
            for o in objects {
                text.push_str("---\n");
                let doc = serde_saphyr::to_string(&o.object).map_err(|e| CliError::Encode {
                    format: "yaml",
                    message: e.to_string(),
                })?;
                text.push_str(&doc);
                if !doc.ends_with('\n') {
                    text.push('\n');
                }
            }
            Ok(text)
        }
        RenderFormat::Json => {
            let list = serde_json::json!({
                "apiVersion": "v1",
                "kind": "List",
                "items": objects.iter().map(|o| &o.object).collect::<Vec<_>>(),
            });
            let mut text = serde_json::to_string_pretty(&list).map_err(|e| CliError::Encode {
                format: "json",
                message: e.to_string(),
            })?;
            text.push('\n');
            Ok(text)
        }
    }
}
