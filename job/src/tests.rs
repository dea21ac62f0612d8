use super::*;
use std::io::Write;

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn load(text: &str) -> Result<JobConfig, JobConfigError> {
    let f = file(text);
    JobConfig::load(Some(f.path()), &[], Vec::new())
}

#[test]
fn minimal_file_gets_defaults() {
    let cfg = load("[job]\nname = \"a\"\n").unwrap();
    assert_eq!(cfg.job.name, "a");
    assert_eq!(cfg.rendezvous.min_workers, 1);
    assert_eq!(cfg.rendezvous.max_workers(), 1);
}

#[test]
fn unknown_key_is_named_with_its_section() {
    let err = load("[job]\nname = \"a\"\n[train]\nstepz = 3\n").unwrap_err();
    assert!(matches!(&err, JobConfigError::UnknownKey { key, .. } if key == "train.stepz"), "{err}");
    assert!(err.to_string().contains("steps"), "lists valid keys: {err}");
}

#[test]
fn unknown_section_is_named() {
    let err = load("[job]\nname = \"a\"\n[trian]\nsteps = 3\n").unwrap_err();
    assert!(matches!(&err, JobConfigError::UnknownKey { key, .. } if key == "trian"), "{err}");
}

#[test]
fn wrong_type_names_the_key() {
    let err = load("[job]\nname = \"a\"\n[rendezvous]\nmin_workers = \"two\"\n").unwrap_err();
    assert!(matches!(&err, JobConfigError::Invalid { key, .. } if key == "rendezvous.min_workers"), "{err}");
    assert!(err.to_string().contains("two"), "shows the value: {err}");
}

#[test]
fn missing_required_key_is_named() {
    let err = load("[job]\nseed = 1\n").unwrap_err();
    assert!(matches!(&err, JobConfigError::MissingKey { key } if key == "job.name"), "{err}");
}

#[test]
fn missing_file_is_named() {
    let err =
        JobConfig::load(Some(std::path::Path::new("/nonexistent/job.toml")), &[], Vec::new()).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/job.toml"), "{err}");
}

#[test]
fn syntax_error_names_the_file() {
    let f = file("[job\nname = 1\n");
    let err = JobConfig::load(Some(f.path()), &[], Vec::new()).unwrap_err();
    let name = f.path().file_name().unwrap().to_string_lossy().to_string();
    assert!(err.to_string().contains(&name), "{err}");
}

#[test]
fn env_then_flags_override_the_file() {
    let f = file("[job]\nname = \"a\"\n[train]\nsteps = 3\nbatch_size = 4\n");
    let env = vec![
        ("MTL_TRAIN__STEPS".to_string(), "7".to_string()),
        ("MTL_TRAIN__BATCH_SIZE".to_string(), "5".to_string()),
        ("UNRELATED".to_string(), "x".to_string()),
    ];
    let cfg = JobConfig::load(Some(f.path()), &["train.batch_size=6".into()], env).unwrap();
    assert_eq!(cfg.train.steps, 7, "env beats file");
    assert_eq!(cfg.train.batch_size, 6, "flag beats env");
}

#[test]
fn unknown_env_key_is_an_error() {
    let f = file("[job]\nname = \"a\"\n");
    let env = vec![("MTL_TRAIN__STEPPS".to_string(), "7".to_string())];
    let err = JobConfig::load(Some(f.path()), &[], env).unwrap_err();
    assert!(matches!(&err, JobConfigError::UnknownKey { key, .. } if key == "train.stepps"), "{err}");
}

#[test]
fn validate_checks_ranges_across_fields() {
    let err = load("[job]\nname = \"a\"\n[rendezvous]\nmin_workers = 3\nmax_workers = 2\n").unwrap_err();
    assert!(matches!(&err, JobConfigError::Invalid { key, .. } if key == "rendezvous.max_workers"), "{err}");
    let err = load("[job]\nname = \"a\"\n[train]\nlr = -1.0\n").unwrap_err();
    assert!(matches!(&err, JobConfigError::Invalid { key, .. } if key == "train.lr"), "{err}");
}

#[test]
fn toml_round_trip_is_identity() {
    let cfg = load("[job]\nname = \"a\"\nseed = 9\n[train]\nsteps = 2\n").unwrap();
    let back = JobConfig::from_toml(&cfg.to_toml()).unwrap();
    assert_eq!(cfg, back);
    assert_eq!(cfg.hash(), back.hash());
}

#[test]
fn the_token_is_read_but_never_written() {
    let cfg = load("[job]\nname = \"a\"\ntoken = \"s3cret-t0ken\"\nseed = 3\n").unwrap();
    assert!(cfg.job.token.matches("s3cret-t0ken"));
    let text = cfg.to_toml();
    assert!(!text.contains("s3cret-t0ken"), "{text}");
    assert!(!format!("{cfg:?}").contains("s3cret-t0ken"));
    assert!(JobConfig::from_toml(&text).unwrap().job.token.is_empty());
    // Checkpoints and state databases store the hash: a job hashes as it did when the token
    // was a plain string cleared before hashing.
    assert_eq!(cfg.hash(), "440a0a84ad0adb2e");
}

#[test]
fn hash_ignores_the_token_and_where_the_job_runs_but_not_what_it_trains() {
    let cfg = load("[job]\nname = \"a\"\ntoken = \"s1\"\n").unwrap();
    let mut other = cfg.clone();
    other.job.token = JobToken::new("s2");
    other.server.listen = "0.0.0.0:1".into();
    other.rendezvous.min_workers = 3;
    other.checkpoint.keep_last = 9;
    other.data.max_unreadable_fraction = 0.5;
    other.data.cache_decoded = true;
    other.server.tensorboard_dir = "off".into();
    other.train.cudnn_benchmark = false;
    other.train.channels_last = true;
    other.train.cuda_graphs = true;
    other.comm.overlap = false;
    assert_eq!(cfg.hash(), other.hash());
    other.train.lr = 0.5;
    assert_ne!(cfg.hash(), other.hash());
    assert_eq!(cfg.hash().len(), 16);
}

#[test]
fn tensorboard_files_go_next_to_the_state_database_unless_placed_or_off() {
    let cfg = load("[job]\nname = \"a\"\n").unwrap();
    assert_eq!(cfg.server.tensorboard_path("a"), Some(std::path::PathBuf::from("runs/a/tb")));
    assert!(!cfg.to_toml().contains("tensorboard_dir"), "left out at its default");
    let moved = load("[job]\nname = \"a\"\n[server]\nstate_db = \"/srv/a/state.db\"\n").unwrap();
    assert_eq!(moved.server.tensorboard_path("a"), Some(std::path::PathBuf::from("/srv/a/tb")));
    let placed = load("[job]\nname = \"a\"\n[server]\ntensorboard_dir = \"/logs/a\"\n").unwrap();
    assert_eq!(placed.server.tensorboard_path("a"), Some(std::path::PathBuf::from("/logs/a")));
    assert_eq!(JobConfig::from_toml(&placed.to_toml()).unwrap(), placed);
    let off = load("[job]\nname = \"a\"\n[server]\ntensorboard_dir = \"off\"\n").unwrap();
    assert_eq!(off.server.tensorboard_path("a"), None);
}

#[test]
fn keep_best_names_a_known_metric_of_a_task() {
    let cfg = load("[job]\nname = \"a\"\n[checkpoint]\nkeep_best = \"detection.AP50\"\n").unwrap();
    assert_eq!(cfg.checkpoint.keep_best_key(), Some("AP50"), "the merged evaluation's key");
    for bad in ["detection.AP51", "classification.AP50", "AP50", "detection."] {
        let err = load(&format!("[job]\nname = \"a\"\n[checkpoint]\nkeep_best = \"{bad}\"\n")).unwrap_err();
        assert!(
            matches!(&err, JobConfigError::Invalid { key, message } if key == "checkpoint.keep_best" && message.contains("segmentation.mIoU")),
            "{bad}: {err}"
        );
    }
}

#[test]
fn the_http_server_keys_are_written_only_when_set_and_checked() {
    let cfg = load("[job]\nname = \"a\"\n").unwrap();
    assert_eq!(cfg.server.http_listen, DEFAULT_HTTP_LISTEN);
    assert!(cfg.server.http_require_token);
    let text = cfg.to_toml();
    assert!(!text.contains("http_"), "defaults are left out of the written config:\n{text}");
    let set =
        load("[job]\nname = \"a\"\n[server]\nhttp_listen = \"\"\nhttp_require_token = false\n").unwrap();
    assert!(set.server.http_listen.is_empty(), "empty turns the server off");
    let back = JobConfig::from_toml(&set.to_toml()).unwrap();
    assert_eq!(back.server, set.server, "set values round-trip");
    let err = load("[job]\nname = \"a\"\n[server]\nhttp_listen = \"localhost\"\n").unwrap_err();
    assert!(matches!(&err, JobConfigError::Invalid { key, .. } if key == "server.http_listen"), "{err}");
    assert!(err.to_string().contains("`localhost`"), "{err}");
}

#[test]
fn the_stop_timeout_is_kept_when_set_and_changes_no_hash() {
    let cfg = load("[job]\nname = \"a\"\n").unwrap();
    assert!(!cfg.to_toml().contains("stop_timeout_ms"), "left out at its default");
    let set = load("[job]\nname = \"a\"\n[server]\nstop_timeout_ms = 5000\n").unwrap();
    assert_eq!(JobConfig::from_toml(&set.to_toml()).unwrap().server.stop_timeout_ms, 5000);
    assert_eq!(cfg.hash(), set.hash());
}

#[test]
fn gpu_kernel_switches_default_to_cudnn_benchmark_on_and_nchw() {
    let cfg = load("[job]\nname = \"a\"\n").unwrap();
    assert!(cfg.train.cudnn_benchmark && !cfg.train.channels_last);
    let cfg = load("[job]\nname = \"a\"\n[train]\ncudnn_benchmark = false\nchannels_last = true\n").unwrap();
    assert!(!cfg.train.cudnn_benchmark && cfg.train.channels_last);
}

#[test]
fn cuda_graphs_are_off_by_default_and_refuse_host_decided_weighting_and_sync_batch_norm() {
    let cfg = load("[job]\nname = \"a\"\n").unwrap();
    assert!(!cfg.train.cuda_graphs);
    assert!(!cfg.to_toml().contains("cuda_graphs"), "left out of the written config at its default");
    for strategy in ["fixed", "uncertainty"] {
        let text = format!(
            "[job]\nname = \"a\"\n[train]\ncuda_graphs = true\n[weighting]\nstrategy = \"{strategy}\"\n"
        );
        assert!(load(&text).unwrap().train.cuda_graphs, "{strategy}");
    }
    for strategy in ["dwa", "gradnorm", "pcgrad"] {
        let text = format!(
            "[job]\nname = \"a\"\n[train]\ncuda_graphs = true\n[weighting]\nstrategy = \"{strategy}\"\n"
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("train.cuda_graphs") && err.contains(&format!("got {strategy}")), "{err}");
    }
    let err = load("[job]\nname = \"a\"\n[train]\ncuda_graphs = true\n[model]\nnorm = \"sync_batch\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.cuda_graphs") && err.contains("sync_batch"), "{err}");
}

#[test]
fn gradient_overlap_defaults_on_and_is_written_only_when_off() {
    let cfg = load("[job]\nname = \"a\"\n").unwrap();
    assert!(cfg.comm.overlap);
    assert!(!cfg.to_toml().contains("overlap"), "left out at its default");
    let off = load("[job]\nname = \"a\"\n[comm]\noverlap = false\n").unwrap();
    assert!(!JobConfig::from_toml(&off.to_toml()).unwrap().comm.overlap, "kept when off");
    assert_eq!(cfg.hash(), off.hash());
}
