//! The certificate arguments that `apply` and `run` share: the ACME directory and account,
//! and where the quota ledger lives (also `quota`'s). Turns them into `CertMode` and
//! `CertSettings`; orders nothing.

use std::path::PathBuf;

use clap::Args;

use super::CliError;
use super::args::parse_duration;
use crate::certs::CertMode;
use crate::certs::acme::AcmeConfig;
use crate::certs::ledger::BucketSpec;
use crate::certs::reconcile::CertSettings;

/// Where the quota ledger lives and how it is configured.
#[derive(Debug, Args)]
pub struct LedgerArgs {
    /// A registered domain's new-certificates limit, when Let's Encrypt raised it:
    /// DOMAIN=COUNT/WINDOW, e.g. example.cloud=1000/168h (repeat, or separate with commas).
    #[arg(
        long = "acme-limit-override",
        env = "ENVCTL_ACME_LIMIT_OVERRIDES",
        value_delimiter = ',',
        value_parser = parse_limit_override
    )]
    pub overrides: Vec<(String, BucketSpec)>,
    /// Tokens kept in reserve in every quota bucket (for issuance outside envctl).
    #[arg(long, env = "ENVCTL_ACME_SAFETY_MARGIN", default_value_t = 0)]
    pub acme_safety_margin: u32,
    /// This region's fixed share K/N of the limits Let's Encrypt counts across every
    /// account (new certificates per registered domain and per exact set of names), for a
    /// fleet of regional clusters that share no ledger: give each region a share, the shares
    /// summing to at most 1 (e.g. 1/3 in each of three regions), and together they never
    /// pass a limit. Per-account limits are each region's own.
    #[arg(
        long,
        env = "ENVCTL_ACME_LIMIT_SHARE",
        value_name = "K/N",
        value_parser = crate::certs::ledger::Share::parse
    )]
    pub acme_limit_share: Option<crate::certs::ledger::Share>,
    /// The controller's namespace, holding the ACME account, the ledger and certificate copies.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub controller_namespace: String,
}

pub(super) fn parse_limit_override(s: &str) -> Result<(String, BucketSpec), String> {
    let (domain, spec) = s
        .split_once('=')
        .ok_or_else(|| format!("expected DOMAIN=COUNT/WINDOW, got {s:?}"))?;
    let domain = domain.trim().to_ascii_lowercase();
    if crate::certs::ledger::registered_domain(&domain).as_deref() != Some(domain.as_str()) {
        return Err(format!(
            "{domain:?} is not a registered domain (limits are per registered domain, e.g. example.cloud)"
        ));
    }
    Ok((domain, BucketSpec::parse(spec.trim())?))
}

impl LedgerArgs {
    /// The ledger as a reader (`quota`, `quota plan`) sees it: measured against the limits
    /// given here, if any (shown, never recorded), else against those recorded in it.
    pub(super) fn reader(
        &self,
        client: &kube::Client,
        instance: &str,
    ) -> crate::certs::store::LedgerStore {
        let settings = self.settings(instance, 1);
        let given =
            !settings.overrides.is_empty() || settings.margin > 0 || settings.share.is_some();
        crate::certs::store::LedgerStore::new(
            client,
            &settings.namespace,
            instance,
            given.then(|| settings.limits()),
        )
    }

    /// `concurrency` is the API concurrency; orders run at most 16 at once.
    pub(super) fn settings(&self, instance: &str, concurrency: usize) -> CertSettings {
        CertSettings {
            namespace: self.controller_namespace.clone(),
            instance: instance.to_string(),
            overrides: self.overrides.iter().cloned().collect(),
            margin: self.acme_safety_margin,
            share: self.acme_limit_share,
            concurrency: concurrency.min(16),
            // `envctl apply` runs of one instance resume each other's orders (one after the
            // other, as a CI job runs); `envctl run` names itself the instance's controller
            // (cli/run.rs), so the two never work on one order.
            writer: format!("apply/{instance}"),
        }
    }
}

/// Certificates from an ACME server.
#[derive(Debug, Args)]
pub struct CertArgs {
    /// Leave certificates alone.
    #[arg(
        long,
        env = "ENVCTL_SKIP_CERTIFICATES",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub skip_certificates: bool,
    /// The ACME directory: a URL, or `letsencrypt` (production) or `letsencrypt-staging`.
    /// There is no default: without one, TLS environments are applied without certificates
    /// (and reported so), never sent to a production CA by accident.
    #[arg(long, env = "ENVCTL_ACME_DIRECTORY")]
    pub acme_directory: Option<String>,
    /// Contact address registered with the ACME account.
    #[arg(long, env = "ENVCTL_ACME_EMAIL")]
    pub acme_email: Option<String>,
    /// PEM file of extra roots to trust for the ACME server (e.g. a test CA).
    #[arg(long, env = "ENVCTL_ACME_CA_BUNDLE")]
    pub acme_ca_bundle: Option<PathBuf>,
    /// External account binding: the key id given by the CA.
    #[arg(long, env = "ENVCTL_ACME_EAB_KID", requires = "acme_eab_hmac_key_file")]
    pub acme_eab_kid: Option<String>,
    /// External account binding: file holding the HMAC key (base64url, as CAs give it).
    #[arg(long, env = "ENVCTL_ACME_EAB_HMAC_KEY_FILE", requires = "acme_eab_kid")]
    pub acme_eab_hmac_key_file: Option<PathBuf>,
    /// The certificate profile to ask for (e.g. `classic`, `tlsserver`, `shortlived`), unless
    /// an environment's `spec.tls.profile` names its own. It must be one the directory offers;
    /// without it the CA's default applies.
    #[arg(long, env = "ENVCTL_ACME_PROFILE")]
    pub acme_profile: Option<String>,
    /// Longest one order may take, from answering its challenges to the certificate.
    #[arg(long, env = "ENVCTL_CERTIFICATE_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub certificate_timeout: std::time::Duration,
    /// Longest the ACME server may take to answer one request, its body included.
    #[arg(long, env = "ENVCTL_ACME_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub acme_request_timeout: std::time::Duration,
    /// `apply` only: answer HTTP-01 challenges on this address while it runs (`run` answers
    /// on --listen).
    #[arg(long, env = "ENVCTL_ACME_HTTP01_LISTEN")]
    pub acme_http01_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub ledger: LedgerArgs,
}

impl CertArgs {
    /// What the certificate step does: nothing (`--skip-certificates`), nothing but report
    /// (no directory), or order from the directory.
    pub(super) fn mode(&self) -> Result<CertMode, CliError> {
        if self.skip_certificates {
            return Ok(CertMode::Skip);
        }
        Ok(match self.acme_config()? {
            Some(config) => CertMode::Acme(config),
            None => CertMode::Unconfigured,
        })
    }

    pub(super) fn acme_config(&self) -> Result<Option<AcmeConfig>, CliError> {
        let Some(directory) = self.acme_directory.as_deref().map(str::trim) else {
            return Ok(None);
        };
        let directory = match directory {
            "" => return Ok(None),
            "letsencrypt" => crate::certs::acme::LETS_ENCRYPT.to_string(),
            "letsencrypt-staging" => crate::certs::acme::LETS_ENCRYPT_STAGING.to_string(),
            url => url.to_string(),
        };
        let plain_http_ok = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
            .iter()
            .any(|p| directory.starts_with(p));
        if !directory.starts_with("https://") && !plain_http_ok {
            return Err(CliError::Setting {
                setting: "--acme-directory",
                message: format!(
                    "{directory:?} must be an https:// URL, `letsencrypt` or `letsencrypt-staging` (plain http only on loopback, for tests)"
                ),
            });
        }
        let eab = match (&self.acme_eab_kid, &self.acme_eab_hmac_key_file) {
            (Some(kid), Some(path)) => {
                use base64::Engine;
                let text = std::fs::read_to_string(path).map_err(|e| CliError::Setting {
                    setting: "--acme-eab-hmac-key-file",
                    message: format!("reading {}: {e}", path.display()),
                })?;
                let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(text.trim().trim_end_matches('='))
                    .map_err(|_| CliError::Setting {
                        setting: "--acme-eab-hmac-key-file",
                        message: format!("{} does not hold a base64url key", path.display()),
                    })?;
                Some((kid.clone(), key))
            }
            _ => None,
        };
        Ok(Some(AcmeConfig {
            directory,
            email: self.acme_email.clone(),
            ca_bundle: self.acme_ca_bundle.clone(),
            eab,
            order_timeout: self.certificate_timeout,
            request_timeout: self.acme_request_timeout,
            profile: self
                .acme_profile
                .as_deref()
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_string),
        }))
    }
}
