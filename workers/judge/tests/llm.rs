//! The LLM judge against the loopback teacher server (OpenAI protocol): rubric scores
//! grounded and ungrounded with the correctness cap, and pairwise comparisons that count a
//! win only when both orders agree.

#![allow(clippy::unwrap_used)]

use dagfleet_judge::llm::{LlmJudge, LlmSettings};
use dagfleet_judge::{judge_row, GenRow};
use dagfleet_providers::{Provider, ProviderConfig, ProviderKind};

const GOOD: &str = "```python\nfrom datetime import datetime\nfrom airflow import DAG\nfrom airflow.operators.bash import BashOperator\nwith DAG('d', start_date=datetime(2024, 1, 1), schedule=None) as dag:\n    BashOperator(task_id='t', bash_command='echo hi')\n```";
const BROKEN: &str = "```python\nfrom airflow import DAG\nfrom airflow.operators.magic import MagicOperator\nwith DAG('d') as dag:\n    MagicOperator(task_id='t')\n```";

fn row(id: &str, model: &str, output: &str) -> dagfleet_judge::EvalRow {
    judge_row(
        &GenRow {
            id: id.into(),
            model: model.into(),
            instruction: "A DAG d with one bash task.".into(),
            output: output.into(),
            finish_reason: Some("stop".into()),
            ..Default::default()
        },
        &dagfleet_analysis::Options::default(),
    )
}

#[tokio::test]
async fn rubric_scores_are_capped_when_grounded_and_pairs_need_both_orders() {
    let teacher = dagfleet_tests::teacher::Teacher::start().await;
    let provider = Provider::new(
        "local",
        ProviderConfig::new(ProviderKind::Openai, Some(format!("{}/v1", teacher.url))),
    )
    .unwrap();
    let judge = LlmJudge {
        provider,
        settings: LlmSettings {
            model: "tm".into(),
            cap: 2.0,
            max_tokens: 256,
        },
        cache: None,
    };
    let mut broken = row("p1", "base", BROKEN);
    assert!(!broken.verdict.valid);
    let t = judge.score(&mut broken).await.unwrap();
    assert_eq!(t.requests, 2);
    let s = broken.llm_scores.clone().unwrap();
    assert_eq!(s["ungrounded_correctness"], 5.0);
    assert_eq!(s["correctness"], 2.0, "capped: {s:?}");
    let mut good = row("p1", "tuned", GOOD);
    assert!(good.verdict.valid);
    judge.score(&mut good).await.unwrap();
    assert_eq!(good.llm_scores.unwrap()["correctness"], 5.0);

    // The good DAG wins in both orders; two equal DAGs get "A" both times, which is no win.
    let (p, t) = judge
        .compare(
            &[row("p1", "tuned", GOOD), row("p2", "tuned", GOOD)],
            &[row("p1", "base", BROKEN), row("p2", "base", GOOD)],
            10,
        )
        .await
        .unwrap();
    assert_eq!(t.requests, 4);
    assert_eq!(
        (p.pairs, p.first_wins, p.second_wins, p.neither),
        (2, 1, 0, 1),
        "{p:?}"
    );
    assert!(p.first_mean_chars > 0.0 && p.second_mean_chars > 0.0);
    let (p, _) = judge
        .compare(
            &[row("p1", "base", BROKEN)],
            &[row("p1", "tuned", GOOD)],
            10,
        )
        .await
        .unwrap();
    assert_eq!((p.first_wins, p.second_wins), (0, 1));
}
