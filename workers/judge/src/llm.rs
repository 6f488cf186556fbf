//! The LLM judge: a rubric (correctness, completeness, best practices, and whether the DAG
//! does what the instruction asked), each 1-5 with a reason, asked of any provider (an API
//! model, an OpenAI-compatible server, `dagfleet serve`).
//!
//! Each row is scored twice. Ungrounded: the judge sees only the instruction and the code,
//! as the original project's judge did (it rated a fine-tune 4x more "idiomatic" although its
//! DAGs loaded 5x less often). Grounded: the prompt also carries what the static judge and
//! Airflow's DagBag found, and a DAG that does not load cannot score above
//! [`LlmSettings::cap`] on correctness, whatever the judge says. Both sets go into the row
//! (`llm_scores`: `correctness`, ... and `ungrounded_correctness`, ...), with the answer's
//! length beside them, so the report can show the two side by side. Replies are cached in the
//! store like the synthesizer's, and their tokens and cost are counted.

use dagfleet_providers::{ChatRequest, Provider, ResponseCache, Usage};
use serde_json::Value;
use std::collections::BTreeMap;

use crate::dagbag::DagbagVerdict;
use crate::{EvalRow, Verdict};

/// The rubric's criteria, in the order the prompt lists them.
pub const CRITERIA: [&str; 4] = [
    "correctness",
    "completeness",
    "best_practices",
    "instruction",
];

/// The prefix of the ungrounded scores in `llm_scores`.
pub const UNGROUNDED: &str = "ungrounded_";

/// How the LLM judge scores.
#[derive(Clone, Debug)]
pub struct LlmSettings {
    /// The model name sent to the provider.
    pub model: String,
    /// Highest grounded correctness of a DAG that does not load.
    pub cap: f64,
    /// Token limit of one reply.
    pub max_tokens: u32,
}

/// What one row's scoring cost.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Tally {
    /// Replies asked of the provider.
    pub requests: u64,
    /// Replies found in the cache.
    pub cached: u64,
    /// Replies with no readable scores.
    pub unreadable: u64,
    /// Tokens of the replies asked.
    pub usage: Usage,
    /// Their cost, where the provider has a price for the model.
    pub cost_usd: f64,
}

impl Tally {
    /// Adds `o` to this tally.
    pub fn add(&mut self, o: &Tally) {
        self.requests += o.requests;
        self.cached += o.cached;
        self.unreadable += o.unreadable;
        self.usage.input_tokens += o.usage.input_tokens;
        self.usage.output_tokens += o.usage.output_tokens;
        self.cost_usd += o.cost_usd;
    }
}

/// Why the LLM judge could not score.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmError {
    /// What went wrong.
    pub message: String,
    /// The provider refused the request (a 4xx other than 429: a model it does not serve,
    /// a bad key): asking again will not help.
    pub refused: bool,
}

impl std::fmt::Display for LlmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<dagfleet_runtime::StoreError> for LlmError {
    fn from(e: dagfleet_runtime::StoreError) -> Self {
        Self {
            message: e.to_string(),
            refused: false,
        }
    }
}

const SYSTEM: &str = "You are a senior Apache Airflow reviewer. You grade DAG files strictly and answer only with JSON.";

/// The findings the grounded prompt carries: the static judge's errors and DagBag's verdict.
pub fn grounding(verdict: &Verdict, dagbag: Option<&DagbagVerdict>) -> String {
    let mut s = String::new();
    let errors: Vec<_> = verdict
        .findings
        .iter()
        .filter(|f| f.severity == dagfleet_analysis::Severity::Error)
        .collect();
    if errors.is_empty() {
        s.push_str("- the static checker found no errors\n");
    }
    for f in errors.iter().take(12) {
        s.push_str(&format!(
            "- static checker, line {}: {:?}: {}\n",
            f.line, f.category, f.message
        ));
    }
    match dagbag {
        Some(d) if d.clean => s.push_str(&format!(
            "- Airflow {} loaded the file: DAGs {:?}, {} tasks\n",
            d.airflow, d.dag_ids, d.tasks
        )),
        Some(d) => {
            let msg: String = d
                .error
                .as_deref()
                .unwrap_or("no DAG defined")
                .chars()
                .take(400)
                .collect();
            s.push_str(&format!(
                "- Airflow {} could NOT load the file: {}: {msg}\n",
                d.airflow,
                d.error_class.as_deref().unwrap_or("error")
            ));
        }
        None => {}
    }
    s
}

/// Whether the file loads: DagBag's verdict where it ran, else the static judge's.
pub fn loads(verdict: &Verdict, dagbag: Option<&DagbagVerdict>) -> bool {
    dagbag.map_or(verdict.valid, |d| d.clean)
}

/// The rubric prompt, with the findings when `findings` is given.
pub fn prompt(instruction: &str, code: &str, findings: Option<&str>) -> String {
    let mut p = format!(
        "Grade this Airflow DAG file written for the instruction below.\n\nInstruction:\n{instruction}\n\nDAG file:\n```python\n{code}\n```\n"
    );
    if let Some(f) = findings {
        p.push_str(&format!(
            "\nWhat automated checks found (trust them: they ran the code's imports and Airflow itself):\n{f}"
        ));
    }
    p.push_str(
        "\nScore each criterion from 1 (bad) to 5 (excellent) with a one-sentence reason:\n\
         - correctness: would the file load in Airflow and run as written\n\
         - completeness: does it cover every step the instruction asks for\n\
         - best_practices: idiomatic operators, dependencies, scheduling, retries, no top-level work\n\
         - instruction: does it do what the instruction asked\n\
         Answer with JSON only, e.g. {\"correctness\": {\"score\": 3, \"reason\": \"...\"}, \"completeness\": {...}, \"best_practices\": {...}, \"instruction\": {...}}",
    );
    p
}

/// The scores of a reply: the first JSON object in it with a 1-5 score for every
/// criterion (as `{"score": n}` or a bare number). `None` when it has no such object.
pub fn parse_scores(text: &str) -> Option<BTreeMap<String, f64>> {
    let mut from = 0;
    while let Some(i) = text[from..].find('{').map(|i| i + from) {
        let mut stream = serde_json::Deserializer::from_str(&text[i..]).into_iter::<Value>();
        if let Some(Ok(v)) = stream.next() {
            let mut out = BTreeMap::new();
            for c in CRITERIA {
                let s = match &v[c] {
                    Value::Number(n) => n.as_f64(),
                    o => o["score"].as_f64(),
                };
                if let Some(s) = s.filter(|s| (1.0..=5.0).contains(s)) {
                    out.insert(c.to_string(), s);
                }
            }
            if out.len() == CRITERIA.len() {
                return Some(out);
            }
        }
        from = i + 1;
    }
    None
}

/// An LLM judge over `provider`.
pub struct LlmJudge {
    /// The provider.
    pub provider: Provider,
    /// How it scores.
    pub settings: LlmSettings,
    /// Replies already asked, in the store.
    pub cache: Option<ResponseCache>,
}

/// The pairwise prompt: which of two DAGs for one instruction is better, with each one's
/// findings.
pub fn pairwise_prompt(instruction: &str, a: &EvalRow, b: &EvalRow) -> String {
    format!(
        "Two Airflow DAG files were written for the same instruction. Decide which one better does what the instruction asks and would load and run in Airflow.\n\nInstruction:\n{instruction}\n\nDAG A:\n```python\n{}\n```\nWhat automated checks found in A:\n{}\nDAG B:\n```python\n{}\n```\nWhat automated checks found in B:\n{}\nAnswer with JSON only: {{\"winner\": \"A\" or \"B\" or \"tie\", \"reason\": \"...\"}}",
        a.code,
        grounding(&a.verdict, a.dagbag.as_ref()),
        b.code,
        grounding(&b.verdict, b.dagbag.as_ref()),
    )
}

/// The winner a pairwise reply names: `Some('A')`, `Some('B')`, `Some('=')` for a tie.
pub fn parse_winner(text: &str) -> Option<char> {
    let mut from = 0;
    while let Some(i) = text[from..].find('{').map(|i| i + from) {
        let mut stream = serde_json::Deserializer::from_str(&text[i..]).into_iter::<Value>();
        if let Some(Ok(v)) = stream.next() {
            match v["winner"].as_str().map(|w| w.trim().to_ascii_uppercase()) {
                Some(w) if w == "A" => return Some('A'),
                Some(w) if w == "B" => return Some('B'),
                Some(w) if w == "TIE" => return Some('='),
                _ => {}
            }
        }
        from = i + 1;
    }
    None
}

/// One pair judged in both orders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pairwise {
    /// The first row won in both orders.
    First,
    /// The second row won in both orders.
    Second,
    /// A tie, or the orders disagreed (position bias), or a reply was unreadable.
    Neither,
}

/// Pairwise results of one model against another over the instructions both answered.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairwiseSummary {
    /// Pairs compared.
    pub pairs: usize,
    /// Pairs the first model won in both orders.
    pub first_wins: usize,
    /// Pairs the second model won in both orders.
    pub second_wins: usize,
    /// Ties, order-dependent answers and unreadable replies.
    pub neither: usize,
    /// Mean code length of the first model's answers in those pairs, characters.
    pub first_mean_chars: f64,
    /// The same for the second model.
    pub second_mean_chars: f64,
}

impl LlmJudge {
    /// Compares `first`'s rows with `second`'s of the same id (at most `limit` pairs, 16 at
    /// a time), each pair in both orders.
    pub async fn compare(
        &self,
        first: &[EvalRow],
        second: &[EvalRow],
        limit: usize,
    ) -> Result<(PairwiseSummary, Tally), LlmError> {
        use futures::StreamExt;
        let by_id: BTreeMap<&str, &EvalRow> =
            second.iter().map(|r| (r.row.id.as_str(), r)).collect();
        let pairs: Vec<(EvalRow, EvalRow)> = first
            .iter()
            .filter_map(|a| {
                by_id
                    .get(a.row.id.as_str())
                    .map(|b| (a.clone(), (*b).clone()))
            })
            .take(limit)
            .collect();
        let mut s = PairwiseSummary {
            pairs: pairs.len(),
            ..Default::default()
        };
        let mut tally = Tally::default();
        let mut results = futures::stream::iter(pairs.into_iter().map(|(a, b)| async move {
            let mut t = Tally::default();
            let r = self.pairwise(&a, &b, &mut t).await;
            (r, t, a.code.chars().count(), b.code.chars().count())
        }))
        .buffer_unordered(16);
        while let Some((r, t, la, lb)) = results.next().await {
            tally.add(&t);
            match r? {
                Pairwise::First => s.first_wins += 1,
                Pairwise::Second => s.second_wins += 1,
                Pairwise::Neither => s.neither += 1,
            }
            s.first_mean_chars += la as f64;
            s.second_mean_chars += lb as f64;
        }
        if s.pairs > 0 {
            s.first_mean_chars /= s.pairs as f64;
            s.second_mean_chars /= s.pairs as f64;
        }
        Ok((s, tally))
    }

    /// Compares `first` and `second` (rows for the same instruction) twice, as A/B and as
    /// B/A; a win counts only when both orders agree.
    pub async fn pairwise(
        &self,
        first: &EvalRow,
        second: &EvalRow,
        tally: &mut Tally,
    ) -> Result<Pairwise, LlmError> {
        let instruction = &first.row.instruction;
        let id = &first.row.id;
        let ab = self
            .ask_text(
                &format!("{id}-ab"),
                pairwise_prompt(instruction, first, second),
                tally,
            )
            .await?;
        let ba = self
            .ask_text(
                &format!("{id}-ba"),
                pairwise_prompt(instruction, second, first),
                tally,
            )
            .await?;
        Ok(match (parse_winner(&ab), parse_winner(&ba)) {
            (Some('A'), Some('B')) => Pairwise::First,
            (Some('B'), Some('A')) => Pairwise::Second,
            (a, b) => {
                if a.is_none() || b.is_none() {
                    tally.unreadable += 1;
                }
                Pairwise::Neither
            }
        })
    }

    async fn ask(
        &self,
        id: &str,
        text: String,
        tally: &mut Tally,
    ) -> Result<Option<BTreeMap<String, f64>>, LlmError> {
        let reply = self.ask_text(id, text, tally).await?;
        let s = parse_scores(&reply);
        if s.is_none() {
            tally.unreadable += 1;
        }
        Ok(s)
    }

    /// The reply's text: from the cache, else from the provider (and then cached).
    async fn ask_text(
        &self,
        id: &str,
        text: String,
        tally: &mut Tally,
    ) -> Result<String, LlmError> {
        let req = ChatRequest {
            custom_id: id.to_string(),
            system: Some(SYSTEM.into()),
            messages: vec![dagfleet_providers::Message {
                role: "user".into(),
                content: text,
            }],
            max_tokens: self.settings.max_tokens,
            temperature: Some(0.0),
        };
        let key = ResponseCache::key(&self.provider, &self.settings.model, &req);
        let cached = match &self.cache {
            Some(c) => c.get(&key).await?,
            None => None,
        };
        let reply = match cached {
            Some(r) => {
                tally.cached += 1;
                r
            }
            None => {
                let r = self
                    .provider
                    .chat(&self.settings.model, &req)
                    .await
                    .map_err(|e| LlmError {
                        refused: matches!(e, dagfleet_providers::ProviderError::Refused { .. }),
                        message: e.to_string(),
                    })?;
                tally.requests += 1;
                tally.usage.input_tokens += r.usage.input_tokens;
                tally.usage.output_tokens += r.usage.output_tokens;
                tally.cost_usd += self
                    .provider
                    .cost(&self.settings.model, r.usage, false)
                    .unwrap_or(0.0);
                if let Some(c) = &self.cache {
                    c.put(&key, &r).await?;
                }
                r
            }
        };
        Ok(reply.text)
    }

    /// Scores `row` ungrounded and grounded; fills `row.llm_scores` (nothing when neither
    /// reply could be read) and returns what it cost. Provider errors are errors.
    pub async fn score(&self, row: &mut EvalRow) -> Result<Tally, LlmError> {
        let mut tally = Tally::default();
        let instruction = row.row.instruction.clone();
        let ungrounded = self
            .ask(
                &format!("{}-u", row.row.id),
                prompt(&instruction, &row.code, None),
                &mut tally,
            )
            .await?;
        let findings = grounding(&row.verdict, row.dagbag.as_ref());
        let grounded = self
            .ask(
                &format!("{}-g", row.row.id),
                prompt(&instruction, &row.code, Some(&findings)),
                &mut tally,
            )
            .await?;
        let mut out = BTreeMap::new();
        if let Some(mut g) = grounded {
            if !loads(&row.verdict, row.dagbag.as_ref()) {
                if let Some(c) = g.get_mut("correctness") {
                    *c = c.min(self.settings.cap);
                }
            }
            out.extend(g);
        }
        if let Some(u) = ungrounded {
            out.extend(u.into_iter().map(|(k, v)| (format!("{UNGROUNDED}{k}"), v)));
        }
        if !out.is_empty() {
            out.insert("length_chars".into(), row.code.chars().count() as f64);
            row.llm_scores = Some(out);
        }
        Ok(tally)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_read_from_json_in_prose_and_out_of_range_ones_refused() {
        let t = "Sure! Here: {\"correctness\": {\"score\": 4, \"reason\": \"ok\"}, \"completeness\": 3, \"best_practices\": {\"score\": 2}, \"instruction\": {\"score\": 5}} done";
        let s = parse_scores(t).unwrap();
        assert_eq!(s["correctness"], 4.0);
        assert_eq!(s["completeness"], 3.0);
        assert_eq!(s.len(), 4);
        assert!(parse_scores(
            "{\"correctness\": 9, \"completeness\": 3, \"best_practices\": 2, \"instruction\": 1}"
        )
        .is_none());
        assert!(parse_scores("no json here").is_none());
        assert!(parse_scores("{\"a\": 1} then {\"correctness\": 1, \"completeness\": 1, \"best_practices\": 1, \"instruction\": 1}").is_some());
    }

    #[test]
    fn the_winner_is_read_from_json() {
        assert_eq!(
            parse_winner("I pick {\"winner\": \"b\", \"reason\": \"x\"}"),
            Some('B')
        );
        assert_eq!(parse_winner("{\"winner\": \"tie\"}"), Some('='));
        assert_eq!(parse_winner("A is better"), None);
    }

    #[test]
    fn the_grounded_prompt_carries_the_findings() {
        let v = crate::judge_source(
            "from airflow.operators.magic import M\n",
            &dagfleet_analysis::Options::default(),
        );
        let d = DagbagVerdict {
            airflow: "2.10.5".into(),
            clean: false,
            error_class: Some("ModuleNotFoundError".into()),
            error: Some("No module named 'airflow.operators.magic'".into()),
            ..Default::default()
        };
        let g = grounding(&v, Some(&d));
        assert!(
            g.contains("airflow.operators.magic") && g.contains("could NOT load"),
            "{g}"
        );
        assert!(!loads(&v, Some(&d)));
        let p = prompt("Do x.", "print(1)", Some(&g));
        assert!(p.contains("could NOT load") && p.contains("Do x."));
        assert!(!prompt("Do x.", "print(1)", None).contains("automated checks"));
    }
}
