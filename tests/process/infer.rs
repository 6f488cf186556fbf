//! The inference batch job end to end through the coordinator: `dagfleet up --run` with an
//! infer → judge spec, a real model (SmolLM2-135M from PyPI, on CPU), prompts uploaded with
//! the run, generations judged.

#![allow(clippy::unwrap_used)]

use dagfleet_tests::*;

#[test]
fn an_infer_then_judge_run_goes_through_the_coordinator() {
    set_dagfleet_bin(env!("CARGO_BIN_EXE_dagfleet"));
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let sys =
        "You are an expert Apache Airflow engineer. Write complete, correct Airflow DAG files.";
    let rows: Vec<String> = [
        "Write an Airflow DAG that runs a bash command every day.",
        "Write an Airflow DAG with two Python tasks, one after the other.",
        "Write an Airflow DAG that prints hello.",
    ]
    .iter()
    .enumerate()
    .map(|(i, p)| {
        serde_json::json!({"id": format!("p{i}"), "messages": [
            {"role": "system", "content": sys}, {"role": "user", "content": p}]})
        .to_string()
    })
    .collect();
    std::fs::write(&prompts, rows.join("\n") + "\n").unwrap();
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"infer-judge\"\nstages = [\"infer\", \"judge\"]\n[models.base]\nprovider = \"file\"\nmodel = \"{}\"\n[infer]\nprompts = \"{}\"\nmax_tokens = 48\nbatch_rows = 2\n",
            smollm2().display(),
            prompts.display()
        ),
    )
    .unwrap();
    let (_, _, run) = up_run(dir.path(), &spec);
    let artifacts = dir.path().join(".dagfleet/artifacts");
    assert!(
        run.join("inputs/prompts.jsonl").exists(),
        "the prompts travelled with the run"
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap();
    let jobs = m["jobs"].as_array().unwrap();
    let infer: Vec<_> = jobs.iter().filter(|j| j["stage"] == "infer").collect();
    assert_eq!(infer.len(), 2, "3 prompts in batches of 2");
    let mut generated = Vec::new();
    for j in &infer {
        let key = j["outputs"][0]["key"].as_str().unwrap();
        assert!(key.ends_with("generations.jsonl"));
        for l in std::fs::read_to_string(artifacts.join(key))
            .unwrap()
            .lines()
        {
            generated.push(serde_json::from_str::<serde_json::Value>(l).unwrap());
        }
    }
    assert_eq!(generated.len(), 3);
    for g in &generated {
        assert_eq!(g["system_prompt"], sys);
        assert!(g["output"].as_str().unwrap().len() > 10, "{g}");
        assert!(["stop", "length"].contains(&g["finish_reason"].as_str().unwrap()));
        assert!(g["ttft_ms"].as_f64().unwrap() > 0.0);
        assert!(g["generated_tokens"].as_u64().unwrap() > 0);
    }
    let judged: f64 = jobs
        .iter()
        .filter(|j| j["stage"] == "judge")
        .map(|j| j["metrics"]["rows"].as_f64().unwrap())
        .sum();
    assert_eq!(judged, 3.0, "every generation was judged");
}
