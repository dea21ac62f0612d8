//! Property tests: the job loader returns a config or an error, never panics, on arbitrary
//! TOML (what a worker receives from the coordinator) and arbitrary `section.key=value`
//! overrides. `make test` runs a few hundred cases; `PROPTEST_CASES=20000` searches longer.
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use toml::{Table, Value};

use crate::JobConfig;

fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

/// Every key of a job file as a path (`data.augment.hflip_prob`), from the defaults.
fn known_keys() -> Vec<Vec<String>> {
    fn walk(table: &Table, prefix: &[String], out: &mut Vec<Vec<String>>) {
        for (key, value) in table {
            let mut path = prefix.to_vec();
            path.push(key.clone());
            match value {
                Value::Table(inner) => walk(inner, &path, out),
                _ => out.push(path),
            }
        }
    }
    let defaults = JobConfig::from_toml("[job]\nname = \"a\"\n").expect("defaults").to_toml();
    let mut out = Vec::new();
    walk(&defaults.parse::<Table>().expect("TOML"), &[], &mut out);
    out
}

/// Values of every TOML kind, biased to the edges of the ranges `validate()` checks.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        3 => (-3i64..10).prop_map(Value::Integer),
        1 => any::<i64>().prop_map(Value::Integer),
        1 => prop_oneof![Just(u32::MAX as i64), Just(1 << 32), Just(i64::MIN)].prop_map(Value::Integer),
        2 => any::<f64>().prop_map(Value::Float),
        2 => (-1.5f64..2.5).prop_map(Value::Float),
        1 => any::<bool>().prop_map(Value::Boolean),
        2 => proptest::sample::select(&[
            "", "a", "synthetic", "jsonl", "coco", "tiny", "resnet18", "group", "batch", "sync_batch", "sgd",
            "adamw", "dwa", "gradnorm", "pcgrad", "uncertainty", "fixed", "bf16", "fp32", "cosine", "ring",
            "nccl", "cpu", "largest_area", "presence", "easy", "127.0.0.1:0", "..", "/",
        ][..]).prop_map(|s| Value::String(s.to_string())),
        1 => ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| vec(inner, 0..4).prop_map(Value::Array))
}

fn set(table: &mut Table, path: &[String], value: Value) {
    let (last, sections) = path.split_last().expect("a key");
    let mut at = table;
    for section in sections {
        let entry = at.entry(section.clone()).or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        at = entry.as_table_mut().expect("a table");
    }
    at.insert(last.clone(), value);
}

/// A job file: `[job]` with a name, then known keys set to arbitrary values.
fn job_file() -> impl Strategy<Value = String> {
    let keys = known_keys();
    let n = keys.len();
    btree_map(0..n, value(), 0..8).prop_map(move |chosen| {
        let mut table = Table::new();
        set(&mut table, &["job".into(), "name".into()], Value::String("a".into()));
        for (i, value) in chosen {
            set(&mut table, &keys[i], value);
        }
        toml::to_string(&table).expect("a table serialises")
    })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_text_is_a_config_or_an_error(text in prop_oneof![".{0,200}", "(\\[[a-z.]{0,12}\\]\n|[a-z_]{1,10} = [0-9a-z\"\\[\\].-]{0,8}\n){0,8}"]) {
        let _ = JobConfig::from_toml(&text);
    }

    #[test]
    fn known_keys_with_arbitrary_values_load_or_name_an_error(text in job_file()) {
        match JobConfig::from_toml(&text) {
            // What loads round-trips and validates again.
            Ok(cfg) => prop_assert_eq!(JobConfig::from_toml(&cfg.to_toml()).expect("round trip"), cfg),
            Err(err) => prop_assert!(!err.to_string().is_empty()),
        }
    }

    #[test]
    fn arbitrary_overrides_are_a_config_or_an_error(
        overrides in vec(prop_oneof![
            (proptest::sample::select(known_keys()), "[-0-9a-z.\"]{0,10}")
                .prop_map(|(key, value)| format!("{}={value}", key.join("."))),
            ".{0,24}",
        ], 0..4),
    ) {
        let mut all = vec!["job.name=a".to_string()];
        all.extend(overrides);
        let _ = JobConfig::load(None, &all, Vec::new());
    }
}
