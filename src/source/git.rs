//! A Git source on libgit2 (git2): asks the remote for a ref's commit (ls-remote), fetches
//! only when it moved (shallow where the transport allows), and reads manifests straight from
//! the fetched tree, without a work tree. Credentials come from files or environment
//! variables and are never logged.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use git2::{
    Cred, CredentialType, Direction, FetchOptions, ObjectType, Oid, RemoteCallbacks, Repository,
    TreeWalkMode, TreeWalkResult,
};

use super::SourceFile;
use crate::diagnostic::Diagnostic;

/// A libgit2 error whose message has had any credential in it replaced (libgit2 may quote
/// the URL it was given, userinfo and all).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Git2Error {
    pub message: String,
    pub class: git2::ErrorClass,
    pub code: git2::ErrorCode,
}

impl Git2Error {
    fn new(e: git2::Error, secrets: &[String]) -> Git2Error {
        Git2Error {
            message: redact_text(e.message(), secrets),
            class: e.class(),
            code: e.code(),
        }
    }
}

/// `url` with its userinfo (`user:token@`) replaced by `***@`: a URL fit to print.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..scheme_end + 3], &rest[at..]),
        None => url.to_string(),
    }
}

/// The credential parts of a URL (its whole userinfo and its password) that must never be
/// printed.
fn url_secrets(url: &str) -> Vec<String> {
    let Some(scheme_end) = url.find("://") else {
        return Vec::new();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return Vec::new();
    };
    let userinfo = &rest[..at];
    let mut out = vec![userinfo.to_string()];
    if let Some((_, password)) = userinfo.split_once(':') {
        out.push(password.to_string());
    }
    out.retain(|s| !s.is_empty());
    out
}

/// `text` with every secret in it replaced by `***`.
pub fn redact_text(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 3) {
        out = out.replace(s.as_str(), "***");
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("opening the Git cache at {path}")]
    Cache {
        path: String,
        #[source]
        source: Git2Error,
    },
    #[error("asking {url} for {reference}")]
    LsRemote {
        url: String,
        reference: String,
        #[source]
        source: Git2Error,
    },
    #[error("{url} has no branch or tag {reference:?}")]
    NoSuchRef { url: String, reference: String },
    #[error("fetching {reference} from {url}")]
    Fetch {
        url: String,
        reference: String,
        #[source]
        source: Git2Error,
    },
    #[error("reading commit {commit}")]
    Read {
        commit: String,
        #[source]
        source: Git2Error,
    },
    #[error("reading credentials from {what}")]
    Credentials { what: String },
}

/// Bounds every network operation of libgit2 (git://, http(s):// and ssh://): a connect
/// gives up after `timeout`, and so does a read from a server that went silent (libgit2 waits
/// forever by default, which would stall the controller). The first call sets them for the
/// process; later calls do nothing.
pub fn configure_timeouts(timeout: std::time::Duration) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let ms = i32::try_from(timeout.as_millis())
        .unwrap_or(i32::MAX)
        .max(1);
    ONCE.call_once(|| {
        // SAFETY: these set libgit2 globals without synchronisation. `Once` makes this the only
        // writer, and it runs before the first Git operation of the process, so no libgit2
        // call can race with it.
        unsafe {
            let _ = git2::opts::set_server_connect_timeout_in_milliseconds(ms);
            let _ = git2::opts::set_server_timeout_in_milliseconds(ms);
        }
    });
}

/// How to authenticate to the remote. `Debug` prints no token.
#[derive(Clone, Default)]
pub struct Credentials {
    pub username: Option<String>,
    /// HTTPS token (password).
    pub token: Option<String>,
    /// SSH private key file.
    pub ssh_key: Option<PathBuf>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("token", &self.token.as_ref().map(|_| "(redacted)"))
            .field("ssh_key", &self.ssh_key)
            .finish()
    }
}

impl Credentials {
    /// From `--git-token-file`/`--git-token-env` and `--git-ssh-key-file`.
    pub fn load(
        username: Option<String>,
        token_file: Option<&Path>,
        token_env: Option<&str>,
        ssh_key: Option<PathBuf>,
    ) -> Result<Credentials, GitError> {
        let token = match (token_file, token_env) {
            (Some(f), _) => Some(
                std::fs::read_to_string(f)
                    .map_err(|_| GitError::Credentials {
                        what: format!("token file {}", f.display()),
                    })?
                    .trim()
                    .to_string(),
            ),
            (None, Some(var)) => Some(std::env::var(var).map_err(|_| GitError::Credentials {
                what: format!("environment variable {var}"),
            })?),
            (None, None) => None,
        };
        Ok(Credentials {
            username,
            token,
            ssh_key,
        })
    }
}

/// Where the manifests live in Git. `Debug` prints the URL without its userinfo.
#[derive(Clone)]
pub struct GitSpec {
    pub url: String,
    /// A branch, a tag, a full ref name or a commit id.
    pub reference: String,
    /// Folder inside the repository holding the manifests.
    pub path: Option<String>,
}

impl std::fmt::Debug for GitSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitSpec")
            .field("url", &redact_url(&self.url))
            .field("reference", &self.reference)
            .field("path", &self.path)
            .finish()
    }
}

/// The Git operations a controller needs; behind a trait so the backend can change.
pub trait GitBackend: Send {
    /// The commit the ref points at on the remote, without fetching anything.
    fn remote_head(&mut self) -> Result<String, GitError>;
    /// Fetches the ref and returns its commit.
    fn fetch(&mut self) -> Result<String, GitError>;
    /// The manifests under the configured path in `commit`.
    fn read(
        &self,
        commit: &str,
        max_size: u64,
    ) -> Result<(Vec<SourceFile>, Vec<Diagnostic>), GitError>;
    /// Paths under the configured path that differ between two fetched commits, if both are
    /// known locally.
    fn changed(&self, from: &str, to: &str) -> Option<BTreeSet<String>>;
}

pub struct Git2Source {
    spec: GitSpec,
    credentials: Credentials,
    repo: Repository,
    /// The URL as printed (userinfo redacted).
    shown_url: String,
    /// What must never be printed: the URL's userinfo and the token.
    secrets: Vec<String>,
}

const LOCAL_REF: &str = "refs/envctl/source";

fn is_commit_id(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// libgit2 refuses shallow fetches from local paths and file:// URLs.
fn shallow_allowed(url: &str) -> bool {
    url.contains("://") && !url.starts_with("file://")
}

impl Git2Source {
    /// A source whose objects are cached in a bare repository under `cache_dir`.
    pub fn open(
        spec: GitSpec,
        credentials: Credentials,
        cache_dir: &Path,
    ) -> Result<Git2Source, GitError> {
        let mut secrets = url_secrets(&spec.url);
        secrets.extend(credentials.token.iter().cloned());
        let repo = Repository::init_bare(cache_dir)
            .or_else(|_| Repository::open_bare(cache_dir))
            .map_err(|source| GitError::Cache {
                path: cache_dir.display().to_string(),
                source: Git2Error::new(source, &secrets),
            })?;
        Ok(Git2Source {
            shown_url: redact_url(&spec.url),
            spec,
            credentials,
            repo,
            secrets,
        })
    }

    fn callbacks(&self) -> RemoteCallbacks<'_> {
        let mut cb = RemoteCallbacks::new();
        let creds = &self.credentials;
        let mut tries = 0;
        cb.credentials(move |_url, user_from_url, allowed| {
            tries += 1;
            if tries > 3 {
                return Err(git2::Error::from_str("authentication failed"));
            }
            let user = creds.username.as_deref().or(user_from_url).unwrap_or("git");
            if allowed.contains(CredentialType::SSH_KEY)
                && let Some(key) = &creds.ssh_key
            {
                return Cred::ssh_key(user, None, key, None);
            }
            if allowed.contains(CredentialType::USER_PASS_PLAINTEXT)
                && let Some(token) = &creds.token
            {
                return Cred::userpass_plaintext(user, token);
            }
            Cred::default()
        });
        cb
    }

    /// Candidate ref names for the configured reference, most specific first.
    fn ref_names(&self) -> Vec<String> {
        let r = &self.spec.reference;
        if r.starts_with("refs/") {
            vec![r.clone()]
        } else {
            vec![
                format!("refs/heads/{r}"),
                format!("refs/tags/{r}^{{}}"),
                format!("refs/tags/{r}"),
            ]
        }
    }

    fn ls_remote_error(&self, source: git2::Error) -> GitError {
        GitError::LsRemote {
            url: self.shown_url.clone(),
            reference: self.spec.reference.clone(),
            source: Git2Error::new(source, &self.secrets),
        }
    }
}

impl Git2Source {
    /// ls-remote: the remote ref name that matches the configured reference, and the commit
    /// it points at (tags peeled).
    fn resolve(&self) -> Result<(String, String), GitError> {
        let mut remote = self
            .repo
            .remote_anonymous(&self.spec.url)
            .map_err(|e| self.ls_remote_error(e))?;
        let conn = remote
            .connect_auth(Direction::Fetch, Some(self.callbacks()), None)
            .map_err(|e| self.ls_remote_error(e))?;
        let heads: Vec<(String, String)> = conn
            .list()
            .map_err(|e| self.ls_remote_error(e))?
            .iter()
            .map(|h| (h.name().to_string(), h.oid().to_string()))
            .collect();
        for name in self.ref_names() {
            if let Some((_, oid)) = heads.iter().find(|(n, _)| *n == name) {
                let plain = name.trim_end_matches("^{}").to_string();
                return Ok((plain, oid.clone()));
            }
        }
        Err(GitError::NoSuchRef {
            url: self.shown_url.clone(),
            reference: self.spec.reference.clone(),
        })
    }

    fn fetch_refspec(&self, refspec: &str, shallow: bool) -> Result<(), GitError> {
        let fetch_err = |source| GitError::Fetch {
            url: self.shown_url.clone(),
            reference: self.spec.reference.clone(),
            source: Git2Error::new(source, &self.secrets),
        };
        let mut remote = self
            .repo
            .remote_anonymous(&self.spec.url)
            .map_err(fetch_err)?;
        let mut options = FetchOptions::new();
        options.remote_callbacks(self.callbacks());
        if shallow {
            options.depth(1);
        }
        remote
            .fetch(&[refspec], Some(&mut options), None)
            .map_err(fetch_err)
    }
}

impl GitBackend for Git2Source {
    fn remote_head(&mut self) -> Result<String, GitError> {
        if is_commit_id(&self.spec.reference) {
            return Ok(self.spec.reference.to_lowercase());
        }
        Ok(self.resolve()?.1)
    }

    fn fetch(&mut self) -> Result<String, GitError> {
        let reference = self.spec.reference.to_lowercase();
        if is_commit_id(&reference) {
            let known = |repo: &Repository| {
                Oid::from_str(&reference)
                    .ok()
                    .is_some_and(|o| repo.find_commit(o).is_ok())
            };
            if !known(&self.repo) {
                // Servers rarely serve bare commit ids: fetch every branch and tag instead.
                self.fetch_refspec("+refs/heads/*:refs/envctl/heads/*", false)?;
                self.fetch_refspec("+refs/tags/*:refs/envctl/tags/*", false)?;
            }
            if !known(&self.repo) {
                return Err(GitError::NoSuchRef {
                    url: self.shown_url.clone(),
                    reference,
                });
            }
            return Ok(reference);
        }
        let (name, expected) = self.resolve()?;
        self.fetch_refspec(
            &format!("+{name}:{LOCAL_REF}"),
            shallow_allowed(&self.spec.url),
        )?;
        let got = self.local_commit(LOCAL_REF)?;
        if got != expected {
            // The ref moved between ls-remote and fetch: read what was fetched.
            tracing::debug!(expected, got, "ref moved while fetching");
        }
        Ok(got)
    }

    fn read(
        &self,
        commit: &str,
        max_size: u64,
    ) -> Result<(Vec<SourceFile>, Vec<Diagnostic>), GitError> {
        let read_err = |source| GitError::Read {
            commit: commit.to_string(),
            source: Git2Error::new(source, &self.secrets),
        };
        let oid = Oid::from_str(commit).map_err(read_err)?;
        let tree = self
            .repo
            .find_commit(oid)
            .and_then(|c| c.tree())
            .map_err(read_err)?;
        let prefix = self
            .spec
            .path
            .as_deref()
            .map(|p| p.trim_matches('/').to_string())
            .filter(|p| !p.is_empty());
        let tree = match &prefix {
            Some(p) => match tree.get_path(Path::new(p)) {
                Ok(entry) => entry
                    .to_object(&self.repo)
                    .and_then(|o| o.peel_to_tree())
                    .map_err(read_err)?,
                Err(_) => {
                    return Ok((
                        Vec::new(),
                        vec![Diagnostic::file(
                            p.clone(),
                            format!("no folder {p:?} in commit {commit}"),
                        )],
                    ));
                }
            },
            None => tree,
        };
        let mut files = Vec::new();
        let mut problems = Vec::new();
        tree.walk(TreeWalkMode::PreOrder, |dir, entry| {
            let Ok(name) = entry.name() else {
                return TreeWalkResult::Skip;
            };
            if name.starts_with('.') {
                return TreeWalkResult::Skip;
            }
            if !(name.ends_with(".yaml") || name.ends_with(".yml")) {
                return TreeWalkResult::Ok;
            }
            let shown = match &prefix {
                Some(p) => format!("{p}/{dir}{name}"),
                None => format!("{dir}{name}"),
            };
            if entry.filemode() == 0o120000 {
                problems.push(Diagnostic::file(
                    &shown,
                    "symlinks are not followed in Git sources; refused",
                ));
                return TreeWalkResult::Ok;
            }
            if entry.kind() != Some(ObjectType::Blob) {
                return TreeWalkResult::Ok;
            }
            match entry.to_object(&self.repo).and_then(|o| o.peel_to_blob()) {
                Ok(blob) if blob.size() as u64 > max_size => problems.push(Diagnostic::file(
                    &shown,
                    format!("file is larger than the limit of {max_size} bytes"),
                )),
                Ok(blob) => files.push(SourceFile {
                    path: shown,
                    bytes: blob.content().to_vec(),
                }),
                Err(e) => problems.push(Diagnostic::file(
                    &shown,
                    format!("cannot read blob: {}", e.message()),
                )),
            }
            TreeWalkResult::Ok
        })
        .map_err(read_err)?;
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok((files, problems))
    }

    fn changed(&self, from: &str, to: &str) -> Option<BTreeSet<String>> {
        let tree = |c: &str| {
            Oid::from_str(c)
                .ok()
                .and_then(|o| self.repo.find_commit(o).ok())
                .and_then(|c| c.tree().ok())
        };
        let (a, b) = (tree(from)?, tree(to)?);
        let diff = self.repo.diff_tree_to_tree(Some(&a), Some(&b), None).ok()?;
        let prefix = self
            .spec
            .path
            .as_deref()
            .map(|p| p.trim_matches('/'))
            .unwrap_or("");
        let mut out = BTreeSet::new();
        for d in diff.deltas() {
            for f in [d.old_file().path(), d.new_file().path()]
                .into_iter()
                .flatten()
            {
                let s = f.to_string_lossy().to_string();
                if prefix.is_empty() || s.starts_with(&format!("{prefix}/")) {
                    out.insert(s);
                }
            }
        }
        Some(out)
    }
}

impl Git2Source {
    fn local_commit(&self, name: &str) -> Result<String, GitError> {
        self.repo
            .refname_to_id(name)
            .and_then(|oid| self.repo.find_object(oid, None))
            .and_then(|o| o.peel_to_commit())
            .map(|c| c.id().to_string())
            .map_err(|source| GitError::Read {
                commit: name.to_string(),
                source: Git2Error::new(source, &self.secrets),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_print_without_credentials() {
        assert_eq!(
            redact_url("https://bot:s3cr3t@git.example.com/envs.git"),
            "https://***@git.example.com/envs.git"
        );
        assert_eq!(
            redact_url("https://ghp_token@git.example.com/a@b.git"),
            "https://***@git.example.com/a@b.git"
        );
        assert_eq!(
            redact_url("git://127.0.0.1:9418/envs.git"),
            "git://127.0.0.1:9418/envs.git"
        );
        assert_eq!(redact_url("/srv/envs.git"), "/srv/envs.git");
        let secrets = url_secrets("https://bot:s3cr3t@host/x");
        assert_eq!(
            secrets,
            vec!["bot:s3cr3t".to_string(), "s3cr3t".to_string()]
        );
        assert_eq!(
            redact_text("failed to reach https://bot:s3cr3t@host/x", &secrets),
            "failed to reach https://***@host/x"
        );
        let c = Credentials {
            username: Some("bot".into()),
            token: Some("s3cr3t".into()),
            ssh_key: None,
        };
        assert!(!format!("{c:?}").contains("s3cr3t"));
        let spec = GitSpec {
            url: "https://bot:s3cr3t@host/x".into(),
            reference: "main".into(),
            path: None,
        };
        assert!(!format!("{spec:?}").contains("s3cr3t"));
    }
}
