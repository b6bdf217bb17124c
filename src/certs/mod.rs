//! Certificates: TLS certificates per environment from an ACME server, planned against a
//! model of Let's Encrypt's rate limits. So far this holds the pure quota ledger; the ACME
//! client, the HTTP-01 responder and the ledger's storage in the cluster come with issue 6.
//! It must never touch environment objects other than their TLS Secret.

pub mod ledger;
