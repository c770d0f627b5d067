#!/usr/bin/env bash
# A/B of `bench.goals` on one machine: this tree ("new") against an earlier commit's ("old"), in separate processes
# that alternate (new, old, new, old, ...), so that both arms see the same card and its drift. Changes of a few per
# cent are inside the spread between two cards; only runs on one machine resolve them.
#
#   bash bench/ab.sh prepare REV                     here: REV's tree into .ab_prev (ignored; without the demo data
#                                                    and the tests, which the bench does not read)
#   bash bench/ab.sh run ROUNDS [bench.goals args]   on the device (carry .whl_bench and .ab_prev): ROUNDS pairs,
#                                                    then each arm's s/edit per method and engine
#   AB_TIMEOUT=S (default 300): seconds each process may take; AB_START_BY=S: start no process after S seconds
#
# Every process writes its raw JSON to $OUT (ab_new1.json, ab_old1.json, ...: a device call brings back 8 files at
# most) and its table, log and run files to /tmp/ab_new1, ...; pass the other bench.goals arguments, e.g.
#   bash bench/ab.sh run 2 --methods ke --engines graph --edits 32 --hypernet-steps 1
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench-out}
WHL=${WHL:-.whl_bench}
PREV=.ab_prev
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

prepare() {
  local rev=$1
  git rev-parse --verify -q "$rev^{commit}" > /dev/null || { echo "ab.sh: $rev is not a commit here" >&2; exit 2; }
  rm -rf "$PREV" && mkdir "$PREV" || exit 3
  git archive "$rev" | tar -x -C "$PREV" || exit 3
  rm -rf "$PREV"/sake_dataset/demo_sources "$PREV"/models "$PREV"/tests "$PREV"/docs
  git rev-parse "$rev" > "$PREV/.ab_rev"
  git check-ignore -q "$PREV" || echo "$PREV/" >> "$(git rev-parse --git-path info/exclude)"
  echo "ab.sh: $(cat "$PREV/.ab_rev") in $PREV ($(du -sh "$PREV" | cut -f1)); carry it with $WHL"
}

run() {
  local rounds=$1; shift
  [[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "ab.sh: ROUNDS must be a positive integer, not '$rounds'" >&2; exit 2; }
  [ -d "$PREV" ] || { echo "ab.sh: no $PREV here: run 'bash bench/ab.sh prepare REV' first and carry it" >&2; exit 2; }
  mkdir -p "$OUT" && rm -f "$OUT"/ab_new*.json "$OUT"/ab_old*.json  # the summary reads this run's alone
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHL"/base/*.whl || exit 3
  local root=$PWD dir arm i work status
  nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null
  local head; head=$(git rev-parse HEAD 2> /dev/null) && { git diff --quiet HEAD || head+=" + uncommitted changes"; }
  echo "new: ${head:-this tree} | old: $(cat "$PREV/.ab_rev" 2> /dev/null || echo '?')"
  for ((i = 1; i <= rounds; i++)); do
    for arm in new old; do
      if [ -n "${AB_START_BY:-}" ] && [ "$SECONDS" -gt "$AB_START_BY" ]; then
        echo "ab.sh: $arm $i not started (${SECONDS} s elapsed, AB_START_BY=$AB_START_BY)"; continue
      fi
      dir=$root; [ $arm = old ] && dir=$root/$PREV
      echo "== $arm $i ($(date -u +%H:%M:%S))"
      work=/tmp/ab_$arm$i
      rm -rf "$work" && mkdir -p "$work"
      (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout "${AB_TIMEOUT:-300}" python3 -m bench.goals \
        --merge-json /dev/null "$@" --out "$work/RESULTS.md" --json "$OUT/ab_$arm$i.json" \
        --workdir "$work") > "$work/log" 2>&1
      status=$?
      echo "   exit $status; $(grep -c 's/edit over' "$work/log") rows"
      [ $status -eq 0 ] || tail -5 "$work/log"
    done
  done
  PYTHONPATH=/tmp/site:$root python3 -m bench.ab_summary "$OUT"
}

case "${1:-}" in
  prepare) [ $# -eq 2 ] || usage; prepare "$2" ;;
  run) [ $# -ge 2 ] || usage; shift; run "$@" ;;
  *) usage ;;
esac
