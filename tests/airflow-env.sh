#!/usr/bin/env bash
# Installs Apache Airflow environments for the judge's DagBag backend: one virtualenv per
# Airflow MAJOR.MINOR under $DAGFLEET_AIRFLOW_ENVS (default ~/.cache/dagfleet-airflow), where
# judge workers and `dagfleet judge --dagbag` find them.
#
#   bash tests/airflow-env.sh                  # Airflow 2.10.5 with its default providers
#   bash tests/airflow-env.sh --providers eval 2.10
#                                              # + the 32 providers DAGs most often use
#                                              #   (Amazon, Google, Azure, Snowflake, ...)
#
# Versions are pinned by tests/airflow/constraints-<MAJOR.MINOR>[-eval].txt (a `pip freeze`
# of a working install: Airflow's own constraint files live on GitHub, which is not always
# reachable); without such a file pip resolves afresh. An environment that already imports its pinned Airflow is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${DAGFLEET_AIRFLOW_ENVS:-$HOME/.cache/dagfleet-airflow}"
PY="${PYTHON:-python3}"
PROFILE=core
VERSIONS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --providers) PROFILE="${2:?--providers core|eval}"; shift 2 ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    *) VERSIONS+=("$1"); shift ;;
  esac
done
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(2.10)

# Provider releases of early 2025, the last to support Airflow 2.10.
EVAL_PROVIDERS_2_10=(
  google==12.0.0 amazon==9.2.0 microsoft-azure==11.1.0 snowflake==6.0.0 databricks==7.0.0
  cncf-kubernetes==10.1.0 docker==4.0.0 postgres==6.0.0 ssh==4.0.0 sftp==5.0.0 slack==9.0.0
  dbt-cloud==4.0.0 mongo==5.0.0 redis==4.0.0 elasticsearch==6.0.0 celery==3.10.0
  apache-kafka==1.7.0 trino==6.0.0 oracle==4.0.0 microsoft-mssql==4.0.0 airbyte==5.0.0
  datadog==3.8.0 github==2.8.0 sendgrid==4.0.0 salesforce==5.9.0 opsgenie==5.7.0
  pagerduty==4.0.0 tableau==5.0.0 papermill==3.9.0 jenkins==4.0.0 asana==2.8.0 telegram==4.7.0
)

for v in "${VERSIONS[@]}"; do
  case "$v" in
    2.10) AIRFLOW=2.10.5; EVAL=("${EVAL_PROVIDERS_2_10[@]}") ;;
    *) echo "tests/airflow-env.sh knows Airflow 2.10 only, not $v" >&2; exit 1 ;;
  esac
  ENV="$ROOT/$v"
  # The core install is pinned by a freeze of it; the eval set by a freeze of its own
  # (its Google, Azure and Snowflake libraries need other protobuf and grpc versions).
  CONSTRAINTS="tests/airflow/constraints-$v.txt"
  [ "$PROFILE" = eval ] && CONSTRAINTS="tests/airflow/constraints-$v-eval.txt"
  pkgs=("apache-airflow==$AIRFLOW")
  if [ "$PROFILE" = eval ]; then
    for p in "${EVAL[@]}"; do pkgs+=("apache-airflow-providers-$p"); done
  fi
  want=$(printf '%s\n' "${pkgs[@]}" | sort | sha256sum | cut -c1-16)
  have=$(cat "$ENV/.dagfleet-packages" 2>/dev/null || true)
  # The eval set includes the core one: an eval environment serves core users as it is.
  if [ -x "$ENV/bin/python" ] && { [ "$have" = "$want" ] || { [ "$PROFILE" = core ] && [ -n "$have" ]; }; } \
    && "$ENV/bin/python" -c "import airflow,sys; sys.exit(airflow.__version__ != '$AIRFLOW')" 2>/dev/null; then
    echo "== Airflow $AIRFLOW ($PROFILE) is ready in $ENV"
    continue
  fi
  echo "== installing Airflow $AIRFLOW ($PROFILE providers) in $ENV"
  mkdir -p "$ROOT"
  [ -x "$ENV/bin/python" ] || "$PY" -m venv "$ENV"
  args=(--disable-pip-version-check --progress-bar off)
  [ -f "$CONSTRAINTS" ] && args+=(-c "$CONSTRAINTS")
  "$ENV/bin/pip" install "${args[@]}" "${pkgs[@]}"
  "$ENV/bin/python" -c "import airflow; assert airflow.__version__ == '$AIRFLOW', airflow.__version__"
  echo "$want" > "$ENV/.dagfleet-packages"
done
