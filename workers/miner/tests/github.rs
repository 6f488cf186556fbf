//! The GitHub source through octocrab against a loopback server that speaks the subset of
//! GitHub's REST API the miner calls: trees, blobs, 404 for a missing tag, and 403 rate-limit
//! answers (one short, to be waited out; one with a far reset, to hand the job back).

#![allow(clippy::unwrap_used)]

use base64::Engine;
use dagfleet_miner::sources::{read, SourceError};
use dagfleet_protocol::jobs::Source;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const DAG: &str = "from airflow import DAG\nwith DAG(\"gh\") as dag:\n    pass\n";

#[derive(Default)]
struct Seen {
    tree_calls: AtomicUsize,
    auth: Mutex<Vec<String>>,
}

fn json(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    seen: Arc<Seen>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if let Some(a) = req.headers().get("authorization") {
        seen.auth
            .lock()
            .unwrap()
            .push(a.to_str().unwrap_or("").to_string());
    }
    let path = req.uri().path().to_string();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    Ok(match path.as_str() {
        "/repos/acme/dags/git/trees/v1.0" => {
            if seen.tree_calls.fetch_add(1, Ordering::SeqCst) == 0 {
                // A secondary rate limit: wait one second.
                let mut r = json(
                    403,
                    serde_json::json!({"message": "You have exceeded a secondary rate limit"}),
                );
                r.headers_mut().insert("retry-after", "1".parse().unwrap());
                r
            } else {
                json(
                    200,
                    serde_json::json!({"sha": "t", "truncated": false, "tree": [
                        {"path": "dags", "type": "tree", "sha": "d"},
                        {"path": "dags/example_one.py", "type": "blob", "sha": "s1", "size": DAG.len()},
                        {"path": "dags/helper.py", "type": "blob", "sha": "s2", "size": 6},
                        {"path": "dags/example_two.py", "type": "blob", "sha": "s3", "size": DAG.len()},
                    ]}),
                )
            }
        }
        "/repos/acme/dags/git/trees/v9.9" => json(404, serde_json::json!({"message": "Not Found"})),
        "/repos/acme/limited/git/trees/v1.0" => {
            let mut r = json(
                403,
                serde_json::json!({"message": "API rate limit exceeded"}),
            );
            r.headers_mut()
                .insert("x-ratelimit-remaining", "0".parse().unwrap());
            r.headers_mut()
                .insert("x-ratelimit-reset", "99999999999".parse().unwrap());
            r
        }
        "/repos/acme/dags/git/blobs/s1" | "/repos/acme/dags/git/blobs/s3" => json(
            200,
            serde_json::json!({"sha": "s", "encoding": "base64", "content": b64(DAG)}),
        ),
        "/repos/acme/dags/git/blobs/s2" => json(
            200,
            serde_json::json!({"encoding": "base64", "content": b64("X = 1\n")}),
        ),
        _ => json(404, serde_json::json!({"message": "Not Found"})),
    })
}

async fn serve(seen: Arc<Seen>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(req, seen.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn github_trees_blobs_missing_tags_and_rate_limits() {
    // The only test in this binary, so setting the variable races with nothing.
    std::env::set_var("GITHUB_TOKEN", "gh-test-token");
    let seen = Arc::new(Seen::default());
    let api = serve(seen.clone()).await;
    let globs = dagfleet_miner::globset(&["**/example_*.py".into()]).unwrap();
    let src = |repo: &str| Source::Github {
        repo: repo.into(),
        refs: vec!["v1.0".into()],
        api_url: Some(api.clone()),
    };

    let files = read(&src("acme/dags"), "v1.0", &globs).await.unwrap();
    let mut paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    paths.sort();
    assert_eq!(paths, ["dags/example_one.py", "dags/example_two.py"]);
    assert_eq!(files[0].1, DAG.as_bytes());
    assert_eq!(
        seen.tree_calls.load(Ordering::SeqCst),
        2,
        "the rate-limited call was retried after retry-after"
    );
    assert!(seen
        .auth
        .lock()
        .unwrap()
        .iter()
        .all(|a| a.contains("gh-test-token")));

    let (mined, _) = dagfleet_miner::mine_files("github:acme/dags", "v1.0", files, &globs);
    assert_eq!(mined.len(), 2);

    match read(&src("acme/dags"), "v9.9", &globs).await {
        Err(SourceError::Missing(why)) => assert!(why.contains("v9.9"), "{why}"),
        other => panic!("a missing tag is recorded as missing: {other:?}"),
    }
    match read(&src("acme/limited"), "v1.0", &globs).await {
        Err(SourceError::RateLimited(wait, _)) => assert!(wait.as_secs() > 60),
        other => panic!("a long rate-limit reset hands the job back: {other:?}"),
    }
    match read(&src("not-a-repo"), "v1.0", &globs).await {
        Err(SourceError::Refused(_)) => {}
        other => panic!("{other:?}"),
    }
}
