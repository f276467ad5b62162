//! The object-store artifact backend against a real S3 server: moto's server mode (PyPI
//! `moto[server]`, installed into the test-tools venv by scripts/install-test-deps.sh). One server
//! serves the whole test binary and every test uses its own bucket. Without moto the tests print
//! "skipped" and pass, unless `RLHF_REQUIRE_TEST_ASSETS` / `RLHF_REQUIRE_TEST_DEPS` is set (CI).
//!
//! Tampering and deleting go through plain HTTP requests, as another client would. moto does
//! not check signatures, but it refuses anonymous object requests: an `Authorization` header
//! with a placeholder signature names the caller.

use std::path::{Path, PathBuf};

use rlhf_bot::artifacts::{
    ArtifactError, ArtifactLocation, ArtifactRef, ArtifactStore, BucketStore, FileStore, MANIFEST,
    verify_dir,
};
use rlhf_bot::registry::{ModelKind, Registry};

use super::common::{Workspace, bin, stderr};
use super::moto::{Moto, moto};

/// A small model directory: a config, a nested weights file and a tokenizer.
fn model_dir(root: &Path, seed: u8) -> PathBuf {
    let dir = root.join(format!("model-{seed}"));
    std::fs::create_dir_all(dir.join("adapter")).unwrap();
    std::fs::write(dir.join("config.json"), format!("{{\"seed\": {seed}}}")).unwrap();
    let weights: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(31) as u8) ^ seed)
        .collect();
    std::fs::write(dir.join("adapter/weights.safetensors"), weights).unwrap();
    std::fs::write(dir.join("tokenizer.json"), b"{\"model\": {}}").unwrap();
    dir
}

/// A fresh bucket holding one stored reward model `id`, with its temporary directory (the cache
/// and the source live there).
fn stored(
    moto: &Moto,
    bucket: &str,
    id: &str,
    seed: u8,
) -> (tempfile::TempDir, BucketStore, ArtifactRef) {
    let tmp = tempfile::tempdir().unwrap();
    let store = moto.store(bucket, &tmp.path().join("cache"));
    let put = store
        .put(ModelKind::Reward, id, &model_dir(tmp.path(), seed))
        .unwrap();
    (tmp, store, put)
}

/// Both ways of reading an artifact, which must both fail.
fn refusals(store: &BucketStore, artifact: &ArtifactRef) -> [ArtifactError; 2] {
    [
        store.verify(artifact).unwrap_err(),
        store.materialize(artifact).unwrap_err(),
    ]
}

fn files_equal(a: &Path, b: &Path) {
    for rel in [
        "config.json",
        "adapter/weights.safetensors",
        "tokenizer.json",
    ] {
        assert_eq!(
            std::fs::read(a.join(rel)).unwrap(),
            std::fs::read(b.join(rel)).unwrap(),
            "{rel} differs"
        );
    }
}

#[test]
fn put_then_materialize_round_trips_with_checksums() {
    let Some(moto) = moto() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let store = moto.store("rt-round-trip", &tmp.path().join("cache"));
    let src = model_dir(tmp.path(), 1);

    let put = store.put(ModelKind::Reward, "reward-r1", &src).unwrap();
    assert_eq!(put.uri, "s3://rt-round-trip/models/reward/reward-r1/");
    // The same format as the file store: the same directory has the same digest and size.
    let local = FileStore::new(tmp.path().join("files")).unwrap();
    let file_ref = local.put(ModelKind::Reward, "reward-r1", &src).unwrap();
    assert_eq!(
        (&put.sha256, put.size_bytes),
        (&file_ref.sha256, file_ref.size_bytes)
    );
    assert!(moto.exists("rt-round-trip", "models/reward/reward-r1/SHA256SUMS"));
    assert!(moto.exists(
        "rt-round-trip",
        "models/reward/reward-r1/adapter/weights.safetensors"
    ));

    store.verify(&put).unwrap();
    let dir = store.materialize(&put).unwrap();
    assert_eq!(dir, tmp.path().join("cache/reward/reward-r1"));
    files_equal(&src, &dir);
    verify_dir(&dir, &put).unwrap();
    // A second read uses the verified cache; a tampered cache is downloaded again.
    std::fs::write(dir.join("config.json"), b"{}").unwrap();
    let again = store.materialize(&put).unwrap();
    files_equal(&src, &again);

    // Storing the same content again is a no-op; different content under the id is refused.
    assert_eq!(
        store.put(ModelKind::Reward, "reward-r1", &src).unwrap(),
        put
    );
    let other = model_dir(tmp.path(), 2);
    let err = store
        .put(ModelKind::Reward, "reward-r1", &other)
        .unwrap_err();
    assert!(matches!(err, ArtifactError::Conflict { .. }), "{err}");
    store.verify(&put).unwrap();

    // A URI from another store is refused with a hint, not read.
    let mut foreign = put.clone();
    foreign.uri = "s3://elsewhere/models/reward/reward-r1/".into();
    let err = store.verify(&foreign).unwrap_err();
    assert!(
        matches!(err, ArtifactError::BadUri { .. }) && err.to_string().contains("hint:"),
        "{err}"
    );
}

#[test]
fn large_files_go_up_in_parts() {
    let Some(moto) = moto() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let store = moto
        .store("rt-multipart", &tmp.path().join("cache"))
        .with_part_size(rlhf_bot::artifacts::bucket::MIN_PART_SIZE);
    let src = tmp.path().join("big");
    std::fs::create_dir_all(&src).unwrap();
    // 11 MiB + 3 bytes: two full 5 MiB parts and a short last one.
    let big: Vec<u8> = (0..(11u32 << 20) + 3)
        .map(|i| (i ^ (i >> 13)) as u8)
        .collect();
    std::fs::write(src.join("model.safetensors"), &big).unwrap();
    let put = store.put(ModelKind::Policy, "policy-big", &src).unwrap();
    assert_eq!(put.size_bytes, big.len() as u64);
    store.verify(&put).unwrap();
    let dir = store.materialize(&put).unwrap();
    assert!(std::fs::read(dir.join("model.safetensors")).unwrap() == big);
}

#[test]
fn a_modified_object_is_a_mismatch() {
    let Some(moto) = moto() else { return };
    let (tmp, store, put) = stored(moto, "rt-modified", "reward-m", 3);
    let (status, _) = moto.request(
        "PUT",
        "/rt-modified/models/reward/reward-m/adapter/weights.safetensors",
        b"not the weights",
    );
    assert_eq!(status, 200);
    for err in refusals(&store, &put) {
        assert!(
            matches!(&err, ArtifactError::Mismatch { file, .. } if file == "adapter/weights.safetensors"),
            "expected a mismatch on the weights, got {err}"
        );
    }
    // Nothing unverified is left where loaders look.
    assert!(!tmp.path().join("cache/reward/reward-m").exists());

    // A registry entry whose digest is not the manifest's is a mismatch on the manifest.
    let mut wrong = put.clone();
    wrong.sha256 = "0".repeat(64);
    match store.verify(&wrong).unwrap_err() {
        ArtifactError::Mismatch { file, .. } => assert_eq!(file, MANIFEST),
        other => panic!("expected a manifest mismatch, got {other}"),
    }
}

#[test]
fn missing_and_stray_objects_are_reported() {
    let Some(moto) = moto() else { return };
    let (_tmp, store, put) = stored(moto, "rt-missing", "reward-x", 4);

    let (status, _) = moto.request(
        "PUT",
        "/rt-missing/models/reward/reward-x/extra.bin",
        b"stray",
    );
    assert_eq!(status, 200);
    match store.verify(&put).unwrap_err() {
        ArtifactError::Unlisted { file, .. } => assert_eq!(file, "extra.bin"),
        other => panic!("expected an unlisted file, got {other}"),
    }
    moto.request(
        "DELETE",
        "/rt-missing/models/reward/reward-x/extra.bin",
        b"",
    );

    let (status, _) = moto.request(
        "DELETE",
        "/rt-missing/models/reward/reward-x/tokenizer.json",
        b"",
    );
    assert_eq!(status, 204);
    for err in refusals(&store, &put) {
        assert!(
            matches!(&err, ArtifactError::Missing { file, .. } if file == "tokenizer.json"),
            "expected tokenizer.json missing, got {err}"
        );
    }

    moto.request(
        "DELETE",
        "/rt-missing/models/reward/reward-x/SHA256SUMS",
        b"",
    );
    match store.verify(&put).unwrap_err() {
        ArtifactError::Missing { file, .. } => assert_eq!(file, MANIFEST),
        other => panic!("expected a missing manifest, got {other}"),
    }
}

#[test]
fn a_failed_upload_leaves_no_manifest() {
    let Some(moto) = moto() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let store = moto.store("rt-failed", &tmp.path().join("cache"));
    let src = model_dir(tmp.path(), 5);
    // Files go up in path order: `config.json` and `adapter/…` are sent, then reading
    // `zz-unreadable` fails (the kernel refuses reads of /proc/self/mem at offset 0).
    std::os::unix::fs::symlink("/proc/self/mem", src.join("zz-unreadable")).unwrap();
    let err = store.put(ModelKind::Policy, "policy-f", &src).unwrap_err();
    assert!(
        matches!(err, ArtifactError::Io { .. }) && err.to_string().contains("zz-unreadable"),
        "{err}"
    );
    let key = |f: &str| format!("models/policy/policy-f/{f}");
    assert!(!moto.exists("rt-failed", &key(MANIFEST)), "no manifest");
    // What was sent before the failure is cleaned up, best effort.
    assert!(!moto.exists("rt-failed", &key("config.json")));

    // The next attempt, with the bad file gone, stores a valid artifact.
    std::fs::remove_file(src.join("zz-unreadable")).unwrap();
    let put = store.put(ModelKind::Policy, "policy-f", &src).unwrap();
    store.verify(&put).unwrap();

    // A bucket that does not exist: a remote error that names the URI and says what to check.
    let url = url::Url::parse("s3://rt-no-such-bucket/models").unwrap();
    let options = moto.env().map(|(k, v)| (k.to_ascii_lowercase(), v));
    let missing = BucketStore::with_options(&url, options, tmp.path().join("c2")).unwrap();
    let err = missing
        .put(ModelKind::Policy, "policy-f", &src)
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, ArtifactError::Remote { .. })
            && text.contains("s3://rt-no-such-bucket/models/policy/policy-f/")
            && text.contains("hint:"),
        "{text}"
    );
    assert!(!text.contains("testing"), "credentials leaked: {text}");
}

#[test]
fn plain_http_endpoints_need_an_explicit_opt_in() {
    let url = url::Url::parse("s3://bucket/models").unwrap();
    let err = BucketStore::with_options(
        &url,
        [
            ("aws_endpoint", "http://127.0.0.1:9"),
            ("aws_allow_http", "false"),
        ],
        "cache",
    )
    .unwrap_err();
    assert!(err.to_string().contains("AWS_ALLOW_HTTP=true"), "{err}");
}

#[test]
fn run_with_a_bucket_stores_the_models_there() {
    let Some(moto) = moto() else { return };
    let ws = Workspace::new();
    let bucket = "rt-run";
    moto.create_bucket(bucket);
    let local_root = format!("artifacts: {}/artifacts", ws.store_dir().display());
    let text = ws.sample_config_text();
    assert!(
        text.contains(&local_root),
        "the sample config moved: {text}"
    );
    let cfg =
        ws.write_config(&text.replace(&local_root, &format!("artifacts: s3://{bucket}/models")));
    let mut cmd = bin();
    for (k, v) in moto.env() {
        cmd.env(k, v);
    }
    let o = cmd
        .env("RLHF_BOT_NOW", "2026-11-27T12:00:00Z")
        .arg("--config")
        .arg(&cfg)
        .args(["--format", "json", "run", "--force"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("testing"), "credentials in the log");

    let registry = Registry::load(&ws.store_dir().join("registry.yaml")).unwrap();
    let url = url::Url::parse(&format!("s3://{bucket}/models")).unwrap();
    let options = moto.env().map(|(k, v)| (k.to_ascii_lowercase(), v));
    let store = BucketStore::with_options(&url, options, ws.path().join("check-cache")).unwrap();
    let kinds: Vec<ModelKind> = registry.models.iter().map(|m| m.kind).collect();
    assert!(kinds.contains(&ModelKind::Reward), "{kinds:?}");
    for model in &registry.models {
        let uri = &model.artifact.uri;
        assert_eq!(
            uri,
            &format!("s3://{bucket}/models/{}/{}/", model.kind, model.id)
        );
        store.verify(&model.artifact).unwrap();
    }
    assert!(
        !ws.store_dir().join("artifacts").exists(),
        "nothing goes to the local artifact directory"
    );
    // The config check accepts the bucket and shows it.
    let settings = rlhf_bot::config::load(&cfg).unwrap();
    assert_eq!(settings.registry.artifacts, ArtifactLocation::Bucket(url));
}

#[test]
fn config_accepts_bucket_urls_and_names_unknown_schemes() {
    let load = |artifacts: &str| {
        rlhf_bot::config::load_str(
            Path::new("rlhf.yaml"),
            &format!(
                "feedback:\n  source: file\n  path: f\nstore:\n  dir: st\nregistry:\n  artifacts: {artifacts}\n"
            ),
        )
    };
    for (value, expected) in [
        ("s3://acme-models/rlhf", "s3://acme-models/rlhf"),
        ("gs://acme-models", "gs://acme-models"),
        ("az://models/rlhf", "az://models/rlhf"),
        (
            "abfss://models@acme.dfs.core.windows.net/rlhf",
            "abfss://models@acme.dfs.core.windows.net/rlhf",
        ),
    ] {
        let settings = load(value).unwrap_or_else(|e| panic!("{value}: {e}"));
        match &settings.registry.artifacts {
            ArtifactLocation::Bucket(url) => assert_eq!(url.as_str(), expected),
            other => panic!("{value} parsed as {other:?}"),
        }
        // Downloads are cached under the feedback store, not in a directory named like the URL.
        assert_eq!(
            settings.registry.artifacts_dir,
            Path::new("st").join("artifact-cache")
        );
    }
    for (value, dir) in [
        ("models/weights", "models/weights"),
        ("file:///srv/models", "/srv/models"),
    ] {
        let settings = load(value).unwrap();
        assert_eq!(
            settings.registry.artifacts,
            ArtifactLocation::Dir(PathBuf::from(dir))
        );
        assert_eq!(settings.registry.artifacts_dir, Path::new(dir));
    }
    for (value, needle) in [
        ("ftp://host/models", "`ftp://`"),
        ("s3://", "names no bucket"),
        ("s3://key:secret@bucket/p", "carries credentials"),
        ("s3://bucket/p?region=x", "query"),
    ] {
        let text = format!("{:#}", load(value).unwrap_err());
        assert!(
            text.contains("registry.artifacts") && text.contains(needle) && text.contains("hint:"),
            "{value}: {text}"
        );
        assert!(
            !text.contains("secret@"),
            "the URL's credentials were echoed: {text}"
        );
    }
}
