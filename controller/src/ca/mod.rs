//! The mesh's certificate authority, run by the controller.
//!
//! - The root: the user's (`--ca-cert`/`--ca-key`), else the one in Secret `warren-ca` of the controller's
//!   namespace, else a new one stored there (first start). Its certificate is published in ConfigMap
//!   `warren-root-cert` for agents to verify the controller and their peers.
//! - Signing ([`authorize`], [`server`]): an agent sends a CSR and the identity it wants, with its
//!   ServiceAccount token bound to its own pod. TokenReview proves the token and names that pod; the pod
//!   names the node. The identity is granted only if a pod on that node runs as it (namespace + service
//!   account). The CA signs the CSR's public key for that identity alone; keys never leave the node.
pub mod authorize;
pub mod server;

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result};
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use warren_identity::CertificateAuthority;

pub const CA_SECRET: &str = "warren-ca";
pub const ROOT_CONFIGMAP: &str = "warren-root-cert";
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Where the root comes from.
pub enum RootSource {
    /// PEM certificate and key the user supplied.
    Supplied { cert_pem: String, key_pem: String },
    /// The Secret in the controller's namespace, created on first start.
    Secret,
}

/// Loads (or creates and stores) the root, and publishes its certificate.
pub async fn load(client: &Client, namespace: &str, trust_domain: &str, source: RootSource) -> Result<CertificateAuthority> {
    let ca = match source {
        RootSource::Supplied { cert_pem, key_pem } => {
            CertificateAuthority::from_pem(trust_domain, &cert_pem, &key_pem).context("the supplied CA certificate/key")?
        }
        RootSource::Secret => load_or_create_secret(client, namespace, trust_domain).await?,
    };
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let root = ConfigMap {
        metadata: ObjectMeta { name: Some(ROOT_CONFIGMAP.into()), ..Default::default() },
        data: Some(BTreeMap::from([("root-cert.pem".to_string(), ca.root_pem().to_string())])),
        ..Default::default()
    };
    configmaps
        .patch(ROOT_CONFIGMAP, &PatchParams::apply("warren-controller").force(), &Patch::Apply(&root))
        .await
        .context("publishing ConfigMap warren-root-cert")?;
    Ok(ca)
}

async fn load_or_create_secret(client: &Client, namespace: &str, trust_domain: &str) -> Result<CertificateAuthority> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let from_secret = |secret: &Secret| -> Result<CertificateAuthority> {
        let data = secret.data.as_ref().context("Secret warren-ca has no data")?;
        let field = |key: &str| {
            data.get(key)
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .with_context(|| format!("Secret warren-ca: no {key}"))
        };
        Ok(CertificateAuthority::from_pem(trust_domain, &field("ca.crt")?, &field("ca.key")?)?)
    };
    if let Some(existing) = secrets.get_opt(CA_SECRET).await? {
        tracing::info!("CA root loaded from Secret {namespace}/{CA_SECRET}");
        return from_secret(&existing);
    }
    let ca = CertificateAuthority::generate(trust_domain, ROOT_LIFETIME)?;
    let secret = Secret {
        metadata: ObjectMeta { name: Some(CA_SECRET.into()), ..Default::default() },
        type_: Some("warren.dev/ca".into()),
        data: Some(BTreeMap::from([
            ("ca.crt".to_string(), ByteString(ca.root_pem().as_bytes().to_vec())),
            ("ca.key".to_string(), ByteString(ca.key_pem().into_bytes())),
        ])),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!("CA root generated and stored in Secret {namespace}/{CA_SECRET}");
            Ok(ca)
        }
        // Another controller replica stored one first: use that.
        Err(kube::Error::Api(e)) if e.code == 409 => from_secret(&secrets.get(CA_SECRET).await?),
        Err(e) => Err(e).context("storing the CA root in a Secret"),
    }
}
