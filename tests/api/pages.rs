//! The storefront and the operators' console: served by the binary with the right content types
//! and a strict CSP, each on its own listener; the console's figures behind the admin token;
//! the development sign-in only in development mode. (The pages themselves are driven in a
//! real browser by scripts/browser-test.)

use seckill::startup::Role;
use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, TestApp, assert_problem};

async fn fetch(client: &reqwest::Client, url: String) -> (u16, String, String, String) {
    let res = client.get(&url).send().await.unwrap();
    let header = |name: &str| {
        res.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (content_type, csp) = (header("content-type"), header("content-security-policy"));
    (
        res.status().as_u16(),
        content_type,
        csp,
        res.text().await.unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_storefront_and_the_console_are_served_each_on_its_own_listener() {
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let api = &app.api;
    let c = &api.client;

    for path in ["/", "/p/7"] {
        let (status, ty, csp, body) = fetch(c, format!("{}{path}", api.http)).await;
        assert_eq!(
            (status, ty.as_str()),
            (200, "text/html; charset=utf-8"),
            "{path}"
        );
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe"),
            "{csp}"
        );
        assert!(
            hashed(&body, "shop", "js").is_some(),
            "{path} names its script by content hash"
        );
        assert!(
            body.contains(r#"data-dev="0""#),
            "no development sign-in outside dev mode"
        );
        for a11y in [
            r#"aria-live="polite""#,
            r#"<label for="jwt-input""#,
            r#"lang="en""#,
        ] {
            assert!(body.contains(a11y), "{path}: {a11y}");
        }
    }
    let (status, ty, csp, body) = fetch(c, format!("{}/console", api.admin)).await;
    assert_eq!((status, ty.as_str()), (200, "text/html; charset=utf-8"));
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(hashed(&body, "console", "js").is_some());
    assert!(
        !body.contains(ADMIN_TOKEN),
        "the page itself holds no secret: the operator types the token"
    );

    for (base, path, ty) in [
        (
            &api.http,
            "/assets/shop.js",
            "text/javascript; charset=utf-8",
        ),
        (
            &api.http,
            "/assets/common.js",
            "text/javascript; charset=utf-8",
        ),
        (&api.http, "/assets/style.css", "text/css; charset=utf-8"),
        (
            &api.admin,
            "/assets/console.js",
            "text/javascript; charset=utf-8",
        ),
        (
            &api.admin,
            "/assets/common.js",
            "text/javascript; charset=utf-8",
        ),
        (&api.admin, "/assets/style.css", "text/css; charset=utf-8"),
    ] {
        let res = c.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        assert_eq!(res.headers()["content-type"], ty, "{path}");
        assert_eq!(res.headers()["x-content-type-options"], "nosniff", "{path}");
    }
    // Each page lives on its own listener only.
    for (base, path) in [
        (&api.http, "/console"),
        (&api.http, "/assets/console.js"),
        (&api.admin, "/"),
        (&api.admin, "/p/7"),
        (&api.admin, "/assets/shop.js"),
    ] {
        let res = c.get(format!("{base}{path}")).send().await.unwrap();
        assert_problem(res, 404, "not_found").await;
    }
    app.stop().await;
}

/// The content-hashed name of `stem.ext` in `page` (`stem.<12 hex>.ext`).
fn hashed(page: &str, stem: &str, ext: &str) -> Option<String> {
    let start = page.find(&format!("\"/assets/{stem}."))? + "\"/assets/".len();
    let name = &page[start..start + page[start..].find('"')?];
    let hash = name
        .strip_prefix(&format!("{stem}."))?
        .strip_suffix(&format!(".{ext}"))?;
    (hash.len() == 12 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then(|| name.to_owned())
}

/// Issue 28: a repeat visit downloads nothing again — the page revalidates (`304`), and its
/// files, named by content hash, are kept for a year.
#[tokio::test(flavor = "multi_thread")]
async fn a_repeat_visit_revalidates_the_page_and_keeps_its_hashed_files() {
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let api = &app.api;
    let c = &api.client;
    let first = c.get(format!("{}/p/3", api.http)).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["cache-control"], "no-cache");
    let etag = first.headers()["etag"].to_str().unwrap().to_owned();
    let page = first.text().await.unwrap();
    let again = c
        .get(format!("{}/", api.http))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304, "the same document at / and /p/{{id}}");
    assert!(again.bytes().await.unwrap().is_empty());

    for (stem, ext) in [("shop", "js"), ("common", "js"), ("style", "css")] {
        let name = hashed(&page, stem, ext).unwrap_or_else(|| panic!("{stem}.{ext}"));
        let res = c
            .get(format!("{}/assets/{name}", api.http))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{name}");
        assert_eq!(
            res.headers()["cache-control"],
            "public, max-age=31536000, immutable",
            "{name}"
        );
        let tag = res.headers()["etag"].to_str().unwrap().to_owned();
        // The plain name is the same file, revalidated rather than kept.
        let plain = c
            .get(format!("{}/assets/{stem}.{ext}", api.http))
            .header("if-none-match", &tag)
            .send()
            .await
            .unwrap();
        assert_eq!(plain.status(), 304, "{stem}.{ext}");
        assert_eq!(plain.headers()["cache-control"], "no-cache");
    }
    // A hash that is not this build's, and the console's file on the shoppers' listener.
    for path in ["/assets/shop.000000000000.js", "/assets/nothing.js"] {
        let res = c.get(format!("{}{path}", api.http)).send().await.unwrap();
        assert_problem(res, 404, "not_found").await;
    }
    let console = c
        .get(format!("{}/console", api.admin))
        .send()
        .await
        .unwrap();
    let console_js = hashed(&console.text().await.unwrap(), "console", "js").unwrap();
    let res = c
        .get(format!("{}/assets/{console_js}", api.http))
        .send()
        .await
        .unwrap();
    assert_problem(res, 404, "not_found").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_figures_are_behind_the_admin_token_and_count_each_products_decisions() {
    let app = TestApp::spawn_with(Role::All, &[]).await;
    let api = &app.api;
    let url = format!("{}/api/v1/admin/overview", api.admin);
    let anonymous = api.client.get(&url).send().await.unwrap();
    assert_problem(anonymous, 401, "unauthorized").await;
    let forged = api
        .client
        .get(&url)
        .bearer_auth("not-the-admin-token")
        .send();
    assert_problem(forged.await.unwrap(), 401, "unauthorized").await;

    let p = api.live_product(1).await;
    let other = api.live_product(5).await;
    assert_eq!(api.buy(1, p).await.status(), 202);
    assert_problem(api.buy(2, p).await, 410, "sold_out").await;

    let res = api.get_admin("/api/v1/admin/overview").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let o: Value = res.json().await.unwrap();
    assert!(o["server_time"].is_string(), "{o}");
    assert!(o["queue_depth"].is_u64() && o["dlq_depth"].is_u64(), "{o}");
    assert!(o["relay_lag"]["count"].is_u64(), "{o}");
    let products = o["products"].as_array().unwrap();
    let ids: Vec<i64> = products
        .iter()
        .map(|p| p["product_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![other, p], "newest first");
    let sold = &products[1];
    assert_eq!(sold["remaining"], 0, "{sold}");
    assert_eq!(sold["stock"], 1);
    assert_eq!(sold["preheated"], true);
    assert_eq!(
        (sold["recovering"].clone(), sold["paused"].clone()),
        (json!(false), json!(false))
    );
    assert!(
        sold["in_flight"].is_null(),
        "not counted while the sale is live: {sold}"
    );
    assert_eq!(sold["decisions"]["won"], 1, "{sold}");
    assert_eq!(sold["decisions"]["sold_out"], 1, "{sold}");
    assert_eq!(products[0]["decisions"]["won"], 0, "per product: {o}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_development_sign_in_exists_only_in_development_mode() {
    let production = TestApp::spawn_with(Role::Serve, &[]).await;
    let api = &production.api;
    let url = format!("{}/api/v1/dev/token", api.http);
    let res = api.client.post(&url).json(&json!({"user_id": 42})).send();
    assert_problem(res.await.unwrap(), 404, "not_found").await;
    production.stop().await;

    let dev = TestApp::spawn_with(Role::Serve, &[("SECKILL_DEV", "1")]).await;
    let api = &dev.api;
    let url = format!("{}/api/v1/dev/token", api.http);
    let (_, _, _, page) = fetch(&api.client, format!("{}/", api.http)).await;
    assert!(page.contains(r#"data-dev="1""#));
    let res = api.client.post(&url).json(&json!({"user_id": 0})).send();
    assert_problem(res.await.unwrap(), 400, "bad_request").await;
    let res = api.client.post(&url).json(&json!({"user_id": 42})).send();
    let minted: Value = res.await.unwrap().json().await.unwrap();
    assert_eq!(minted["expires_in"], 3600);
    // The JWT signs user 42 in: their (absent) reservation is a 404, not a 401.
    let p = api.live_product(1).await;
    let me = api
        .client
        .get(format!("{}/api/v1/products/{p}/reservations/me", api.http))
        .bearer_auth(minted["token"].as_str().unwrap())
        .send();
    assert_problem(me.await.unwrap(), 404, "no_reservation").await;
    dev.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_storefront_sends_a_winner_to_the_shops_checkout_outside_development_mode() {
    let checkout = "https://shop.example/checkout?order={order_id}&from=seckill";
    let app = TestApp::spawn_with(Role::Serve, &[("SECKILL_CHECKOUT_URL", checkout)]).await;
    let api = &app.api;
    let (_, _, _, page) = fetch(&api.client, format!("{}/p/1", api.http)).await;
    assert!(page.contains(r#"data-dev="0""#));
    // The template, escaped for the attribute (the & of its query).
    assert!(
        page.contains(
            r#"data-checkout="https://shop.example/checkout?order={order_id}&amp;from=seckill""#
        ),
        "{page}"
    );
    app.stop().await;
    // Without one, the attribute is empty: the page says to complete the payment at the shop.
    let app = TestApp::spawn_with(Role::Serve, &[]).await;
    let (_, _, _, page) = fetch(&app.api.client, format!("{}/", app.api.http)).await;
    assert!(page.contains(r#"data-checkout="""#));
    app.stop().await;
}
