//! Spec fuzzing: specs with extreme, negative, overflowing, unicode and missing values for
//! every field. Each one is either refused with a message that names what is wrong, or its
//! stages plan within a fixed memory bound, with no more jobs than the limit in force.
//!
//! The specs are decoded the way a coordinator reads them from the run-state bucket (serde
//! only, no client-side validation), then checked as the coordinator checks them before
//! planning (`validate` and `check_caps`). The client's `check_spec` is run on the text too.
//! Memory is measured by a counting allocator around the planning and the paging of every
//! stage.

#![allow(clippy::unwrap_used)]

use dagfleet_coordinator::plan::{plan_stage, FleetHints};
use dagfleet_protocol::{Caps, RunId, RunSpec, RunState, Stage};
use dagfleet_runtime::{ArtifactStore, StoreConfig};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use toml::Value;

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[allow(unsafe_code)] // a global allocator is an unsafe trait; this one only counts bytes
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Memory planning may take above what was in use when it started.
const PLAN_MEMORY_BOUND: usize = 64 << 20;

/// Specs the mutations start from: one per kind of pipeline.
const BASES: &[&str] = &[
    "name = \"noop\"\nstages = [\"noop\"]\n[noop]\njobs = 10",
    "name = \"mine\"\nstages = [\"mine\", \"judge\"]\n[[sources]]\nkind = \"pypi\"\npackage = \"apache-airflow\"\nversions = [\"2.10.5\"]",
    "name = \"infer\"\nstages = [\"infer\", \"judge\", \"report\"]\n[models.base]\nprovider = \"local\"\nmodel = \"m.gguf\"\n[infer]\nprompts = \"store:runs/x/inputs/prompts.jsonl\"",
    "name = \"train\"\nstages = [\"train\", \"infer\"]\n[models.base]\nprovider = \"local\"\nmodel = \"m\"\n[train]\ndataset = \"store:runs/x/inputs/train.jsonl\"\n[infer]\nprompts = \"store:runs/x/inputs/prompts.jsonl\"",
    "name = \"synth\"\nstages = [\"mine\", \"synthesize\", \"dataset\"]\n[[sources]]\nkind = \"dir\"\npath = \"dags\"\n[models.teacher]\nprovider = \"anthropic\"\nmodel = \"claude\"",
];

/// Every field of a spec, with the shape of its value.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Int,
    Float,
    Str,
    Dur,
    StrList,
    IntList,
    Bool,
    Stages,
    Sources,
    Model,
}

const FIELDS: &[(&str, Kind)] = &[
    ("name", Kind::Str),
    ("stages", Kind::Stages),
    ("sources", Kind::Sources),
    ("mine.globs", Kind::StrList),
    ("models.teacher", Kind::Model),
    ("models.base", Kind::Model),
    ("limits.max_jobs_per_stage", Kind::Int),
    ("limits.max_failed_jobs", Kind::Int),
    ("limits.deadline", Kind::Dur),
    ("noop.jobs", Kind::Int),
    ("noop.work_ms", Kind::Int),
    ("noop.output_bytes", Kind::Int),
    ("noop.fail_attempts", Kind::Int),
    ("noop.fatal_jobs", Kind::IntList),
    ("judge.batch_rows", Kind::Int),
    ("judge.airflow_version", Kind::Str),
    ("synthesize.variants", Kind::Int),
    ("synthesize.aspects", Kind::StrList),
    ("synthesize.system", Kind::Str),
    ("synthesize.prompt", Kind::Str),
    ("synthesize.max_tokens", Kind::Int),
    ("synthesize.temperature", Kind::Float),
    ("synthesize.mode", Kind::Str),
    ("synthesize.chunk_rows", Kind::Int),
    ("synthesize.context_tokens", Kind::Int),
    ("synthesize.min_chars", Kind::Int),
    ("synthesize.max_chars", Kind::Int),
    ("synthesize.near_duplicate", Kind::Float),
    ("synthesize.failures_per_dag", Kind::Int),
    ("synthesize.batch_deadline", Kind::Dur),
    ("synthesize.poll_interval", Kind::Dur),
    ("synthesize.max_resubmits", Kind::Int),
    ("dataset.seed", Kind::Int),
    ("dataset.splits", Kind::IntList),
    ("dataset.system_prompt", Kind::Str),
    ("dataset.near_duplicate", Kind::Float),
    ("infer.prompts", Kind::Str),
    ("infer.batch_rows", Kind::Int),
    ("infer.max_tokens", Kind::Int),
    ("infer.temperature", Kind::Float),
    ("infer.seed", Kind::Int),
    ("train.dataset", Kind::Str),
    ("train.valid", Kind::Str),
    ("train.r", Kind::Int),
    ("train.alpha", Kind::Float),
    ("train.dropout", Kind::Float),
    ("train.target_modules", Kind::StrList),
    ("train.lr", Kind::Float),
    ("train.schedule", Kind::Str),
    ("train.warmup_steps", Kind::Int),
    ("train.micro_batch", Kind::Int),
    ("train.grad_accum", Kind::Int),
    ("train.max_seq_len", Kind::Int),
    ("train.epochs", Kind::Int),
    ("train.max_steps", Kind::Int),
    ("train.eval_every", Kind::Int),
    ("train.eval_rows", Kind::Int),
    ("train.checkpoint_every", Kind::Int),
    ("train.keep_checkpoints", Kind::Int),
    ("train.activation_checkpointing", Kind::Bool),
    ("train.loss_chunk", Kind::Int),
    ("train.export", Kind::StrList),
];

fn ints() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(0i64),
        Just(1),
        Just(-1),
        Just(2),
        Just(255),
        Just(100_000),
        Just(100_001),
        Just(4_000_000_000),
        Just(i64::from(u32::MAX)),
        Just(i64::from(u32::MAX) + 1),
        Just(i64::MAX),
        Just(i64::MIN),
        any::<i64>(),
        0i64..1_000,
    ]
    .prop_map(Value::Integer)
    .boxed()
}

fn strings() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just("x".to_string()),
        Just("ДАГ-🚀-名前".to_string()),
        Just("a\u{0}b".to_string()),
        Just("../../../etc/passwd".to_string()),
        Just("store:runs/someone-else/inputs/prompts.jsonl".to_string()),
        Just("store:".to_string()),
        Just("{dag}".to_string()),
        Just("x".repeat(300_000)),
        Just("2.10".to_string()),
        Just("99999999999999999999".to_string()),
        "[a-z{}_. ]{0,40}",
        any::<String>(),
    ]
    .boxed()
}

fn value(kind: Kind) -> BoxedStrategy<Value> {
    let any_scalar = prop_oneof![
        ints(),
        strings().prop_map(Value::String),
        Just(Value::Float(f64::NAN)),
        Just(Value::Float(f64::INFINITY)),
        Just(Value::Float(-1e300)),
        Just(Value::Boolean(true)),
        Just(Value::Array(vec![])),
    ];
    match kind {
        Kind::Int => prop_oneof![4 => ints(), 1 => any_scalar].boxed(),
        Kind::Float => prop_oneof![
            4 => prop_oneof![
                Just(0.0),
                Just(-0.5),
                Just(0.5),
                Just(1.0),
                Just(1e308),
                Just(f64::NAN),
                Just(f64::NEG_INFINITY),
                any::<f64>()
            ]
            .prop_map(Value::Float),
            1 => any_scalar
        ]
        .boxed(),
        Kind::Str | Kind::Bool => {
            prop_oneof![4 => strings().prop_map(Value::String), 1 => any_scalar].boxed()
        }
        Kind::Dur => prop_oneof![
            4 => prop_oneof![
                Just("0s"),
                Just("1ns"),
                Just("1ms"),
                Just("-1s"),
                Just("18446744073709551615s"),
                Just("584942417355y"),
                Just("999999999999999999999y"),
                Just("1000000d"),
                Just("2h"),
                Just("abc"),
                Just(""),
            ]
            .prop_map(|s| Value::String(s.into())),
            1 => any_scalar
        ]
        .boxed(),
        Kind::StrList | Kind::IntList => prop_oneof![
            Just(Value::Array(vec![])),
            prop::collection::vec(strings().prop_map(Value::String), 0..5).prop_map(Value::Array),
            prop::collection::vec(ints(), 0..5).prop_map(Value::Array),
            // A long list: many fatal jobs, globs or aspects.
            (0i64..50_000).prop_map(|n| Value::Array((0..n).map(Value::Integer).collect())),
            Just(Value::Array(vec![
                Value::Float(0.8),
                Value::Float(0.1),
                Value::Float(0.1)
            ])),
            any_scalar,
        ]
        .boxed(),
        Kind::Stages => {
            let stage = prop_oneof![
                Just("noop"),
                Just("mine"),
                Just("synthesize"),
                Just("dataset"),
                Just("train"),
                Just("infer"),
                Just("judge"),
                Just("report"),
                Just("nope"),
            ];
            prop_oneof![
                prop::collection::vec(stage, 0..9).prop_map(|v| Value::Array(
                    v.into_iter().map(|s| Value::String(s.into())).collect()
                )),
                any_scalar,
            ]
            .boxed()
        }
        Kind::Sources => {
            let refs = prop::collection::vec(strings(), 0..4);
            let src = prop_oneof![
                (strings(), refs.clone()).prop_map(|(p, v)| table(&[
                    ("kind", s("pypi")),
                    ("package", s(&p)),
                    ("versions", list(v))
                ])),
                (strings(), refs.clone()).prop_map(|(r, v)| table(&[
                    ("kind", s("github")),
                    ("repo", s(&r)),
                    ("refs", list(v))
                ])),
                (strings(), refs).prop_map(|(p, v)| table(&[
                    ("kind", s("git")),
                    ("path", s(&p)),
                    ("refs", list(v))
                ])),
                strings().prop_map(|p| table(&[("kind", s("dir")), ("path", s(&p))])),
                // Many refs in one source: one job each.
                (0usize..120_000).prop_map(|n| {
                    let v: Vec<String> = (0..n).map(|i| format!("2.{i}")).collect();
                    table(&[
                        ("kind", s("pypi")),
                        ("package", s("apache-airflow")),
                        ("versions", list(v)),
                    ])
                }),
                strings().prop_map(|k| table(&[("kind", s(&k))])),
            ];
            prop_oneof![
                prop::collection::vec(src.prop_map(Value::Table), 0..4).prop_map(Value::Array),
                any_scalar,
            ]
            .boxed()
        }
        Kind::Model => prop_oneof![
            (strings(), strings())
                .prop_map(|(p, m)| Value::Table(table(&[("provider", s(&p)), ("model", s(&m))]))),
            any_scalar,
        ]
        .boxed(),
    }
}

fn s(v: &str) -> Value {
    Value::String(v.into())
}

fn list(v: Vec<String>) -> Value {
    Value::Array(v.into_iter().map(Value::String).collect())
}

fn table(kv: &[(&str, Value)]) -> toml::Table {
    kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

/// One change: set a field to a value, or remove it.
#[derive(Clone, Debug)]
enum Mutation {
    Set(&'static str, Value),
    Remove(&'static str),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (0..FIELDS.len(), any::<bool>()).prop_flat_map(|(i, remove)| {
        let (key, kind) = FIELDS[i];
        if remove && i % 3 == 0 {
            Just(Mutation::Remove(key)).boxed()
        } else {
            value(kind).prop_map(move |v| Mutation::Set(key, v)).boxed()
        }
    })
}

fn apply(doc: &mut toml::Table, m: &Mutation) {
    let (key, v) = match m {
        Mutation::Set(k, v) => (*k, Some(v.clone())),
        Mutation::Remove(k) => (*k, None),
    };
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap();
    let mut t = doc;
    for p in parts {
        let e = t
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Default::default()));
        if !e.is_table() {
            *e = Value::Table(Default::default());
        }
        t = e.as_table_mut().unwrap();
    }
    match v {
        Some(v) => {
            t.insert(last.to_string(), v);
        }
        None => {
            t.remove(last);
        }
    }
}

/// A refusal must say what is wrong: a key of the spec, the TOML error or the size cap.
fn assert_clear(msg: &str, text: &str) {
    assert!(!msg.trim().is_empty(), "empty error for {text:.300}");
    assert!(
        msg.contains('`') || msg.contains("TOML") || msg.contains("caps."),
        "error does not name what is wrong: {msg:.500}\nspec: {text:.300}"
    );
    assert!(msg.len() < 4_000, "error too long ({} bytes)", msg.len());
}

/// Plans every stage of `state` as a coordinator would, paging through the jobs, and checks
/// the job count and the memory taken.
async fn plan_all(state: &RunState, store: &ArtifactStore, caps: &Caps) {
    let limit = state.spec.max_jobs_per_stage(caps);
    for stage in state.spec.stages.clone() {
        let base = CURRENT.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let hints = FleetHints {
            infer_max_batch: Some(u64::MAX / 4),
            lanes: ["airflow-2_10".to_string()].into(),
        };
        match plan_stage(state, stage, 1, store, &hints, caps).await {
            Ok(mut plan) => {
                assert!(
                    plan.jobs <= limit,
                    "{stage}: {} jobs over {limit}",
                    plan.jobs
                );
                let mut n = 0u64;
                loop {
                    let page = plan.next_page(10_000);
                    if page.is_empty() {
                        break;
                    }
                    n += page.len() as u64;
                }
                assert_eq!(n, u64::from(plan.jobs), "{stage}: count and jobs differ");
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        let took = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        assert!(
            took < PLAN_MEMORY_BOUND,
            "planning {stage} took {took} bytes of memory"
        );
        // Later stages read the outputs of earlier ones, which do not exist here: the first
        // stage is the one a spec controls fully.
        if stage != Stage::Noop {
            break;
        }
    }
}

fn store() -> ArtifactStore {
    let store = ArtifactStore::open(&StoreConfig {
        url: "memory://".into(),
        ..Default::default()
    })
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let rows: String = (0..500).map(|i| format!("{{\"id\": \"{i}\"}}\n")).collect();
        for k in ["prompts.jsonl", "train.jsonl"] {
            store
                .put_overwrite(&format!("runs/x/inputs/{k}"), rows.clone().into())
                .await
                .unwrap();
        }
    });
    store
}

/// What the fuzzed specs came to, so the test proves it reached planning, not only parsing.
#[derive(Debug, Default)]
struct Tally {
    unparsable: u32,
    refused: u32,
    planned: u32,
}

fn one_case(base: usize, muts: &[Mutation], tally: &mut Tally) {
    let mut doc: toml::Table = toml::from_str(BASES[base]).unwrap();
    for m in muts {
        apply(&mut doc, m);
    }
    let text = toml::to_string(&doc).unwrap_or_default();
    let caps = Caps::default();
    // The client's check.
    if let Err(e) = dagfleet_coordinator::check_spec(&text, &caps) {
        assert_clear(&e.to_string(), &text);
    }
    // The coordinator's: the spec as stored in KV, decoded without validation.
    let spec: RunSpec = match toml::from_str(&text) {
        Ok(s) => s,
        Err(_) => {
            tally.unparsable += 1;
            return;
        }
    };
    if let Err(e) = spec.validate().and_then(|()| spec.check_caps(&caps)) {
        assert_clear(&e.to_string(), &text);
        tally.refused += 1;
        return;
    }
    tally.planned += 1;
    let state = RunState::new(RunId::new("x").unwrap(), spec, 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(plan_all(&state, &STORE.with(|s| s.clone()), &caps));
}

#[test]
fn every_spec_is_refused_clearly_or_plans_in_bounded_memory() {
    use proptest::test_runner::{Config, TestRunner};
    // Found by this test: a source listing 90k versions was copied whole into each of its
    // 90k shards (about 24 GB before the OOM killer). Each shard now carries its own ref.
    let versions: Vec<String> = (0..90_000).map(|i| format!("2.{i}")).collect();
    let mut spec: RunSpec = toml::from_str(BASES[1]).unwrap();
    spec.sources = vec![dagfleet_protocol::jobs::Source::Pypi {
        package: "apache-airflow".into(),
        versions,
        index_url: None,
    }];
    let state = RunState::new(RunId::new("many-refs").unwrap(), spec, 0);
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(plan_all(
            &state,
            &STORE.with(|s| s.clone()),
            &Caps::default(),
        ));

    let mut runner = TestRunner::new(Config {
        cases: 600,
        failure_persistence: None,
        ..Config::default()
    });
    let tally = std::cell::RefCell::new(Tally::default());
    let strategy = (0..BASES.len(), prop::collection::vec(mutation(), 1..5));
    runner
        .run(&strategy, |(base, muts)| {
            one_case(base, &muts, &mut tally.borrow_mut());
            Ok(())
        })
        .unwrap();
    let t = tally.into_inner();
    eprintln!("{t:?}");
    // Each outcome is reached often enough to mean something.
    assert!(
        t.planned >= 50 && t.refused >= 20 && t.unparsable >= 50,
        "{t:?}"
    );
}

thread_local! {
    static STORE: ArtifactStore = store();
}

/// The spec that took the fleet down, decoded as a coordinator reads it from KV.
#[test]
fn the_reported_poison_spec_is_refused_by_the_coordinators_check() {
    let text = "name = \"poison\"\nstages = [\"noop\"]\n[noop]\njobs = 4000000000\n[limits]\nmax_jobs_per_stage = 4294967295";
    let spec: RunSpec = toml::from_str(text).unwrap();
    spec.validate().unwrap();
    let e = spec.check_caps(&Caps::default()).unwrap_err().to_string();
    assert!(
        e.contains("limits.max_jobs_per_stage") && e.contains("4294967295"),
        "{e}"
    );
    // Even planned without the check, the count is refused before any job exists.
    let state = RunState::new(RunId::new("poison").unwrap(), spec, 0);
    let e = dagfleet_coordinator::plan::plan(&state, Stage::Noop, 0, &Caps::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("4000000000") && e.contains("100000"), "{e}");
}
