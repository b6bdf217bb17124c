//! Shared helpers: running the built `envctl` binary and comparing against golden files.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn blessing() -> bool {
    std::env::var_os("ENVCTL_BLESS").is_some_and(|v| v != "0")
}

/// Runs `envctl ARGS` in `cwd`; returns the transcript `exit: N`, stdout and stderr.
pub fn run_envctl(cwd: &Path, args: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_envctl"))
        .args(args)
        .current_dir(cwd)
        .env_remove("ENVCTL_MAX_SCALE")
        .env_remove("ENVCTL_MAX_FILE_SIZE")
        .env("NO_COLOR", "1")
        // Certificates have their own tests (certs.rs), against pebble.
        .env("ENVCTL_SKIP_CERTIFICATES", "1")
        .output()
        .expect("running the envctl binary");
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        out.status
            .code()
            .map_or_else(|| "signal".to_string(), |c| c.to_string()),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Compares `actual` with the golden file at `path` (or rewrites it when blessing).
/// Returns a readable diff on mismatch.
pub fn check_golden(path: &Path, actual: &str) -> Result<(), String> {
    if blessing() {
        std::fs::write(path, actual).map_err(|e| format!("writing {}: {e}", path.display()))?;
        return Ok(());
    }
    let expected = std::fs::read_to_string(path).unwrap_or_default();
    if expected == actual {
        return Ok(());
    }
    let diff = similar::TextDiff::from_lines(&expected, actual)
        .unified_diff()
        .header("expected", "actual")
        .to_string();
    Err(format!("{} differs:\n{diff}", path.display()))
}

/// Copies the examples into `dest` with each environment renamed `<name>-<suffix>`; returns
/// the new names.
pub fn examples_renamed(dest: &Path, suffix: &str) -> Vec<String> {
    std::fs::create_dir_all(dest).expect("creating a manifest folder");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo_root().join("examples/environments")).expect("examples") {
        let path = entry.expect("an entry").path();
        let text = std::fs::read_to_string(&path).expect("an example");
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("  name: "))
            .expect("a metadata.name")
            .to_string();
        let renamed = format!("{name}-{suffix}");
        let text = text.replacen(
            &format!("  name: {name}\n"),
            &format!("  name: {renamed}\n"),
            1,
        );
        std::fs::write(dest.join(path.file_name().expect("a file name")), text)
            .expect("writing an example");
        names.push(renamed);
    }
    names
}

/// Runs one of the project's scripts and returns the last line it printed (the scripts print
/// the path of what they started last).
pub fn script_last_line(mut command: Command, what: &str) -> Result<String, String> {
    let out = command
        .output()
        .map_err(|e| format!("running {what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(|l| l.trim().to_string())
        .ok_or(format!("{what} printed nothing"))
}

/// A real component the tests need, once started. When it could not start, the test FAILS,
/// unless `ENVCTL_SKIP_CLUSTER_TESTS=1` (a developer machine without the control plane or
/// pebble) says to skip it, with a note.
pub fn required<T>(what: &str, started: &'static Result<T, String>) -> Option<&'static T> {
    match started {
        Ok(c) => Some(c),
        Err(e) if std::env::var("ENVCTL_SKIP_CLUSTER_TESTS").as_deref() == Ok("1") => {
            eprintln!("SKIPPED (ENVCTL_SKIP_CLUSTER_TESTS=1): no {what}: {e}");
            None
        }
        Err(e) => panic!(
            "{what} is required but could not start: {e}\n(on a developer machine without it, ENVCTL_SKIP_CLUSTER_TESTS=1 skips the tests that need it)"
        ),
    }
}

/// Checks the README's metrics table (the rows `| \`envctl_...\` | kind | ...` between
/// `<!-- metrics:start -->` and `<!-- metrics:end -->`) against every metric envctl registers,
/// and against `scrape`, a real `/metrics` answer: each metric it shows must be in the table
/// with the same kind. Panics with the table as it should read.
pub fn check_metrics_table(scrape: &str) {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let section = readme
        .split("<!-- metrics:start -->")
        .nth(1)
        .and_then(|s| s.split("<!-- metrics:end -->").next())
        .expect("the README has a metrics table between <!-- metrics:start/end --> markers");
    let cell = |row: &str, i: usize| -> String {
        row.split('|')
            .nth(i)
            .unwrap_or_default()
            .trim()
            .trim_matches('`')
            .to_string()
    };
    let table: std::collections::BTreeSet<(String, String)> = section
        .lines()
        .filter(|l| l.starts_with("| `envctl_"))
        .map(|l| (cell(l, 1), cell(l, 2)))
        .collect();
    let registered = envctl::metrics::Metrics::new().described;
    let expected: std::collections::BTreeSet<(String, String)> = registered
        .iter()
        .map(|d| (d.name.clone(), d.kind.clone()))
        .collect();
    let rows: Vec<String> = registered
        .iter()
        .map(|d| format!("| `{}` | {} | ... | {} |", d.name, d.kind, d.help))
        .collect();
    assert_eq!(
        table,
        expected,
        "the README's metrics table differs from the registered metrics; it should list:\n{}",
        rows.join("\n")
    );
    let scraped: Vec<(String, String)> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            let suffix = if kind == "counter" { "_total" } else { "" };
            Some((format!("{name}{suffix}"), kind.to_string()))
        })
        .collect();
    assert!(scraped.len() >= 3, "the scrape shows no metrics:\n{scrape}");
    for m in &scraped {
        assert!(
            table.contains(m),
            "/metrics shows {m:?}, which the README's table does not list"
        );
    }
}

/// Waits until `check` holds, polling every 100 ms; panics after `timeout` with `what` and
/// `log()` (the log of whatever is being waited on). Returns how long it took.
pub async fn wait_until<F, Fut>(
    what: &str,
    timeout: std::time::Duration,
    log: &dyn Fn() -> String,
    mut check: F,
) -> std::time::Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}\n--- log ---\n{}",
            log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A raw HTTP/1.1 request to `127.0.0.1:port`: (status code, whole response). (0, "") when
/// nothing listens there.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("writing a request");
    s.write_all(body).expect("writing a body");
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, resp)
}

/// Runs `git ARGS` in `dir` as a test author; panics with git's message when it fails.
pub fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
        .output()
        .expect("running git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running `envctl run`, killed and reaped when dropped (also when a test panics). Every
/// test that runs the controller starts it through `Controller::run`.
pub struct Controller {
    child: std::process::Child,
    log: PathBuf,
    port: u16,
}

/// How to start a controller: its arguments, log and environment.
pub struct RunCommand {
    kubeconfig: PathBuf,
    args: Vec<String>,
    log: Option<PathBuf>,
    env: Vec<(String, String)>,
    unset: Vec<String>,
}

impl Controller {
    /// `envctl run ARGS --kubeconfig KUBECONFIG`, listening on a free loopback port, logging
    /// at info level. Certificates are skipped unless `args` name an ACME directory.
    pub fn run<S: AsRef<str>>(kubeconfig: &Path, args: impl IntoIterator<Item = S>) -> RunCommand {
        RunCommand {
            kubeconfig: kubeconfig.to_path_buf(),
            args: args.into_iter().map(|a| a.as_ref().to_string()).collect(),
            log: None,
            env: Vec::new(),
            unset: Vec::new(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> PathBuf {
        self.log.clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The port of its HTTP listener.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The exit status, once the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to end.
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A raw HTTP/1.1 request to the controller's listener: (status code, body).
    pub fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> (u16, String) {
        http_request(self.port, method, path, headers, body)
    }

    /// A gauge's value from /metrics, if served.
    pub fn gauge(&self, name: &str) -> Option<i64> {
        let (code, body) = self.http("GET", "/metrics", &[], b"");
        if code != 200 {
            return None;
        }
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

impl RunCommand {
    /// Appends the process's output to `path` (a restarted controller can share one log);
    /// without it, each process logs to a fresh temp file.
    pub fn log(mut self, path: &Path) -> RunCommand {
        self.log = Some(path.to_path_buf());
        self
    }

    /// Sets an environment variable of the process (after the defaults).
    pub fn env(mut self, key: &str, value: &str) -> RunCommand {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Sets each of `vars` in the process's environment.
    pub fn envs(mut self, vars: &[(&str, String)]) -> RunCommand {
        for (k, v) in vars {
            self = self.env(k, v);
        }
        self
    }

    /// Removes an environment variable from the process (after the defaults).
    pub fn env_remove(mut self, key: &str) -> RunCommand {
        self.unset.push(key.to_string());
        self
    }

    pub fn start(self) -> Controller {
        let port = free_port();
        let (log, file) = match &self.log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("a log file");
                (path.clone(), file)
            }
            None => {
                let path = std::env::temp_dir().join(format!("envctl-run-{port}.log"));
                (
                    path.clone(),
                    std::fs::File::create(&path).expect("a log file"),
                )
            }
        };
        let mut command = Command::new(env!("CARGO_BIN_EXE_envctl"));
        command
            .arg("run")
            .args(&self.args)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .env("ENVCTL_LOG", "info")
            .env_remove("KUBECONFIG");
        if self.args.iter().any(|a| a == "--acme-directory") {
            command.env_remove("ENVCTL_SKIP_CERTIFICATES");
        } else {
            command.env("ENVCTL_SKIP_CERTIFICATES", "1");
        }
        for (k, v) in &self.env {
            command.env(k, v);
        }
        for k in &self.unset {
            command.env_remove(k);
        }
        let child = command
            .stdout(file.try_clone().expect("a log file"))
            .stderr(file)
            .spawn()
            .expect("starting envctl run");
        Controller { child, log, port }
    }
}
