//! Keystone v3 auth against the real Keystone (PyPI): password and application credential,
//! token reuse and refresh, the image endpoint from the catalog by interface and region,
//! then a Glance call through that endpoint with the token. (Glance itself runs without
//! auth middleware in these tests: it ignores the token.)

mod common;

use common::{Glance, Keystone, ADMIN_PASSWORD};
use image_bridge::keystone::{Credentials, Keystone as Auth, KeystoneConfig};
use image_bridge::GlanceClient;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

#[test]
fn keystone_password_and_application_credential() {
    let ks = Keystone::start();
    let glance = Glance::start();
    let (admin, user_id) = ks.admin_token();
    // The image service in the catalog: public in RegionOne → our Glance; internal → a
    // different URL, so the interface choice is visible.
    let svc = ks.post(
        &admin,
        "/services",
        &json!({"service": {"type": "image", "name": "glance"}}),
    );
    let sid = svc["service"]["id"]
        .as_str()
        .expect("service id")
        .to_string();
    for (iface, url) in [
        ("public", glance.endpoint.as_str()),
        ("internal", "http://127.0.0.2:9292"),
    ] {
        ks.post(
            &admin,
            "/endpoints",
            &json!({"endpoint": {"service_id": sid, "interface": iface, "region_id": "RegionOne", "url": url}}),
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let password = KeystoneConfig {
        auth_url: ks.url.clone(),
        credentials: Credentials::Password {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
            user_domain_name: "Default".into(),
            project_name: "admin".into(),
            project_domain_name: "Default".into(),
        },
        region: Some("RegionOne".into()),
        interface: "public".into(),
    };
    rt.block_on(async {
        let auth = Arc::new(Auth::new(password.clone()).expect("keystone"));
        let t1 = auth.token().await.expect("token");
        let t2 = auth.token().await.expect("token again");
        assert_eq!(t1, t2, "token reused");
        assert_eq!(auth.tokens_issued(), 1);
        assert_eq!(
            auth.endpoint("image").await.expect("image endpoint"),
            glance.endpoint
        );
        // Through the catalog to Glance, token attached.
        let g = GlanceClient::from_keystone(auth.clone())
            .await
            .expect("client");
        assert_eq!(g.endpoint(), glance.endpoint);
        let err = g
            .show("00000000-0000-4000-8000-000000000000")
            .await
            .expect_err("404");
        assert!(matches!(err, image_bridge::Error::NotFound { .. }), "{err}");
        // Refresh: a margin longer than the token's life makes every call renew it.
        let mut short = Auth::new(password.clone()).expect("keystone");
        short.refresh_margin = Duration::from_secs(7200);
        short.token().await.expect("token");
        short.token().await.expect("token");
        assert_eq!(short.tokens_issued(), 2, "renewed before expiry");
        // Invalidate (what a 401 does) → a new token.
        auth.invalidate().await;
        auth.token().await.expect("token after invalidate");
        assert_eq!(auth.tokens_issued(), 2);
        // Interface and region select the endpoint.
        let mut internal = password.clone();
        internal.interface = "internal".into();
        let a = Auth::new(internal).expect("keystone");
        assert_eq!(
            a.endpoint("image").await.expect("internal"),
            "http://127.0.0.2:9292"
        );
        let mut elsewhere = password.clone();
        elsewhere.region = Some("RegionTwo".into());
        let a = Auth::new(elsewhere).expect("keystone");
        assert!(
            a.endpoint("image").await.is_err(),
            "no image endpoint in RegionTwo"
        );
        // Wrong password: a clear refusal.
        let mut bad = password.clone();
        if let Credentials::Password { password, .. } = &mut bad.credentials {
            *password = "wrong".into();
        }
        let e = Auth::new(bad)
            .expect("keystone")
            .token()
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("401"), "{e}");
    });
    // Application credential (created with the admin token, used without a password).
    let ac = ks.post(
        &admin,
        &format!("/users/{user_id}/application_credentials"),
        &json!({"application_credential": {"name": "fatbox-test"}}),
    );
    let id = ac["application_credential"]["id"]
        .as_str()
        .expect("ac id")
        .to_string();
    let secret = ac["application_credential"]["secret"]
        .as_str()
        .expect("secret")
        .to_string();
    rt.block_on(async {
        let auth = Auth::new(KeystoneConfig {
            auth_url: ks.url.clone(),
            credentials: Credentials::ApplicationCredential { id, secret },
            region: None,
            interface: "public".into(),
        })
        .expect("keystone");
        auth.token().await.expect("application credential token");
        assert_eq!(
            auth.endpoint("image").await.expect("endpoint"),
            glance.endpoint
        );
    });
}
