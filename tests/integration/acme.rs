//! Current ACME against the current pebble (built from `third_party/` by `scripts/pebble`):
//! ARI-driven renewal (`set-renewal-info` moves one certificate's window), certificate
//! profiles (a 6-day `shortlived` one), and external account binding.

use std::process::Command;

use crate::certs::{
    Case, EAB_ACCOUNT, Pebble, bucket, bucket_if_any, chain_of, envctl, now, pebble_with_eab,
    pebble_with_profiles, quota, serial_of, setup, setup_on, tls_secret,
};

/// The leaf (first certificate) of a PEM chain.
fn leaf(chain: &[u8]) -> String {
    let text = String::from_utf8_lossy(chain);
    let end = "-----END CERTIFICATE-----";
    let i = text.find(end).expect("a PEM certificate") + end.len();
    text[..i].to_string()
}

/// How many orders pebble took as ARI replacements of an earlier certificate.
fn replacements(pebble: &Pebble) -> usize {
    std::fs::read_to_string(&pebble.log)
        .unwrap_or_default()
        .matches("is a replacement of")
        .count()
}

/// Moves a certificate's ARI window (pebble's management endpoint).
fn set_renewal_window(pebble: &Pebble, leaf_pem: &str, start: &str, end: &str) {
    let ari = serde_json::json!({"suggestedWindow": {"start": start, "end": end}}).to_string();
    let body = serde_json::json!({"Certificate": leaf_pem, "ARIResponse": ari}).to_string();
    let out = Command::new("curl")
        .args(["-fsS", "-X", "POST", "--data-binary", &body, "--cacert"])
        .arg(&pebble.ca)
        .arg(format!("{}/set-renewal-info/", pebble.management))
        .output()
        .expect("running curl");
    assert!(
        out.status.success(),
        "set-renewal-info failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A window in the past (as after a mass revocation): the next pass renews exactly that
/// certificate, with `replaces`, and the renewal costs no quota.
#[tokio::test(flavor = "multi_thread")]
async fn ari_window_in_the_past_renews_exactly_that_certificate() {
    let Some(s) = setup(true).await else { return };
    let case = Case::new(&s.client, s.dir.path(), "ari", 3).await;
    let apply = case.apply(&s.pebble.flags());
    let (code, out, err) = envctl(s.cluster, &apply);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("3 issued"), "{out}");
    let mut serials = Vec::new();
    for name in &case.names {
        let secret = tls_secret(&s.client, &format!("environment-{name}"))
            .await
            .expect("a Secret");
        serials.push(serial_of(&secret));
    }
    // Pebble's own window for a 90-day certificate lies two months ahead: nothing is due.
    let (before, replaced) = (s.pebble.orders(), replacements(s.pebble));
    let (code, out, err) = envctl(s.cluster, &apply);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(s.pebble.orders(), before, "nothing was due: {out}");
    assert!(out.contains("3 current"), "{out}");

    let first = tls_secret(&s.client, &format!("environment-{}", case.names[0]))
        .await
        .expect("a Secret");
    set_renewal_window(
        s.pebble,
        &leaf(&chain_of(&first)),
        "2020-01-01T00:00:00Z",
        "2020-01-02T00:00:00Z",
    );
    let (code, out, err) = envctl(s.cluster, &apply);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "certificate {}: issued (ARI renewal)",
            case.names[0]
        )),
        "{out}"
    );
    assert!(out.contains("2 current"), "{out}");
    assert_eq!(s.pebble.orders(), before + 1, "exactly one order: {out}");
    assert_eq!(
        replacements(s.pebble),
        replaced + 1,
        "the order named the certificate it replaces"
    );
    for (i, name) in case.names.iter().enumerate() {
        let secret = tls_secret(&s.client, &format!("environment-{name}"))
            .await
            .expect("a Secret");
        assert_eq!(
            serial_of(&secret) != serials[i],
            i == 0,
            "{name}: only the first certificate is renewed"
        );
    }
    // ARI renewals are exempt from every limit: the ledger charged nothing for it.
    let q = quota(s.cluster, &case.common);
    assert_eq!(
        bucket(&q, "new-certificates-per-registered-domain", &case.domain).0,
        3,
        "{q}"
    );
    let host = format!("{}.us-east-1.{}", case.names[0], case.domain);
    assert_eq!(
        bucket(&q, "new-certificates-per-exact-set", &host).0,
        1,
        "{q}"
    );
    eprintln!(
        "measure: ARI window moved into the past for {}: renewed {} of 3 certificates",
        case.names[0], 1
    );
    case.cleanup(&s.client).await;
}

/// `--acme-profile shortlived` for the fleet, `spec.tls.profile: classic` for one
/// environment, and one that names a profile the CA does not offer.
#[tokio::test(flavor = "multi_thread")]
async fn profiles_set_each_certificates_lifetime_and_its_renewal() {
    let Some(s) = setup_on(pebble_with_profiles).await else {
        return;
    };
    let case = Case::new(&s.client, s.dir.path(), "prof", 3).await;
    let with_profile = |name: &str, profile: &str| {
        let path = case.src.join(format!("{name}.yaml"));
        let text = std::fs::read_to_string(&path).expect("a manifest");
        std::fs::write(&path, format!("{text}  tls:\n    profile: {profile}\n"))
            .expect("writing a manifest");
    };
    with_profile(&case.names[1], "classic");
    with_profile(&case.names[2], "longlived");
    let mut flags = s.pebble.flags();
    flags.extend(["--acme-profile".to_string(), "shortlived".into()]);
    let before = s.pebble.orders();
    let (code, out, err) = envctl(s.cluster, &case.apply(&flags));
    assert_ne!(code, 0, "an environment's certificate failed: {out}\n{err}");
    assert!(out.contains("2 issued"), "{out}");
    assert!(
        out.contains(&format!(
            "certificate {}: failed: spec.tls.profile \"longlived\" is not a profile the ACME directory offers (it offers: classic, shortlived, tlsserver)",
            case.names[2]
        )),
        "{out}"
    );
    assert_eq!(
        s.pebble.orders() - before,
        2,
        "no order for the unknown profile"
    );
    let mut lifetimes = Vec::new();
    for name in &case.names[..2] {
        let secret = tls_secret(&s.client, &format!("environment-{name}"))
            .await
            .expect("a Secret");
        let info = envctl::certs::inspect(&chain_of(&secret)).expect("a certificate");
        lifetimes.push(info.not_after - info.not_before);
        // Renewal follows the certificate's own lifetime: a third of it left.
        let renews = envctl::certs::store::rfc3339(info.renew_at());
        assert!(
            out.contains(&format!("certificate {name}: issued (new)"))
                && out.contains(&format!("renews {renews}")),
            "{name} renews at {renews}: {out}"
        );
    }
    assert!(lifetimes[0] <= 7 * 86_400, "shortlived: {} s", lifetimes[0]);
    assert!(lifetimes[1] >= 89 * 86_400, "classic: {} s", lifetimes[1]);
    eprintln!(
        "measure: profile lifetimes: shortlived {:.1} days, classic {:.1} days",
        lifetimes[0] as f64 / 86_400.0,
        lifetimes[1] as f64 / 86_400.0
    );
    // The next pass asks the CA's ARI window: the short-lived one renews within its 6 days.
    let (_, out, _) = envctl(s.cluster, &case.apply(&flags));
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("certificate {}: current", case.names[0])))
        .unwrap_or_else(|| panic!("{out}"));
    let renews = line.rsplit("renews ").next().unwrap_or_default();
    let at: i64 = renews
        .parse::<k8s_openapi::jiff::Timestamp>()
        .map(|t| t.as_second())
        .unwrap_or_else(|e| panic!("{renews}: {e}"));
    assert!(
        at > now() && at < now() + 6 * 86_400,
        "the short-lived certificate renews within its lifetime: {line}"
    );
    case.cleanup(&s.client).await;
}

/// A CA that requires external account binding: without a key, or with a wrong one, the
/// account is not registered and no order is placed; with the right one, certificates come.
#[tokio::test(flavor = "multi_thread")]
async fn eab_binds_the_account_and_a_missing_or_wrong_key_orders_nothing() {
    let Some(s) = setup_on(pebble_with_eab).await else {
        return;
    };
    let case = Case::new(&s.client, s.dir.path(), "eab", 1).await;
    let (kid, key) = EAB_ACCOUNT.split_once('=').expect("KID=KEY");
    let key_file = s.dir.path().join("eab.key");
    let before = s.pebble.orders();

    // No binding.
    let (code, out, err) = envctl(s.cluster, &case.apply(&s.pebble.flags()));
    assert_ne!(code, 0, "{out}\n{err}");
    let all = format!("{out}\n{err}");
    assert!(all.contains("registering an ACME account"), "{all}");
    assert!(
        all.contains("the ACME server requires external account binding"),
        "{all}"
    );
    assert!(!all.contains(key), "the key leaked: {all}");

    // A wrong key (well-formed, but not the CA's).
    std::fs::write(&key_file, key.chars().rev().collect::<String>()).expect("a key file");
    let mut flags = s.pebble.flags();
    flags.extend([
        "--acme-eab-kid".to_string(),
        kid.to_string(),
        "--acme-eab-hmac-key-file".into(),
        key_file.display().to_string(),
    ]);
    let (code, out, err) = envctl(s.cluster, &case.apply(&flags));
    assert_ne!(code, 0, "{out}\n{err}");
    let all = format!("{out}\n{err}");
    assert!(all.contains("registering an ACME account"), "{all}");
    assert_eq!(
        s.pebble.orders(),
        before,
        "an order without a bound account"
    );

    // A key id without a key file is refused before anything runs.
    let mut half = s.pebble.flags();
    half.extend(["--acme-eab-kid".to_string(), kid.to_string()]);
    let (code, _, err) = envctl(s.cluster, &case.apply(&half));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--acme-eab-hmac-key-file"), "{err}");

    // The right key.
    std::fs::write(&key_file, key).expect("a key file");
    let (code, out, err) = envctl(s.cluster, &case.apply(&flags));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("1 issued"), "{out}");
    assert!(!format!("{out}{err}").contains(key), "the key leaked");
    assert_eq!(s.pebble.orders(), before + 1);
    case.cleanup(&s.client).await;
}

/// `envctl quota plan` against a fixed ledger and fleet says what the real passes do: which
/// environments get a certificate at once, and when each of the others will (the times the
/// controller announces). The limits given to `apply` are recorded in the ledger, so a plain
/// `envctl quota` (and `quota plan`) reads them, and a changed override is taken over.
#[tokio::test(flavor = "multi_thread")]
async fn quota_plan_matches_real_passes_and_limits_live_in_the_ledger() {
    let Some(s) = setup(true).await else { return };
    let case = Case::new(&s.client, s.dir.path(), "plan", 5).await;
    let flag = |spec: &str| {
        vec![
            "--acme-limit-override".to_string(),
            format!("{}={spec}", case.domain),
        ]
    };
    let plan = |extra: &[String]| -> (i32, serde_json::Value) {
        let mut args = vec![
            "quota".to_string(),
            "plan".into(),
            "--source".into(),
            case.src.display().to_string(),
            "-o".into(),
            "json".into(),
        ];
        args.extend(case.common.iter().cloned());
        args.extend(extra.iter().cloned());
        let (code, out, err) = envctl(s.cluster, &args);
        let json = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
        (code, json)
    };
    let env_rows = |p: &serde_json::Value| -> Vec<(String, String)> {
        p["environments"]
            .as_array()
            .expect("environments")
            .iter()
            .map(|e| {
                (
                    e["environment"].as_str().unwrap_or_default().to_string(),
                    e["first_certificate"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect()
    };

    // Before anything: 3 a week fit 3 of 5 now; the plan names the override to ask for.
    let (code, before) = plan(&flag("3/168h"));
    assert_eq!(code, 1, "the fleet does not fit: {before}");
    assert_eq!(before["fits"], false);
    let from = before["from"].as_str().expect("from").to_string();
    let planned_now: Vec<String> = env_rows(&before)
        .into_iter()
        .filter(|(_, at)| *at == from)
        .map(|(e, _)| e)
        .collect();
    assert_eq!(planned_now.len(), 3, "{before}");
    assert_eq!(before["suggestions"][0]["capacity"], 5, "{before}");
    assert_eq!(
        before["suggestions"][0]["flag"],
        format!("--acme-limit-override {}=5/168h", case.domain)
    );

    // The real pass issues exactly those three, and announces when the others come.
    let mut apply = case.apply(&s.pebble.flags());
    apply.extend(flag("3/168h"));
    let (code, out, err) = envctl(s.cluster, &apply);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("3 issued, 2 waiting"), "{out}");
    for name in &case.names {
        assert_eq!(
            out.contains(&format!("certificate {name}: issued")),
            planned_now.contains(name),
            "{name}: {out}"
        );
    }
    // A plain `envctl quota` reads the recorded limit: 3 used of 3, not 30 of 50.
    let q = quota(s.cluster, &case.common);
    assert_eq!(
        bucket(&q, "new-certificates-per-registered-domain", &case.domain),
        (3, 0),
        "{q}"
    );
    // The plan, from the ledger alone (no flags), gives the waiting ones exactly the times
    // the controller announced on their namespaces.
    let (code, after) = plan(&[]);
    assert_eq!(code, 1, "{after}");
    let rows = env_rows(&after);
    for name in case.names.iter().filter(|n| !planned_now.contains(n)) {
        let ns: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(s.client.clone());
        let announced = ns
            .get(&format!("environment-{name}"))
            .await
            .expect("the namespace")
            .metadata
            .annotations
            .unwrap_or_default()
            .get(envctl::certs::WAIT_UNTIL_ANNOTATION)
            .cloned()
            .unwrap_or_default();
        let planned = rows
            .iter()
            .find(|(e, _)| e == name)
            .map(|(_, at)| at.clone())
            .unwrap_or_default();
        assert_eq!(planned, announced, "{name}: {after}");
    }
    eprintln!(
        "measure: quota plan vs real pass, 5 environments at 3/168h: now {planned_now:?}, later {:?}",
        rows.iter()
            .filter(|(e, _)| !planned_now.contains(e))
            .collect::<Vec<_>>()
    );

    // Raised to 10 a week: the used 3 stay used, the two waiting go at once.
    let mut apply = case.apply(&s.pebble.flags());
    apply.extend(flag("10/168h"));
    let (code, out, err) = envctl(s.cluster, &apply);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("2 issued"), "{out}");
    let q = quota(s.cluster, &case.common);
    assert_eq!(
        bucket(&q, "new-certificates-per-registered-domain", &case.domain),
        (5, 5),
        "{q}"
    );
    let (code, fits) = plan(&[]);
    assert_eq!(code, 0, "{fits}");
    case.cleanup(&s.client).await;
}

/// Validation that keeps failing (nothing answers pebble's HTTP-01 requests): every failed
/// authorization is booked; once the failures use up what the limits allow,
/// the next pass places no order and says until when it waits; `envctl quota` shows the run
/// of failures and the next try. (That the backoff never walks into Let's Encrypt's pause
/// over weeks is the ledger's unit test `a_failing_identifier_backs_off_and_never_walks_into_the_pause`.)
#[tokio::test(flavor = "multi_thread")]
async fn failing_validation_backs_off_and_places_no_more_orders() {
    let Some(s) = setup(false).await else { return };
    let case = Case::new(&s.client, s.dir.path(), "fails", 1).await;
    let mut flags = s.pebble.flags();
    flags.extend(["--certificate-timeout".to_string(), "30s".into()]);
    let apply = case.apply(&flags);
    let before = s.pebble.orders();
    for attempt in 1..=5 {
        let (code, out, err) = envctl(s.cluster, &apply);
        assert_eq!(code, 4, "attempt {attempt}:\n{out}\n{err}");
        assert!(out.contains("failed: authorization for"), "{out}");
    }
    assert_eq!(s.pebble.orders() - before, 5, "one order per failing pass");
    // Let's Encrypt counts certificates issued, not orders: the five failed orders gave
    // their name set's and registered domain's reservations back; their failures are booked.
    let q = quota(s.cluster, &case.common);
    let host = format!("{}.us-east-1.{}", case.names[0], case.domain);
    let used = |limit: &str, key: &str| bucket_if_any(&q, limit, key).map_or(0, |(u, _)| u);
    assert_eq!(used("new-certificates-per-exact-set", &host), 0, "{q}");
    assert_eq!(
        used("new-certificates-per-registered-domain", &case.domain),
        0,
        "{q}"
    );
    let failures = q["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .find(|b| {
            b["limit"] == "authorization-failures-per-identifier"
                && b["key"]
                    .as_str()
                    .is_some_and(|k| k.ends_with(&format!("/{host}")))
        })
        .unwrap_or_else(|| panic!("no failure bucket for {host}: {q}"));
    assert_eq!(failures["used"], 5, "{q}");
    let (code, out, err) = envctl(s.cluster, &apply);
    assert_eq!(code, 0, "a wait is not a failure:\n{out}\n{err}");
    // The wait is the hourly failure limit's (a token back in 12 minutes), not the name
    // set's week.
    assert!(
        out.contains("waiting for quota (authorization-failures-per-identifier) until"),
        "{out}"
    );
    assert_eq!(
        s.pebble.orders() - before,
        5,
        "no order while the identifier backs off"
    );
    let mut args = vec!["quota".to_string()];
    args.extend(case.common.iter().cloned());
    let (code, out, err) = envctl(s.cluster, &args);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("5 failed authorization(s) in a row"), "{out}");
    case.cleanup(&s.client).await;
}
